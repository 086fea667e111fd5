"""`/stac`: a STAC API over the configured datasets, asset hrefs rewritten to `/assets/...`.

Each dataset is one collection. EODAG datasets list and search through EODAG; `http`
datasets with an `objects` list have one item per object. Provider URLs never appear.
"""

from __future__ import annotations

import base64
import json
import math
import re
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import quote

import shapely.errors
import shapely.geometry
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from proxy.auth import allowed
from proxy.problems import ProxyError
from upstreams.base import DatasetNotFound, Listing, ObjectNotFound, Searchable
from upstreams.registry import Entry, Registry

STAC_VERSION = "1.0.0"
MAX_LIMIT = 1000
CONFORMS = [
    "https://api.stacspec.org/v1.0.0/core",
    "https://api.stacspec.org/v1.0.0/collections",
    "https://api.stacspec.org/v1.0.0/ogcapi-features",
    "https://api.stacspec.org/v1.0.0/item-search",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson",
]
GEOJSON = "application/geo+json"
OPENAPI = "application/vnd.oai.openapi+json;version=3.0"


class BadQuery(ProxyError):
    status, slug = 400, "bad-stac-query"


async def _visible(request: Request) -> dict[str, Entry]:
    """The datasets this caller may read: the others do not exist for them."""
    from proxy.app import identity  # the app module owns request identity

    who = await identity(request)
    registry: Registry = request.app.state.registry
    return {n: e for n, e in registry.entries.items() if allowed(e.policy.access, who)}


async def _entry(request: Request, name: str) -> Entry:
    visible = await _visible(request)
    if name not in visible:
        raise DatasetNotFound(f"no collection named {name!r}")
    return visible[name]


def _root(request: Request) -> str:
    return str(request.app.state.settings.server.public_url).rstrip("/") + "/stac"


def _public(request: Request) -> str:
    return str(request.app.state.settings.server.public_url).rstrip("/")


def _collection(request: Request, entry: Entry) -> dict[str, Any]:
    root = _root(request)
    ds = entry.policy
    return {
        "type": "Collection",
        "stac_version": STAC_VERSION,
        "id": entry.name,
        "title": ds.title or entry.name,
        "description": ds.description or f"{entry.name}, served by fdp",
        "license": "other",
        "extent": {
            "spatial": {"bbox": [[-180.0, -90.0, 180.0, 90.0]]},
            "temporal": {"interval": [[None, None]]},
        },
        "links": [
            _link("self", f"{root}/collections/{entry.name}", title=ds.title or entry.name),
            _link("items", f"{root}/collections/{entry.name}/items", GEOJSON, "its items"),
            _link("root", root, title="fdp"),
            _link("parent", root, title="fdp"),
        ],
    }


def _link(rel: str, href: str, media: str = "application/json", title: str = "") -> dict[str, str]:
    return {"rel": rel, "href": href, "type": media, **({"title": title} if title else {})}


def _links(request: Request, entry: Entry, iid: str) -> list[dict[str, str]]:
    root = _root(request)
    col = f"{root}/collections/{entry.name}"
    return [
        {"rel": "self", "href": f"{col}/items/{quote(iid)}", "type": GEOJSON},
        {"rel": "collection", "href": col, "type": "application/json"},
        {"rel": "parent", "href": col, "type": "application/json"},
        {"rel": "root", "href": root, "type": "application/json"},
    ]


def _rewrite(request: Request, entry: Entry, item: dict[str, Any]) -> dict[str, Any]:
    """Point an EODAG item at us: collection id, asset hrefs, links; drop EODAG internals."""
    iid = item["id"]
    item["collection"] = entry.name
    item["stac_version"] = STAC_VERSION
    item["properties"] = {
        k: v
        for k, v in item.get("properties", {}).items()
        if not k.startswith("eodag:") and k not in ("federation:backends", "providers")
    }
    for key, asset in item.get("assets", {}).items():
        asset["href"] = f"{_public(request)}/assets/{entry.name}/{quote(iid)}/{quote(key)}"
        asset.pop("alternate", None)
    item["links"] = _links(request, entry, iid)
    return item


