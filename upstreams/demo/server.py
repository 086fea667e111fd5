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
import json
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from upstreams.demo.catalog import (
    collection,
    collections,
    conformance,
    get_order,
    item,
    items,
    landing,
    place_order,
    search,
)
from upstreams.demo.data import ensure_demo_data
from upstreams.demo.files import DataFiles
from upstreams.demo.state import Fault, State


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


class RequestLog:
    """Record every request (method, path, query, range, if-range, via, whether it carried
    Authorization)."""

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
                "if_range": headers.get("if-range"),
                "via": headers.get("via"),
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
