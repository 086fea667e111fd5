"""Delivery from the online cache: hits straight from held files, misses filled block by block.

This module plans and sends; `cache.engine` fetches, checks and commits blocks. A response
is planned as a list of block slices. Cached slices are read with `os.pread` on held
descriptors; missing ones join (or start) the single fill of their block and stream as it
arrives. Headers go out only once the first missing block's upstream has answered,
so an upstream error is still a proper problem response, not a broken body.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import secrets

from starlette.types import Receive, Send

from cache.engine import FillEngine, outdated
from cache.fill import CacheWriteFailed, FillFailed
from cache.store import STORE_ERRORS, ObjectRecord
from proxy.conditional import Selection, select
from proxy.exchange import Exchange, Kind, Plan
from proxy.streams import until_disconnect
from upstreams.base import UpstreamObject, UpstreamUnavailable
from upstreams.http import open_body
from upstreams.memo import Memo
from upstreams.mirrors import first_answer

log = logging.getLogger("fdp.cache")

CHUNK = 1 << 20
SIMPLE_RANGE = re.compile(r"bytes=(\d{1,18})-(\d{1,18})\Z")


def _simple(x: Exchange, record: ObjectRecord) -> Selection | None:
    """The common GDAL request, decided without parsing: no conditions, `bytes=a-b` inside."""
    if x.method != "GET" or x.conditional:
        return None
    if x.range is None:
        return Selection(200)
    m = SIMPLE_RANGE.match(x.range)
    if m is None:
        return None
    start, end = int(m[1]), int(m[2]) + 1
    if start >= end or end > record.size:
        return None
    return Selection(206, ((start, end),))


async def _respond(send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


class CacheDelivery:
    """Plans and sends responses from the cache; store I/O runs off the event loop."""

    def __init__(self, engine: FillEngine, read_ahead: int = 4) -> None:
        self.engine = engine
        #: blocks fetched ahead of the one being sent, in a response that spans several
        self.read_ahead = read_ahead
        self.store, self.client = engine.store, engine.client
        self.fills, self.health = engine.fills, engine.health
        self._revalidating: set[str] = set()
        self._header_memo: Memo[str, tuple[ObjectRecord, tuple[tuple[bytes, bytes], ...]]]
        self._header_memo = Memo(16384, 300.0)

    @property
    def usable(self) -> bool:
        return self.store is not None and not self.health.degraded

    # -- the record: what we know of the object before any block ----------------------

    async def lookup(self, key: str, x: Exchange | None = None) -> ObjectRecord | None:
        """The record. A stale one held in memory still serves a request whose blocks are
        all held open (re-read in the background); anything else waits for the index."""
        assert self.store is not None
        record, fresh = self.store.peek(key)
        if record is not None and not fresh and x is not None and self._held_for(record, x):
            if key not in self._revalidating:
                self._revalidating.add(key)
                self.fills.spawn(self._revalidate(key))
            return record
        if record is not None and fresh:
            return record
        return await self.engine.index("reading the cache index", self.store.record, key)

    def _held_for(self, record: ObjectRecord, x: Exchange) -> bool:
        assert self.store is not None
        selection = _simple(x, record)
        if selection is None:
            return False
        start, end = selection.ranges[0] if selection.ranges else (0, record.size)
        first, last = start // record.block_size, max(start, end - 1) // record.block_size
        return all(self.store.held_block(record.key, i) for i in range(first, last + 1))

    async def _revalidate(self, key: str) -> None:
        assert self.store is not None
        try:
            await self.engine.io(self.store.record, key)
        except STORE_ERRORS as e:
            self.health.failed("reading the cache index", e)
        finally:
            self._revalidating.discard(key)

    async def record(self, x: Exchange, obj: UpstreamObject) -> ObjectRecord:
        """The object's record; a new one if there is none or the catalogue now promises
        other bytes than the cached ones."""
        record = await self.lookup(x.cache_key, x)
        if record is not None and not outdated(record, obj):
            return record
        assert self.store is not None
        if record is not None:
            log.info("cached %s/%s has an outdated checksum: evicted", x.dataset, x.rel)
            await self.engine.index("evicting an outdated object", self.store.evict, x.cache_key)
        return await self.engine.create_record(x.dataset, x.cache_key, x.rel, obj)

    async def presigned(self, x: Exchange, expires: int) -> str | None:
        """A presigned URL of the object's whole copy in the shared tier, if it has one of
        this version; else None (and, for a complete object, the copy is made for later)."""
        shared = self.engine.shared
        if shared is None or self.store is None or x.obj is None:
            return None
        record = await self.lookup(x.cache_key, x)
        if record is None or not record.complete:
            record = await self.engine.shared_record(
                x.dataset, x.cache_key, x.rel, x.obj, complete=True
            )
        if record is None or outdated(record, x.obj):
            return None
        if not await self.engine.on_shared(shared.has_whole, record):
            self.engine.share_whole(record)
            return None
        return shared.presign(record, expires)

    # -- planning: hit or miss, before anything is sent ---------------------------------

    async def plan(self, x: Exchange, create: bool = True, whole: bool = True) -> Plan | None:
        """HIT when every byte asked for is cached, else MISS. Without `create`, None when
        there is no usable record (and, with `whole`, unless the object is wholly cached):
        nothing is asked of the upstream. Raises for 412/416 and malformed ranges."""
        assert x.obj is not None and self.store is not None
        record, fresh = self.store.peek(x.cache_key)  # the common case: no await at all
        if not fresh or record is None or outdated(record, x.obj):
            record = await self.record(x, x.obj) if create else await self.lookup(x.cache_key, x)
        whole_elsewhere = False  # every block is in the shared tier: no upstream needed
        if record is None and not create:
            record = await self.engine.shared_record(
                x.dataset, x.cache_key, x.rel, x.obj, complete=True
            )
            whole_elsewhere = record is not None
        if record is None:
            return None
        if not create and (
            outdated(record, x.obj) or (whole and not record.complete and not whole_elsewhere)
        ):
            return None
        selection = _simple(x, record) or select(x, record.size, record.etag, record.last_modified)
        if x.method == "HEAD" or selection.status == 304 or record.complete:
            return Plan(Kind.HIT, selection, record)
        present = set(record.blocks)
        for start, end in selection.ranges or ((0, record.size),):
            first, last = start // record.block_size, max(start, end - 1) // record.block_size
            if any(i not in present for i in range(first, last + 1)):
                return Plan(Kind.MISS, selection, record)
        return Plan(Kind.HIT, selection, record)

    # -- sending ------------------------------------------------------------------------

    async def send(
        self, x: Exchange, plan: Plan, cache_control: bytes, receive: Receive, send: Send
    ) -> None:
        record, selection = plan.record, plan.selection
        assert record is not None and self.store is not None and x.obj is not None
        headers = self._headers(record, cache_control)
        if x.link is not None:
            headers.append(x.link)
        self.store.touch(record.key)
        if record.checksum and not record.verified and x.method == "GET":
            self.engine.complete_later(record, x.obj)  # (cut by a restart, say) finish it
        if selection.status == 304:
            await _respond(x.tracking(send), 304, headers)
            return
        if x.method == "HEAD":
            headers.append((b"content-length", str(record.size).encode()))
            await _respond(x.tracking(send), 200, headers)
            return
        ranges = selection.ranges or ((0, record.size),)
        if plan.kind == Kind.HIT:
            self.health.counters["hit"] += 1
            chunk = self._small_hit(record, ranges) if len(ranges) == 1 else None
            if chunk is not None:  # the common case, kept short: one pread, two sends
                start, end = ranges[0]
                if selection.status == 206:
                    headers.append(
                        (b"content-range", f"bytes {start}-{end - 1}/{record.size}".encode())
                    )
                headers.append((b"content-length", str(end - start).encode()))
                x.status, x.sent = selection.status, len(chunk)  # (`send` is not tracked)
                await send({"type": "http.response.start", "status": x.status, "headers": headers})
                await send({"type": "http.response.body", "body": chunk})
                return
        else:
            self.health.counters["miss"] += 1
            bs = record.block_size
            missing = sorted(
                {
                    i
                    for start, end in ranges
                    for i in range(start // bs, (end - 1) // bs + 1)
                    if i not in record.blocks
                }
            )
            # what the upstream sends for it: whole blocks (miss-byte budgets count these)
            x.fetched = sum(min(record.size, (i + 1) * bs) - i * bs for i in missing)
            if missing:  # (filled meanwhile: nothing to wait for)
                await self.engine.ensure(record, x.obj, missing[0]).started  # errors: problems
                record = self.store.peek(record.key)[0] or record  # the fill may know more
        obj = x.obj
        send = x.tracking(send)

        async def body() -> None:
            if len(ranges) > 1:
                await self._multipart(record, obj, ranges, headers, send)
                return
            start, end = ranges[0]
            if selection.status == 206:
                headers.append(
                    (b"content-range", f"bytes {start}-{end - 1}/{record.size}".encode())
                )
            headers.append((b"content-length", str(end - start).encode()))
            await send(
                {"type": "http.response.start", "status": selection.status, "headers": headers}
            )
            if self._withhold(record, start, end):
                # the whole object, not verified yet: its last byte waits for the hash
                if not await self._stream(record, obj, start, end - 1, send):
                    return
                if not await self.engine.verified(record):
                    log.error("%s: does not match its checksum; response aborted", record.path)
                    return
                start = end - 1
            if await self._stream(record, obj, start, end, send):
                await send({"type": "http.response.body", "body": b""})

        await until_disconnect(receive, body)  # a client that leaves fetches no more blocks

    def _withhold(self, record: ObjectRecord, start: int, end: int) -> bool:
        """A response of the whole of a multi-block object that has a catalogue checksum
        and is not verified yet (single-block fills withhold their last byte themselves)."""
        return (
            start == 0
            and end == record.size
            and record.nblocks > 1
            and not record.verified
            and self.engine.checkable(record)
        )

    def _small_hit(self, record: ObjectRecord, ranges: tuple[tuple[int, int], ...]) -> bytes | None:
        """The bytes of one range inside one held block, or None for the general path."""
        start, end = ranges[0]
        index = start // record.block_size
        if (end - 1) // record.block_size != index or end - start > CHUNK:
            return None
        assert self.store is not None
        f = self.store.held_block(record.key, index)
        if f is None:
            return None
        chunk = os.pread(f.fileno(), end - start, start - index * record.block_size)
        return chunk if len(chunk) == end - start else None  # short: the general path evicts

    async def _multipart(
        self,
        record: ObjectRecord,
        obj: UpstreamObject,
        ranges: tuple[tuple[int, int], ...],
        headers: list[tuple[bytes, bytes]],
        send: Send,
    ) -> None:
        """Several ranges: one multipart/byteranges body (RFC 9110 14.6)."""
        boundary = secrets.token_hex(16)
        media = (record.media_type or "application/octet-stream").encode("latin-1")
        heads = [
            b"\r\n--%s\r\ncontent-type: %s\r\ncontent-range: bytes %d-%d/%d\r\n\r\n"
            % (boundary.encode(), media, start, end - 1, record.size)
            for start, end in ranges
        ]
        tail = b"\r\n--%s--\r\n" % boundary.encode()
        length = sum(len(h) for h in heads) + sum(e - s for s, e in ranges) + len(tail)
        headers = [(k, v) for k, v in headers if k != b"content-type"]
        headers += [
            (b"content-type", b"multipart/byteranges; boundary=" + boundary.encode()),
            (b"content-length", str(length).encode()),
        ]
        await send({"type": "http.response.start", "status": 206, "headers": headers})
        for head_, (start, end) in zip(heads, ranges, strict=True):
            await send({"type": "http.response.body", "body": head_, "more_body": True})
            if not await self._stream(record, obj, start, end, send):
                return
        await send({"type": "http.response.body", "body": tail})

    async def _stream(
        self, record: ObjectRecord, obj: UpstreamObject, start: int, end: int, send: Send
    ) -> bool:
        """Send bytes [start, end) from cached blocks and fills; False when aborted."""
        assert self.store is not None
        if start >= end:
            return True
        store = self.store
        first, last = start // record.block_size, max(start, end - 1) // record.block_size
        for index in range(first, last + 1):
            b0, b1 = record.block_range(index)
            a, b = max(start, b0), min(end, b1)
            f = store.held_block(record.key, index)
            if f is None and index in (store.peek(record.key)[0] or record).blocks:
                f = await self.engine.io(store.block_file, record.key, index)  # filled meanwhile
            if f is not None:
                fd, pos = f.fileno(), a - b0
                while a < b:
                    chunk = os.pread(fd, min(CHUNK, b - a), pos)
                    if not chunk:
                        log.error("cached block %s/%d is short: evicted", record.key, index)
                        await self.engine.io(store.evict, record.key)
                        return False  # abort: the client sees an incomplete body
                    a += len(chunk)
                    pos += len(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                continue
            self.engine.read_ahead(record, obj, index + 1, min(last, index + self.read_ahead))
            if not await self._stream_fill(record, obj, index, a, b, send):
                return False
        return True

    async def _stream_fill(
        self, record: ObjectRecord, obj: UpstreamObject, index: int, a: int, b: int, send: Send
    ) -> bool:
        b0 = index * record.block_size
        pos = a
        try:
            fill = self.engine.ensure(record, obj, index)
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
            client, asked = self.client, {"range": f"bytes={pos}-{b - 1}"}
            body = await first_answer(obj, lambda o: open_body(client, o, asked))
            try:
                async for chunk in body.chunks():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finally:
                await body.aclose()
        except UpstreamUnavailable as e:
            log.warning("%s: %s; response aborted", record.path, e)
            return False
        return True

    def _headers(self, record: ObjectRecord, cache_control: bytes) -> list[tuple[bytes, bytes]]:
        """A record's fixed headers, memoised per object until its record changes."""
        memo = self._header_memo.get(record.key)
        if memo is not None and memo[0] is record and memo[1][-1][1] is cache_control:
            return list(memo[1])
        headers = self._build_headers(record, cache_control)
        self._header_memo[record.key] = (record, headers)
        return list(headers)

    @staticmethod
    def _build_headers(
        record: ObjectRecord, cache_control: bytes
    ) -> tuple[tuple[bytes, bytes], ...]:
        headers = [(b"accept-ranges", b"bytes")]
        if record.media_type:
            headers.append((b"content-type", record.media_type.encode("latin-1")))
        if record.etag:
            headers.append((b"etag", record.etag.encode("latin-1")))
        if record.last_modified:
            headers.append((b"last-modified", record.last_modified.encode("latin-1")))
        if record.sha256 and record.complete:  # RFC 9530: of the whole representation
            digest = base64.b64encode(bytes.fromhex(record.sha256))
            headers.append((b"repr-digest", b"sha-256=:" + digest + b":"))
        headers.append((b"cache-control", cache_control))  # last: the memo checks it
        return tuple(headers)