def _object_item(request: Request, entry: Entry, key: str) -> dict[str, Any]:
    """An `http` dataset's object as an item with one asset and no footprint."""
    return {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "id": key,
        "collection": entry.name,
        "geometry": None,
        # time unknown: STAC wants an interval then, so give the widest honest one
        "properties": {
            "datetime": None,
            "start_datetime": "1970-01-01T00:00:00Z",
            "end_datetime": "2100-01-01T00:00:00Z",
        },
        "assets": {
            "data": {
                "href": f"{_public(request)}/assets/{entry.name}/{quote(key)}",
                "roles": ["data"],
            }
        },
        "links": _links(request, entry, key),
    }


Cursor = dict[str, Any]


async def _page(
    request: Request, entry: Entry, limit: int, query: dict[str, Any], cursor: Cursor | None
) -> tuple[list[dict[str, Any]], Cursor | None]:
    """A page of a dataset's items, and the cursor of the next page (None at the end)."""
    resolver = entry.resolver
    if isinstance(resolver, Searchable):
        found, nxt = await resolver.search(limit, query, cursor)
        items = [_rewrite(request, entry, json.loads(json.dumps(f, default=str))) for f in found]
        return items, nxt
    objects = sorted(await resolver.list_keys()) if isinstance(resolver, Listing) else []
    if query.get("geom") or query.get("start") or query.get("end"):
        return [], None  # objects carry no footprint or time
    if "id" in query:
        objects = [o for o in objects if o == query["id"]]
    start = int((cursor or {}).get("o", 0))
    end = start + limit
    page = [_object_item(request, entry, k) for k in objects[start:end]]
    return page, ({"o": end} if end < len(objects) else None)


def _encode(index: int, cursor: Cursor | None) -> str:
    raw = json.dumps({"i": index, "c": cursor}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _page_params(values: dict[str, Any]) -> tuple[int, Cursor | None, int]:
    """(dataset index, cursor within it, limit), from `limit` and an opaque `token`."""
    try:
        limit = min(int(values.get("limit") or 10), MAX_LIMIT)
        token = values.get("token")
        state = (
            json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            if token
            else {"i": 0, "c": None}
        )
        index, cursor = int(state["i"]), state["c"]
    except (TypeError, ValueError, KeyError, OverflowError, RecursionError):
        raise BadQuery("limit must be an integer, and token one given in a next link") from None
    if limit < 1 or index < 0 or not (cursor is None or isinstance(cursor, dict)):
        raise BadQuery("limit must be positive, and token one given in a next link")
    return index, cursor, limit


#: RFC 3339 `date-time` (section 5.6): ISO 8601 without its looser forms
RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)


def _instant(text: str) -> datetime:
    """An RFC 3339 date-time; else a 400 naming `datetime`."""
    try:
        if not RFC3339.fullmatch(text):
            raise ValueError(text)
        return datetime.fromisoformat(text.upper())
    except ValueError:
        raise BadQuery(f"datetime: {text[:40]!r} is not an RFC 3339 date-time") from None


def _bbox(bbox: Any, method: str) -> list[float]:
    """A 2-D or 3-D bbox (a list; in a query string, a comma list) as its 2-D extent."""
    if isinstance(bbox, str) and method == "POST":
        raise BadQuery("bbox: a JSON array of four or six numbers")
    try:
        box = [float(v) for v in (bbox.split(",") if isinstance(bbox, str) else bbox)]
    except (TypeError, ValueError):
        raise BadQuery("bbox: four or six numbers") from None
    if len(box) not in (4, 6) or not all(math.isfinite(v) for v in box):
        raise BadQuery("bbox: four or six finite numbers")
    box = box if len(box) == 4 else [box[0], box[1], box[3], box[4]]
    # west > east crosses the antimeridian; south > north is just wrong
    if box[1] > box[3] or not (-90 <= box[1] <= 90 and -90 <= box[3] <= 90):
        raise BadQuery("bbox: latitudes within -90..90, the southern one first")
    return box


