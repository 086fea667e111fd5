"""Delivery from the online cache: hits straight from held files, misses filled block by block.

A response is planned as a list of block slices. Cached slices are read with `os.pread`
on held descriptors; missing ones join (or start) the single fill of their block and stream
as it arrives. Headers go out only once the first missing block's upstream has answered,
so an upstream error is still a proper problem response, not a broken body.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio.to_thread
import httpx
from starlette.types import Send
from werkzeug.http import parse_range_header

from cache.fill import CacheWriteFailed, Fill, FillFailed, Fills
from cache.integrity import ChecksumMismatch, Digest
from cache.store import STORE_ERRORS, ObjectRecord, Store, object_key
from proxy.problems import MalformedRange
from upstreams.base import (
    ObjectNotFound,
    RangeNotSatisfiable,
    UpstreamObject,
    UpstreamUnavailable,
)
from upstreams.http import head, open_body

log = logging.getLogger("fdp.cache")

CHUNK = 1 << 20
#: Blocks fetched ahead of the one being sent, in a response that spans several.
READ_AHEAD = 2
SIMPLE_RANGE = re.compile(r"bytes=(\d{1,18})-(\d{1,18})\Z")
ERROR_LOG_INTERVAL = 60.0
RETRY_CACHE_AFTER = 10.0  # seconds of pass-through after a cache failure before trying again


@dataclass
class Asked:
    """What the client asked, from its headers."""

    method: str
    path: str
    range: str | None = None
    if_none_match: str | None = None
    if_range: str | None = None


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


def byte_range(asked: Asked, record: ObjectRecord) -> tuple[int, int, bool]:
    """(start, end, partial) for the response; raises for bad or unsatisfiable ranges."""
    spec = asked.range
    if spec is None or spec.partition("=")[0].strip().lower() != "bytes":
        return 0, record.size, False
    if asked.if_range is not None and asked.if_range != record.etag:
        if not (asked.if_range == record.last_modified and record.last_modified):
            return 0, record.size, False  # If-Range does not match: send it all
    parsed = parse_range_header(spec)
    if parsed is None:
        raise MalformedRange(f"malformed Range header {spec!r}; expected e.g. bytes=0-1023")
    if len(parsed.ranges) != 1:
        return 0, record.size, False  # several ranges: RFC 9110 lets us send the whole
    bounds = parsed.range_for_length(record.size)
    if bounds is None:
        raise RangeNotSatisfiable(record.size)
    return bounds[0], bounds[1], True


def _etag_matches(header: str, etag: str | None) -> bool:
    if etag is None:
        return False
    if header.strip() == "*":
        return True
    weak = etag.removeprefix("W/")
    return any(t.strip().removeprefix("W/") == weak for t in header.split(","))


class CacheDelivery:
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
        self._header_memo: dict[str, tuple[ObjectRecord, tuple[tuple[bytes, bytes], ...]]] = {}

    @property
    def usable(self) -> bool:
        return self.store is not None and not self.health.degraded

    # -- the record: what we know of the object before any block ----------------------

    async def record(self, dataset: str, key: str, path: str, obj: UpstreamObject) -> ObjectRecord:
        assert self.store is not None
        record = self.store.record(key)
        if record is not None and not (
            record.checksum and obj.checksum and record.checksum != obj.checksum
        ):
            return record
        if record is not None:  # the catalogue now promises other bytes: start over
            log.info("cached %s/%s has an outdated checksum: evicted", dataset, path)
            self.store.evict(key)
        etag = last_modified = None
        if obj.size is not None:
            size, media_type = obj.size, obj.media_type
        else:
            meta = await head(self.client, obj)
            size, etag, last_modified = meta.size, meta.etag, meta.last_modified
            media_type = obj.media_type or meta.media_type
        now = self.clock()
        record = ObjectRecord(
            key=key,
            dataset=dataset,
            path=path,
            size=size,
            block_size=self.block_size,
            etag=etag,
            last_modified=last_modified,
            media_type=media_type,
            checksum=obj.checksum,
            created=now,
            accessed=now,
        )
        self.store.put_record(record)
        return record

    # -- serving ----------------------------------------------------------------------

    async def serve(
        self, asked: Asked, dataset: str, path: str, obj: UpstreamObject, send: Send
    ) -> None:
        assert self.store is not None
        key = object_key(dataset, path)
        if await self._hit(asked, key, send):
            return
        record = await self.record(dataset, key, path, obj)
        if asked.if_none_match and _etag_matches(asked.if_none_match, record.etag):
            await self._head(send, record, 304)
            return
        if asked.method == "HEAD":
            await self._head(send, record, 200)
            return
        start, end, partial = byte_range(asked, record)
        first, last = start // record.block_size, max(start, end - 1) // record.block_size
        store = self.store
        files = [store.block_file(key, i) for i in range(first, last + 1)]
        self.store.touch(key)
        if all(files):
            self.health.counters["hit"] += 1
        else:
            self.health.counters["miss"] += 1
            missing = next(i for i, f in zip(range(first, last + 1), files, strict=True) if not f)
            await self._ensure_fill(record, obj, missing).started  # errors become problems
            record = self.store.record(key) or record  # the fill may have learnt the etag
        headers = list(self._headers(record))
        status = 200
        if partial:
            status = 206
            headers.append((b"content-range", f"bytes {start}-{end - 1}/{record.size}".encode()))
        headers.append((b"content-length", str(end - start).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for n, index in enumerate(range(first, last + 1)):
            b0, b1 = record.block_range(index)
            a, b = max(start, b0), min(end, b1)
            f = files[n] or store.block_file(key, index)
            if f is not None:
                fd, pos = f.fileno(), a - b0
                while a < b:
                    chunk = os.pread(fd, min(CHUNK, b - a), pos)
                    if not chunk:
                        log.error("cached block %s/%d is short: evicted", key, index)
                        store.evict(key)
                        return  # abort: the client sees an incomplete body
                    a += len(chunk)
                    pos += len(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                continue
            self._read_ahead(record, obj, index + 1, min(last, index + READ_AHEAD))
            if not await self._stream_fill(record, obj, index, a, b, send):
                return  # aborted
        await send({"type": "http.response.body", "body": b""})

    async def _hit(self, asked: Asked, key: str, send: Send) -> bool:
        """The common case, kept short: a plain GET of one range inside one cached block."""
        assert self.store is not None
        if asked.method != "GET" or asked.if_none_match or asked.if_range:
            return False
        record = self.store.record(key)
        if record is None:
            return False
        spec = asked.range
        if spec is None:
            start, end, partial = 0, record.size, False
        else:
            m = SIMPLE_RANGE.match(spec)
            if m is None:
                return False  # suffix, open-ended, several ranges...: the general path
            start, end, partial = int(m[1]), int(m[2]) + 1, True
            if start >= end or end > record.size:
                return False
        index = start // record.block_size
        if (end - 1) // record.block_size != index or end - start > CHUNK:
            return False
        f = self.store.block_file(key, index)
        if f is None:
            return False
        offset = index * record.block_size
        chunk = os.pread(f.fileno(), end - start, start - offset)
        if len(chunk) != end - start:
            return False  # the general path notices and evicts
        headers = list(self._headers(record))
        if partial:
            headers.append((b"content-range", f"bytes {start}-{end - 1}/{record.size}".encode()))
        headers.append((b"content-length", str(end - start).encode()))
        self.store.touch(key)
        self.health.counters["hit"] += 1
        await send(
            {"type": "http.response.start", "status": 206 if partial else 200, "headers": headers}
        )
        await send({"type": "http.response.body", "body": chunk})
        return True

    def _read_ahead(self, record: ObjectRecord, obj: UpstreamObject, first: int, last: int) -> None:
        """Start the next missing blocks of a long response now, so their latency overlaps."""
        assert self.store is not None
        for index in range(first, last + 1):
            if self.store.block_file(record.key, index) is None:
                with contextlib.suppress(CacheWriteFailed):
                    self._ensure_fill(record, obj, index)

    async def _stream_fill(
        self, record: ObjectRecord, obj: UpstreamObject, index: int, a: int, b: int, send: Send
    ) -> bool:
        b0 = index * record.block_size
        pos = a
        try:
            fill = self._ensure_fill(record, obj, index)
            async for chunk in fill.follow(a - b0, b - b0):
                pos += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            return True
        except CacheWriteFailed:
            pass  # the cache cannot take it: fetch the rest of this slice directly
        except FillFailed as e:
            log.warning("%s: %s; response aborted after %d bytes", record.path, e, pos - a)
            return False
        try:
            body = await open_body(self.client, obj, {"range": f"bytes={pos}-{b - 1}"})
            try:
                async for chunk in body.chunks():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finally:
                await body.aclose()
        except UpstreamUnavailable as e:
            log.warning("%s: %s; response aborted", record.path, e)
            return False
        return True

    async def _head(self, send: Send, record: ObjectRecord, status: int) -> None:
        headers = list(self._headers(record))
        if status == 200:
            headers.append((b"content-length", str(record.size).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    def _headers(self, record: ObjectRecord) -> tuple[tuple[bytes, bytes], ...]:
        """A record's fixed headers, memoised per object until its record changes."""
        memo = self._header_memo.get(record.key)
        if memo is not None and memo[0] is record:
            return memo[1]
        headers = self._build_headers(record)
        if len(self._header_memo) > 65536:
            self._header_memo.clear()
        self._header_memo[record.key] = (record, headers)
        return headers

    @staticmethod
    def _build_headers(record: ObjectRecord) -> tuple[tuple[bytes, bytes], ...]:
        headers = [(b"accept-ranges", b"bytes")]
        if record.media_type:
            headers.append((b"content-type", record.media_type.encode("latin-1")))
        if record.etag:
            headers.append((b"etag", record.etag.encode("latin-1")))
        if record.last_modified:
            headers.append((b"last-modified", record.last_modified.encode("latin-1")))
        return tuple(headers)

    # -- filling ----------------------------------------------------------------------

    def _ensure_fill(self, record: ObjectRecord, obj: UpstreamObject, index: int) -> Fill:
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
        try:
            body = await open_body(self.client, obj, {"range": f"bytes={b0}-{b1 - 1}"})
        except Exception as e:
            if isinstance(e, ObjectNotFound):
                self.store.evict(record.key)  # no such object: keep no record of it
            fill.fail(e)
            return
        try:
            self._check_response(record, body.status, body.headers, b0, b1)
            fill.begin()
            async for chunk in body.chunks():
                if fill.written + len(chunk) > b1 - b0:
                    raise FillFailed("upstream sent more bytes than the block holds")
                fill.append(chunk)
                if digest is not None:
                    digest.update(chunk)
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
            self.store.evict(record.key)
            fill.fail(FillFailed(str(e)))
            return
        except (FillFailed, UpstreamUnavailable) as e:
            fill.fail(e)
            return
        finally:
            await body.aclose()
        fill.finish()
        try:
            updated = await anyio.to_thread.run_sync(
                self.store.commit_block, record.key, index, fill.path
            )
            if updated is not None and digest is not None:
                self.store.update(
                    record.key, sha256=digest.sha256.hexdigest(), verified=digest.checkable
                )
            elif updated is not None and updated.complete and not whole:
                await anyio.to_thread.run_sync(self.verify_object, updated)
            self.health.recovered()
        except STORE_ERRORS as e:
            self.health.failed("cannot store a block", e)

    def _check_response(
        self, record: ObjectRecord, status: int, headers: dict[str, str], b0: int, b1: int
    ) -> None:
        """The upstream must send exactly the block, of the object we think it is."""
        assert self.store is not None
        if status == 206:
            want = f"bytes {b0}-{b1 - 1}/{record.size}"
            got = headers.get("content-range", "")
            if got != want:
                raise FillFailed(f"upstream sent {got or 'no Content-Range'}, expected {want}")
        elif not (status == 200 and b0 == 0 and b1 == record.size):
            raise FillFailed(f"upstream answered {status} to a range request")
        etag, last_modified = headers.get("etag"), headers.get("last-modified")
        if record.etag and etag and etag != record.etag:
            self.store.evict(record.key)
            raise FillFailed("the object changed upstream (new ETag); cached blocks dropped")
        if record.etag is None and etag:
            self.store.update(record.key, etag=etag, last_modified=last_modified)

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
