"""What every job queue offers the proxy, and the wake-ups it gives to held requests.

Every method is a coroutine: the proxy awaits the queue on its event loop, so a backend that
talks to a network service must never block that loop (RQ's calls run on threads of their
own; see workers.rq_queue).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Protocol, TypeVar

from workers.jobs import JobInfo
from workers.stats import JobStats


class QueueUnavailable(Exception):
    """The job queue (Redis) cannot be reached or did not answer; asking later may work."""


class JobQueue(Protocol):
    stats: JobStats  # how attempts ended, for /metrics

    async def submit(self, dataset: str, path: str, owner: str, max_attempts: int) -> JobInfo:
        """Join the object's job (one per object) or start it; `owner` may then read it."""
        ...

    async def get(self, job_id: str) -> JobInfo | None: ...

    async def wait(self, job_id: str, seconds: float) -> JobInfo | None:
        """The job once it has ended, or as it stands after `seconds`."""
        ...

    async def problem(self) -> str | None:
        """Why the queue cannot be used right now, for /readyz (None: it can)."""
        ...

    def depth(self) -> int:
        """Jobs waiting to run (may block: call it in a thread)."""
        ...

    def recent(self, n: int) -> list[JobInfo]:
        """The `n` latest jobs, newest first (may block: call it in a thread)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


Q = TypeVar("Q", bound=JobQueue)


@contextlib.asynccontextmanager
async def running(queue: Q) -> AsyncIterator[Q]:
    """`queue`, started, and closed on every way out."""
    await queue.start()
    try:
        yield queue
    finally:
        await queue.close()


class Waiters:
    """Held requests waiting for jobs to end; woken from any thread (or a pub/sub message)."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.events: dict[str, set[asyncio.Event]] = {}

    @contextlib.contextmanager
    def waiting(self, jid: str) -> Iterator[asyncio.Event]:
        """An event set when `jid` ends. Enter before reading the job, so no wake-up is missed."""
        self.loop = asyncio.get_running_loop()
        event = asyncio.Event()
        self.events.setdefault(jid, set()).add(event)
        try:
            yield event
        finally:
            events = self.events.get(jid)
            if events is not None:
                events.discard(event)
                if not events:
                    del self.events[jid]

    def wake(self, jid: str) -> None:
        """Callable from any thread."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.release, jid)

    def release(self, jid: str) -> None:
        """Wake the waiters of `jid` (on the loop's thread)."""
        for event in self.events.get(jid, ()):
            event.set()