#: what shapely raises for a GeoJSON document that is not a geometry
MALFORMED = (ValueError, TypeError, KeyError, IndexError, AttributeError)


def _geometry(value: Any) -> Any:
    """A GeoJSON geometry (`intersects`) as a shapely one, as EODAG takes it."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise BadQuery("intersects: a GeoJSON geometry") from None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise BadQuery("intersects: a GeoJSON geometry")
    try:
        geometry = shapely.geometry.shape(value)
    except (
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        shapely.errors.ShapelyError,
    ):
        raise BadQuery("intersects: not a valid GeoJSON geometry") from None
    bounds = geometry.bounds
    if geometry.is_empty or not all(math.isfinite(v) for v in bounds):
        raise BadQuery("intersects: an empty geometry or one with non-finite coordinates")
    return geometry


def _query(values: dict[str, Any], method: str = "GET") -> dict[str, Any]:
    """Translate STAC search parameters into EODAG's; a malformed one is a 400 naming it."""
    out: dict[str, Any] = {}
    if values.get("bbox") is not None and values.get("intersects") is not None:
        raise BadQuery("bbox and intersects: give one or the other")
    if values.get("bbox") is not None:
        out["geom"] = _bbox(values["bbox"], method)
    if values.get("intersects") is not None:
        out["geom"] = _geometry(values["intersects"])
    interval = values.get("datetime")
    if interval is not None:
        if not isinstance(interval, str) or not interval:
            raise BadQuery("datetime: an RFC 3339 date-time or interval (a string)")
        start, slash, end = interval.partition("/")
        if not slash:
            out["start"] = out["end"] = _instant(start)
        else:
            if start in ("", "..") and end in ("", ".."):
                raise BadQuery("datetime: an interval needs at least one end")
            if start not in ("", ".."):
                out["start"] = _instant(start)
            if end not in ("", ".."):
                out["end"] = _instant(end)
            if "start" in out and "end" in out and out["start"] > out["end"]:
                raise BadQuery("datetime: the interval ends before it starts")
        for key in ("start", "end"):  # as EODAG wants them: UTC, RFC 3339
            if key in out:
                out[key] = out[key].astimezone(UTC).isoformat().replace("+00:00", "Z")
    return out


def _names(values: dict[str, Any], key: str) -> list[str] | None:
    """`collections` or `ids`: a list of strings, or one comma-separated string."""
    value = values.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.split(",") if v]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadQuery(f"{key}: a list of strings (or one comma-separated string)")
    return value


def _self(request: Request) -> str:
    """This page's URL as clients reach it (the public URL, this path and query)."""
    query = f"?{request.url.query}" if request.url.query else ""
    return f"{_public(request)}{request.url.path}{query}"


def _feature_collection(
    request: Request,
    features: list[dict[str, Any]],
    values: dict[str, Any],
    token: str | None,
    collection: str | None = None,
) -> Response:
    """A page of items: `self`, `root`, `parent` (and `collection` for a collection's items)
    links, and `next` while there is more."""
    root = _root(request)
    parent = f"{root}/collections/{collection}" if collection else root
    links: list[dict[str, Any]] = [
        {
            "rel": "self",
            "href": _public(request)
            + request.url.path
            + (f"?{request.url.query}" if request.url.query else ""),
            "type": GEOJSON,
        },
        {"rel": "root", "href": root, "type": "application/json"},
        {"rel": "parent", "href": parent, "type": "application/json"},
    ]
    if collection:
        links.append({"rel": "collection", "href": parent, "type": "application/json"})
    if token is not None:
        if request.method == "POST":
            links.append(
                {
                    "rel": "next",
                    "href": f"{_root(request)}/search",
                    "method": "POST",
                    "body": {**values, "token": token},
                    "type": GEOJSON,
                }
            )
        else:
            links.append(
                {
                    "rel": "next",
                    "type": GEOJSON,
                    "method": "GET",
                    "href": str(request.url.include_query_params(token=token)),
                }
            )
    body = {
        "type": "FeatureCollection",
        "features": features,
        "numberReturned": len(features),
        "links": links,
    }
    return JSONResponse(body, media_type=GEOJSON)


