"""`/stac` with a real STAC client (pystac-client), over the http and EODAG datasets."""

from __future__ import annotations

import httpx
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
    assert sorted(i.id for i in listed) == ["scene-a/B04.tif", "scene-b/B04.tif"]
    assert listed[0].assets["data"].href.startswith(f"{proxy.url}/assets/listed/")


def test_item_and_collection_endpoints(proxy):
    r = httpx.get(f"{proxy.url}/stac/collections/scenes/items/scene-b")
    assert r.status_code == 200 and r.json()["id"] == "scene-b"
    r = httpx.get(f"{proxy.url}/stac/collections/scenes/items/nope")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    r = httpx.get(f"{proxy.url}/stac/collections/nope")
    assert r.status_code == 404
    r = httpx.get(f"{proxy.url}/stac/search", params={"bbox": "1,2,3"})
    assert r.status_code == 400 and "bbox" in r.json()["detail"]
