"""Plain HTTP: resolve keys under a base URL, and fetch bytes from any http(s) href."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from upstreams.base import (
    ObjectNotFound,
    RangeNotSatisfiable,
    UpstreamObject,
    UpstreamTimeout,
    UpstreamUnavailable,
    quote_key,
    safe_key,
)

#: Response headers worth passing on to a client; everything else stays with us.
PASS_HEADERS = (
    "content-type",
    "content-length",
    "content-range",
    "etag",
    "last-modified",
    "accept-ranges",
    "content-encoding",
)
#: Request headers a client may send on to a provider (never Authorization or cookies).
FORWARD_HEADERS = ("range", "if-none-match", "if-modified-since", "if-range")


def make_client(timeout: float = 300.0) -> httpx.AsyncClient:
    """One pooled client per process: connection reuse is most of an upstream's latency."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=10.0),
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        follow_redirects=True,
        headers={"accept-encoding": "identity", "user-agent": "fdp"},
        trust_env=False,
    )


class HttpResolver:
    """Objects of an `http` dataset are keys under `base_url`; `objects`, if given, is the list."""

    def __init__(self, base_url: str, objects: list[str] | None = None) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.objects = set(objects) if objects is not None else None

    async def resolve(self, path: str) -> UpstreamObject:
        return self._resolve(path)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one resolver per dataset, for good)
    def _resolve(self, path: str) -> UpstreamObject:
        key = safe_key(path)
        if self.objects is not None and key not in self.objects:
            raise ObjectNotFound(f"no object {key!r}")
        return UpstreamObject(href=self.base_url + quote_key(key))


@dataclass
class Meta:
    size: int
    media_type: str | None
    etag: str | None
    last_modified: str | None


def _raise_for(status: int, what: str, response: httpx.Response) -> None:
    if status == 404 or status == 410:
        raise ObjectNotFound(f"{what}: upstream answered {status}")
    if status == 416:
        total = response.headers.get("content-range", "").rpartition("/")[2]
        raise RangeNotSatisfiable(int(total) if total.isdigit() else None)
    if status >= 400:
        raise UpstreamUnavailable(f"{what}: upstream answered {status}", status)


def _transport_error(what: str, exc: httpx.HTTPError) -> UpstreamUnavailable:
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"{what}: upstream timed out ({type(exc).__name__})")
    return UpstreamUnavailable(f"{what}: upstream failed ({type(exc).__name__})")


async def head(client: httpx.AsyncClient, obj: UpstreamObject) -> Meta:
    """Size and validators of an object; falls back to a 1-byte GET where HEAD is refused."""
    try:
        r = await client.head(obj.href, headers=obj.headers)
        if r.status_code in (403, 405, 501) or "content-length" not in r.headers:
            r = await client.get(obj.href, headers={**obj.headers, "range": "bytes=0-0"})
    except httpx.HTTPError as e:
        raise _transport_error("HEAD", e) from None
    _raise_for(r.status_code, "HEAD", r)
    if r.status_code == 206:
        total = r.headers.get("content-range", "").rpartition("/")[2]
        size = int(total) if total.isdigit() else None
    else:
        size = int(r.headers["content-length"]) if "content-length" in r.headers else None
    if size is None:
        raise UpstreamUnavailable("HEAD: upstream did not say the object's size")
    return Meta(
        size=size,
        media_type=r.headers.get("content-type"),
        etag=r.headers.get("etag"),
        last_modified=r.headers.get("last-modified"),
    )


class Body:
    """An open upstream response: status, the headers to pass on, and the byte stream."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status = response.status_code
        self.headers = {k: v for k in PASS_HEADERS if (v := response.headers.get(k)) is not None}

    async def chunks(self) -> AsyncIterator[bytes]:
        """Raw bytes as they arrive; raises UpstreamUnavailable if the body is cut off."""
        try:
            async for chunk in self.response.aiter_raw():
                yield chunk
        except httpx.HTTPError as e:
            raise _transport_error("GET body", e) from None

    async def aclose(self) -> None:
        await self.response.aclose()


async def open_body(
    client: httpx.AsyncClient, obj: UpstreamObject, forward: dict[str, str]
) -> Body:
    """Start a GET; the caller must `aclose()` the result. 304 passes through."""
    headers = {**forward, **obj.headers}
    request = client.build_request("GET", obj.href, headers=headers)
    try:
        response = await client.send(request, stream=True)
    except httpx.HTTPError as e:
        raise _transport_error("GET", e) from None
    if response.status_code >= 400:
        await response.aclose()
        _raise_for(response.status_code, "GET", response)
    return Body(response)