async def landing(request: Request) -> Response:
    root = _root(request)
    return JSONResponse(
        {
            "type": "Catalog",
            "stac_version": STAC_VERSION,
            "id": "fdp",
            "title": "fdp",
            "description": "Federated Data Proxy: every dataset this endpoint serves",
            "conformsTo": CONFORMS,
            "links": [
                _link("self", root, title="fdp"),
                _link("root", root, title="fdp"),
                _link("conformance", f"{root}/conformance", title="conformance classes"),
                _link("data", f"{root}/collections", title="collections"),
                _link("service-desc", f"{root}/api", OPENAPI, "OpenAPI description"),
                _link("service-doc", f"{root}/api.html", "text/html", "API documentation"),
                {**_link("search", f"{root}/search", GEOJSON, "search"), "method": "GET"},
                {**_link("search", f"{root}/search", GEOJSON, "search"), "method": "POST"},
                *(
                    _link("child", f"{root}/collections/{n}", title=e.policy.title or n)
                    for n, e in (await _visible(request)).items()
                ),
            ],
        }
    )


async def conformance(request: Request) -> Response:
    return JSONResponse({"conformsTo": CONFORMS})


async def collections(request: Request) -> Response:
    cols = [_collection(request, e) for e in (await _visible(request)).values()]
    root = _root(request)
    return JSONResponse(
        {
            "collections": cols,
            "links": [
                {"rel": "self", "href": f"{root}/collections", "type": "application/json"},
                {"rel": "root", "href": root, "type": "application/json"},
            ],
        }
    )


async def collection(request: Request) -> Response:
    entry = await _entry(request, request.path_params["cid"])
    return JSONResponse(_collection(request, entry))


async def items(request: Request) -> Response:
    entry = await _entry(request, request.path_params["cid"])
    values = dict(request.query_params)
    _, cursor, limit = _page_params(values)
    features, nxt = await _page(request, entry, limit, _query(values), cursor)
    token = _encode(0, nxt) if nxt else None
    return _feature_collection(request, features, values, token, entry.name)


def _item_id(iid: str) -> str:
    """An item id we can pass to a provider's search: printable, no quotes or backslashes."""
    if not iid or not iid.isprintable() or any(c in iid for c in '"\\'):
        raise BadQuery(f"invalid item id {iid!r}")
    return iid


async def item(request: Request) -> Response:
    entry = await _entry(request, request.path_params["cid"])
    iid = _item_id(request.path_params["iid"])
    found = [f for f in (await _page(request, entry, 1, {"id": iid}, None))[0] if f["id"] == iid]
    if not found:
        raise ObjectNotFound(f"no item {iid!r} in {entry.name}")
    return JSONResponse(found[0], media_type=GEOJSON)


async def search(request: Request) -> Response:
    visible = await _visible(request)
    if request.method == "POST":
        try:
            values = json.loads(await request.body())
        except (ValueError, RecursionError):  # (a body nested thousands deep)
            raise BadQuery("the search body must be JSON") from None
        if not isinstance(values, dict):
            raise BadQuery("the search body must be a JSON object")
    else:
        values = dict(request.query_params)
    for key in ("collections", "ids"):
        if key in values:
            values[key] = _names(values, key)
    index, cursor, limit = _page_params(values)
    query = _query(values, request.method)
    names = values.get("collections") or list(visible)
    unknown = [n for n in names if n not in visible]
    if unknown:
        raise DatasetNotFound(f"no collection named {unknown[0]!r}")
    entries = [visible[n] for n in names]
    if ids := values.get("ids"):
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise BadQuery("ids must be a list of strings")
        ids = [_item_id(i) for i in ids]
        found = [
            f
            for entry in entries
            for iid in ids
            for f in (await _page(request, entry, 1, {**query, "id": iid}, None))[0]
            if f["id"] == iid
        ]
        return _feature_collection(request, found[:limit], values, None)
    # One dataset per page, in order; at a dataset's end the token moves on to the next one.
    while index < len(entries):
        features, nxt = await _page(request, entries[index], limit, query, cursor)
        if nxt is None:
            index, nxt = index + 1, None
        token = _encode(index, nxt) if index < len(entries) else None
        if features:
            return _feature_collection(request, features, values, token)
        cursor = None
    return _feature_collection(request, [], values, None)


