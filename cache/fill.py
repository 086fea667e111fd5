"""Fills in progress: one upstream fetch per missing block, followed by any number of readers.

The filler writes a part file; readers tail it while it grows, so every client streams
from the first byte and the upstream is asked once however many clients wait.
"""

from __future__ import annotations

import asyncio
import bisect
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
    """One block's bytes as they arrive: in memory first (`arrived`), then in its part file
    (`grew`).

    A fetching thread of this process announces each piece as it comes off the network,
    then hashes and writes it; the owner in another process is only seen through the file.
    Readers take what is announced from memory, or from the file once it is there. The
    descriptor stays open until the fill has ended and its last reader is done, so readers
    finish after the file has been renamed into the store.
    """

    def __init__(self, path: Path, size: int, holdback: int = 0, fd: int | None = None) -> None:
        """`holdback` bytes are withheld from readers until the fill is verified and done."""
        self.path = path
        self.size = size
        self.holdback = holdback
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600) if fd is None else fd
        #: bytes readers may have (a prefix of the block), and how many are in the file
        self.written = 0
        self.on_disk = 0
        #: pieces in memory that are not in the file yet: their offsets, and the pieces
        self._starts: list[int] = []
        self._pieces: list[memoryview] = []
        self.done = False
        self.error: FillFailed | None = None
        #: set when the process stops: the fetching thread gives up at its next chunk
        self.stop = False
        #: resolved once the upstream has answered (or failed before sending a byte)
        self.started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._changed = asyncio.Event()
        self._readers = 0
        self._ended = False

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def arrived(self, pos: int, data: memoryview) -> None:
        """Bytes [pos, pos + len(data)) have come in (the next ones after `written`)."""
        if pos != self.written or not data:
            return
        self._starts.append(pos)
        self._pieces.append(data)
        self.written = pos + len(data)
        self._wake()

    def grew(self, written: int) -> None:
        """`written` bytes of the block are in the file (pieces in memory may go)."""
        self.on_disk = max(self.on_disk, written)
        while self._starts and self._starts[0] + len(self._pieces[0]) <= self.on_disk:
            del self._starts[0], self._pieces[0]
        if written > self.written:
            self.written = written
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

    def follow(self, start: int, end: int) -> AsyncIterator[bytes | memoryview]:
        """Bytes [start, end) of the block as they arrive; raises FillFailed on failure."""
        if self.error is not None:  # failed (and maybe closed) already
            raise self.error
        self._readers += 1
        return self._follow(start, end)

    async def _follow(self, start: int, end: int) -> AsyncIterator[bytes | memoryview]:
        try:
            async for chunk in self._tail(start, end):
                yield chunk
        finally:
            self._readers -= 1
            self._close_if_unused()

    async def _tail(self, start: int, end: int) -> AsyncIterator[bytes | memoryview]:
        pos = start
        while pos < end:
            if self.error is not None:
                raise self.error
            ready = self.written if self.done else self.written - self.holdback
            if ready > pos:
                upto = min(end, ready)
                if pos >= self.on_disk:  # from memory: the piece that holds `pos`
                    i = bisect.bisect_right(self._starts, pos) - 1
                    at, piece = self._starts[i], self._pieces[i]
                    chunk = piece[pos - at : upto - at]
                else:
                    chunk = os.pread(self.fd, min(upto, self.on_disk, pos + CHUNK) - pos, pos)
                    if not chunk:
                        raise FillFailed("fill file shorter than announced")
                pos += len(chunk)
                yield chunk
                continue
            if self.done:
                raise FillFailed(f"fill ended at {self.written} of {self.size} bytes")
            await self._changed.wait()

    def close(self) -> None:
        """The fill has ended; the descriptor goes once no reader needs it."""
        self._ended = True
        self._close_if_unused()

    def _close_if_unused(self) -> None:
        if self._ended and self._readers == 0 and self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


class Fills:
    """Single flight: at most one fill per (object, block) in this process."""

    def __init__(self) -> None:
        self._active: dict[tuple[str, int], Fill] = {}
        self._runners: dict[tuple[str, int], asyncio.Task[None]] = {}
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
                self._runners.pop((key, index), None)
                fill.close()

        task = asyncio.get_running_loop().create_task(runner())
        self._runners[(key, index)] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fill

    async def settled(self, key: str, index: int | None = None) -> None:
        """Until the fill of that block (every block of `key` if None) has ended, committed
        or not. Waiting does not cancel it."""
        runners = [t for (k, i), t in self._runners.items() if k == key and index in (None, i)]
        if runners:
            await asyncio.wait([asyncio.shield(t) for t in runners])

    def spawn(self, work: Awaitable[None]) -> None:
        """Run background work (a re-read of the index) that `drain()` also stops."""

        async def runner() -> None:
            await work

        task = asyncio.get_running_loop().create_task(runner())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        for fill in self._active.values():
            fill.stop = True  # threads that fetch give up at their next chunk
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
