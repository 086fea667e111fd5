"""Retrieval jobs: identity, state, and the work a job does (the same for every backend)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from cache.feed import announce_quietly, open_log
from cache.shared import SharedTier
from cache.store import Store
from policies.config import Settings
from upstreams.base import Orderable, UpstreamError
from upstreams.caps import Caps
from upstreams.http import make_pool
from upstreams.registry import Registry
from workers.retrieval import Progress, RetrievalFailed, Target, fetch_into_cache

log = logging.getLogger("fdp.workers")

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
#: How long a finished job's status stays readable.
FINISHED_TTL = 24 * 3600


def job_id(dataset: str, path: str) -> str:
    """The job's identity: the same object always maps to the same id (RQ-safe characters)."""
    return hashlib.sha256(f"{dataset}\0{path}".encode()).hexdigest()[:32]


@dataclass
class JobInfo:
    id: str
    dataset: str
    path: str
    state: str = QUEUED
    bytes_done: int = 0
    bytes_total: int | None = None
    error: str | None = None
    #: failed because the object is not at the provider (a 404 to whoever asked, not a 502)
    not_found: bool = False
    owners: list[str] = field(default_factory=list)
    attempts: int = 0
    max_attempts: int = 3
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    position: int | None = None

    @property
    def done(self) -> bool:
        return self.state in (SUCCEEDED, FAILED)

    def public(self) -> dict[str, Any]:
        """What `GET /jobs/{id}` shows: never the owners of other users."""
        out = asdict(self)
        out.pop("owners")
        return out


class Context:
    """What a worker needs: the datasets, the cache and an HTTP client; built once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = Registry(settings)
        self.store = Store(settings.cache.folder)
        self.shared = SharedTier(settings.cache) if settings.cache.shared else None
        self.feed = open_log(settings)
        self.pool = make_pool(self.registry.timeouts)
        self.caps = Caps(
            lambda: self.registry.upstream_limits, settings.queue.redis_url, settings.qos
        )

    def close(self) -> None:
        self.pool.clear()
        self.feed.close()
        self.store.close()
        self.registry.close()


def retrieve(context: Context, dataset: str, path: str, progress: Progress) -> None:
    """Resolve the object, order it if the provider needs that, and bring it into the cache.

    Raises RetrievalFailed or UpstreamError with a message that is safe to show to users.
    """
    entry = context.registry.get(dataset)
    obj = asyncio.run(entry.resolver.resolve(path))
    if not obj.online:
        if not isinstance(entry.resolver, Orderable):
            raise RetrievalFailed("the object is offline and its provider takes no orders")
        obj = entry.resolver.order(path, progress)
    target = Target(dataset, path, int(context.settings.cache.block_size))
    record = fetch_into_cache(context.store, target, obj, progress, context.pool, context.caps)
    announce_quietly(context.store, context.feed, record)
    if context.shared is not None:
        if not context.shared.publish(context.store, record):
            log.warning("%s/%s: retrieved, but not copied to the shared cache", dataset, path)
        elif entry.presigns_from_cache:  # clients are sent to a whole copy
            context.shared.write_whole(context.store, record)


def describe(exc: BaseException) -> str:
    """A failure as users may see it: our own messages, else only the kind of error."""
    if isinstance(exc, RetrievalFailed | UpstreamError):
        return str(exc)
    return f"retrieval failed ({type(exc).__name__})"
