"""What every upstream resolves a request path to, and the errors it may raise."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import quote, urlsplit

import anyio
import anyio.to_thread

if TYPE_CHECKING:
    from upstreams.mirrors import Alternates

log = logging.getLogger("fdp.upstreams")

T = TypeVar("T")

#: (scheme, host, port): what a fetch may reach. Hosts are lower-case, ports explicit.
Origin = tuple[str, str, int]
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Timeouts:
    """How long one upstream call may wait to connect, and then between bytes."""

    connect: float = 5.0
    read: float = 30.0

    @property
    def call(self) -> float:
        """The longest one attempt of a call can take before its timeouts fire."""
        return self.connect + self.read


class Origins:
    """The origins a dataset's fetches may reach; everything else is refused."""

    def __init__(self, origins: Iterable[Origin] = ()) -> None:
        self.origins = frozenset(origins)

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Origins:
        """From `allowed_hosts` entries: `host` (ports 80/443), `host:port` or a URL."""
        out: set[Origin] = set()
        for entry in entries:
            if "://" in entry:
                out.add(origin_of(entry))
                continue
            parts = urlsplit(f"//{entry}")
            host = (parts.hostname or "").lower()
            if not host:
                raise ValueError(f"not a host: {entry!r}")
            for scheme, default in DEFAULT_PORTS.items():
                out.add((scheme, host, parts.port or default))
        return cls(out)

    @classmethod
    def of(cls, *urls: str) -> Origins:
        """The origins of these URLs (those that are http(s) URLs with a host)."""
        out = set()
        for url in urls:
            try:
                out.add(origin_of(url))
            except ValueError:
                continue
        return cls(out)

    def __or__(self, other: Origins) -> Origins:
        return Origins(self.origins | other.origins)

    def __contains__(self, url: str) -> bool:
        try:
            return origin_of(url) in self.origins
        except ValueError:
            return False

    def __repr__(self) -> str:
        return f"Origins({sorted(f'{s}://{h}:{p}' for s, h, p in self.origins)})"

    def check(self, url: str, what: str) -> None:
        """Raise OriginNotAllowed unless `url` may be fetched; logs the origin, never the URL."""
        if url in self:
            return
        try:
            scheme, host, port = origin_of(url)
            shown = f"{scheme}://{host}:{port}"
        except ValueError:
            shown = f"a non-HTTP URL ({urlsplit(url).scheme or 'no scheme'})"
        log.warning("refused %s to %s: not an allowed origin of the dataset", what, shown)
        raise OriginNotAllowed(
            f"the upstream's {what} points at an origin this dataset does not allow"
        )


def host_of(href: str) -> str:
    """`host[:port]` of an href, lower case, without credentials ("" when it has none): how
    per-origin caps, thread limits and metrics name an upstream (cheap: no parsing)."""
    return href.split("/", 3)[2].rpartition("@")[2].lower() if "://" in href else ""


def origin_of(url: str) -> Origin:
    """(scheme, host, port) of an http(s) URL; ValueError for anything else."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an http(s) URL with a host: {url!r}")
    return scheme, parts.hostname.lower(), parts.port or DEFAULT_PORTS[scheme]


@dataclass(frozen=True)
class UpstreamObject:
    """One object at a provider. `headers` carry the provider's credentials: never show them."""

    href: str
    size: int | None = None
    media_type: str | None = None
    checksum: str | None = None  # multihash, hex (STAC `file:checksum`)
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    online: bool = True
    #: where fetches of it may go (redirects included); None: only the href's own origin
    origins: Origins | None = field(default=None, repr=False, compare=False)
    #: its dataset's timeouts; None: the client's defaults
    timeouts: Timeouts | None = field(default=None, repr=False, compare=False)
    #: an object of a mirror set: every mirror that holds it (`href` is the best one's)
    mirrors: Alternates | None = field(default=None, repr=False, compare=False)


def bind(obj: UpstreamObject, origins: Origins, timeouts: Timeouts) -> UpstreamObject:
    """A resolved object as fetches must treat it: href checked, the dataset's rules attached."""
    origins.check(obj.href, "href")
    return replace(obj, origins=origins, timeouts=timeouts)


class Resolver(Protocol):
    #: where the objects it resolves may be fetched from (its own origins included)
    origins: Origins

    async def resolve(self, path: str) -> UpstreamObject: ...


