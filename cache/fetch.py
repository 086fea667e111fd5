"""Fetching blocks: one ranged GET, checked against the record, written block by block.

Runs in a thread (a fill's or a worker's): reading the socket, writing the file and hashing
all release the GIL, so the event loop only hears of progress. Request-driven fills and
retrieval jobs both fetch through `fetch_span`; only what they do with a finished block
differs (the `Sink`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from typing import Any, Protocol

import urllib3

from cache.fill import CacheWriteFailed, FillFailed
from cache.integrity import ChecksumMismatch, Digest
from cache.store import ObjectRecord, Store
from upstreams.base import ObjectNotFound, UpstreamObject, UpstreamUnavailable
from upstreams.caps import Caps
from upstreams.http import Meta, SyncBody, open_sync

log = logging.getLogger("fdp.cache")

CHUNK = 1 << 20
#: The most one socket read takes: below glibc's mmap threshold (128 KiB), so each buffer
#: comes from the reused heap, not from fresh pages (slow to fault in on a VM).
READ = 120 * 1024


class ObjectChanged(FillFailed):
    """The upstream no longer holds the version the record describes: drop the record."""


class Sink(Protocol):
    """Where a span's bytes go, block by block."""

    def begin(self, etag: str | None, last_modified: str | None) -> None:
        """The upstream answered with the expected bytes of this version."""

    def part(self, index: int) -> int:
        """The descriptor block `index` is written to (at offsets within the block)."""

    def arrived(self, index: int, pos: int, data: memoryview) -> None:
        """Bytes [pos, pos + len(data)) of block `index` have arrived (not written yet)."""

    def wrote(self, index: int, written: int) -> None:
        """`written` bytes of block `index` are now in its file."""

    def done(self, index: int, sha256: str) -> None:
        """Block `index` is complete (and, for a checked span, verified)."""

    def stopped(self) -> bool:
        """True when nobody needs the rest (the process is stopping)."""


def strong(etag: str | None) -> bool:
    return bool(etag) and not etag.startswith("W/")  # type: ignore[union-attr]


def check_response(
    record: ObjectRecord, status: int, headers: urllib3.HTTPHeaderDict, start: int, end: int
) -> None:
    """The upstream must send exactly bytes [start, end) of the object we think it is."""
    want = f"bytes {start}-{end - 1}/{record.size}"
    got = headers.get("content-range", "") if status == 206 else None
    length = headers.get("content-length")
    total = got.rpartition("/")[2] if got else length if status == 200 else None
    if total is not None and total.isdigit() and int(total) != record.size:
        raise ObjectChanged(f"the object's size changed upstream (now {total} bytes)")
    if status == 206 and got != want:
        raise FillFailed(f"upstream sent {got or 'no Content-Range'}, expected {want}")
    if status not in (200, 206):
        raise FillFailed(f"upstream answered {status} to a range request")
    etag = headers.get("etag")
    if record.etag and etag and etag != record.etag:
        raise ObjectChanged("the object changed upstream (new ETag)")


def _write(fd: int, data: memoryview, pos: int) -> None:
    try:
        while data:
            n = os.pwrite(fd, data, pos)
            data, pos = data[n:], pos + n
    except OSError as e:
        raise CacheWriteFailed(f"cache write failed: {e.strerror}") from e


def _rehash(fd: int, length: int, *hashes: object) -> None:
    """Feed the first `length` bytes already in a part file to the hashes (a resumed fill)."""
    pos = 0
    while pos < length:
        chunk = os.pread(fd, min(CHUNK, length - pos), pos)
        if not chunk:
            raise FillFailed("a resumed part file is shorter than it was")
        for h in hashes:
            h.update(chunk)  # type: ignore[attr-defined]
        pos += len(chunk)


