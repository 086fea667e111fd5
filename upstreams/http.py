"""Plain HTTP: resolve keys under a base URL, and fetch bytes from any allowed http(s) href.

Redirects are followed here, not by the clients: every hop must be an origin the dataset
allows, and the provider's credentials (`UpstreamObject.headers`) never leave the href's
origin. Two clients, chosen by measurement (NOTES.md, README): httpx on the event loop for
small calls and pass-through, urllib3 in threads for block fills (`open_sync`), which read
sequential 4 MiB ranges from nginx here at 2.1 GB/s against httpx's 0.8 GB/s, and keep
the reading, writing and hashing of bytes off the event loop.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urljoin

import httpx
import urllib3
from prometheus_client import Counter, Histogram

from upstreams import autoindex
from upstreams.base import (
    Listed,
    LoopDetected,
    ObjectNotFound,
    Origin,
    Origins,
    RangeNotSatisfiable,
    Timeouts,
    UpstreamObject,
    UpstreamTimeout,
    UpstreamUnavailable,
    bind,
    host_of,
    origin_of,
    quote_key,
    safe_key,
)
from upstreams.memo import Memo

UPSTREAM_SECONDS = Histogram(
    "fdp_upstream_response_seconds",
    "Time from sending a request to an upstream to its answer's headers, by origin",
    ["upstream"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
UPSTREAM_ERRORS = Counter(
    "fdp_upstream_errors",
    "Requests to an upstream that failed (timeout, failed) or answered 5xx, by origin",
    ["upstream", "kind"],
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
REDIRECTS = (301, 302, 303, 307, 308)
#: resolutions kept per dataset, and for how long (they cost nothing to redo)
MEMO_SIZE, MEMO_TTL = 4096, 300.0
MAX_REDIRECTS = 5
#: how long one crawl of autoindex pages may take
LISTING_SECONDS = 60.0
CLIENT_HEADERS = {"accept-encoding": "identity", "user-agent": "fdp"}


def httpx_timeout(timeouts: Timeouts) -> httpx.Timeout:
    """Our two numbers as httpx's four: writes like reads, a pooled connection like a call."""
    return httpx.Timeout(
        connect=timeouts.connect, read=timeouts.read, write=timeouts.read, pool=timeouts.call
    )


def make_client(timeouts: Timeouts | None = None) -> httpx.AsyncClient:
    """One pooled client per process: connection reuse is most of an upstream's latency.

    It does not follow redirects: `head` and `open_body` do, checking each hop.
    """
    return httpx.AsyncClient(
        timeout=httpx_timeout(timeouts or Timeouts()),
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        follow_redirects=False,
        headers=CLIENT_HEADERS,
        trust_env=False,
    )


def sync_timeout(timeouts: Timeouts) -> urllib3.Timeout:
    return urllib3.Timeout(connect=timeouts.connect, read=timeouts.read)


def make_pool(timeouts: Timeouts | None = None, per_host: int = 16) -> urllib3.PoolManager:
    """The blocking client for block fills (threads) and workers: pooled per origin, no
    retries or redirects of its own (`open_sync` follows them), no proxies from the env."""
    return urllib3.PoolManager(
        num_pools=256,
        maxsize=per_host,
        retries=False,
        timeout=sync_timeout(timeouts or Timeouts()),
        headers=CLIENT_HEADERS,
    )


