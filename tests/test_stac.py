"""`/stac` with a real STAC client (pystac-client), over the http and EODAG datasets."""

from __future__ import annotations

import base64

import httpx
import pytest
from pystac_client import Client


def test_pystac_client_search_points_assets_at_the_proxy(proxy, upstream):
    cat = Client.open(f"{proxy.url}/stac")
    assert {c.id for c in cat.get_collections()} == {"files", "listed", "scenes"}
    items = list(cat.search(collections=["scenes"], limit=1).items())  # pages of one
    assert sorted(i.id for i in items) == ["scene-a", "scene-b", "scene-c"]
    for item in items:
        href = item.assets["visual"].href
        assert href == f"{proxy.url}/assets/scenes/{item.id}/visual"
        assert item.collection_id == "scenes"
        assert upstream.url not in str(item.to_dict())
    r = httpx.get(items[0].assets["B04"].href, headers={"Range": "bytes=0-99"})
    assert r.status_code == 206 and len(r.content) == 100


def test_search_filters_and_post(proxy):
    cat = Client.open(f"{proxy.url}/stac")
    hits = list(cat.search(collections=["scenes"], bbox=[3.0, 44.9, 3.2, 45.2]).items())
    assert [i.id for i in hits] == ["scene-a"]
    hits = list(cat.search(collections=["scenes"], ids=["scene-c"], method="POST").items())
    assert [i.id for i in hits] == ["scene-c"]
    listed = list(cat.search(collections=["listed"]).items())
    assert sorted(i.id for i in listed) == ["scene-a~B04.tif", "scene-b~B04.tif"]
    asset = listed[0].assets["B04"]
    assert asset.href == f"{proxy.url}/assets/listed/scene-a/B04.tif"
    assert asset.media_type == "image/tiff; application=geotiff" and asset.roles == ["data"]


def test_item_and_collection_endpoints(proxy):
    r = httpx.get(f"{proxy.url}/stac/collections/scenes/items/scene-b")
    assert r.status_code == 200 and r.json()["id"] == "scene-b"
    r = httpx.get(f"{proxy.url}/stac/collections/scenes/items/nope")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    r = httpx.get(f"{proxy.url}/stac/collections/nope")
    assert r.status_code == 404
    r = httpx.get(f"{proxy.url}/stac/search", params={"bbox": "1,2,3"})
    assert r.status_code == 400 and "bbox" in r.json()["detail"]


POINT = {"type": "Point", "coordinates": [0, 0]}


@pytest.mark.parametrize(
    ("method", "query", "names"),
    [
        ("POST", {"bbox": 5}, "bbox"),
        ("POST", {"bbox": [1, 2, 3]}, "bbox"),
        ("GET", {"bbox": "nan,1,2,3"}, "bbox"),
        (
            "POST",
            {"bbox": [0, 0, 1, 1], "intersects": {"type": "Point", "coordinates": [0, 0]}},
            "bbox and intersects",
        ),
        ("POST", {"ids": 5}, "ids"),
        ("POST", {"collections": 5}, "collections"),
        ("POST", {"collections": [1, 2]}, "collections"),
        ("GET", {"datetime": "yesterday"}, "datetime"),
        ("GET", {"datetime": "2020-01-01"}, "datetime"),  # no time, no offset
        ("GET", {"datetime": "../.."}, "datetime"),
        ("GET", {"datetime": "2021-01-01T00:00:00Z/2020-01-01T00:00:00Z"}, "datetime"),
        ("POST", {"datetime": 5}, "datetime"),
        ("GET", {"token": "eyJpIjogW1tbW1tbXV1dXV1dfQ"}, "token"),  # a forged token
    ],
)
def test_malformed_searches_are_400s_naming_the_parameter(proxy, method, query, names):
    url = f"{proxy.url}/stac/search"
    r = httpx.post(url, json=query) if method == "POST" else httpx.get(url, params=query)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert names in r.json()["detail"]


def test_deeply_nested_bodies_and_tokens_are_400s(proxy):
    huge = httpx.post(f"{proxy.url}/stac/search", content='{"limit": 1e999}')
    assert huge.status_code == 400 and "limit" in huge.json()["detail"]
    deep = "[" * 100_000 + "]" * 100_000
    r = httpx.post(f"{proxy.url}/stac/search", content='{"bbox": ' + deep + "}")
    assert r.status_code == 400
    token = base64.urlsafe_b64encode(b"[" * 5000 + b"]" * 5000).decode()
    assert httpx.get(f"{proxy.url}/stac/search", params={"token": token}).status_code == 400


def test_collections_as_a_comma_string_and_3d_bboxes(proxy):
    one = httpx.post(f"{proxy.url}/stac/search", json={"collections": "scenes", "limit": 5})
    assert one.status_code == 200 and {f["collection"] for f in one.json()["features"]} == {
        "scenes"
    }
    box = [3.0, 44.9, -100.0, 3.2, 45.2, 9000.0]  # minz and maxz are ignored
    hits = httpx.post(f"{proxy.url}/stac/search", json={"collections": ["scenes"], "bbox": box})
    assert [f["id"] for f in hits.json()["features"]] == ["scene-a"]
    exact = httpx.get(
        f"{proxy.url}/stac/search",
        params={"collections": "scenes", "datetime": "2020-01-01T00:00:00Z/.."},
    )
    assert exact.status_code == 200


def test_service_description_and_links_on_every_page(proxy):
    landing = httpx.get(f"{proxy.url}/stac").json()
    rels = {link["rel"]: link for link in landing["links"]}
    desc = httpx.get(rels["service-desc"]["href"])
    assert desc.status_code == 200 and desc.json()["openapi"].startswith("3.0")
    assert desc.headers["content-type"].startswith("application/vnd.oai.openapi+json")
    assert "/search" in desc.json()["paths"]
    doc = httpx.get(rels["service-doc"]["href"])
    assert doc.status_code == 200 and doc.headers["content-type"].startswith("text/html")
    page = httpx.get(f"{proxy.url}/stac/collections/scenes/items", params={"limit": 1}).json()
    links = {link["rel"]: link["href"] for link in page["links"]}
    assert links["self"] == f"{proxy.url}/stac/collections/scenes/items?limit=1"
    assert links["collection"] == links["parent"] == f"{proxy.url}/stac/collections/scenes"
    assert links["root"] == f"{proxy.url}/stac" and "next" in links
    found = httpx.get(f"{proxy.url}/stac/search", params={"collections": "scenes"}).json()
    assert {"self", "root", "parent"} <= {link["rel"] for link in found["links"]}


def test_intersects_selects_by_footprint(proxy):
    def ids(geometry: object) -> list[str]:
        r = httpx.post(
            f"{proxy.url}/stac/search", json={"collections": ["scenes"], "intersects": geometry}
        )
        assert r.status_code == 200, r.text
        return sorted(f["id"] for f in r.json()["features"])

    box = [3.0, 44.9, 3.2, 45.2]  # the bbox that finds scene-a alone
    square = [
        [[box[0], box[1]], [box[2], box[1]], [box[2], box[3]], [box[0], box[3]], [box[0], box[1]]]
    ]
    assert ids({"type": "Polygon", "coordinates": square}) == ["scene-a"]
    assert ids({"type": "Point", "coordinates": [-170.0, -80.0]}) == []
    for bad in ({"type": "Polygon"}, {"type": "Point", "coordinates": "x"}, [1, 2], {"type": 5}):
        r = httpx.post(f"{proxy.url}/stac/search", json={"intersects": bad})
        assert r.status_code == 400 and "intersects" in r.json()["detail"], bad
