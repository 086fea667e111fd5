"""The fill engine: fetch a block from its upstream, check it, commit it, release its waiters.

Store reads and writes run in threads of the engine's own limiter (a locked or slow SQLite
holds those threads, never the event loop). Every block fill is tied to the object version
it began with: fetched with `If-Match`, checked against the record's size and ETag, and a
change drops the record instead of mixing versions.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import httpx

from cache.fill import CacheWriteFailed, Fill, FillFailed, Fills
from cache.integrity import ChecksumMismatch, Digest
from cache.store import STORE_ERRORS, ObjectRecord, Store
from upstreams.base import ObjectNotFound, UpstreamObject, UpstreamUnavailable
from upstreams.http import open_body, probe

T = TypeVar("T")

log = logging.getLogger("fdp.cache")

CHUNK = 1 << 20
ERROR_LOG_INTERVAL = 60.0
RETRY_CACHE_AFTER = 10.0  # seconds of pass-through after a cache failure before trying again
#: Threads for index reads and writes (SQLite): a lock held elsewhere blocks only these.
STORE_THREADS = 4


def names(record: ObjectRecord) -> tuple[str, str]:
    return record.dataset, record.path


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


class FillEngine:
    def __init__(
        self,
        store: Store | None,
        client: httpx.AsyncClient,
        block_size: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.client = client
        self.block_size = block_size
        self.clock = clock
        self.fills = Fills()
        self.health = Health()
        self.limiter = anyio.CapacityLimiter(STORE_THREADS)

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
        meta = await probe(self.client, obj)  # sizes as the GETs will tell them
        if obj.size is not None and obj.size != meta.size:
            log.warning(
                "%s/%s: the catalogue says %d bytes, the provider %d: using the provider's",
                dataset,
                path,
                obj.size,
                meta.size,
            )
        now = self.clock()
        record = ObjectRecord(
            key=key,
            dataset=dataset,
            path=path,
            size=meta.size,
            block_size=self.block_size,
            etag=meta.etag,
            last_modified=meta.last_modified,
            media_type=obj.media_type or meta.media_type,
            checksum=obj.checksum,
            created=now,
            accessed=now,
        )
        await self.index("writing the cache index", self.store.put_record, record)
        return record

    def read_ahead(self, record: ObjectRecord, obj: UpstreamObject, first: int, last: int) -> None:
        """Start the next missing blocks of a long response now, so their latency overlaps."""
        assert self.store is not None
        current = self.store.peek(record.key)[0] or record
        for index in range(first, last + 1):
            if index not in current.blocks:
                with contextlib.suppress(CacheWriteFailed):
                    self.ensure(record, obj, index)

    def ensure(self, record: ObjectRecord, obj: UpstreamObject, index: int) -> Fill:
        """The fill of block `index`: the one running, or a new one (single flight)."""
        fill = self.fills.get(record.key, index)
        if fill is not None:
            return fill
        assert self.store is not None
        b0, b1 = record.block_range(index)
        whole = record.nblocks == 1
        verify = whole and Digest(record.checksum).checkable
        tmp = self.store.tmp / f"{record.key}.{index}.{os.getpid()}.part"
        try:
            fill = Fill(tmp, b1 - b0, holdback=1 if verify else 0)
        except OSError as e:
            self.health.failed("cannot create a fill file", e)
            raise CacheWriteFailed(str(e)) from e
        return self.fills.start(
            record.key, index, fill, lambda f: self._fill(record, obj, index, f, whole)
        )

    async def _fill(
        self, record: ObjectRecord, obj: UpstreamObject, index: int, fill: Fill, whole: bool
    ) -> None:
        assert self.store is not None
        b0, b1 = record.block_range(index)
        digest = Digest(record.checksum) if whole else None
        asked = {"range": f"bytes={b0}-{b1 - 1}"}
        if record.etag and not record.etag.startswith("W/"):
            asked["if-match"] = record.etag  # this version's bytes, or a 412
        try:
            body = await open_body(self.client, obj, asked)
        except Exception as e:
            if isinstance(e, ObjectNotFound) or getattr(e, "status", None) == 412:
                log.warning("%s/%s is gone or changed upstream: record dropped", *names(record))
                with contextlib.suppress(*STORE_ERRORS):  # keep no record of that version
                    await self.io(self.store.evict, record.key)
            fill.fail(e)
            return
        try:
            await self._check_response(record, body.status, body.headers, b0, b1)
            fill.begin()
            # an upstream that ignored Range sends it all: skip to the block, stop after it
            skip = b0 if body.status == 200 else 0
            async for chunk in body.chunks():
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                if body.status == 200:
                    chunk = chunk[: b1 - b0 - fill.written]
                if fill.written + len(chunk) > b1 - b0:
                    raise FillFailed("upstream sent more bytes than the block holds")
                if chunk:
                    fill.append(chunk)
                    if digest is not None:
                        digest.update(chunk)
                if fill.written == b1 - b0 and body.status == 200:
                    break
            if fill.written != b1 - b0:
                raise FillFailed(f"upstream sent {fill.written} of {b1 - b0} bytes")
            if digest is not None and not digest.matches():
                raise ChecksumMismatch(f"{record.dataset}/{record.path}: checksum mismatch")
        except CacheWriteFailed as e:
            self.health.failed("cannot write a fill", e)
            fill.fail(e)
            return
        except ChecksumMismatch as e:
            self.health.integrity_failures += 1
            log.error("%s; not cached", e)
            fill.fail(FillFailed(str(e)))
            with contextlib.suppress(*STORE_ERRORS):
                await self.io(self.store.evict, record.key)
            return
        except (FillFailed, UpstreamUnavailable) as e:
            fill.fail(e)
            return
        finally:
            await body.aclose()
        fill.finish()
        try:
            updated = await self.io(self.store.commit_block, record.key, index, fill.path)
            if updated is not None and digest is not None:
                await self.io(
                    functools.partial(
                        self.store.update,
                        record.key,
                        sha256=digest.sha256.hexdigest(),
                        verified=digest.checkable,
                    )
                )
            elif updated is not None and updated.complete and not whole:
                await self.io(self.verify_object, updated)
            self.health.recovered()
        except STORE_ERRORS as e:
            self.health.failed("cannot store a block", e)

    async def _check_response(
        self, record: ObjectRecord, status: int, headers: dict[str, str], b0: int, b1: int
    ) -> None:
        """The upstream must send exactly the block, of the object we think it is."""
        assert self.store is not None
        want = f"bytes {b0}-{b1 - 1}/{record.size}"
        got = headers.get("content-range", "") if status == 206 else None
        length = headers.get("content-length")
        total = got.rpartition("/")[2] if got else length if status == 200 else None
        if total is not None and total.isdigit() and int(total) != record.size:
            log.warning("%s/%s changed size upstream: record dropped", *names(record))
            await self.io(self.store.evict, record.key)
            raise FillFailed(f"the object's size changed upstream (now {total} bytes)")
        if status == 206 and got != want:
            raise FillFailed(f"upstream sent {got or 'no Content-Range'}, expected {want}")
        if status not in (200, 206):
            raise FillFailed(f"upstream answered {status} to a range request")
        etag, last_modified = headers.get("etag"), headers.get("last-modified")
        if record.etag and etag and etag != record.etag:
            await self.io(self.store.evict, record.key)
            raise FillFailed("the object changed upstream (new ETag); cached blocks dropped")
        if record.etag is None and etag:
            await self.io(
                functools.partial(
                    self.store.update, record.key, etag=etag, last_modified=last_modified
                )
            )

    def verify_object(self, record: ObjectRecord) -> None:
        """Hash a multi-block object once all its blocks are in; a mismatch evicts it."""
        assert self.store is not None
        digest = Digest(record.checksum)
        for index in range(record.nblocks):
            f = self.store.block_file(record.key, index)
            if f is None:
                return  # evicted meanwhile
            pos, (b0, b1) = 0, record.block_range(index)
            while pos < b1 - b0:
                chunk = os.pread(f.fileno(), min(CHUNK, b1 - b0 - pos), pos)
                if not chunk:
                    break
                pos += len(chunk)
                digest.update(chunk)
        if not digest.matches():
            self.health.integrity_failures += 1
            log.error(
                "%s/%s: checksum mismatch after the last block; evicted",
                record.dataset,
                record.path,
            )
            self.store.evict(record.key)
            return
        self.store.update(record.key, sha256=digest.sha256.hexdigest(), verified=digest.checkable)
