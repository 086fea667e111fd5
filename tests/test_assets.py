"""`GET|HEAD /assets/{dataset}/{path}` pass-through, against a real upstream and a real proxy."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import httpx
import pytest

B04 = "demo-cogs/scene-a/B04.tif"
VISUAL = "demo-cogs/scene-a/visual.tif"


def assert_problem(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status
    assert body["type"].startswith("https://")
    assert body["title"] and body["detail"]
    return body


def test_http_get_streams_exact_bytes_and_keeps_the_users_token(client, upstream):
    r = client.get("/assets/files/scene-a/B04.tif", headers={"Authorization": "Bearer secret-t"})
    assert r.status_code == 200
    assert r.content == upstream.file(B04)
    assert int(r.headers["content-length"]) == len(r.content)
    assert r.headers["accept-ranges"] == "bytes"
    assert "etag" in r.headers and "last-modified" in r.headers
    seen = upstream.data_requests()
    assert [(e["method"], e["path"]) for e in seen] == [("GET", "/data/" + B04)]
    assert seen[0]["authorization"] is False


@pytest.mark.parametrize(
    ("header", "start", "stop"),
    [("bytes=0-16383", 0, 16384), ("bytes=1000-", 1000, None), ("bytes=-500", -500, None)],
)
def test_http_range_gives_206(client, upstream, header, start, stop):
    data = upstream.file(B04)
    r = client.get("/assets/files/scene-a/B04.tif", headers={"Range": header})
    assert r.status_code == 206
    want = data[start:stop]
    assert r.content == want
    first = start % len(data)
    assert r.headers["content-range"] == f"bytes {first}-{first + len(want) - 1}/{len(data)}"
    gets = [e["range"] for e in upstream.data_requests() if e["method"] == "GET"]
    # (a 1-byte probe for the validators, once a while), then the range as decided
    assert gets[-1] == f"bytes={first}-{first + len(want) - 1}"
    assert gets[:-1] in ([], ["bytes=0-0"])


def test_eodag_range_and_get(client, upstream):
    data = upstream.file(VISUAL)
    r = client.get("/assets/scenes/scene-a/visual", headers={"Range": "bytes=16384-32767"})
    assert r.status_code == 206
    assert r.content == data[16384:32768]
    full = client.get("/assets/scenes/scene-a/visual")
    assert full.status_code == 200 and full.content == data


def test_unsatisfiable_range_is_416(client, upstream):
    size = len(upstream.file(B04))
    r = client.get("/assets/files/scene-a/B04.tif", headers={"Range": f"bytes={size + 10}-"})
    assert_problem(r, 416)
    assert r.headers["content-range"] == f"bytes */{size}"


@pytest.mark.parametrize("header", ["bytes=zz", "bytes=5-1", "bytes=", "bytes=1-2-3"])
def test_malformed_range_is_a_400_problem_and_reaches_no_upstream(client, upstream, header):
    body = assert_problem(
        client.get("/assets/files/scene-a/B04.tif", headers={"Range": header}), 400
    )
    assert "Range" in body["detail"]
    assert upstream.data_requests() == []


def test_unknown_range_unit_is_ignored(client, upstream):
    r = client.get("/assets/files/scene-a/B04.tif", headers={"Range": "items=0-5"})
    assert r.status_code == 200 and r.content == upstream.file(B04)


def test_head_http_has_true_length_and_no_body(client, upstream):
    r = client.head("/assets/files/scene-a/visual.tif")
    assert r.status_code == 200
    assert int(r.headers["content-length"]) == len(upstream.file(VISUAL))
    assert r.content == b""
    probe = [(e["method"], e["range"], e["bytes"]) for e in upstream.data_requests()]
    assert probe == [("GET", "bytes=0-0", 1)]  # size as GETs report it: one byte moved


def test_head_eodag_has_catalogue_size_and_the_validators_get_will_have(client, upstream):
    r = client.head("/assets/scenes/scene-b/B04")
    assert r.status_code == 200
    assert int(r.headers["content-length"]) == len(upstream.file("demo-cogs/scene-b/B04.tif"))
    assert r.headers["content-type"].startswith("image/tiff")
    assert [e["range"] for e in upstream.data_requests()] == ["bytes=0-0"]  # one byte moved
    g = client.get("/assets/scenes/scene-b/B04", headers={"Range": "bytes=0-9"})
    assert g.status_code == 206
    for name in ("etag", "last-modified", "content-type"):
        assert g.headers[name] == r.headers[name]
    again = client.head("/assets/scenes/scene-b/B04")
    assert again.headers["etag"] == r.headers["etag"]


def test_eodag_resolution_is_cached_and_sidecar_probes_are_fast_404s(client, upstream):
    assert client.head("/assets/scenes/scene-c/visual").status_code == 200
    searches = len(upstream.log("/search"))
    assert searches == 1
    for probe in ("visual.aux.xml", "visual.msk", "visual.ovr", "nope"):
        assert client.head(f"/assets/scenes/scene-c/{probe}").status_code == 404
        assert_problem(client.get(f"/assets/scenes/scene-c/{probe}"), 404)
    assert (
        client.get("/assets/scenes/scene-c/visual", headers={"Range": "bytes=0-9"}).status_code
        == 206
    )
    assert len(upstream.log("/search")) == searches  # no further search
    ranges = [e["range"] for e in upstream.data_requests()]
    assert ranges == ["bytes=0-0", "bytes=0-3634738"]  # the probe, the block; sidecars: none


@pytest.mark.parametrize(
    ("path", "detail"),
    [
        ("/assets/nope/scene-a/B04.tif", "no dataset"),
        ("/assets/scenes/no-such-item/visual", "no item"),
        ("/assets/scenes/scene-a/no-such-asset", "no asset"),
        ("/assets/scenes/scene-a", "expected"),
        ("/assets/files/scene-a/missing.tif", "404"),
        ("/assets/listed/scene-c/B04.tif", "no object"),
    ],
)
def test_not_found_is_a_problem(client, path, detail):
    for method in ("GET", "HEAD"):
        r = client.request(method, path)
        assert r.status_code == 404
        if method == "GET":
            assert detail in assert_problem(r, 404)["detail"]


def test_listed_dataset_refuses_unlisted_keys_without_asking_upstream(client, upstream):
    assert client.get("/assets/listed/scene-c/B04.tif").status_code == 404
    assert client.get("/assets/listed/scene-a/B04.tif").status_code == 200
    assert [e["path"] for e in upstream.data_requests()] == ["/data/" + B04]


@pytest.mark.parametrize(
    "raw_path",
    [
        "/assets/files/..%2f..%2fetc/passwd",
        "/assets/files/%2e%2e/%2e%2e/etc/passwd",
        "/assets/files/scene-a//B04.tif",
        "/assets/files/scene-a/./B04.tif",
        "/assets/files/scene-a/%00B04.tif",
    ],
)
def test_traversal_attempts_are_refused(proxy, upstream, raw_path):
    parts = urlsplit(proxy.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", raw_path)  # http.client sends the path as is, unnormalised
    r = conn.getresponse()
    body = json.loads(r.read())
    conn.close()
    assert r.status in (400, 404)
    assert body["status"] == r.status
    assert upstream.data_requests() == []


def test_upstream_error_is_a_502_problem(client, upstream):
    upstream.fault(r"scene-b/B04", status=500)
    body = assert_problem(client.get("/assets/files/scene-b/B04.tif"), 502)
    assert "500" in body["detail"]
    assert upstream.url not in json.dumps(body)  # provider URLs stay private


def test_upstream_cut_off_mid_body_is_never_a_complete_response(client, upstream):
    upstream.fault(r"scene-b/visual", cut_after=100_000, times=1)
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("GET", "/assets/files/scene-b/visual.tif") as r,
    ):
        assert r.status_code == 200
        for _ in r.iter_bytes():
            pass
    # the fault was one-shot: the next request gets the whole object
    assert client.get("/assets/files/scene-b/visual.tif").content == upstream.file(
        "demo-cogs/scene-b/visual.tif"
    )


def test_upstream_cut_off_in_a_range_response(client, upstream):
    upstream.fault(r"scene-c/visual", cut_after=10)
    with pytest.raises(httpx.RemoteProtocolError):
        client.get("/assets/files/scene-c/visual.tif", headers={"Range": "bytes=0-65535"})


def test_upstream_down_is_a_502(start_proxy, tmp_path):
    dead = f"http://127.0.0.1:{_closed_port()}"
    p = start_proxy({"datasets": {"d": {"upstream": {"http": {"base_url": dead}}}}})
    r = httpx.get(f"{p.url}/assets/d/x.tif")
    assert_problem(r, 502)
    assert dead not in r.text


def _closed_port() -> int:
    from tests.harness.procs import free_port

    return free_port()


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json()["checks"]["datasets"]["count"] == 3


def test_unknown_route_and_method_are_problems(client):
    assert_problem(client.get("/nothing-here"), 404)
    assert_problem(client.post("/assets/files/scene-a/B04.tif"), 405)


def test_proxy_log_has_no_traceback_and_no_token(proxy, client):
    """Runs after the fault tests above: they are logged as one line each, never a traceback."""
    client.get("/assets/files/scene-a/B04.tif", headers={"Authorization": "Bearer secret-t"})
    log = proxy.proc.log_text()
    assert "upstream answered 500" in log  # the failures above were logged ...
    assert "Traceback" not in log  # ... without a traceback
    assert "secret-t" not in log


def test_client_mistakes_in_ids_and_boxes_are_400s(client, upstream):
    searches = len(upstream.log("/search"))
    assert_problem(client.get('/assets/scenes/sc"ene/visual'), 400)
    assert_problem(client.get('/stac/collections/scenes/items/sc"ene'), 400)
    assert_problem(client.get("/stac/search", params={"ids": 'a"b'}), 400)
    for box in ("nan,0,1,1", "0,0,inf,1", "0,0,1"):
        assert_problem(client.get("/stac/search", params={"bbox": box}), 400)
    assert len(upstream.log("/search")) == searches  # no provider was asked


def test_a_206_shorter_than_its_content_range_is_never_relayed_as_complete(client, upstream):
    upstream.fault(r"scene-a/B04", method="GET", short_by=100)
    r = client.get("/assets/files/scene-a/B04.tif", headers={"Range": "bytes=0-999"})
    assert_problem(r, 502)  # told before any byte was sent
    assert "Content-Range" in r.json()["detail"]
