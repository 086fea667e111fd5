"""Every dataset searchable, hrefs at fdp, searches bounded and cached, partial results.

Real parts: `python -m http.server` as a plain autoindex server, our fault-injecting upstream
(nginx-style autoindex pages and a STAC API behind EODAG), pystac-client.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml
from pystac_client import Client

from proxy.demo import providers_yaml
from tests.harness.procs import PYTHON, ServerProcess, free_port, http_ok
from upstreams.autoindex import parse

TREE = {
    "top.txt": b"top level\n",
    "a/one.tif": b"I" * 5000,
    "a/b/two.nc": b"N" * 123,
    "a/b/with space & more.json": b'{"x": 1}',
    "c/three.bin": bytes(range(256)) * 4,
}


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    """`python -m http.server` over a nested folder: the plainest autoindex there is."""
    root = tmp_path_factory.mktemp("tree")
    for rel, data in TREE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = ServerProcess(
        "http.server",
        [PYTHON, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(root), str(port)],
        log_dir=tmp_path_factory.mktemp("tree-logs"),
        ready=http_ok(f"{url}/"),
    )
    with proc:
        yield url


@pytest.fixture(scope="module")
def inventory(start_proxy, upstream_server, plain_server, blackhole, tmp_path_factory):
    work = tmp_path_factory.mktemp("inventory")
    up = upstream_server.url
    providers = yaml.safe_load(providers_yaml(up))
    # the same provider at a second name, whose search endpoint is missing: it fails
    broken = yaml.safe_load(providers_yaml(f"{up}/missing").replace("fdp_demo", "broken_demo"))
    (work / "providers.yml").write_text(yaml.safe_dump({**providers, **broken}))
    return start_proxy(
        {
            "cache": {"store": str(work / "cache")},
            "eodag": {"providers_file": str(work / "providers.yml")},
            "stac": {"cache_seconds": 30, "timeout_seconds": 2},
            "datasets": {
                "tree": {"upstream": {"http": {"base_url": f"{plain_server}/"}}},
                "cogs": {"upstream": {"http": {"base_url": f"{up}/data/demo-cogs/"}}},
                "archived": {
                    "upstream": {"http": {"base_url": f"{up}/data/demo-cogs/scene-a/"}},
                    "archive": True,
                },
                "broken": {"upstream": {"http": {"base_url": f"{up}/data/broken/"}}},
                "silent": {"upstream": {"http": {"base_url": f"{blackhole.url}/pub/"}}},
                "scenes": {
                    "upstream": {"eodag": {"provider": "fdp_demo", "collection": "demo-cogs"}}
                },
                "federated": {
                    "upstream": {
                        "eodag": {
                            "providers": ["broken_demo", "fdp_demo"],
                            "collection": "demo-cogs",
                        }
                    }
                },
            },
        }
    )


def _items(url, collection, **params):
    return list(Client.open(f"{url}/stac").search(collections=[collection], **params).items())


def test_a_plain_autoindex_server_is_listed_recursively(inventory):
    items = _items(inventory.url, "tree", limit=2)  # pages of two
    by_id = {i.id: i for i in items}
    assert sorted(by_id) == sorted(k.replace("/", "~") for k in TREE)
    assert all("/" not in i for i in by_id)
    for key, data in TREE.items():
        item = by_id[key.replace("/", "~")]
        [(name, asset)] = item.assets.items()
        stem = key.rpartition("/")[2].partition(".")[0]
        assert name == stem and asset.roles == ["data"]
        assert asset.href.startswith(f"{inventory.url}/assets/tree/")
        r = httpx.get(asset.href)
        assert r.status_code == 200 and r.content == data, key
    assert by_id["a~one.tif"].assets["one"].media_type == "image/tiff; application=geotiff"
    assert by_id["a~b~two.nc"].assets["two"].media_type == "application/x-netcdf"
    r = httpx.get(f"{inventory.url}/stac/collections/tree/items/a~b~two.nc")
    assert r.status_code == 200 and r.json()["assets"]["two"]["href"].endswith("/a/b/two.nc")


def test_nginx_style_listings_give_sizes_and_archives_say_they_wait(inventory, upstream):
    items = _items(inventory.url, "cogs")
    folder = upstream.data / "demo-cogs"
    on_disk = {
        str(p.relative_to(folder)).replace("/", "~"): p.stat().st_size
        for p in folder.rglob("*")
        if p.is_file()
    }
    assert {"scene-a~B04.tif", "scene-c~visual.tif"} <= on_disk.keys()
    assert {i.id for i in items} == on_disk.keys()
    for item in items:
        [(_, asset)] = item.assets.items()
        assert asset.extra_fields["file:size"] == on_disk[item.id]
        assert "order:status" not in item.properties
    archived = _items(inventory.url, "archived")
    assert {i.properties["order:status"] for i in archived} == {"orderable"}
    assert any("order" in e for e in archived[0].stac_extensions)


def test_hrefs_keep_file_fields_and_hide_the_provider(inventory, upstream):
    items = _items(inventory.url, "scenes", limit=1)
    assert len(items) == 3
    for item in items:
        text = json.dumps(item.to_dict())
        assert upstream.url not in text and "mirror=1" not in text and "demo:source" not in text
        asset = item.assets["B04"]
        assert asset.media_type.startswith("image/tiff") and asset.roles == ["data"]
        data = httpx.get(asset.href).content
        assert len(data) == asset.extra_fields["file:size"]
        checksum = asset.extra_fields["file:checksum"]
        assert checksum == "1220" + hashlib.sha256(data).hexdigest()


def test_pystac_client_pages_with_every_kind_of_filter(inventory):
    cat = Client.open(f"{inventory.url}/stac")
    area = {
        "type": "Polygon",
        "coordinates": [[[-10, 30], [20, 30], [20, 60], [-10, 60], [-10, 30]]],
    }
    searches = [
        {"bbox": [-10, 30, 20, 60]},
        {"intersects": area},
        {"datetime": "2026-06-01T00:00:00Z/2026-06-30T00:00:00Z"},
        {"ids": ["scene-a", "scene-b", "scene-c"]},
    ]
    for params in searches:
        for method in ("GET", "POST"):
            search = cat.search(collections=["scenes"], limit=1, method=method, **params)
            pages = list(search.pages())
            assert len(pages) == 3, (params, method)  # one item a page, three pages
            ids = [i.id for page in pages for i in page.items]
            assert sorted(ids) == ["scene-a", "scene-b", "scene-c"], (params, method)
    exact = list(cat.search(collections=["scenes"], datetime="2026-06-02T10:30:00Z").items())
    assert [i.id for i in exact] == ["scene-b"]


def test_upstream_searches_are_cached(inventory, upstream):
    body = {"collections": ["scenes"], "bbox": [-10, 30, 20, 60], "limit": 2}
    first = httpx.post(f"{inventory.url}/stac/search", json=body)
    searched = len(upstream.log("/search"))
    again = httpx.post(f"{inventory.url}/stac/search", json=body)
    assert first.json()["features"] == again.json()["features"] != []
    assert searched >= 1 and len(upstream.log("/search")) == searched  # answered from memory
    httpx.post(f"{inventory.url}/stac/search", json={**body, "limit": 3})
    assert len(upstream.log("/search")) == searched + 1


def test_an_ids_search_looks_up_at_most_limit_ids_a_page(inventory, upstream):
    ids = [f"scene-{c}" for c in "abc"] + [f"missing-{n}" for n in range(20)]
    r = httpx.post(
        f"{inventory.url}/stac/search",
        json={
            "collections": ["scenes"],
            "ids": ids,
            "limit": 2,
            "datetime": "2026-06-01T10:30:00Z/..",
        },
    )
    assert r.status_code == 200
    assert [f["id"] for f in r.json()["features"]] == ["scene-a", "scene-b"]
    assert len(upstream.log("/search")) <= 2  # two ids, one collection: two lookups at most
    nxt = next(link for link in r.json()["links"] if link["rel"] == "next")
    r = httpx.post(nxt["href"], json=nxt["body"])
    assert [f["id"] for f in r.json()["features"]] == ["scene-c"]


def test_a_failing_provider_gives_a_partial_result_or_a_problem(inventory, upstream):
    upstream.fault("^/search", status=500)
    started = time.monotonic()
    r = httpx.get(f"{inventory.url}/stac/search", params={"collections": "scenes,cogs"})
    assert r.status_code == 200
    assert r.json()["fdp:unavailable"] == [
        {"collection": "scenes", "reason": "its provider failed"}
    ]
    assert {f["collection"] for f in r.json()["features"]} == {"cogs"}
    r = httpx.get(f"{inventory.url}/stac/search", params={"collections": "scenes", "limit": 7})
    assert r.status_code == 502 and r.headers["content-type"] == "application/problem+json"
    upstream.reset()
    upstream.fault("^/search", delay=10)  # slower than stac.timeout_seconds (2)
    r = httpx.get(f"{inventory.url}/stac/search", params={"collections": "scenes", "limit": 8})
    assert r.status_code == 504
    # a limit above the listing's size (other tests add files to the shared demo data)
    r = httpx.get(
        f"{inventory.url}/stac/search", params={"collections": "cogs,scenes", "limit": 999}
    )
    assert r.status_code == 200 and r.json()["features"]  # the listing, on its own page
    assert {f["collection"] for f in r.json()["features"]} == {"cogs"}
    nxt = next(link for link in r.json()["links"] if link["rel"] == "next")
    r = httpx.get(nxt["href"])
    assert r.status_code == 504  # the rest is the silent provider: nothing partial to show
    assert time.monotonic() - started < 15
    upstream.reset()


def test_a_dataset_at_several_providers_passes_over_a_failing_one(inventory, upstream):
    r = httpx.get(f"{inventory.url}/stac/search", params={"collections": "federated"})
    assert r.status_code == 200
    assert sorted(f["id"] for f in r.json()["features"]) == ["scene-a", "scene-b", "scene-c"]
    assert r.json()["fdp:unavailable"] == [
        {"collection": "federated", "provider": "broken_demo", "reason": "it failed"}
    ]
    item = httpx.get(f"{inventory.url}/stac/collections/federated/items/scene-b").json()
    data = httpx.get(item["assets"]["B04"]["href"]).content
    assert data == upstream.file("demo-cogs/scene-b/B04.tif")


def test_a_listing_that_fails_is_not_taken_for_an_empty_one(inventory, upstream):
    upstream.fault("^/data/broken/$", status=500)
    r = httpx.get(f"{inventory.url}/stac/collections/broken/items")
    assert r.status_code == 502
    upstream.reset()


def test_a_silent_listing_times_out_without_stalling_other_searches(inventory):
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        silent = pool.submit(httpx.get, f"{inventory.url}/stac/collections/silent/items")
        r = httpx.get(f"{inventory.url}/stac/search", params={"collections": "tree"})
        assert r.status_code == 200 and r.json()["features"]
        assert not silent.done()  # the silent server is still being waited for
        assert silent.result().status_code == 504
        assert time.monotonic() - started < 6  # stac.timeout_seconds is 2
    r = httpx.get(f"{inventory.url}/stac/search", params={"collections": "silent,tree"})
    assert r.status_code == 200 and r.json()["features"]
    unavailable = r.json()["fdp:unavailable"]
    assert unavailable == [{"collection": "silent", "reason": "its provider timed out"}]


def test_filter_in_cql2_text_and_json(inventory):
    url = f"{inventory.url}/stac/search"
    conformance = httpx.get(f"{inventory.url}/stac/conformance").json()["conformsTo"]
    assert "http://www.opengis.net/spec/cql2/1.0/conf/cql2-text" in conformance
    text = "datetime > TIMESTAMP('2026-06-01T12:00:00Z') AND id <> 'scene-c'"
    r = httpx.get(url, params={"collections": "scenes", "filter": text})
    assert [f["id"] for f in r.json()["features"]] == ["scene-b"]
    expr = {"op": "=", "args": [{"property": "id"}, "scene-c"]}
    r = httpx.post(url, json={"collections": ["scenes"], "filter": expr, "limit": 1})
    assert [f["id"] for f in r.json()["features"]] == ["scene-c"]
    found = list(
        Client.open(f"{inventory.url}/stac")
        .search(collections=["tree"], filter="id LIKE 'a~%'", filter_lang="cql2-text")
        .items()
    )
    assert sorted(i.id for i in found) == ["a~b~two.nc", "a~b~with space & more.json", "a~one.tif"]
    for bad in ("id = ", "nonsense((", "{"):
        r = httpx.get(url, params={"filter": bad})
        assert r.status_code == 400 and "filter" in r.json()["detail"], bad
    r = httpx.post(url, json={"filter": {"op": "frobnicate", "args": []}})
    assert r.status_code == 400 and "filter" in r.json()["detail"]
    r = httpx.get(f"{inventory.url}/stac/collections/scenes/queryables")
    assert r.status_code == 200 and "datetime" in r.json()["properties"]


ROW = '<tr><td><a href="{}">{}</a></td><td align="right">2026-11-21 10:00  </td><td>{}</td></tr>'
APACHE = "\n".join(
    [
        "<html><head><title>Index of /pub</title></head><body><h1>Index of /pub</h1><table>",
        '<tr><th><a href="?C=N;O=D">Name</a></th><th><a href="?C=S;O=A">Size</a></th></tr>',
        '<tr><td><a href="/">Parent Directory</a></td><td>&nbsp;</td><td>  - </td></tr>',
        ROW.format("sub/", "sub/", "  - "),
        ROW.format("small.txt", "small.txt", "420 "),
        ROW.format("big%20file.tif", "big file.tif", "1.2M"),
        '<tr><td><a href="http://else.example/x">x</a></td><td><a href="../up">up</a></td></tr>',
        "</table></body></html>",
    ]
).encode()


def test_apache_and_nginx_json_listings_parse():
    files, folders = parse("http://h/pub/", APACHE, "text/html")
    assert folders == ["sub/"]
    assert {f.key: f.size for f in files} == {"small.txt": 420, "big file.tif": None}
    nginx_json = json.dumps(
        [
            {"name": "d", "type": "directory", "mtime": "x"},
            {"name": "f.tif", "type": "file", "size": 99, "mtime": "x"},
            {"name": "../evil", "type": "file", "size": 1},
        ]
    ).encode()
    files, folders = parse("http://h/pub/", nginx_json, "application/json")
    assert folders == ["d/"] and [(f.key, f.size) for f in files] == [("f.tif", 99)]


def test_tokens_stay_opaque_but_checked(inventory):
    token = base64.urlsafe_b64encode(b'{"i": 0, "c": "nope"}').decode()
    r = httpx.get(f"{inventory.url}/stac/search", params={"token": token})
    assert r.status_code == 400
