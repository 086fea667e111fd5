"""The fill engine: claim a block, fetch it, check it, commit it, release its waiters.

Fetching runs in threads (`cache.fetch`), store reads and writes in threads of the engine's
own limiter (a locked or slow SQLite holds those threads, never the event loop). Every
block fill is tied to the object version it began with: fetched with `If-Match`, checked
against the record's size and ETag, and a change drops the record instead of mixing
versions. The claim on a block is a lock on its part file, so processes sharing a cache
folder fetch each block once between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import httpx
import urllib3

from cache.fetch import ObjectChanged, fetch_span, names, new_record, verify_object
from cache.fill import CacheWriteFailed, Fill, FillFailed, Fills
from cache.integrity import ChecksumMismatch, Digest
from cache.shared import SharedTier
from cache.store import STORE_ERRORS, ObjectRecord, Store, version_tag
from upstreams.base import UpstreamError, UpstreamObject, host_of
from upstreams.caps import Caps
from upstreams.http import Meta, make_pool, probe_sync
from upstreams.memo import Memo
from upstreams.mirrors import agree

T = TypeVar("T")

log = logging.getLogger("fdp.cache")

CHUNK = 1 << 20
ERROR_LOG_INTERVAL = 60.0
RETRY_CACHE_AFTER = 10.0  # seconds of pass-through after a cache failure before trying again
#: Threads for index reads and writes (SQLite): a lock held elsewhere blocks only these.
STORE_THREADS = 4
#: Threads fetching blocks from one origin at a time.
FETCH_THREADS = 8
#: threads reading from and copying to the shared tier
SHARED_THREADS = 8
#: Seconds before another background completion of the same object is tried.
RETRY_COMPLETION = 60.0
#: Seconds between looks at a part file another process is filling.
FOLLOW_POLL = 0.002


def _is_claim(fill: Fill) -> bool:
    """The fill's file is still the claim at its path (its owner died holding it)."""
    try:
        return os.stat(fill.path).st_ino == os.fstat(fill.fd).st_ino
    except OSError:
        return False


def outdated(record: ObjectRecord, obj: UpstreamObject) -> bool:
    """The catalogue now promises other bytes than the cached ones."""
    return bool(record.checksum and obj.checksum and record.checksum != obj.checksum)


@dataclass
class Health:
    """The cache's state for /readyz: the last store error, logged at most once a minute."""

    error: str | None = None
    since: float | None = None
    last_failure: float = 0.0
    logged: float = 0.0
    integrity_failures: int = 0
    counters: dict[str, int] = field(default_factory=lambda: {"hit": 0, "miss": 0})

    def failed(self, what: str, exc: BaseException) -> None:
        now = self.last_failure = time.monotonic()
        self.error = f"{what}: {exc}"
        self.since = self.since or time.time()
        if now - self.logged > ERROR_LOG_INTERVAL:
            self.logged = now
            log.error("cache unavailable, serving pass-through: %s", self.error)

    def recovered(self) -> None:
        if self.error is not None:
            log.info("cache writable again")
        self.error, self.since = None, None

    @property
    def degraded(self) -> bool:
        """Recently failed: skip the cache for a while rather than fail every request."""
        return self.error is not None and time.monotonic() - self.last_failure < RETRY_CACHE_AFTER


class _FillSink:
    """A fetching thread's view of a Fill: each event is handed to the event loop."""

    def __init__(self, fill: Fill) -> None:
        self.fill = fill
        self.loop = asyncio.get_running_loop()
        self.sha256 = ""
        #: pieces not yet handed over; one wake-up of the loop takes all there are by then
        self._arrivals: list[tuple[int, memoryview]] = []
        self._lock = threading.Lock()

    def begin(self, etag: str | None, last_modified: str | None) -> None:
        self.loop.call_soon_threadsafe(self.fill.begin)

    def part(self, index: int) -> int:
        return self.fill.fd

    def arrived(self, index: int, pos: int, data: memoryview) -> None:
        with self._lock:
            self._arrivals.append((pos, data))
            wake = len(self._arrivals) == 1
        if wake:
            self.loop.call_soon_threadsafe(self._hand_over)

    def _hand_over(self) -> None:
        with self._lock:
            arrivals, self._arrivals = self._arrivals, []
        for pos, data in arrivals:
            self.fill.arrived(pos, data)

    def wrote(self, index: int, written: int) -> None:
        self.loop.call_soon_threadsafe(self.fill.grew, written)

    def done(self, index: int, sha256: str) -> None:
        self.sha256 = sha256

    def stopped(self) -> bool:
        return self.fill.stop


