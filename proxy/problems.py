"""Errors as RFC 9457 problem documents, and the one place exceptions become HTTP statuses."""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from proxy.retrieval import RetrievalError
from upstreams.base import (
    BadPath,
    DatasetNotFound,
    ObjectNotFound,
    RangeNotSatisfiable,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from workers.queue import QueueUnavailable

log = logging.getLogger("fdp.proxy")

PROBLEM_TYPE = "https://fdp.dev/problems/"
TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    416: "Range Not Satisfiable",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class ProxyError(Exception):
    """A client-facing error raised by the proxy's own code."""

    status = 400
    slug = "bad-request"

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class MalformedRange(ProxyError):
    status, slug = 400, "malformed-range"


def problem(
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    body = {
        "type": PROBLEM_TYPE + (slug or str(status)),
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        **({"instance": instance} if instance else {}),
        **extra,
    }
    return Response(
        json.dumps(body),
        status_code=status,
        headers=headers,
        media_type="application/problem+json",
    )


def error_response(exc: Exception, path: str) -> Response:
    """Map one exception to its response; anything unknown is a 500 with no internals shown."""
    if isinstance(exc, ProxyError):
        return problem(exc.status, exc.detail, slug=exc.slug, instance=path, headers=exc.headers)
    if isinstance(exc, QueueUnavailable):
        log.error("%s", exc)
        return problem(
            503, str(exc), slug="queue-unavailable", instance=path, headers={"retry-after": "30"}
        )
    if isinstance(exc, RetrievalError):
        return problem(502, str(exc), slug="retrieval-failed", instance=path)
    if isinstance(exc, DatasetNotFound):
        return problem(404, str(exc), slug="unknown-dataset", instance=path)
    if isinstance(exc, ObjectNotFound):
        return problem(404, str(exc), slug="not-found", instance=path)
    if isinstance(exc, BadPath):
        return problem(400, str(exc), slug="bad-path", instance=path)
    if isinstance(exc, RangeNotSatisfiable):
        headers = {"content-range": f"bytes */{exc.size}"} if exc.size is not None else None
        return problem(416, str(exc), slug="range-not-satisfiable", instance=path, headers=headers)
    if isinstance(exc, UpstreamUnavailable):
        log.warning("upstream failure on %s: %s", path, exc)
        status = 504 if isinstance(exc, UpstreamTimeout) else 502
        return problem(status, str(exc), slug="upstream-failed", instance=path)
    if isinstance(exc, UpstreamError):
        return problem(502, str(exc), slug="upstream-failed", instance=path)
    if isinstance(exc, HTTPException):
        return problem(exc.status_code, exc.detail, instance=path, headers=exc.headers)
    log.error("unhandled error on %s", path, exc_info=exc)
    return problem(500, "internal error; see the server log", instance=path)


async def handle(request: Request, exc: Exception) -> Response:
    return error_response(exc, request.url.path)


def exception_handlers() -> dict[Any, Any]:
    return {Exception: handle, HTTPException: handle, UpstreamError: handle, ProxyError: handle}
