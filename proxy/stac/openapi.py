"""The OpenAPI description of `/stac` (`service-desc`) and a page of it for people."""

from __future__ import annotations

from html import escape
from typing import Any

from proxy.stac.documents import GEOJSON, STAC_VERSION

MEDIA_TYPE = "application/vnd.oai.openapi+json;version=3.0"


def page(root: str) -> str:
    """A human-readable page of the same (`service-doc`): no script, no CDN."""
    doc = openapi(root)
    rows = "".join(
        f"<tr><td>{escape(method.upper())}</td><td><code>{escape(path)}</code></td>"
        f"<td>{escape(op['summary'])}</td></tr>"
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
    )
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>fdp STAC API</title>'
        "</head><body><h1>fdp STAC API</h1><p>Machine-readable: "
        f'<a href="{escape(root)}/api">OpenAPI</a></p>'
        f"<table><tr><th>method</th><th>path</th><th>what</th></tr>{rows}</table></body></html>"
    )
    return page


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
        for n in ("bbox", "datetime", "ids", "collections", "limit", "token", "filter")
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
                    "parameters": [cid, *search[:2], *search[4:]],
                    "responses": geojson,
                }
            },
            "/collections/{collectionId}/items/{featureId}": {
                "get": {"summary": "one item", "parameters": [cid, fid], "responses": ok}
            },
            "/queryables": {"get": {"summary": "what a filter may name", "responses": ok}},
            "/collections/{collectionId}/queryables": {
                "get": {"summary": "the same, per collection", "parameters": [cid], "responses": ok}
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