class FillEngine:
    def __init__(
        self,
        store: Store | None,
        client: httpx.AsyncClient,
        block_size: int,
        clock: Callable[[], float] = time.time,
        pool: urllib3.PoolManager | None = None,
        verify_max_bytes: int = 2**30,
        window: int = 4,
        caps: Caps | None = None,
        shared: SharedTier | None = None,
        wants_whole: Callable[[str], bool] = lambda dataset: False,
        on_whole: Callable[[ObjectRecord], None] = lambda record: None,
    ) -> None:
        self.store = store
        #: called with each object that became whole here (it is announced)
        self.on_whole = on_whole
        #: the tier every replica shares (`s3://`), behind this process's store
        self.shared = shared
        #: datasets whose complete objects get a whole copy in the shared tier (presigning)
        self.wants_whole = wants_whole
        #: threads talking to the shared tier (uploads never hold up a fill)
        self._shared_threads = anyio.CapacityLimiter(SHARED_THREADS)
        #: whole copies being uploaded (one upload per object at a time)
        self._whole_uploads: set[str] = set()
        #: per-origin caps every block fetch keeps to
        self.caps = caps
        #: objects with a catalogue checksum up to this size are completed to be verified
        self.verify_max_bytes = verify_max_bytes
        #: blocks fetched at once by a background completion
        self.window = max(1, window)
        #: objects whose completion was tried lately (a failing upstream is not hammered)
        self._attempted: Memo[tuple[str, float], bool] = Memo(4096, RETRY_COMPLETION)
        self.client = client
        self.pool = pool or make_pool()
        self.block_size = block_size
        self.clock = clock
        self.fills = Fills()
        self.health = Health()
        self.limiter = anyio.CapacityLimiter(STORE_THREADS)
        self._limiters: Memo[str, anyio.CapacityLimiter] = Memo(1024, 3600.0)

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a store call in a thread of the store's own limiter."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def index(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """A store call on a request's path: a failing index (locked, full) makes the
        request go around the cache (CacheWriteFailed), never a 500."""
        try:
            return await self.io(fn, *args)
        except STORE_ERRORS as e:
            self.health.failed(what, e)
            raise CacheWriteFailed(f"{what}: {type(e).__name__}") from None

    async def create_record(
        self, dataset: str, key: str, path: str, obj: UpstreamObject
    ) -> ObjectRecord:
        """A new record: size and validators as the upstream's GETs report them."""
        assert self.store is not None
        record = await self.shared_record(dataset, key, path, obj)
        if record is not None:  # another replica has sized it already
            return record
        since = time.monotonic()

        async def probe(o: UpstreamObject) -> Meta:
            return await anyio.to_thread.run_sync(self._probe, o, since, limiter=self._limiter(o))

        meta = await agree(obj, probe)  # a mirrored object: by every mirror at once
        record = new_record(meta, obj, key, dataset, path, self.block_size, self.clock())
        record = await self.index("writing the cache index", self.store.add_record, record)
        if self.shared is not None:
            self.fills.spawn(self.on_shared(self.shared.put_record, record))
        return record

    async def shared_record(
        self, dataset: str, key: str, path: str, obj: UpstreamObject, complete: bool = False
    ) -> ObjectRecord | None:
        """A local record made from the shared tier's (no blocks yet), if it has one of
        this version (and, with `complete`, every block of it); else None."""
        if self.shared is None or self.store is None:
            return None
        found = await self.on_shared(self.shared.record, key)
        if found is None or (complete and not found[1]) or found[0].block_size != self.block_size:
            return None
        now = self.clock()
        record = replace(found[0], dataset=dataset, path=path, created=now, accessed=now)
        if outdated(record, obj):
            return None
        return await self.index("writing the cache index", self.store.add_record, record)

    async def on_shared(self, fn: Callable[..., T], *args: Any) -> T:
        """A call to the shared tier, on its own threads."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._shared_threads)

    def _probe(self, obj: UpstreamObject, since: float) -> Meta:
        """The 1-byte GET that sizes a new object, in a slot of its origin."""
        with self.caps.slot(obj.href, since) if self.caps else contextlib.nullcontext():
            return probe_sync(self.pool, obj)

    def read_ahead(self, record: ObjectRecord, obj: UpstreamObject, first: int, last: int) -> None:
        """Start the next missing blocks of a long response now, so their latency overlaps."""
        assert self.store is not None
        current = self.store.peek(record.key)[0] or record
        for index in range(first, last + 1):
            if index not in current.blocks:
                with contextlib.suppress(CacheWriteFailed):
                    self.ensure(record, obj, index)

    def ensure(self, record: ObjectRecord, obj: UpstreamObject, index: int) -> Fill:
        """The fill of block `index`: the one running, or a new one (single flight).

        Across processes the part file is the claim: whoever holds its lock fetches, the
        others tail the file as it grows, and take over if the owner dies.
        """
        fill = self.fills.get(record.key, index)
        if fill is not None:
            return fill
        assert self.store is not None
        b0, b1 = record.block_range(index)
        verify = record.nblocks == 1 and Digest(record.checksum).checkable
        tag = version_tag(record.size, record.etag, record.last_modified)
        path = self.store.tmp / f"{record.key}.{index}.{tag}.part"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            self.health.failed("cannot create a fill file", e)
            raise CacheWriteFailed(str(e)) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            owner = True
        except BlockingIOError:
            owner = False
        # a follower elsewhere cannot tell verified bytes from others: it waits for the end
        holdback = (1 if owner else b1 - b0) if verify else 0
        fill = Fill(path, b1 - b0, holdback, fd)
        run = self._own if owner else self._follow
        return self.fills.start(record.key, index, fill, lambda f: run(record, obj, index, f))

    async def _own(self, record: ObjectRecord, obj: UpstreamObject, index: int, fill: Fill) -> None:
        """Fetch the block (resuming what a dead owner left), commit it, release the claim."""
        assert self.store is not None
        since = time.monotonic()  # a wait for the origin's slot counts from here
        try:
            resume = os.fstat(fill.fd).st_size
            if resume == 0 and await self._read_stored(record, index, fill):
                return
            if (
                resume == 0
                and self.shared is not None
                and await self._read_shared(record, index, fill)
            ):
                return
            if resume >= fill.size:
                os.ftruncate(fill.fd, 0)
                resume = 0
            fill.grew(resume)
            digest = Digest(record.checksum) if record.nblocks == 1 else None
            sink = _FillSink(fill)
            await anyio.to_thread.run_sync(
                fetch_span,
                *(self.pool, record, obj, index, index, sink, resume, digest, self.caps, since),
                limiter=self._limiter(obj),
            )
            fill.finish()
            updated = await self._commit(record, index, fill.path, sink.sha256, digest)
            if updated is not None:
                self.complete_later(updated, obj)
                if self.shared is not None:
                    self.fills.spawn(self._share(updated, index, sink.sha256))
                    self.share_whole(updated)
        except ObjectChanged as e:
            log.warning("%s/%s: %s: record dropped", record.dataset, record.path, e)
            with contextlib.suppress(*STORE_ERRORS):  # keep no record of that version
                await self.io(self.store.evict, record.key)
            fill.fail(e)
        except ChecksumMismatch as e:
            self.health.integrity_failures += 1
            log.error("%s; not cached", e)
            fill.fail(FillFailed(str(e)))
            with contextlib.suppress(*STORE_ERRORS):
                await self.io(self.store.evict, record.key)
        except CacheWriteFailed as e:
            self.health.failed("cannot write a fill", e)
            fill.fail(e)
        except (FillFailed, UpstreamError) as e:
            fill.fail(e)
        finally:
            with contextlib.suppress(OSError):
                # the claim's path goes while the claim is held (unless a newer claim took
                # it): a committed block is linked in the store, a failed fill leaves
                # nothing to resume
                if _is_claim(fill):
                    fill.path.unlink()
            with contextlib.suppress(OSError):
                fcntl.flock(fill.fd, fcntl.LOCK_UN)

    async def _read_stored(self, record: ObjectRecord, index: int, fill: Fill) -> bool:
        """If the store has the block now (another process committed it), the fill reads
        that file instead of fetching it."""
        assert self.store is not None
        current = await self.io(self.store.refresh, record.key)
        if current is None or index not in current.blocks or current.etag != record.etag:
            return False
        f = await self.io(self.store.block_file, record.key, index)
        if f is None:
            return False
        old, fill.fd = fill.fd, os.dup(f.fileno())  # readers pread whatever fd is current
        with contextlib.suppress(OSError):
            if os.stat(fill.path).st_ino == os.fstat(old).st_ino and os.fstat(old).st_size == 0:
                fill.path.unlink()  # the empty file of our own claim
        fcntl.flock(old, fcntl.LOCK_UN)
        os.close(old)
        fill.begin()
        fill.grew(fill.size)
        fill.finish()
        return True

    async def _read_shared(self, record: ObjectRecord, index: int, fill: Fill) -> bool:
        """If the shared tier has the block (checked against its sha-256), the fill takes
        it from there: into the local store, then to its readers. Else the caller fetches."""
        assert self.shared is not None
        sha = await self.on_shared(self.shared.read_block, record, index, fill.fd)
        updated = None
        if sha is not None:
            updated = await self._commit(record, index, fill.path, sha, None)
        if updated is None:  # not there, damaged, or not checkable: from the upstream
            os.ftruncate(fill.fd, 0)
            return False
        fill.begin()
        fill.grew(fill.size)
        fill.finish()
        self.share_whole(updated)
        return True

    def share_whole(self, record: ObjectRecord) -> None:
        """A complete object of a presigning dataset: copy it whole to the shared tier (in
        the background), so later requests can be redirected there."""
        if (
            self.shared is None
            or not record.complete
            or not self.wants_whole(record.dataset)
            or record.key in self._whole_uploads
        ):
            return
        assert self.store is not None
        self._whole_uploads.add(record.key)

        async def upload() -> None:
            assert self.shared is not None
            try:
                await self.on_shared(self.shared.write_whole, self.store, record)
            finally:
                self._whole_uploads.discard(record.key)

        self.fills.spawn(upload())

    async def _share(self, record: ObjectRecord, index: int, sha256: str) -> None:
        """Copy a block filled from the upstream to the shared tier (in the background)."""
        assert self.store is not None and self.shared is not None
        try:
            data = await self.io(self.store.block_bytes, record, index)
        except STORE_ERRORS:
            return  # evicted meanwhile: nothing to share
        if data is None:
            return
        await self.on_shared(self.shared.write_block, record, index, data, sha256)

    async def _commit(
        self,
        record: ObjectRecord,
        index: int,
        part: Path,
        sha256: str,
        digest: Digest | None,
    ) -> ObjectRecord | None:
        """Move the block into the store; hash the object when it is whole."""
        assert self.store is not None
        try:
            updated = await self.io(self.store.commit_block, record, index, part, sha256)
            if updated is not None and digest is not None:
                sha = digest.sha256.hexdigest()
                await self.io(
                    functools.partial(
                        self.store.update, record.key, sha256=sha, verified=digest.checkable
                    )
                )
            elif updated is not None and updated.complete:  # hash it whole, check if we can
                try:
                    await self.io(verify_object, self.store, updated)
                except ChecksumMismatch as e:
                    self.health.integrity_failures += 1
                    log.error("%s", e)
                    return None
            self.health.recovered()
            if updated is not None and updated.complete:
                self.on_whole(updated)
            return updated
        except STORE_ERRORS as e:
            self.health.failed("cannot store a block", e)
            return None

    def complete_later(self, record: ObjectRecord, obj: UpstreamObject) -> None:
        """Fetch the rest of a multi-block object with a catalogue checksum and verify the
        whole (up to `verify_max_bytes`); one attempt per record a minute at most."""
        attempt = (record.key, record.created)  # a new record of it is tried anew
        if (
            record.verified
            or record.nblocks <= 1  # (its own fill verifies it)
            or attempt in self._attempted
            or not self.checkable(record)
        ):
            return
        self._attempted[attempt] = True
        self.fills.spawn(self._complete(record, obj))

    async def _complete(self, record: ObjectRecord, obj: UpstreamObject) -> None:
        assert self.store is not None
        pending: list[int] = []
        for index in range(record.nblocks):
            current = self.store.peek(record.key)[0] or record
            if index in current.blocks:
                continue
            try:
                self.ensure(record, obj, index)
            except CacheWriteFailed:
                return
            pending.append(index)
            if len(pending) >= self.window:
                await self.fills.settled(record.key, pending.pop(0))
        await self.verified(record)  # (the last commit has verified it, as a rule)

    def checkable(self, record: ObjectRecord) -> bool:
        """It has a catalogue checksum we can verify, and is not too big to."""
        return record.size <= self.verify_max_bytes and Digest(record.checksum).checkable

    async def verified(self, record: ObjectRecord) -> bool:
        """Whether the object's bytes match its catalogue checksum, once the fills under way
        have ended (a whole-object response waits for this before its last byte)."""
        assert self.store is not None
        await self.fills.settled(record.key)
        try:
            current = await self.io(self.store.refresh, record.key)
            if current is not None and current.complete and not current.verified:
                await self.io(verify_object, self.store, current)
                current = await self.io(self.store.refresh, record.key)
        except ChecksumMismatch as e:
            self.health.integrity_failures += 1
            log.error("%s", e)
            return False
        except STORE_ERRORS as e:
            self.health.failed("reading the cache index", e)
            return False
        return current is not None and current.verified

    async def _follow(
        self, record: ObjectRecord, obj: UpstreamObject, index: int, fill: Fill
    ) -> None:
        """Tail another process's fill of the block; take over if that process dies."""
        assert self.store is not None
        verify = fill.holdback == fill.size
        while True:
            if fill.stop:
                raise FillFailed("stopped")
            size = os.fstat(fill.fd).st_size
            if size > fill.written and not verify:
                fill.begin()
                fill.grew(size)
            try:
                fcntl.flock(fill.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break  # the owner has let go: done, failed or killed
            except BlockingIOError:
                await asyncio.sleep(FOLLOW_POLL)
        with contextlib.suppress(*STORE_ERRORS):
            if await self._read_stored(record, index, fill):
                return
        if not _is_claim(fill):  # the owner ended and removed its claim: it failed
            fcntl.flock(fill.fd, fcntl.LOCK_UN)
            fill.fail(FillFailed("the fill in another process failed"))
            return
        log.warning("%s/%s block %d: its filler died; taking over", *names(record), index)
        fill.holdback = 1 if verify else 0
        await self._own(record, obj, index, fill)

    def _limiter(self, obj: UpstreamObject) -> anyio.CapacityLimiter:
        """Threads fetching from one origin: a slow provider holds only its own."""
        origin = host_of(obj.href)
        limiter = self._limiters.get(origin)
        if limiter is None:
            limiter = self._limiters[origin] = anyio.CapacityLimiter(FETCH_THREADS)
        return limiter
