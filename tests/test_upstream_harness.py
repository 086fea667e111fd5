"""The fault-injecting upstream itself: the tests above rely on each of these behaviours."""

from __future__ import annotations

import time

import httpx


def test_request_log_and_one_shot_faults(upstream):
    url = f"{upstream.url}/data/demo-cogs/scene-a/B04.tif"
    upstream.fault("scene-a/B04", status=503, times=1)
    assert httpx.get(url).status_code == 503
    assert httpx.get(url, headers={"Range": "bytes=0-9"}).status_code == 206
    log = upstream.data_requests()
    assert [(e["method"], e["range"]) for e in log] == [("GET", None), ("GET", "bytes=0-9")]


def test_delay_fault(upstream):
    upstream.fault("scene-b/B04", delay=0.5)
    t = time.monotonic()
    assert httpx.head(f"{upstream.url}/data/demo-cogs/scene-b/B04.tif").status_code == 200
    assert time.monotonic() - t >= 0.5


def test_cut_off_body_is_detectable_by_a_client(upstream):
    upstream.fault("scene-a/visual", cut_after=1000)
    try:
        httpx.get(f"{upstream.url}/data/demo-cogs/scene-a/visual.tif")
    except httpx.RemoteProtocolError:
        pass
    else:
        raise AssertionError("a cut-off body was read as complete")


def test_orderable_item_lifecycle(upstream):
    item = httpx.get(f"{upstream.url}/collections/demo-orderable/items/offline-a").json()
    props = item["properties"]
    assert props["order:status"] == "orderable"
    data = item["assets"]["B04"]["href"]
    assert httpx.get(data).status_code == 409  # offline
    r = httpx.post(props["eodag:order_link"])
    assert r.status_code == 202 and r.json()["status"] == "ordered"
    status = httpx.get(props["eodag:status_link"])
    assert status.json()["status"] == "ordered" and int(status.headers["retry-after"]) >= 1
    deadline = time.monotonic() + 10
    while httpx.get(props["eodag:status_link"]).json()["status"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert httpx.get(data).content == upstream.file("demo-orderable/offline-a/B04.tif")
    again = httpx.get(f"{upstream.url}/collections/demo-orderable/items/offline-a").json()
    assert again["properties"]["order:status"] == "succeeded"
