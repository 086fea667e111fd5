"""A STAC API with the transactions extension, in memory: where `fdp harvest --push` writes.

`POST /collections`, `GET /collections/{c}`, `POST /collections/{c}/items` (409 if the id is
taken), `PUT /collections/{c}/items/{id}`, `GET /collections/{c}/items` (all of them), and
`GET /_log` (method and path of every write).
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

collections: dict[str, dict[str, Any]] = {}
items: dict[str, dict[str, dict[str, Any]]] = {}
writes: list[list[str]] = []


async def add_collection(request: Request) -> Response:
    doc = await request.json()
    writes.append(["POST", request.url.path])
    collections[doc["id"]] = doc
    items.setdefault(doc["id"], {})
    return JSONResponse(doc, 201)


async def get_collection(request: Request) -> Response:
    cid = request.path_params["cid"]
    if cid not in collections:
        return JSONResponse({"detail": "no such collection"}, 404)
    return JSONResponse(collections[cid])


async def add_item(request: Request) -> Response:
    cid = request.path_params["cid"]
    doc = await request.json()
    writes.append(["POST", request.url.path])
    if cid not in collections:
        return JSONResponse({"detail": "no such collection"}, 404)
    if doc["id"] in items[cid]:
        return JSONResponse({"detail": "exists"}, 409)
    items[cid][doc["id"]] = doc
    return JSONResponse(doc, 201)


async def put_item(request: Request) -> Response:
    cid, iid = request.path_params["cid"], request.path_params["iid"]
    writes.append(["PUT", request.url.path])
    items[cid][iid] = await request.json()
    return JSONResponse(items[cid][iid])


async def list_items(request: Request) -> Response:
    found = list(items.get(request.path_params["cid"], {}).values())
    return JSONResponse({"type": "FeatureCollection", "features": found})


async def log(request: Request) -> Response:
    return JSONResponse(writes)


app = Starlette(
    routes=[
        Route("/collections", add_collection, methods=["POST"]),
        Route("/collections/{cid}", get_collection),
        Route("/collections/{cid}/items", add_item, methods=["POST"]),
        Route("/collections/{cid}/items", list_items, methods=["GET"]),
        Route("/collections/{cid}/items/{iid}", put_item, methods=["PUT"]),
        Route("/_log", log),
    ]
)

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    uvicorn.run(app, host="127.0.0.1", port=p.parse_args().port, log_level="warning")