async def service_desc(request: Request) -> Response:
    """The OpenAPI description of this STAC API (`service-desc`)."""
    return JSONResponse(openapi(_root(request)), media_type=OPENAPI)


async def service_doc(request: Request) -> Response:
    """A human-readable page of the same (`service-doc`): no script, no CDN."""
    doc = openapi(_root(request))
    rows = "".join(
        f"<tr><td>{escape(method.upper())}</td><td><code>{escape(path)}</code></td>"
        f"<td>{escape(op['summary'])}</td></tr>"
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
    )
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>fdp STAC API</title>'
        "</head><body><h1>fdp STAC API</h1><p>Machine-readable: "
        f'<a href="{escape(_root(request))}/api">OpenAPI</a></p>'
        f"<table><tr><th>method</th><th>path</th><th>what</th></tr>{rows}</table></body></html>"
    )
    return HTMLResponse(page)


def openapi(root: str) -> dict[str, Any]:
    """OpenAPI 3.0 of the STAC endpoints (paths relative to `root`)."""
    json_body = {"application/json": {"schema": {"type": "object"}}}
    geojson = {
        "200": {"description": "items", "content": {GEOJSON: {"schema": {"type": "object"}}}}
    }
    ok = {"200": {"description": "ok", "content": json_body}}
    cid = {"name": "collectionId", "in": "path", "required": True, "schema": {"type": "string"}}
    fid = {"name": "featureId", "in": "path", "required": True, "schema": {"type": "string"}}
    search = [
        {"name": n, "in": "query", "schema": {"type": "string"}}
        for n in ("bbox", "datetime", "ids", "collections", "limit", "token")
    ]
    return {
        "openapi": "3.0.3",
        "info": {"title": "fdp STAC API", "version": STAC_VERSION},
        "servers": [{"url": root}],
        "paths": {
            "/": {"get": {"summary": "landing page", "responses": ok}},
            "/conformance": {"get": {"summary": "conformance classes", "responses": ok}},
            "/collections": {"get": {"summary": "the collections you may read", "responses": ok}},
            "/collections/{collectionId}": {
                "get": {"summary": "one collection", "parameters": [cid], "responses": ok}
            },
            "/collections/{collectionId}/items": {
                "get": {
                    "summary": "its items",
                    "parameters": [cid, *search[:2], search[4], search[5]],
                    "responses": geojson,
                }
            },
            "/collections/{collectionId}/items/{featureId}": {
                "get": {"summary": "one item", "parameters": [cid, fid], "responses": ok}
            },
            "/search": {
                "get": {"summary": "item search", "parameters": search, "responses": geojson},
                "post": {
                    "summary": "item search (JSON body)",
                    "requestBody": {"content": json_body},
                    "responses": geojson,
                },
            },
        },
    }


routes = [
    Route("/stac", landing),
    Route("/stac/api", service_desc),
    Route("/stac/api.html", service_doc),
    Route("/stac/conformance", conformance),
    Route("/stac/collections", collections),
    Route("/stac/collections/{cid}", collection),
    Route("/stac/collections/{cid}/items", items),
    Route("/stac/collections/{cid}/items/{iid:path}", item),
    Route("/stac/search", search, methods=["GET", "POST"]),
]
