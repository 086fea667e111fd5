"""`GET /feed`: announcements as Server-Sent Events, resumable, filtered by access.

Each event is one Sarracenia v03 message (`data:`), with the log's id (`id:`): a client that
reconnects with `Last-Event-ID` (or `?after=`) goes on after it, with no gap and no
duplicate, as long as that id is still in the window. `?dataset=` (repeatable, or comma
separated) and `?path=` (a prefix of the object's path) select; the caller sees only objects
of datasets it may read now, by the same rules as `/assets`.

A tail task per process reads the log each second (other processes and workers append to it
too) or at once when this process announced something, and wakes the streams; each stream
then reads on from its own last id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio.to_thread
import redis
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response

from cache.feed import EVENT_ID, Log, Notice, v03
from proxy.auth import Identity, allowed, identity
from proxy.problems import BadRequest, ProxyError
from upstreams.registry import Registry

log = logging.getLogger("fdp.feed")

POLL_SECONDS = 1.0
PAGE = 500
#: a stream ends after this long (its client reconnects with `Last-Event-ID`, and a fresh
#: token: access is decided when a stream starts)
STREAM_SECONDS = 3600.0
PING_SECONDS = 15


def lease_owner() -> str:
    """Who holds a lease: this host and process, and this holder within it."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


async def release(log_: Log, role: str, owner: str) -> None:
    """Give a lease up as this process stops (so another takes over now, not when the lease
    runs out); shielded, as shutdown cancels the caller, and bounded."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        try:
            await anyio.to_thread.run_sync(log_.release, role, owner, abandon_on_cancel=True)
        except (sqlite3.Error, redis.RedisError, OSError) as e:
            log.warning("lease %s not released (%s): it runs out", role, type(e).__name__)


class FeedUnavailable(ProxyError):
    status, slug = 503, "feed-unavailable"


class Feed:
    """The log, and a wake-up for this process's streams when it grows."""

    def __init__(self, log_: Log) -> None:
        self.log = log_
        self.newest: str | None = None
        self._grown = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poke = asyncio.Event()

    def announced(self, notice: Notice) -> None:
        """From the announcer's thread: read the log now, not at the next poll."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # (the loop closed: nobody to wake)
                self._loop.call_soon_threadsafe(self._poke.set)

    async def read(self, after: str | None, limit: int = PAGE) -> list[Notice]:
        return await self._ask(self.log.after, after, limit)  # type: ignore[no-any-return]

    async def _ask(self, fn: Any, *args: Any) -> Any:
        try:
            return await anyio.to_thread.run_sync(fn, *args)
        except (sqlite3.Error, redis.RedisError, OSError) as e:
            raise FeedUnavailable(
                f"the announcement log is not available ({type(e).__name__})",
                headers={"retry-after": "5"},
            ) from None

    async def tail(self) -> None:
        """Wake the streams whenever the log grows (here, in another process or a worker)."""
        self._loop = asyncio.get_running_loop()
        started = False
        while True:
            try:
                if not started:  # (what is there already woke nobody: start at its end)
                    self.newest, started = await self._ask(self.log.newest), True
                while page := await self.read(self.newest):
                    self.newest = page[-1].id
                    self._grown.set()
                    self._grown = asyncio.Event()
            except FeedUnavailable as e:
                log.warning("%s", e)
            with anyio.move_on_after(POLL_SECONDS):
                await self._poke.wait()
            self._poke.clear()

    def growth(self) -> asyncio.Event:
        """Set when the log has grown after this call (take it before reading the log)."""
        return self._grown


def _selection(request: Request) -> tuple[set[str] | None, str, str | None]:
    q = request.query_params
    names = {n.strip() for v in q.getlist("dataset") for n in v.split(",") if n.strip()}
    after = request.headers.get("last-event-id") or q.get("after")
    if after is not None:
        after = after.strip()
        if not EVENT_ID.match(after):
            raise BadRequest("Last-Event-ID: an id as sent in the feed's events")
    return names or None, q.get("path", "").lstrip("/"), after


def selects(n: Notice, names: set[str] | None, prefix: str) -> bool:
    return (names is None or n.dataset in names) and n.path.startswith(prefix)


async def feed(request: Request) -> Response:
    names, prefix, after = _selection(request)
    who = await identity(request)
    state = request.app.state
    hub: Feed = state.feed
    registry: Registry = state.registry
    public_url: str = state.public_url
    grown = hub.growth()
    first = await hub.read(after)  # a log that is down is a 503 now, not a broken stream

    def readable(n: Notice, who: Identity) -> bool:
        entry = registry.entries.get(n.dataset)
        return entry is not None and allowed(entry.policy.access, who)

    async def events() -> AsyncIterator[ServerSentEvent]:
        last, page, ends, woken = after, first, time.monotonic() + STREAM_SECONDS, grown
        while True:
            for n in page:
                last = n.id
                if selects(n, names, prefix) and readable(n, who):
                    yield ServerSentEvent(json.dumps(v03(n, public_url)), id=n.id)
            if len(page) < PAGE:
                with anyio.move_on_after(ends - time.monotonic()):
                    await woken.wait()
                if time.monotonic() >= ends:
                    return  # the client comes back with its Last-Event-ID
            woken = hub.growth()
            try:
                page = await hub.read(last)
            except FeedUnavailable as e:
                log.warning("%s: a stream ends", e)
                return

    return EventSourceResponse(
        events(),
        ping=PING_SECONDS,
        headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        send_timeout=30,
    )
