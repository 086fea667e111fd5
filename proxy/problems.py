"""Errors as RFC 9457 problem documents, and the one table that turns exceptions into statuses.

The table is keyed by exception type and looked up along the type's MRO (like Starlette's
handler lookup): a subclass is mapped by its own entry or its nearest ancestor's. Anything
not in the table is a 500 whose details stay in the log.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from cache.fill import FillFailed
from policies.qos import QosUnavailable, RateLimited
from proxy.retrieval import RetrievalError
from upstreams.base import (
    BadPath,
    DatasetNotFound,
    LoopDetected,
    ObjectNotFound,
    OriginNotAllowed,
    RangeNotSatisfiable,
    UpstreamError,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from upstreams.caps import UpstreamBusy
from workers.queue import QueueUnavailable

log = logging.getLogger("fdp.proxy")

PROBLEM_TYPE = "https://fdp.dev/problems/"
TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    412: "Precondition Failed",
    416: "Range Not Satisfiable",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    508: "Loop Detected",
}


class ProxyError(Exception):
    """A client-facing error raised by the proxy's own code: it carries its status."""

    status = 400
    slug = "bad-request"

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class BadRequest(ProxyError):
    """A request we cannot make sense of: a malformed or non-ASCII header, a bad value."""


class MalformedRange(ProxyError):
    status, slug = 400, "malformed-range"


class MethodNotAllowed(ProxyError):
    status, slug = 405, "method-not-allowed"


class PreconditionFailed(ProxyError):
    status, slug = 412, "precondition-failed"


@dataclass(frozen=True)
class Rule:
    """How one kind of exception answers: status, problem slug, extra headers, log level."""

    status: int
    slug: str
    headers: Callable[[Any], dict[str, str]] | None = None
    level: int | None = None  # log one line (no traceback) at this level


def _range_headers(exc: RangeNotSatisfiable) -> dict[str, str]:
    return {"content-range": f"bytes */{exc.size}"} if exc.size is not None else {}


RULES: dict[type[BaseException], Rule] = {
    DatasetNotFound: Rule(404, "unknown-dataset"),
    ObjectNotFound: Rule(404, "not-found"),
    BadPath: Rule(400, "bad-path"),
    RangeNotSatisfiable: Rule(416, "range-not-satisfiable", _range_headers),
    UpstreamRefused: Rule(403, "upstream-refused", level=logging.INFO),
    OriginNotAllowed: Rule(502, "origin-not-allowed"),  # logged where it is refused
    LoopDetected: Rule(508, "loop-detected", level=logging.WARNING),
    UpstreamBusy: Rule(503, "upstream-busy", lambda e: {"retry-after": str(e.retry_after)}),
    UpstreamTimeout: Rule(504, "upstream-timeout", level=logging.WARNING),
    UpstreamUnavailable: Rule(502, "upstream-failed", level=logging.WARNING),
    UpstreamError: Rule(502, "upstream-failed", level=logging.WARNING),
    FillFailed: Rule(502, "upstream-failed", level=logging.WARNING),
    QueueUnavailable: Rule(
        503, "queue-unavailable", lambda e: {"retry-after": "30"}, level=logging.ERROR
    ),
    RetrievalError: Rule(502, "retrieval-failed", level=logging.WARNING),
    RateLimited: Rule(429, "rate-limited", lambda e: e.headers),
    QosUnavailable: Rule(503, "qos-unavailable", lambda e: {"retry-after": "5"}),
}


def lookup(exc: BaseException) -> Rule | None:
    """The rule of the nearest type in `exc`'s MRO that has one."""
    for cls in type(exc).__mro__:
        rule = RULES.get(cls)
        if rule is not None:
            return rule
    return None


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
        headers={"cache-control": "no-store", **(headers or {})},
        media_type="application/problem+json",
    )


def error_response(exc: BaseException, path: str) -> Response:
    """The response for `exc`, by the table; unknown errors are logged and shown as 500."""
    if isinstance(exc, ProxyError):
        return problem(exc.status, exc.detail, slug=exc.slug, instance=path, headers=exc.headers)
    if isinstance(exc, HTTPException):
        return problem(exc.status_code, exc.detail, instance=path, headers=exc.headers)
    rule = lookup(exc)
    if rule is None:
        log.error("unhandled error on %s", path, exc_info=exc)
        return problem(500, "internal error; see the server log", instance=path)
    if rule.level is not None:
        log.log(rule.level, "%s: %s", path, exc)
    headers = rule.headers(exc) if rule.headers else None
    return problem(rule.status, str(exc), slug=rule.slug, instance=path, headers=headers)


def slug_of(exc: BaseException) -> str:
    """A short name of what went wrong, for the access log."""
    if isinstance(exc, ProxyError):
        return exc.slug
    rule = lookup(exc)
    return rule.slug if rule else type(exc).__name__


async def handle(request: Request, exc: Exception) -> Response:
    return error_response(exc, request.url.path)


def exception_handlers() -> dict[Any, Any]:
    """Starlette's handlers: every mapped type (Starlette walks the MRO too); an unmapped
    error reaches its ServerErrorMiddleware, which answers 500 and logs the traceback."""
    return {cls: handle for cls in (*RULES, ProxyError, HTTPException, Exception)}
