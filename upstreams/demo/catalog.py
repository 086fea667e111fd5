"""The demo provider's STAC API (landing, collections, items, search) and its orders."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import shapely.geometry
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from upstreams.demo.state import State, order_status

CONFORMS = [
    "https://api.stacspec.org/v1.0.0/core",
    "https://api.stacspec.org/v1.0.0/collections",
    "https://api.stacspec.org/v1.0.0/ogcapi-features",
    "https://api.stacspec.org/v1.0.0/item-search",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson",
]


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _item(state: State, base: str, cid: str, iid: str) -> dict[str, Any]:
    spec = state.catalog["collections"][cid]["items"][iid]
    x0, y0, x1, y1 = spec["bbox"]
    assets = {}
    for key, a in spec["assets"].items():
        asset = {k: v for k, v in a.items() if k != "file"}
        asset["href"] = f"{state.asset_base or base}/data/{a['file']}"
        # what real catalogues carry too: another copy's URL (never to reach fdp's clients)
        asset["alternate"] = {"mirror": {"href": asset["href"] + "?mirror=1"}}
        assets[key] = asset
    properties: dict[str, Any] = {
        "datetime": spec["datetime"],
        "demo:source": f"{base}/collections/{cid}/items/{iid}",  # a provider URL
    }
    status = order_status(state, cid, iid)
    if status is not None:
        order_url = f"{base}/orders/{cid}/{iid}"
        properties |= {
            "order:status": status,
            "eodag:order_link": order_url,
            "eodag:status_link": order_url,
        }
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": ["https://stac-extensions.github.io/file/v2.1.0/schema.json"],
        "id": iid,
        "collection": cid,
        "bbox": spec["bbox"],
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
        },
        "properties": properties,
        "assets": assets,
        "links": [
            {"rel": "self", "href": f"{base}/collections/{cid}/items/{iid}"},
            {"rel": "collection", "href": f"{base}/collections/{cid}"},
            {"rel": "root", "href": f"{base}/"},
        ],
    }


def _collection(state: State, base: str, cid: str) -> dict[str, Any]:
    spec = state.catalog["collections"][cid]
    boxes = [i["bbox"] for i in spec["items"].values()]
    times = sorted(i["datetime"] for i in spec["items"].values())
    return {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": cid,
        "description": spec["description"],
        "license": "CC-BY-4.0",
        "extent": {
            "spatial": {
                "bbox": [
                    [
                        min(b[0] for b in boxes),
                        min(b[1] for b in boxes),
                        max(b[2] for b in boxes),
                        max(b[3] for b in boxes),
                    ]
                ]
            },
            "temporal": {"interval": [[times[0], times[-1]]]},
        },
        "links": [
            {"rel": "self", "href": f"{base}/collections/{cid}"},
            {"rel": "items", "href": f"{base}/collections/{cid}/items"},
            {"rel": "root", "href": f"{base}/"},
        ],
    }


def _footprint(spec: dict[str, Any]) -> Any:
    return shapely.geometry.box(*spec["bbox"])


def _in_interval(dt: str, interval: str) -> bool:
    """Whether an item's time is the instant, or in the interval, given (compared as times)."""
    when = datetime.fromisoformat(dt)
    start, slash, end = interval.partition("/")
    if not slash:
        return when == datetime.fromisoformat(start)
    return (start in ("", "..") or when >= datetime.fromisoformat(start)) and (
        end in ("", "..") or when <= datetime.fromisoformat(end)
    )


def _search(state: State, request: Request, params: dict[str, Any]) -> dict[str, Any]:
    base = _base(request)
    cids = params.get("collections") or list(state.catalog["collections"])
    ids = params.get("ids")
    bbox = params.get("bbox")
    area = (
        shapely.geometry.shape(params["intersects"])
        if params.get("intersects")
        else shapely.geometry.box(*(bbox if len(bbox) == 4 else bbox[:2] + bbox[3:5]))
        if bbox
        else None
    )
    interval = params.get("datetime")
    limit = int(params.get("limit") or 10)
    page = params.get("page")  # EODAG's StacSearch pages with `page`, clients with `token`
    offset = (int(page) - 1) * limit if page else int(params.get("token") or 0)
    matches = []
    for cid in cids:
        for iid, spec in state.catalog["collections"].get(cid, {}).get("items", {}).items():
            if ids and iid not in ids:
                continue
            if area is not None and not area.intersects(_footprint(spec)):
                continue
            if interval and not _in_interval(spec["datetime"], interval):
                continue
            matches.append((cid, iid))
    page = matches[offset : offset + limit]
    links = [{"rel": "root", "href": f"{base}/"}]
    if offset + limit < len(matches):
        if request.method == "POST":
            body = {**params, "token": str(offset + limit)}
            links.append({"rel": "next", "href": f"{base}/search", "method": "POST", "body": body})
        else:
            url = request.url.include_query_params(token=str(offset + limit))
            links.append({"rel": "next", "href": str(url), "method": "GET"})
    return {
        "type": "FeatureCollection",
        "features": [_item(state, base, c, i) for c, i in page],
        "numberMatched": len(matches),
        "numberReturned": len(page),
        "links": links,
    }