def fetch_span(
    pool: urllib3.PoolManager,
    record: ObjectRecord,
    obj: UpstreamObject,
    first: int,
    last: int,
    sink: Sink,
    resume: int = 0,
    digest: Digest | None = None,
    caps: Caps | None = None,
    since: float | None = None,
) -> None:
    """Blocks `first`..`last` in one GET (tied to the record's version with `If-Match`).

    `resume` bytes of block `first` are already in its part file (a fill taken over from a
    process that died). `digest`, for a span that is the whole object, is checked before the
    last block is declared done. An upstream that ignores `Range` is read from the start and
    left once the span is in. With `caps`, the GET holds a slot of its origin (waited for
    since `since`) and keeps to the origin's rate. Raises ObjectChanged, FillFailed,
    ChecksumMismatch or UpstreamError; never commits anything itself.
    """
    start, end = record.block_range(first)[0] + resume, record.block_range(last)[1]
    asked = {"range": f"bytes={start}-{end - 1}"}
    if strong(record.etag):
        asked["if-match"] = record.etag  # type: ignore[assignment]  # this version, or a 412
    fd = sink.part(first)
    block = hashlib.sha256()
    _rehash(fd, resume, block, *([digest] if digest else []))
    try:
        with (
            caps.slot(obj.href, since) if caps else contextlib.nullcontext() as meter,
            open_sync(pool, obj, asked) as body,
        ):
            check_response(record, body.status, body.headers, start, end)
            sink.begin(body.headers.get("etag"), body.headers.get("last-modified"))
            skip = start if body.status == 200 else 0
            body = meter.wrap(body) if meter is not None else body
            write_blocks(body, record, first, last, sink, fd, block, resume, skip, digest)
    except ObjectNotFound as e:
        raise ObjectChanged("the object is gone upstream") from e
    except UpstreamUnavailable as e:
        if e.status == 412:
            raise ObjectChanged("the object changed upstream (If-Match failed)") from e
        raise


def write_blocks(
    body: SyncBody,
    record: ObjectRecord,
    first: int,
    last: int,
    sink: Sink,
    fd: int,
    block: Any,
    pos: int = 0,
    skip: int = 0,
    digest: Digest | None = None,
) -> None:
    """Copy an open answer's bytes into blocks `first`..`last` (the first one at `fd`,
    already holding `pos` bytes hashed into `block`), skipping `skip` bytes first.

    Each piece is announced as it comes off the network, before it is hashed and written:
    readers here need not wait for the disk, and readers in other processes see the file
    grow piece by piece.
    """
    index = first
    b0, b1 = record.block_range(index)
    while index <= last:
        if sink.stopped():
            raise FillFailed("stopped")
        data = memoryview(body.read(READ))
        n = len(data)
        if n == 0:
            raise FillFailed(f"upstream sent {pos} of {b1 - b0} bytes of block {index}")
        if skip:
            cut = min(skip, n)
            data, skip = data[cut:], skip - cut
        while data and index <= last:
            piece = data[: b1 - b0 - pos]
            sink.arrived(index, pos, piece)
            block.update(piece)
            if digest is not None:
                digest.update(piece)
            _write(fd, piece, pos)
            pos += len(piece)
            data = data[len(piece) :]
            sink.wrote(index, pos)
            if pos < b1 - b0:
                continue
            if index == last and digest is not None and not digest.matches():
                raise ChecksumMismatch(f"{record.dataset}/{record.path}: checksum mismatch")
            sink.done(index, block.hexdigest())
            index += 1
            if index <= last:
                b0, b1 = record.block_range(index)
                fd, pos, block = sink.part(index), 0, hashlib.sha256()


def new_record(
    meta: Meta,
    obj: UpstreamObject,
    key: str,
    dataset: str,
    path: str,
    block_size: int,
    now: float,
) -> ObjectRecord:
    """A record for an object not cached yet: size and validators as its GETs report them
    (`meta` from a GET; a HEAD can lie). The provider's size wins over the catalogue's."""
    if obj.size is not None and obj.size != meta.size:
        log.warning(
            "%s/%s: the catalogue says %d bytes, the provider %d: using the provider's",
            *(dataset, path, obj.size, meta.size),
        )
    return ObjectRecord(
        key=key,
        dataset=dataset,
        path=path,
        size=meta.size,
        block_size=block_size,
        etag=meta.etag,
        last_modified=meta.last_modified,
        media_type=obj.media_type or meta.media_type,
        checksum=obj.checksum,
        created=now,
        accessed=now,
    )


def verify_object(store: Store, record: ObjectRecord) -> None:
    """Hash a whole multi-block object from its stored blocks and record its sha-256.

    A mismatch with its catalogue checksum evicts it and raises ChecksumMismatch.
    """
    digest = Digest(record.checksum)
    for index in range(record.nblocks):
        f = store.block_file(record.key, index)
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
        store.evict(record.key)
        raise ChecksumMismatch(f"{record.dataset}/{record.path}: checksum mismatch; evicted")
    store.update(record.key, sha256=digest.sha256.hexdigest(), verified=digest.checkable)


def names(record: ObjectRecord) -> tuple[str, str]:
    return record.dataset, record.path
