"""Fetching blocks: one ranged GET, checked against the record, written block by block.

Runs in a thread (a fill's or a worker's): reading the socket, writing the file and hashing
all release the GIL, so the event loop only hears of progress. Request-driven fills and
retrieval jobs both fetch through `fetch_span`; only what they do with a finished block
differs (the `Sink`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import urllib3

from cache.fill import CacheWriteFailed, FillFailed
from cache.integrity import ChecksumMismatch, Digest
from cache.store import BlockMissing, ObjectRecord, Store
from upstreams.base import ObjectNotFound, UpstreamObject, UpstreamUnavailable
from upstreams.caps import Caps
from upstreams.http import Meta, SyncBody, open_sync
from upstreams.mirrors import Member, MirrorSet, attempts, blames

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
    record: ObjectRecord,
    status: int,
    headers: urllib3.HTTPHeaderDict,
    start: int,
    end: int,
    etag: str | None,
) -> None:
    """The upstream must send exactly bytes [start, end) of the object we think it is
    (`etag`: the ETag it gave this version, if known)."""
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
    answered = headers.get("etag")
    if etag and answered and answered != etag:
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


@dataclass
class Cursor:
    """Where a span's bytes have got to: block `index`, `pos` bytes of it written to `fd`
    and hashed into `block`. A read that fails leaves it where the next one resumes."""

    index: int
    pos: int
    fd: int
    block: Any

    @property
    def at(self) -> tuple[int, int]:
        return self.index, self.pos


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
    """Blocks `first`..`last` in one GET (tied to the record's version with `If-Match`);
    for a mirrored object, from the best mirror, and on from the next one where it fails.

    `resume` bytes of block `first` are already in its part file (a fill taken over from a
    process that died). `digest`, for a span that is the whole object, is checked before the
    last block is declared done. An upstream that ignores `Range` is read from the start and
    left once the span is in. With `caps`, the GET holds a slot of its origin (waited for
    since `since`) and keeps to the origin's rate. Raises ObjectChanged, FillFailed,
    ChecksumMismatch or UpstreamError; never commits anything itself.
    """
    cursor = Cursor(first, resume, sink.part(first), hashlib.sha256())
    _rehash(cursor.fd, resume, cursor.block, *([digest] if digest else []))
    if obj.mirrors is None:
        try:
            _read(pool, record, obj, record.etag, cursor, last, sink, digest, caps, since)
        except ObjectNotFound as e:
            raise ObjectChanged("the object is gone upstream") from e
        except UpstreamUnavailable as e:
            if e.status == 412:
                raise ObjectChanged("the object changed upstream (If-Match failed)") from e
            raise
        return
    _from_mirrors(pool, record, obj, cursor, last, sink, digest, caps, since)


def _from_mirrors(
    pool: urllib3.PoolManager,
    record: ObjectRecord,
    obj: UpstreamObject,
    cursor: Cursor,
    last: int,
    sink: Sink,
    digest: Digest | None,
    caps: Caps | None,
    since: float | None,
) -> None:
    """The span from the mirrors in order: a mirror that fails is marked down and the next
    one goes on from the byte where it stopped (`Range`, and `If-Range` with that mirror's
    own ETag), so readers see one continuous body. A mirror holding another version is
    inconsistent once another one serves this version; if none does, the object changed."""
    assert obj.mirrors is not None
    mirrors = obj.mirrors.set
    began = cursor.at
    other_version: list[tuple[Member, str]] = []
    contributors: list[Member] = []
    failure: Exception | None = None
    for member, candidate in attempts(obj):
        assert member is not None
        if sink.stopped():
            raise FillFailed("stopped")
        before, etag = cursor.at, mirrors.validator(candidate.href)
        answered = functools.partial(
            _answered, mirrors, member, candidate.href, etag, time.monotonic()
        )
        try:
            with member.fetching():
                _read(
                    *(pool, record, candidate, etag, cursor, last, sink, digest, caps, since),
                    resuming=cursor.at != began,
                    answered=answered,
                )
        except CacheWriteFailed:
            raise
        except ChecksumMismatch:
            if cursor.at != before:
                contributors.append(member)
            if len(set(contributors)) == 1:  # its bytes alone made the object
                member.disagrees("its bytes do not match the catalogue checksum")
            raise
        except (FillFailed, ObjectNotFound, UpstreamUnavailable) as e:  # (ObjectChanged too)
            if sink.stopped():
                raise
            if cursor.at != before:
                contributors.append(member)
            changed = isinstance(e, ObjectChanged) or getattr(e, "status", None) == 412
            if changed:  # another version there
                mirrors.note_validator(candidate.href, None)
                other_version.append((member, str(e)))
            elif not isinstance(e, ObjectNotFound):  # failed, cut off or short
                if blames(e) or not isinstance(e, UpstreamUnavailable):
                    member.failed(str(e))
                failure = e
            log.warning("%s/%s: mirror %s: %s; trying the next", *names(record), member.name, e)
            continue
        for other, why in other_version:
            other.disagrees(why)
        return
    if other_version and failure is None:
        raise ObjectChanged("no mirror holds the version this record describes")
    raise failure or ObjectChanged("no mirror holds the object any more")


def _answered(
    mirrors: MirrorSet,
    member: Member,
    href: str,
    known: str | None,
    started: float,
    headers: urllib3.HTTPHeaderDict,
) -> None:
    """A mirror answered a span's GET: its latency, and its ETag if it is the first seen."""
    member.answered(time.monotonic() - started)
    if known is None:
        mirrors.note_validator(href, headers.get("etag"))


def _read(
    pool: urllib3.PoolManager,
    record: ObjectRecord,
    obj: UpstreamObject,
    etag: str | None,
    cursor: Cursor,
    last: int,
    sink: Sink,
    digest: Digest | None,
    caps: Caps | None,
    since: float | None,
    resuming: bool = False,
    answered: Callable[[urllib3.HTTPHeaderDict], None] | None = None,
) -> None:
    """One GET from where `cursor` is to the end of block `last`: `If-Match` its version,
    or when it resumes what another answer began, `If-Range` (a changed object then comes
    whole, with its new validators, and is refused)."""
    start, end = record.block_range(cursor.index)[0] + cursor.pos, record.block_range(last)[1]
    asked = {"range": f"bytes={start}-{end - 1}"}
    if strong(etag):
        asked["if-range" if resuming else "if-match"] = etag  # type: ignore[assignment]
    with (
        caps.slot(obj.href, since) if caps else contextlib.nullcontext() as meter,
        open_sync(pool, obj, asked) as body,
    ):
        check_response(record, body.status, body.headers, start, end, etag)
        if answered is not None:
            answered(body.headers)
        sink.begin(body.headers.get("etag"), body.headers.get("last-modified"))
        skip = start if body.status == 200 else 0
        body = meter.wrap(body) if meter is not None else body
        write_blocks(body, record, cursor, last, sink, skip, digest)


def write_blocks(
    body: SyncBody,
    record: ObjectRecord,
    cursor: Cursor,
    last: int,
    sink: Sink,
    skip: int = 0,
    digest: Digest | None = None,
) -> None:
    """Copy an open answer's bytes into blocks `cursor.index`..`last`, from where the cursor
    is, skipping `skip` bytes of the answer first.

    Each piece is announced as it comes off the network, before it is hashed and written:
    readers here need not wait for the disk, and readers in other processes see the file
    grow piece by piece.
    """
    c = cursor
    b0, b1 = record.block_range(c.index)
    while c.index <= last:
        if sink.stopped():
            raise FillFailed("stopped")
        data = memoryview(body.read(READ))
        n = len(data)
        if n == 0:
            raise FillFailed(f"upstream sent {c.pos} of {b1 - b0} bytes of block {c.index}")
        if skip:
            cut = min(skip, n)
            data, skip = data[cut:], skip - cut
        while data and c.index <= last:
            piece = data[: b1 - b0 - c.pos]
            sink.arrived(c.index, c.pos, piece)
            c.block.update(piece)
            if digest is not None:
                digest.update(piece)
            _write(c.fd, piece, c.pos)
            c.pos += len(piece)
            data = data[len(piece) :]
            sink.wrote(c.index, c.pos)
            if c.pos < b1 - b0:
                continue
            if c.index == last and digest is not None and not digest.matches():
                raise ChecksumMismatch(f"{record.dataset}/{record.path}: checksum mismatch")
            sink.done(c.index, c.block.hexdigest())
            c.index += 1
            if c.index <= last:
                b0, b1 = record.block_range(c.index)
                c.fd, c.pos, c.block = sink.part(c.index), 0, hashlib.sha256()


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
    try:
        for chunk in store.chunks(record, CHUNK):
            digest.update(chunk)
    except BlockMissing:
        return  # evicted meanwhile
    if not digest.matches():
        store.evict(record.key)
        raise ChecksumMismatch(f"{record.dataset}/{record.path}: checksum mismatch; evicted")
    store.update(record.key, sha256=digest.sha256.hexdigest(), verified=digest.checkable)


def names(record: ObjectRecord) -> tuple[str, str]:
    return record.dataset, record.path
