"""RFC 9110 as clients see it, on a cached and a pass-through dataset of a real proxy."""

from __future__ import annotations

import base64
import email
import hashlib
import http.client
import json
import time
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import NO_CACHE
from tests.test_assets import assert_problem

B04 = "demo-cogs/scene-a/B04.tif"
DATASETS = ("cached", "through")


@pytest.fixture(scope="module")
def hproxy(start_proxy, upstream_server):
    files = {"http": {"base_url": f"{upstream_server.url}/data/demo-cogs/"}}
    return start_proxy(
        {
            "log": {"format": "json"},
            "datasets": {
                "cached": {"upstream": files, "max_age": 600},
                "through": {"upstream": files, "retention": NO_CACHE},
            },
        }
    )


def url(proxy, dataset, path="scene-a/B04.tif"):
    return f"{proxy.url}/assets/{dataset}/{path}"


@pytest.mark.parametrize("dataset", DATASETS)
def test_head_and_get_carry_the_same_validators_before_and_after_caching(hproxy, upstream, dataset):
    first = httpx.head(url(hproxy, dataset, "scene-b/visual.tif"))
    get = httpx.get(url(hproxy, dataset, "scene-b/visual.tif"))
    later = httpx.head(url(hproxy, dataset, "scene-b/visual.tif"))
    assert first.status_code == later.status_code == 200 and get.status_code == 200
    for name in ("etag", "last-modified", "content-length", "cache-control"):
        assert first.headers[name] == get.headers[name] == later.headers[name], name
    assert get.content == upstream.file("demo-cogs/scene-b/visual.tif")


@pytest.mark.parametrize("dataset", DATASETS)
def test_conditional_requests(hproxy, upstream, dataset):
    u = url(hproxy, dataset)
    etag = httpx.head(u).headers["etag"]
    last_modified = httpx.head(u).headers["last-modified"]
    for headers in ({"if-none-match": etag}, {"if-modified-since": last_modified}):
        r = httpx.get(u, headers=headers)
        assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    changed = httpx.get(u, headers={"if-none-match": '"something-else"'})
    assert changed.status_code == 200 and changed.content == upstream.file(B04)
    stale = httpx.get(u, headers={"if-match": '"something-else"'})
    assert stale.status_code == 412
    old = httpx.get(u, headers={"if-unmodified-since": "Thu, 01 Jan 1970 00:00:01 GMT"})
    assert old.status_code == 412
    ok = httpx.get(u, headers={"if-match": etag, "range": "bytes=0-9"})
    assert ok.status_code == 206 and ok.content == upstream.file(B04)[:10]


@pytest.mark.parametrize("dataset", DATASETS)
def test_if_range_honours_only_strong_validators(hproxy, upstream, dataset):
    u = url(hproxy, dataset)
    etag = httpx.head(u).headers["etag"]
    data = upstream.file(B04)
    same = httpx.get(u, headers={"range": "bytes=10-19", "if-range": etag})
    assert same.status_code == 206 and same.content == data[10:20]
    weak = httpx.get(u, headers={"range": "bytes=10-19", "if-range": f"W/{etag}"})
    assert weak.status_code == 200 and weak.content == data
    other = httpx.get(u, headers={"range": "bytes=10-19", "if-range": '"changed"'})
    assert other.status_code == 200 and other.content == data


@pytest.mark.parametrize("dataset", DATASETS)
def test_a_suffix_longer_than_the_object_is_the_whole_object(hproxy, upstream, dataset):
    data = upstream.file(B04)
    r = httpx.get(url(hproxy, dataset), headers={"range": f"bytes=-{len(data) * 2}"})
    assert r.status_code == 206 and r.content == data
    assert r.headers["content-range"] == f"bytes 0-{len(data) - 1}/{len(data)}"


def test_several_ranges_are_one_multipart_answer(hproxy, upstream):
    data = upstream.file(B04)
    wanted = [(100, 199), (0, 9), (len(data) - 5, len(data) - 1)]
    spec = "bytes=" + ",".join(f"{a}-{b}" for a, b in wanted)
    r = httpx.get(url(hproxy, "cached"), headers={"range": spec})
    assert r.status_code == 206
    assert r.headers["content-type"].startswith("multipart/byteranges; boundary=")
    assert int(r.headers["content-length"]) == len(r.content)
    message = email.message_from_bytes(
        b"content-type: " + r.headers["content-type"].encode() + b"\r\n\r\n" + r.content
    )
    parts = [(p["content-range"], p.get_payload(decode=True)) for p in message.get_payload()]
    assert parts == [(f"bytes {a}-{b}/{len(data)}", data[a : b + 1]) for a, b in sorted(wanted)]


