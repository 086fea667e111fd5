"""What every upstream resolves a request path to, and the errors it may raise."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote


@dataclass(frozen=True)
class UpstreamObject:
    """One object at a provider. `headers` carry the provider's credentials: never show them."""

    href: str
    size: int | None = None
    media_type: str | None = None
    checksum: str | None = None  # multihash, hex (STAC `file:checksum`)
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    online: bool = True


class Resolver(Protocol):
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
