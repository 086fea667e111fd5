"""Fills in progress: one upstream fetch per missing block, followed by any number of readers.

The filler appends to a temporary file; readers tail it while it grows, so every client
streams from the first byte and the upstream is asked once however many clients wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

CHUNK = 1 << 20
log = logging.getLogger("fdp.cache")


class FillFailed(Exception):
    """The fill did not finish; readers must abort (or fetch the rest another way)."""


class CacheWriteFailed(FillFailed):
    """The bytes could not be written to the cache (disk full, unwritable folder)."""


class Fill:
    def __init__(self, path: Path, size: int, holdback: int = 0) -> None:
        """`holdback` bytes are withheld from readers until the fill is verified and done."""
        self.path = path
        self.size = size
        self.holdback = holdback
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.written = 0
        self.done = False
        self.error: FillFailed | None = None
        #: resolved once the upstream has answered (or failed before sending a byte)
        self.started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._changed = asyncio.Event()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def append(self, chunk: bytes) -> None:
        try:
            view = memoryview(chunk)
            while view:
                n = os.pwrite(self.fd, view, self.written)
                self.written += n
                view = view[n:]
        except OSError as e:
            raise CacheWriteFailed(f"cache write failed: {e.strerror}") from e
        self._wake()

    def finish(self) -> None:
        self.done = True
        self._wake()

    def begin(self) -> None:
        if not self.started.done():
            self.started.set_result(None)

    def fail(self, error: Exception) -> None:
        """Fail the fill: before it began, waiters get `error`; readers get FillFailed."""
        if not self.started.done():
            self.started.set_exception(error)
            self.started.exception()  # retrieved here; awaiting it raises it again
        self.error = error if isinstance(error, FillFailed) else FillFailed(str(error))
        self._wake()

    def follow(self, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end) of the block as they arrive; raises FillFailed on failure.

        The reader gets its own descriptor now, so it can finish reading after the filler
        is done and has removed the temporary file.
        """
        if self.error is not None:  # failed (and maybe closed) already
            raise self.error
        return self._follow(os.dup(self.fd), start, end)

    async def _follow(self, fd: int, start: int, end: int) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._tail(fd, start, end):
                yield chunk
        finally:
            os.close(fd)

    async def _tail(self, fd: int, start: int, end: int) -> AsyncIterator[bytes]:
        pos = start
        while pos < end:
            if self.error is not None:
                raise self.error
            ready = self.written if self.done else self.written - self.holdback
            if ready > pos:
                n = min(end, ready) - pos
                while n > 0:
                    chunk = os.pread(fd, min(n, CHUNK), pos)
                    if not chunk:
                        raise FillFailed("fill file shorter than announced")
                    pos += len(chunk)
                    n -= len(chunk)
                    yield chunk
                continue
            if self.done:
                raise FillFailed(f"fill ended at {self.written} of {self.size} bytes")
            await self._changed.wait()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(OSError):
            self.path.unlink()


class Fills:
    """Single flight: at most one fill per (object, block) in this process."""

    def __init__(self) -> None:
        self._active: dict[tuple[str, int], Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, key: str, index: int) -> Fill | None:
        return self._active.get((key, index))

    def start(
        self, key: str, index: int, fill: Fill, run: Callable[[Fill], Awaitable[None]]
    ) -> Fill:
        """Register `fill` and run `run(fill)` in its own task (it outlives any one client)."""
        self._active[(key, index)] = fill

        async def runner() -> None:
            try:
                await run(fill)
            except BaseException as e:  # whatever killed it, its readers must not wait on
                fill.fail(e if isinstance(e, Exception) else FillFailed("fill cancelled"))
                if not isinstance(e, Exception):
                    raise
                log.error("fill of %s/%d failed", key, index, exc_info=e)
            finally:
                self._active.pop((key, index), None)
                fill.close()

        task = asyncio.get_running_loop().create_task(runner())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fill

    def spawn(self, work: Awaitable[None]) -> None:
        """Run background work (a re-read of the index) that `drain()` also stops."""

        async def runner() -> None:
            await work

        task = asyncio.get_running_loop().create_task(runner())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
