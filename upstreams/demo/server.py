"""A small provider of our own: STAC API + asset server with fault injection.

`fdp demo` runs it as the demo upstream; the tests run it as the upstream they break on
purpose. It serves the files and catalogue written by `upstreams.demo.data`:

- STAC API: `/`, `/conformance`, `/collections[/{c}[/items[/{i}]]]`, `GET|POST /search`.
- Assets: `GET|HEAD /data/{collection}/{item}/{file}` with Range, ETag, Last-Modified.
- A slow archive: collections with `archive_delay` hold the first read of an object until it
  is "staged" (the delay after its first request).
- Offline items: collections with `order_delay` have items whose `order:status` is
  `orderable`; `POST /orders/{c}/{i}` (the item's `eodag:order_link`) orders one, `GET` on the
  same URL (`eodag:status_link`) reports `ordered` then `succeeded` after the delay; until then
  its data answers 409.
- Control, for tests: `GET|DELETE /_log` (every request seen), `POST|DELETE /_faults`
  (delays, HTTP errors, bodies cut off after N bytes, ignored Ranges, lying HEADs, redirects,
  per-user 403s, changed objects; each for the next `times` requests). See `Fault`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import formatdate
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

import shapely.geometry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from werkzeug.http import parse_range_header

from upstreams.demo.data import ensure_demo_data

CHUNK = 256 * 1024
CONFORMS = [
    "https://api.stacspec.org/v1.0.0/core",
    "https://api.stacspec.org/v1.0.0/collections",
    "https://api.stacspec.org/v1.0.0/ogcapi-features",
    "https://api.stacspec.org/v1.0.0/item-search",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson",
]


@dataclass
class Fault:
    """One injected misbehaviour for requests whose path matches `match` (a regex).

    The first fault that applies to a request is used (and its `times` counted down).
    """

    match: str
    method: str | None = None
    #: answer this status with `body` instead of the file (200 here makes a "successful"
    #: error page: a HEAD then says the error body's length, 26 bytes by default)
    status: int | None = None
    body: str = '{"error":"injected fault"}'
    delay: float = 0.0
    cut_after: int | None = None
    #: a 206 whose Content-Length and body are this many bytes short of its Content-Range
    short_by: int = 0
    corrupt: bool = False  # flip the first byte of every chunk sent
    chunk_delay: float = 0.0  # pause after every chunk (a slow link)
    ignore_range: bool = False  # answer a Range request with 200 and the whole body
    head_length: int | None = None  # a HEAD claims this Content-Length (a lying HEAD)
    #: answer 302 (or `status`, if a 3xx) to this URL; `{path}` is replaced by the request path
    redirect: str | None = None
    #: apply only to requests whose Authorization header is exactly this value ...
    authorization: str | None = None
    no_authorization: bool = False  # ... or only to requests that carry none
    #: the object changed upstream: another ETag and Last-Modified, every byte inverted
    changed: bool = False
    times: int | None = None

    def applies(self, method: str, path: str, authorization: str | None = None) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.method and self.method.upper() != method:
            return False
        if self.authorization is not None and authorization != self.authorization:
            return False
        if self.no_authorization and authorization is not None:
            return False
        return re.search(self.match, path) is not None


def changed_bytes(data: bytes) -> bytes:
    """What a `changed` fault serves instead of `data` (the same at every offset)."""
    return data.translate(_INVERT)


_INVERT = bytes(255 - i for i in range(256))


@dataclass
class State:
    root: Path
    catalog: dict[str, Any]
    log: list[dict[str, Any]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    staged_at: dict[str, float] = field(default_factory=dict)
    ordered_at: dict[str, float] = field(default_factory=dict)
    #: where asset hrefs point (another server's URL: a catalogue whose data lives elsewhere)
    asset_base: str | None = None

    def take_fault(self, method: str, path: str, authorization: str | None = None) -> Fault | None:
        for f in self.faults:
            if f.applies(method, path, authorization):
                if f.times is not None:
                    f.times -= 1
                return f
        return None


def order_status(state: State, cid: str, iid: str) -> str | None:
    """None for items that are always online, else orderable / ordered / succeeded."""
    delay = state.catalog["collections"][cid].get("order_delay")
    if delay is None:
        return None
    ordered = state.ordered_at.get(f"{cid}/{iid}")
    if ordered is None:
        return "orderable"
    return "succeeded" if time.monotonic() >= ordered + delay else "ordered"


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


async def get_log(request: Request) -> Response:
    return JSONResponse(request.app.state.demo.log)


async def clear_log(request: Request) -> Response:
    request.app.state.demo.log.clear()
    return Response(status_code=204)


async def add_fault(request: Request) -> Response:
    request.app.state.demo.faults.append(Fault(**await request.json()))
    return Response(status_code=204)


async def clear_faults(request: Request) -> Response:
    state: State = request.app.state.demo
    state.faults.clear()
    state.staged_at.clear()
    state.ordered_at.clear()
    return Response(status_code=204)


class DataFiles:
    """Raw ASGI file server: Range, conditional headers, staging delay, injected faults."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state: State = scope["app"].state.demo
        entry = scope.get("fdp.log", {})  # the request log's entry: bytes sent go there
        method = scope["method"]
        rel = scope["path"][len("/data/") :]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        fault = state.take_fault(method, scope["path"], headers.get("authorization"))
        if fault and fault.delay:
            await asyncio.sleep(fault.delay)
        if fault and fault.redirect:
            location = fault.redirect.replace("{path}", scope["path"])
            status = fault.status if fault.status and 300 <= fault.status < 400 else 302
            await _send_simple(send, status, b"", [(b"location", location.encode())])
            return
        if fault and fault.status:
            await _send_simple(send, fault.status, fault.body.encode())
            return
        path = (state.root / rel).resolve()
        if method not in ("GET", "HEAD"):
            await _send_simple(send, 405, b"")
            return
        inside = state.root.resolve() in path.parents
        if inside and path.is_dir() and scope["path"].endswith("/"):
            page = autoindex(scope["path"], path).encode()
            headers = [(b"content-type", b"text/html")]
            await _send_simple(send, 200, b"" if method == "HEAD" else page, headers)
            return
        if not path.is_file() or not inside:
            await _send_simple(send, 404, b'{"error":"no such file"}')
            return
        cid, iid = [*rel.split("/"), "", ""][:2]
        if cid in state.catalog["collections"] and order_status(state, cid, iid) in (
            "orderable",
            "ordered",
        ):
            await _send_simple(send, 409, b'{"error":"offline: order the item first"}')
            return
        delay = state.catalog["collections"].get(cid, {}).get("archive_delay", 0.0)
        if delay and method == "GET":
            ready_at = state.staged_at.setdefault(rel, time.monotonic() + delay)
            await asyncio.sleep(max(0.0, ready_at - time.monotonic()))
        st = path.stat()
        changed = fault is not None and fault.changed
        etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}{"-changed" if changed else ""}"'
        mtime = st.st_mtime + (3600 if changed else 0)
        out = [
            (b"accept-ranges", b"bytes"),
            (b"content-type", b"image/tiff"),
            (b"etag", etag.encode()),
            (b"last-modified", formatdate(mtime, usegmt=True).encode()),
        ]
        start, end, status = 0, st.st_size, 200
        ignore_range = fault is not None and fault.ignore_range
        rng = None if ignore_range else parse_range_header(headers.get("range"))
        if rng is not None and len(rng.ranges) == 1:
            bounds = rng.range_for_length(st.st_size)
            if bounds is None:
                out.append((b"content-range", f"bytes */{st.st_size}".encode()))
                await _send_simple(send, 416, b"", out)
                return
            start, end, status = bounds[0], bounds[1], 206
            out.append((b"content-range", f"bytes {start}-{end - 1}/{st.st_size}".encode()))
        if status == 206 and fault is not None and fault.short_by:
            end = max(start, end - fault.short_by)  # a lying 206: whole, but shorter
        length = end - start
        if method == "HEAD" and fault is not None and fault.head_length is not None:
            length = fault.head_length
        out.append((b"content-length", str(length).encode()))
        await send({"type": "http.response.start", "status": status, "headers": out})
        if method == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return
        limit = end if fault is None or fault.cut_after is None else start + fault.cut_after
        with path.open("rb") as f:
            pos = start
            while pos < min(end, limit):
                n = min(CHUNK, end - pos, limit - pos)
                chunk = os.pread(f.fileno(), n, pos)
                pos += len(chunk)
                entry["bytes"] = pos - start
                if fault is not None and fault.corrupt and chunk:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                if changed:
                    chunk = changed_bytes(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                entry["last_byte"] = time.time()
                if fault is not None and fault.chunk_delay:
                    await asyncio.sleep(fault.chunk_delay)
        if pos < end:
            return  # cut off: the server closes the connection with the body incomplete
        await send({"type": "http.response.body", "body": b""})


def autoindex(url_path: str, folder: Path) -> str:
    """A folder's listing as nginx's `autoindex on` writes it (names, dates, exact sizes)."""
    lines = ['<a href="../">../</a>']
    for child in sorted(folder.iterdir()):
        st = child.stat()
        name = child.name + ("/" if child.is_dir() else "")
        when = time.strftime("%d-%b-%Y %H:%M", time.gmtime(st.st_mtime))
        size = "-" if child.is_dir() else str(st.st_size)
        lines.append(f'<a href="{quote(name)}">{escape(name)}</a>{" " * 20}{when}{size:>20}')
    title = f"Index of {escape(url_path)}"
    body = "\n".join(lines)
    return (
        f"<html>\n<head><title>{title}</title></head>\n<body>\n"
        f"<h1>{title}</h1><hr><pre>{body}\n</pre><hr></body>\n</html>\n"
    )


async def _send_simple(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    out = [(k, v) for k, v in headers or [] if k != b"content-length"]
    out.append((b"content-length", str(len(body)).encode()))
    if not any(k == b"content-type" for k, _ in out):
        out.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})