def _csv(value: str | None) -> list[str] | None:
    return [v for v in value.split(",") if v] if value else None


async def search(request: Request) -> Response:
    state: State = request.app.state.demo
    fault = state.take_fault(request.method, request.url.path)
    if fault and fault.delay:
        await asyncio.sleep(fault.delay)
    if fault and fault.status:
        return Response(fault.body, fault.status, media_type="application/json")
    if request.method == "POST":
        params = await request.json()
    else:
        q = request.query_params
        bbox = _csv(q.get("bbox"))
        params = {
            "collections": _csv(q.get("collections")),
            "ids": _csv(q.get("ids")),
            "bbox": [float(v) for v in bbox] if bbox else None,
            "datetime": q.get("datetime"),
            "limit": q.get("limit"),
            "token": q.get("token"),
            "page": q.get("page"),
        }
    return JSONResponse(_search(state, request, params), media_type="application/geo+json")


async def landing(request: Request) -> Response:
    base = _base(request)
    return JSONResponse(
        {
            "type": "Catalog",
            "stac_version": "1.0.0",
            "id": "demo-upstream",
            "description": "fdp demo/test upstream",
            "conformsTo": CONFORMS,
            "links": [
                {"rel": "self", "href": f"{base}/"},
                {"rel": "root", "href": f"{base}/"},
                {"rel": "conformance", "href": f"{base}/conformance"},
                {"rel": "data", "href": f"{base}/collections"},
                {"rel": "search", "href": f"{base}/search", "method": "GET"},
                {"rel": "search", "href": f"{base}/search", "method": "POST"},
            ],
        }
    )


async def conformance(request: Request) -> Response:
    return JSONResponse({"conformsTo": CONFORMS})


async def collections(request: Request) -> Response:
    state: State = request.app.state.demo
    base = _base(request)
    cols = [_collection(state, base, c) for c in state.catalog["collections"]]
    return JSONResponse({"collections": cols, "links": [{"rel": "root", "href": f"{base}/"}]})


def _not_found(what: str) -> Response:
    return JSONResponse({"code": "NotFound", "description": f"{what} not found"}, 404)


async def collection(request: Request) -> Response:
    state: State = request.app.state.demo
    cid = request.path_params["cid"]
    if cid not in state.catalog["collections"]:
        return _not_found(f"collection {cid}")
    return JSONResponse(_collection(state, _base(request), cid))


async def items(request: Request) -> Response:
    state: State = request.app.state.demo
    cid = request.path_params["cid"]
    if cid not in state.catalog["collections"]:
        return _not_found(f"collection {cid}")
    q = request.query_params
    params = {"collections": [cid], "limit": q.get("limit"), "token": q.get("token")}
    return JSONResponse(_search(state, request, params), media_type="application/geo+json")


async def item(request: Request) -> Response:
    state: State = request.app.state.demo
    cid, iid = request.path_params["cid"], request.path_params["iid"]
    if iid not in state.catalog["collections"].get(cid, {}).get("items", {}):
        return _not_found(f"item {cid}/{iid}")
    return JSONResponse(_item(state, _base(request), cid, iid), media_type="application/geo+json")


async def place_order(request: Request) -> Response:
    state: State = request.app.state.demo
    cid, iid = request.path_params["cid"], request.path_params["iid"]
    if iid not in state.catalog["collections"].get(cid, {}).get("items", {}):
        return _not_found(f"item {cid}/{iid}")
    if order_status(state, cid, iid) is None:
        return JSONResponse({"error": "item is online, nothing to order"}, 400)
    state.ordered_at.setdefault(f"{cid}/{iid}", time.monotonic())
    return await get_order(request, 202)


async def get_order(request: Request, code: int = 200) -> Response:
    state: State = request.app.state.demo
    cid, iid = request.path_params["cid"], request.path_params["iid"]
    if iid not in state.catalog["collections"].get(cid, {}).get("items", {}):
        return _not_found(f"item {cid}/{iid}")
    status = order_status(state, cid, iid)
    body = {"id": f"{cid}/{iid}", "status": status}
    headers = {}
    if status == "ordered":
        left = state.ordered_at[f"{cid}/{iid}"] + state.catalog["collections"][cid]["order_delay"]
        headers["retry-after"] = str(max(1, round(left - time.monotonic())))
    return JSONResponse(body, code, headers=headers)