class HttpResolver:
    """Objects of an `http` dataset are keys under `base_url`; `objects`, if given, is the list."""

    def __init__(
        self,
        base_url: str,
        objects: list[str] | None = None,
        origins: Origins | None = None,
        timeouts: Timeouts | None = None,
        autoindex: bool = True,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        #: sent with every fetch to its own origin (a service token), never elsewhere
        self.headers = headers or {}
        self.objects = set(objects) if objects is not None else None
        self.origins = (origins or Origins()) | Origins.of(self.base_url)
        self.timeouts = timeouts or Timeouts()
        self.autoindex = autoindex
        self._seen: Memo[str, UpstreamObject] = Memo(MEMO_SIZE, MEMO_TTL)

    async def listing(self, limit: int = 10000) -> list[Listed]:
        """The configured `objects`, else what the server's autoindex pages list."""
        if self.objects is not None:
            return [Listed(k) for k in sorted(self.objects)[:limit]]
        if not self.autoindex:
            return []
        deadline = time.monotonic() + LISTING_SECONDS
        async with make_client(self.timeouts) as client:
            return await autoindex.crawl(self.base_url, self.origins, client, limit, deadline)

    async def resolve(self, path: str) -> UpstreamObject:
        obj = self._seen.get(path)
        if obj is None:
            key = safe_key(path)
            if self.objects is not None and key not in self.objects:
                raise ObjectNotFound(f"no object {key!r}")
            href = self.base_url + quote_key(key)
            obj = bind(UpstreamObject(href, headers=self.headers), self.origins, self.timeouts)
            self._seen[path] = obj
        return obj


@dataclass
class Meta:
    size: int
    media_type: str | None
    etag: str | None
    last_modified: str | None


def _raise_for(status: int, what: str, headers: Mapping[str, str]) -> None:
    if status == 404 or status == 410:
        raise ObjectNotFound(f"{what}: upstream answered {status}")
    if status == 508:
        raise LoopDetected(f"{what}: the upstream fdp found a loop of fdps (508)")
    if status == 416:
        total = headers.get("content-range", "").rpartition("/")[2]
        raise RangeNotSatisfiable(int(total) if total.isdigit() else None)
    if status >= 400:
        raise UpstreamUnavailable(f"{what}: upstream answered {status}", status)


@contextlib.contextmanager
def map_transport_errors(what: str) -> Iterator[None]:
    """The one place httpx's transport errors become ours (like httpx's own mapping of httpcore)."""
    try:
        yield
    except httpx.TimeoutException as e:
        raise UpstreamTimeout(f"{what}: upstream timed out ({type(e).__name__})") from None
    except httpx.HTTPError as e:
        raise UpstreamUnavailable(f"{what}: upstream failed ({type(e).__name__})") from None


@contextlib.contextmanager
def map_sync_errors(what: str) -> Iterator[None]:
    """The same for urllib3 (whose refused connection is, oddly, a kind of timeout)."""
    try:
        yield
    except urllib3.exceptions.NewConnectionError:
        raise UpstreamUnavailable(f"{what}: upstream refused the connection") from None
    except urllib3.exceptions.TimeoutError as e:
        raise UpstreamTimeout(f"{what}: upstream timed out ({type(e).__name__})") from None
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise UpstreamUnavailable(f"{what}: upstream failed ({type(e).__name__})") from None


@dataclass
class Health:
    """How one origin has answered this process lately (for /status)."""

    last_ok: float | None = None
    last_error: float | None = None
    error: str | None = None  # timeout, failed, 5xx

    def public(self) -> dict[str, Any]:
        down = self.last_error is not None and (self.last_ok or 0) < self.last_error
        return {"ok": not down, **asdict(self)}


#: by origin (bounded: fetches only go to allowed origins)
HEALTH: dict[str, Health] = {}


def _health(upstream: str) -> Health:
    health = HEALTH.get(upstream)
    if health is None:
        if len(HEALTH) >= 1024:
            HEALTH.pop(next(iter(HEALTH)))
        health = HEALTH[upstream] = Health()
    return health


def answered(url: str, status: int) -> None:
    """Note an upstream's answer: a 5xx counts as an error of its origin."""
    upstream = host_of(url) or "(none)"
    health = _health(upstream)
    if status >= 500:
        UPSTREAM_ERRORS.labels(upstream, "5xx").inc()
        health.last_error, health.error = time.time(), "5xx"
    else:
        health.last_ok = time.time()


@contextlib.contextmanager
def observed(url: str, what: str = "GET", sync: bool = False) -> Iterator[None]:
    """One request to an upstream: its time to the answer's headers and its failures
    (as the proxy maps them), counted by origin."""
    upstream = host_of(url) or "(none)"
    started = time.perf_counter()
    try:
        with map_sync_errors(what) if sync else map_transport_errors(what):
            yield
    except UpstreamTimeout:
        UPSTREAM_ERRORS.labels(upstream, "timeout").inc()
        _health(upstream).last_error, _health(upstream).error = time.time(), "timeout"
        raise
    except UpstreamUnavailable:
        UPSTREAM_ERRORS.labels(upstream, "failed").inc()
        _health(upstream).last_error, _health(upstream).error = time.time(), "failed"
        raise
    UPSTREAM_SECONDS.labels(upstream).observe(time.perf_counter() - started)


def _origin(url: str) -> Origin | None:
    try:
        return origin_of(url)
    except ValueError:
        return None


class Hops:
    """Where one fetch goes next: each redirect's origin checked, credentials kept at home."""

    def __init__(self, obj: UpstreamObject) -> None:
        self.allowed = obj.origins if obj.origins is not None else Origins.of(obj.href)
        if obj.origins is not None:
            obj.origins.check(obj.href, "href")
        self.home = _origin(obj.href)
        self.url = obj.href
        self.credentials = obj.headers
        self.timeouts = obj.timeouts
        self.timeout: Any = (
            httpx_timeout(obj.timeouts) if obj.timeouts else httpx.USE_CLIENT_DEFAULT
        )
        self.left = MAX_REDIRECTS

    def headers(self, extra: dict[str, str]) -> dict[str, str]:
        return {**extra, **self.credentials}

    def follow(self, status: int, location: str | None) -> bool:
        """True when this answer is a redirect we may follow; `url` is then the next hop."""
        if status not in REDIRECTS or not location:
            return False
        if self.left == 0:
            raise UpstreamUnavailable(f"more than {MAX_REDIRECTS} redirects", status)
        self.left -= 1
        url = urljoin(self.url, location)
        self.allowed.check(url, "redirect")
        if _origin(url) != self.home:
            self.credentials = {}  # the provider's credentials are for its own origin only
        self.url = url
        return True


async def _send(
    client: httpx.AsyncClient,
    method: str,
    obj: UpstreamObject,
    extra: dict[str, str],
    *,
    stream: bool = False,
) -> httpx.Response:
    """Send one request and follow its redirects; the final response is returned open."""
    hops = Hops(obj)
    while True:
        request = client.build_request(
            method, hops.url, headers=hops.headers(extra), timeout=hops.timeout
        )
        with observed(hops.url, method):
            response = await client.send(request, stream=stream)
        answered(hops.url, response.status_code)
        try:
            if not hops.follow(response.status_code, response.headers.get("location")):
                return response
        except BaseException:
            await response.aclose()
            raise
        await response.aclose()


async def probe(client: httpx.AsyncClient, obj: UpstreamObject) -> Meta:
    """Size and validators as the object's GETs will report them: a 1-byte ranged GET.

    A HEAD can lie (an error page's length, a stale size); the `Content-Range` total of a
    ranged GET is what every later block fetch is checked against. An upstream that ignores
    Range answers 200: its Content-Length is the size, and the body is not read.
    """
    r = await _send(client, "GET", obj, {"range": "bytes=0-0"}, stream=True)
    try:
        return meta_of(r.status_code, r.headers, "GET")
    finally:
        await r.aclose()


async def head(client: httpx.AsyncClient, obj: UpstreamObject) -> Meta:
    """Size and validators of an object; a 1-byte GET where HEAD is refused or says no size."""
    r = await _send(client, "HEAD", obj, {})
    if r.status_code in (403, 405, 501) or "content-length" not in r.headers:
        return await probe(client, obj)
    return meta_of(r.status_code, r.headers, "HEAD")


def meta_of(status: int, headers: Mapping[str, str], what: str) -> Meta:
    """Size and validators from an answer to a GET (a 206's total) or a HEAD. A ranged GET
    of an empty object is a 416 with `bytes */0`: its size is 0."""
    if status == 416 and headers.get("content-range", "").strip() == "bytes */0":
        return Meta(0, headers.get("content-type"), headers.get("etag"), None)
    _raise_for(status, what, headers)
    if status == 206:
        total = headers.get("content-range", "").rpartition("/")[2]
        size = int(total) if total.isdigit() else None
    else:
        length = headers.get("content-length")
        size = int(length) if length is not None and length.isdigit() else None
    if size is None:
        raise UpstreamUnavailable(f"{what}: upstream did not say the object's size")
    return Meta(
        size=size,
        media_type=headers.get("content-type"),
        etag=headers.get("etag"),
        last_modified=headers.get("last-modified"),
    )


class Body:
    """An open upstream response: status, the headers to pass on, and the byte stream.

    An async context manager: `async with await open_body(...) as body:` (or `stream(...)`)
    closes it on every path.
    """

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status = response.status_code
        self.headers = {k: v for k in PASS_HEADERS if (v := response.headers.get(k)) is not None}

    async def chunks(self) -> AsyncIterator[bytes]:
        """Raw bytes as they arrive; raises UpstreamUnavailable if the body is cut off."""
        with map_transport_errors("GET body"):
            async for chunk in self.response.aiter_raw():
                yield chunk

    async def aclose(self) -> None:
        await self.response.aclose()

    async def __aenter__(self) -> Body:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def open_body(
    client: httpx.AsyncClient, obj: UpstreamObject, forward: dict[str, str]
) -> Body:
    """Start a GET (following allowed redirects); close the result. 304 passes through."""
    response = await _send(client, "GET", obj, forward, stream=True)
    if response.status_code >= 400:
        await response.aclose()
        _raise_for(response.status_code, "GET", response.headers)
    return Body(response)


@contextlib.asynccontextmanager
async def stream(
    client: httpx.AsyncClient, obj: UpstreamObject, forward: dict[str, str]
) -> AsyncIterator[Body]:
    """`open_body` as a context manager: the body is closed however the block ends."""
    async with await open_body(client, obj, forward) as body:
        yield body


class SyncBody:
    """An open upstream answer read in a thread: status, headers, and `read`."""

    def __init__(self, response: urllib3.BaseHTTPResponse) -> None:
        self.response = response
        self.status = response.status
        self.headers = response.headers

    def read(self, most: int) -> bytes:
        """The bytes that have arrived (at least one, at most `most`), without waiting for
        more; b"" at the end. A cut body raises."""
        with map_sync_errors("GET body"):
            return self.response.read1(most)


@contextlib.contextmanager
def open_sync(
    pool: urllib3.PoolManager, obj: UpstreamObject, forward: dict[str, str] | None = None
) -> Iterator[SyncBody]:
    """A blocking GET with the same redirect, origin and error rules as `open_body`.

    Its connection goes back to the pool only when the body was read to the end.
    """
    hops = Hops(obj)
    while True:
        # the pool's timeouts unless the dataset has its own
        own = {"timeout": sync_timeout(hops.timeouts)} if hops.timeouts else {}
        with observed(hops.url, sync=True):
            response = pool.request(
                "GET",
                hops.url,
                headers=hops.headers(forward or {}),
                preload_content=False,
                decode_content=False,
                redirect=False,
                **own,
            )
        answered(hops.url, response.status)
        try:
            if not hops.follow(response.status, response.headers.get("location")):
                break
        except BaseException:
            _discard(response)
            raise
        _discard(response)
    try:
        if response.status >= 400:
            _raise_for(response.status, "GET", response.headers)
        yield SyncBody(response)
    finally:
        _discard(response)


def probe_sync(pool: urllib3.PoolManager, obj: UpstreamObject) -> Meta:
    """`probe` for threads and workers."""
    try:
        with open_sync(pool, obj, {"range": "bytes=0-0"}) as body:
            return meta_of(body.status, body.headers, "GET")
    except RangeNotSatisfiable as e:
        if e.size == 0:  # an empty object
            return Meta(0, None, None, None)
        raise


def _discard(response: urllib3.BaseHTTPResponse) -> None:
    """Reuse the connection if the body was read to the end, else close it."""
    if response.length_remaining != 0:
        response.close()
    response.release_conn()