class RequestLog:
    """Record every request (method, path, query, range, whether it carried Authorization)."""

    def __init__(self, app: Starlette) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/_"):
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
            }
            entry = {
                "method": scope["method"],
                "path": scope["path"],
                "query": scope["query_string"].decode("latin-1"),
                "range": headers.get("range"),
                "authorization": "authorization" in headers,
                "time": time.time(),
                "bytes": 0,
            }
            self.app.state.demo.log.append(entry)
            scope = {**scope, "fdp.log": entry}
            try:
                await self.app(scope, receive, send)
            finally:
                entry["ended"] = time.time()
            return
        await self.app(scope, receive, send)


def create_app(root: Path, asset_base: str | None = None) -> RequestLog:
    """The upstream app over the demo data in `root` (generated when missing).

    `asset_base`: the URL asset hrefs point at, instead of this server's own.
    """
    root = Path(root)
    manifest = ensure_demo_data(root)
    app = Starlette(
        routes=[
            Route("/", landing),
            Route("/conformance", conformance),
            Route("/collections", collections),
            Route("/collections/{cid}", collection),
            Route("/collections/{cid}/items", items),
            Route("/collections/{cid}/items/{iid}", item),
            Route("/search", search, methods=["GET", "POST"]),
            Route("/data/{rest:path}", DataFiles(), methods=["GET", "HEAD"]),
            Route("/orders/{cid}/{iid}", place_order, methods=["POST"]),
            Route("/orders/{cid}/{iid}", get_order, methods=["GET"]),
            Route("/_log", get_log, methods=["GET"]),
            Route("/_log", clear_log, methods=["DELETE"]),
            Route("/_faults", add_fault, methods=["POST"]),
            Route("/_faults", clear_faults, methods=["DELETE"]),
        ]
    )
    app.state.demo = State(
        root=root,
        catalog=json.loads(manifest.read_text()),
        asset_base=asset_base.rstrip("/") if asset_base else None,
    )
    return RequestLog(app)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description="fdp demo/test upstream (STAC API + assets)")
    p.add_argument("--data", type=Path, required=True, help="data folder (created on first run)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--asset-base", help="URL asset hrefs point at (default: this server)")
    args = p.parse_args(argv)
    app = create_app(args.data, args.asset_base)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