class UpstreamError(Exception):
    """Base of what an upstream can go wrong with; the proxy maps each kind to one status."""


class DatasetNotFound(UpstreamError):
    """No dataset of that name is configured."""


class ObjectNotFound(UpstreamError):
    """The dataset has no such item, asset or object."""


class BadPath(UpstreamError):
    """The path cannot name an object (traversal, empty segments, control characters)."""


class RangeNotSatisfiable(UpstreamError):
    def __init__(self, size: int | None) -> None:
        super().__init__(f"range not satisfiable (size {size})")
        self.size = size


class UpstreamUnavailable(UpstreamError):
    """The provider failed or did not answer; `status` is what it said, if anything."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class UpstreamTimeout(UpstreamUnavailable):
    """The provider did not answer in time."""


class UpstreamRefused(UpstreamError):
    """The provider refused the caller's own credentials (`forward_token`): a 403 for them."""


class LoopDetected(UpstreamError):
    """This request has been through this fdp before (its `Via`): tiers configured in a
    circle. Not a fault of any one upstream, so no mirror is blamed for it."""


class OriginNotAllowed(UpstreamError):
    """An href or redirect pointed outside the dataset's allowed origins; nothing was sent."""


#: For threads that already hold a slot of their upstream's limiter.
_HELD = anyio.CapacityLimiter(math.inf)


async def run_blocking(
    limiter: anyio.CapacityLimiter, wait: float, fn: Callable[..., T], *args: object
) -> T:
    """Run blocking upstream work on one of its upstream's threads, not the shared pool.

    Waiting for a free thread is bounded by `wait`, so a stalled upstream answers
    UpstreamTimeout instead of queueing requests for as long as its calls take to time out.
    A caller that is cancelled (a deadline, a client gone) returns at once; the thread runs
    on to its own timeouts and gives its slot back when it ends, so the limit still holds.
    """
    token = object()
    try:
        with anyio.fail_after(wait):
            await limiter.acquire_on_behalf_of(token)
    except TimeoutError:
        raise UpstreamTimeout(
            f"the upstream is busy (all {limiter.total_tokens:g} of its threads are in use)"
        ) from None
    loop = asyncio.get_running_loop()
    lock, state = threading.Lock(), ["queued"]  # -> running (thread), or abandoned (caller)

    def work() -> T | None:
        with lock:
            if state[0] == "abandoned":
                return None
            state[0] = "running"
        try:
            return fn(*args)
        finally:
            loop.call_soon_threadsafe(limiter.release_on_behalf_of, token)

    try:
        return await anyio.to_thread.run_sync(work, limiter=_HELD, abandon_on_cancel=True)  # type: ignore[return-value]
    except BaseException:
        with lock:
            if state[0] == "queued":  # the thread never started it: the slot is ours to free
                state[0] = "abandoned"
                limiter.release_on_behalf_of(token)
        raise


def safe_key(path: str) -> str:
    """Check an object key (already percent-decoded once, by the server) cannot escape a prefix."""
    parts = path.split("/")
    if (
        not path
        or "\\" in path
        or not path.isprintable()
        or "" in parts
        or "." in parts
        or ".." in parts
    ):
        raise BadPath(f"invalid object path {path!r}")
    return path


def quote_key(key: str) -> str:
    return quote(key, safe="/-_.~")


# -- what some resolvers can do beyond `resolve` (checked as protocols, not classes) ------


@runtime_checkable
class Presigning(Protocol):
    """Hands out URLs that let a client fetch an object from the store directly."""

    def presign(self, path: str, method: str, expires: int) -> str: ...


@dataclass(frozen=True)
class Listed:
    """One object found by listing a dataset: its key, and its size when the listing says."""

    key: str
    size: int | None = None


@runtime_checkable
class Listing(Protocol):
    """Lists its objects (for generated catalogue items), sorted by key."""

    async def listing(self, limit: int = 10000) -> list[Listed]: ...


@runtime_checkable
class Searchable(Protocol):
    """Searches a provider's catalogue, one page at a time (items as STAC dicts)."""

    async def search(
        self, limit: int, query: dict[str, Any], cursor: dict[str, Any] | None
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]: ...


@runtime_checkable
class Orderable(Protocol):
    """Orders offline objects and waits until they are online (blocking)."""

    def order(self, path: str, progress: Callable[[int, int | None], None]) -> UpstreamObject: ...