def test_public_data_may_be_cached_by_others(hproxy):
    assert httpx.head(url(hproxy, "cached")).headers["cache-control"] == "public, max-age=600"
    r = httpx.get(url(hproxy, "through"), headers={"range": "bytes=0-9"})
    assert r.headers["cache-control"] == "public, max-age=3600"


@pytest.mark.parametrize("dataset", DATASETS)
def test_gdal_directory_probe_is_a_404_that_asks_nobody(hproxy, upstream, dataset):
    for path in ("scene-a/", ""):
        assert_problem(httpx.get(url(hproxy, dataset, path)), 404)
    assert upstream.data_requests() == []


def raw_request(proxy, path, headers):
    """Send headers exactly as given (httpx would merge or refuse some)."""
    parts = urlsplit(proxy.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.putrequest("GET", path)
    for name, value in headers:
        conn.putheader(name, value)
    conn.endheaders()
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, body


@pytest.mark.parametrize(
    "path", ["/assets/cached/scene-a/B04.tif", "/stac", "/stac/search", "/jobs/x", "/admin/x"]
)
def test_two_authorization_headers_are_refused_on_every_route(hproxy, upstream, path):
    status, body = raw_request(
        hproxy, path, [("Authorization", "Bearer a"), ("Authorization", "Bearer b")]
    )
    assert status == 400
    assert json.loads(body)["detail"] == "more than one Authorization header"
    assert upstream.data_requests() == []


def test_client_header_mistakes_are_400s_not_502s(hproxy, upstream):
    for name, value in (("Range", "bytes=0-9\xe9"), ("If-None-Match", '"\xe9"')):
        status, body = raw_request(hproxy, "/assets/through/scene-a/B04.tif", [(name, value)])
        assert status == 400, body
    status, body = raw_request(
        hproxy, "/assets/through/scene-a/B04.tif", [("Range", "bytes=0-9   ")]
    )
    assert status == 206 and body == upstream.file(B04)[:10]
    # (a 1-byte probe for the size comes first unless an earlier test left it memoized)
    ranges = [e["range"] for e in upstream.data_requests() if e["range"] != "bytes=0-0"]
    assert ranges == ["bytes=0-9"]


def test_every_asset_request_is_one_json_access_line_without_tokens(hproxy, upstream):
    httpx.get(
        url(hproxy, "cached"), headers={"range": "bytes=0-9", "authorization": "Bearer s3cr3t"}
    )
    httpx.get(url(hproxy, "through", "nope.tif") + "?X-Amz-Signature=s3cr3t")
    deadline = time.monotonic() + 5
    while "/assets/through/nope.tif" not in hproxy.proc.log_text():  # (written after answering)
        assert time.monotonic() < deadline, "no access line for the last request"
        time.sleep(0.02)
    lines = [
        json.loads(line) for line in hproxy.proc.log_text().splitlines() if "fdp.access" in line
    ]
    mine = [line for line in lines if line.get("dataset") in DATASETS]
    assert mine, "no access lines"
    last_two = mine[-2:]
    assert last_two[0]["status"] == 206 and last_two[0]["plan"] in ("hit", "miss")
    assert last_two[0]["bytes"] == 10
    assert last_two[1]["status"] == 404 and last_two[1]["error"] == "not-found"
    assert "s3cr3t" not in hproxy.proc.log_text()


def test_a_whole_cached_object_carries_its_sha256_as_repr_digest(hproxy, upstream):
    data = upstream.file("demo-cogs/scene-c/B04.tif")
    target = url(hproxy, "cached", "scene-c/B04.tif")
    assert "repr-digest" not in httpx.get(target, headers={"Range": "bytes=0-9"}).headers
    assert httpx.get(target).content == data  # now whole, and hashed
    expected = "sha-256=:" + base64.b64encode(hashlib.sha256(data).digest()).decode() + ":"
    deadline = time.monotonic() + 10
    while httpx.head(target).headers.get("repr-digest") != expected:
        assert time.monotonic() < deadline, "no Repr-Digest"
        time.sleep(0.1)
    r = httpx.get(target, headers={"Range": "bytes=10-19"})  # a part: the whole's digest
    assert r.status_code == 206 and r.headers["repr-digest"] == expected
    through = httpx.get(url(hproxy, "through", "scene-c/B04.tif"))
    assert "repr-digest" not in through.headers  # nothing hashed, nothing claimed
