"""`/stac`: a STAC API over the configured datasets, asset hrefs rewritten to `/assets/...`.

Each dataset is one collection. EODAG datasets search through EODAG; `http` and `s3`
datasets have one generated item per object of their listing. Provider URLs never appear,
and a caller sees only the datasets they may read.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from proxy.auth import allowed
from proxy.stac import openapi, query
from proxy.stac.catalog import Catalog
from proxy.stac.documents import GEOJSON, QUERYABLES, STAC_VERSION, link
from proxy.stac.documents import collection as _collection
from proxy.stac.query import BadQuery, Search, encode
from upstreams.base import DatasetNotFound, ObjectNotFound, UpstreamError, UpstreamTimeout
from upstreams.registry import Entry, Registry

log = logging.getLogger("fdp.stac")

FILTER_CLASSES = [
    "https://api.stacspec.org/v1.0.0-rc.2/item-search#filter",
    "http://www.opengis.net/spec/ogcapi-features-3/1.0/conf/filter",
    "http://www.opengis.net/spec/ogcapi-features-3/1.0/conf/features-filter",
    "http://www.opengis.net/spec/cql2/1.0/conf/cql2-text",
    "http://www.opengis.net/spec/cql2/1.0/conf/cql2-json",
    "http://www.opengis.net/spec/cql2/1.0/conf/basic-cql2",
]
CONFORMS = [
    "https://api.stacspec.org/v1.0.0/core",
    "https://api.stacspec.org/v1.0.0/collections",
    "https://api.stacspec.org/v1.0.0/ogcapi-features",
    "https://api.stacspec.org/v1.0.0/item-search",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson",
    *FILTER_CLASSES,
]
#: item lookups of one `ids` search running at once
ID_LOOKUPS = 8


def _catalog(request: Request) -> Catalog:
    state = request.app.state
    if getattr(state, "stac_catalog", None) is None:
        stac = state.settings.stac
        public = str(state.settings.server.public_url).rstrip("/")
        state.stac_catalog = Catalog(
            f"{public}/stac", public, stac.cache_seconds, stac.timeout_seconds
        )
    return state.stac_catalog


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


def _feature_collection(
    request: Request,
    features: list[dict[str, Any]],
    values: dict[str, Any],
    token: str | None,
    collection: str | None = None,
    unavailable: list[dict[str, str]] | None = None,
) -> Response:
    """A page of items: `self`, `root`, `parent` (and `collection` for a collection's items)
    links, `next` while there is more, and which collections failed if any did."""
    catalog = _catalog(request)
    root = catalog.root
    parent = f"{root}/collections/{collection}" if collection else root
    query = f"?{request.url.query}" if request.url.query else ""
    links: list[dict[str, Any]] = [
        link("self", f"{catalog.public}{request.url.path}{query}", GEOJSON),
        link("root", root),
        link("parent", parent),
    ]
    if collection:
        links.append(link("collection", parent))
    if token is not None:
        if request.method == "POST":
            body = {**values, "token": token}
            links.append(
                {**link("next", f"{root}/search", GEOJSON), "method": "POST", "body": body}
            )
        else:
            after = request.url.include_query_params(token=token)
            href = f"{catalog.public}{after.path}?{after.query}"
            links.append({**link("next", href, GEOJSON), "method": "GET"})
    body: dict[str, Any] = {
        "type": "FeatureCollection",
        "features": features,
        "numberReturned": len(features),
        "links": links,
    }
    if unavailable:
        # a partial result: these collections failed and are missing from this page
        body["fdp:unavailable"] = unavailable
    return JSONResponse(body, media_type=GEOJSON)


async def landing(request: Request) -> Response:
    root = _catalog(request).root
    visible = await _visible(request)
    search = link("search", f"{root}/search", GEOJSON, "search")
    return JSONResponse(
        {
            "type": "Catalog",
            "stac_version": STAC_VERSION,
            "id": "fdp",
            "title": "fdp",
            "description": "Federated Data Proxy: every dataset this endpoint serves",
            "conformsTo": CONFORMS,
            "links": [
                link("self", root, title="fdp"),
                link("root", root, title="fdp"),
                link("conformance", f"{root}/conformance", title="conformance classes"),
                link("data", f"{root}/collections", title="collections"),
                link("service-desc", f"{root}/api", openapi.MEDIA_TYPE, "OpenAPI description"),
                link("service-doc", f"{root}/api.html", "text/html", "API documentation"),
                link(QUERYABLES, f"{root}/queryables", "application/schema+json", "queryables"),
                {**search, "method": "GET"},
                {**search, "method": "POST"},
                *(
                    link("child", f"{root}/collections/{n}", title=e.policy.title or n)
                    for n, e in visible.items()
                ),
            ],
        }
    )


async def conformance(request: Request) -> Response:
    return JSONResponse({"conformsTo": CONFORMS})


async def collections(request: Request) -> Response:
    root = _catalog(request).root
    cols = [_collection(root, e) for e in (await _visible(request)).values()]
    return JSONResponse(
        {"collections": cols, "links": [link("self", f"{root}/collections"), link("root", root)]}
    )


async def collection(request: Request) -> Response:
    entry = await _entry(request, request.path_params["cid"])
    return JSONResponse(_collection(_catalog(request).root, entry))


async def queryables(request: Request) -> Response:
    """What a `filter` may name: the core fields, and any property (checked per item)."""
    if "cid" in request.path_params:
        await _entry(request, request.path_params["cid"])
    schema = {
        "$schema": "https://json-schema.org/draft/2019-09/schema",
        "$id": f"{_catalog(request).public}{request.url.path}",
        "type": "object",
        "title": "Queryables",
        "properties": {
            "id": {"type": "string", "title": "Item id"},
            "collection": {"type": "string", "title": "Collection id"},
            "datetime": {"type": "string", "format": "date-time", "title": "Acquired"},
            "geometry": {"$ref": "https://geojson.org/schema/Geometry.json", "title": "Footprint"},
        },
        "additionalProperties": True,
    }
    return JSONResponse(schema, media_type="application/schema+json")


def _values(request: Request) -> dict[str, Any]:
    return dict(request.query_params)


async def items(request: Request) -> Response:
    entry = await _entry(request, request.path_params["cid"])
    values = _values(request)
    search = query.parse(values, "GET")
    features, nxt, failed = await _catalog(request).page(entry, search, search.cursor)
    token = encode(0, nxt) if nxt else None
    notes = [_failed(entry, e, name) for name, e in failed]
    return _feature_collection(request, features, values, token, entry.name, notes)


async def item(request: Request) -> Response:
    entry = await _entry(request, request.path_params["cid"])
    iid = query.item_id(request.path_params["iid"])
    found = await _catalog(request).page(entry, Search(limit=1, query={"id": iid}), None)
    hits = [f for f in found[0] if f["id"] == iid]
    if not hits:
        raise ObjectNotFound(f"no item {iid!r} in {entry.name}")
    return JSONResponse(hits[0], media_type=GEOJSON)


async def _body(request: Request) -> dict[str, Any]:
    try:
        values = json.loads(await request.body())
    except (ValueError, RecursionError):  # (a body nested thousands deep)
        raise BadQuery("the search body must be JSON") from None
    if not isinstance(values, dict):
        raise BadQuery("the search body must be a JSON object")
    return values


async def search(request: Request) -> Response:
    visible = await _visible(request)
    values = await _body(request) if request.method == "POST" else _values(request)
    found = query.parse(values, request.method)
    names = found.collections or list(visible)
    unknown = [n for n in names if n not in visible]
    if unknown:
        raise DatasetNotFound(f"no collection named {unknown[0]!r}")
    entries = [visible[n] for n in names]
    if found.ids:
        return await _by_ids(request, entries, found, values)
    # One dataset per page, in order; at a dataset's end the token moves on to the next one.
    # A dataset whose provider fails is skipped and named; if all fail, that is the answer.
    catalog = _catalog(request)
    index, cursor = found.index, found.cursor
    unavailable: list[dict[str, str]] = []
    failure: UpstreamError | None = None
    failures = 0
    while index < len(entries):
        entry = entries[index]
        try:
            features, nxt, failed = await catalog.page(entry, found, cursor)
            unavailable += [_failed(entry, e, name) for name, e in failed]
        except UpstreamError as e:
            failure = e
            failures += 1
            unavailable.append(_failed(entry, e))
            features, nxt = [], None
        if nxt is None:
            index += 1
        token = encode(index, nxt) if index < len(entries) else None
        if features:
            return _feature_collection(request, features, values, token, None, unavailable)
        cursor = nxt
    if failure is not None and failures == len(entries) - found.index:
        raise failure  # nothing but failures: a 502 or 504 problem says it best
    return _feature_collection(request, [], values, None, None, unavailable)


def _failed(entry: Entry, error: UpstreamError, provider: str = "") -> dict[str, str]:
    """How a page says a collection (or one provider of a federated one) is missing from it."""
    reason = "timed out" if isinstance(error, UpstreamTimeout) else "failed"
    log.warning("STAC search of %s %s: %s", entry.name, reason, error)
    if provider and provider != entry.name:
        return {"collection": entry.name, "provider": provider, "reason": f"it {reason}"}
    return {"collection": entry.name, "reason": f"its provider {reason}"}


async def _by_ids(
    request: Request, entries: list[Entry], found: Search, values: dict[str, Any]
) -> Response:
    """Items by id, `limit` ids a page: never more lookups than that per page (each id in
    each collection searched), at most ID_LOOKUPS at once."""
    assert found.ids is not None
    catalog = _catalog(request)
    start = found.index
    ids = found.ids[start : start + found.limit]
    slots = anyio.CapacityLimiter(ID_LOOKUPS)
    hits: dict[tuple[int, int], dict[str, Any]] = {}
    unavailable: dict[str, dict[str, str]] = {}

    async def lookup(i: int, iid: str, j: int, entry: Entry) -> None:
        async with slots:
            one = Search(limit=1, query={**found.query, "id": iid}, filter=found.filter)
            try:
                page, _, failed = await catalog.page(entry, one, None)
            except UpstreamError as e:
                unavailable[entry.name] = _failed(entry, e)
                return
            for name, e in failed:
                unavailable[f"{entry.name} {name}"] = _failed(entry, e, name)
            for f in page:
                if f["id"] == iid:
                    hits[(i, j)] = f

    async with anyio.create_task_group() as tg:
        for i, iid in enumerate(ids):
            for j, entry in enumerate(entries):
                tg.start_soon(lookup, i, iid, j, entry)
    features = [hits[k] for k in sorted(hits)]
    nxt = start + found.limit
    token = encode(nxt, None) if nxt < len(found.ids) else None
    return _feature_collection(request, features, values, token, None, list(unavailable.values()))


async def service_desc(request: Request) -> Response:
    """The OpenAPI description of this STAC API (`service-desc`)."""
    return JSONResponse(openapi.openapi(_catalog(request).root), media_type=openapi.MEDIA_TYPE)


async def service_doc(request: Request) -> Response:
    """A human-readable page of the same (`service-doc`)."""
    return HTMLResponse(openapi.page(_catalog(request).root))


routes = [
    Route("/stac", landing),
    Route("/stac/api", service_desc),
    Route("/stac/api.html", service_doc),
    Route("/stac/conformance", conformance),
    Route("/stac/queryables", queryables),
    Route("/stac/collections", collections),
    Route("/stac/collections/{cid}", collection),
    Route("/stac/collections/{cid}/queryables", queryables),
    Route("/stac/collections/{cid}/items", items),
    Route("/stac/collections/{cid}/items/{iid:path}", item),
    Route("/stac/search", search, methods=["GET", "POST"]),
]
