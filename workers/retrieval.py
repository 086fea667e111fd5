"""One retrieval: bring an object from a slow upstream into the cache, whole and verified.

Runs in a worker (an RQ worker process or the embedded runner's thread) and writes with
the fill engine's own code (`cache.fetch`): one GET of the whole object, each block checked,
hashed and committed as it completes, the whole checked against the catalogue before the
last block is. A worker killed half-way leaves the blocks it finished and at most one part
file, which retention removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import urllib3

from cache.fetch import Cursor, check_response, new_record, write_blocks
from cache.fill import FillFailed
from cache.integrity import ChecksumMismatch, Digest
from cache.store import ObjectRecord, Store, object_key
from upstreams.base import UpstreamObject, UpstreamUnavailable
from upstreams.caps import Caps
from upstreams.http import meta_of, open_sync
from upstreams.mirrors import attempts, blames

log = logging.getLogger("fdp.workers")

Progress = Callable[[int, int | None], None]
#: seconds a retrieval waits for a slot of a capped upstream
SLOT_WAIT = 300.0


class RetrievalFailed(Exception):
    """A retrieval that cannot succeed as things stand; the text is safe to show users."""


@dataclass(frozen=True)
class Target:
    dataset: str
    path: str
    block_size: int


class _JobSink:
    """Each block of the span goes to its own part file and into the store once complete."""

    def __init__(self, store: Store, record: ObjectRecord, progress: Progress) -> None:
        self.store, self.record, self.progress = store, record, progress
        self.fd = -1
        self.path: Path | None = None

    def begin(self, etag: str | None, last_modified: str | None) -> None:
        pass

    def part(self, index: int) -> int:
        self.close()
        self.path = self.store.tmp / f"{self.record.key}.{index}.job-{os.getpid()}.part"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        return self.fd

    def arrived(self, index: int, pos: int, data: memoryview) -> None:
        self.progress(self.record.block_range(index)[0] + pos + len(data), self.record.size)

    def wrote(self, index: int, written: int) -> None:
        pass

    def done(self, index: int, sha256: str) -> None:
        assert self.path is not None
        committed = self.store.commit_block(self.record, index, self.path, sha256)
        self.close()  # (the store has its own link to the file)
        if committed is None:
            raise RetrievalFailed("the object changed or was evicted during the retrieval")

    def stopped(self) -> bool:
        return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def fetch_into_cache(
    store: Store,
    target: Target,
    obj: UpstreamObject,
    progress: Progress,
    pool: urllib3.PoolManager,
    caps: Caps | None = None,
) -> ObjectRecord:
    """One GET of the whole object, written block by block, verified, returns its record;
    a mirrored object from its mirrors in order, each that fails marked down.

    Archives answer slowly: the record is made from that GET's own answer, not a probe. The
    GET keeps to its origin's caps; a worker waits up to `SLOT_WAIT` for a slot (a job has
    no client waiting on it), then fails the attempt with UpstreamBusy (tried again later).
    """
    error: UpstreamUnavailable | None = None
    for member, candidate in attempts(obj):
        try:
            return _retrieve(store, target, candidate, progress, pool, caps)
        except UpstreamUnavailable as e:
            if member is None or not blames(e):
                raise
            member.failed(str(e))
            error = e
    raise error or UpstreamUnavailable("no mirror answered")


def _retrieve(
    store: Store,
    target: Target,
    obj: UpstreamObject,
    progress: Progress,
    pool: urllib3.PoolManager,
    caps: Caps | None,
) -> ObjectRecord:
    key = object_key(target.dataset, target.path)
    with (
        caps.slot(obj.href, wait=SLOT_WAIT) if caps else contextlib.nullcontext() as meter,
        open_sync(pool, obj) as body,
    ):
        body = meter.wrap(body) if meter is not None else body
        meta = meta_of(body.status, body.headers, "GET")
        now = time.time()
        record = new_record(meta, obj, key, target.dataset, target.path, target.block_size, now)
        store.evict(key)  # whatever was cached of it goes: this is the version now
        store.put_record(record)
        progress(0, record.size)
        digest = Digest(record.checksum)
        sink = _JobSink(store, record, progress)
        try:
            check_response(record, body.status, body.headers, 0, record.size, record.etag)
            cursor = Cursor(0, 0, sink.part(0), hashlib.sha256())
            write_blocks(body, record, cursor, record.nblocks - 1, sink, digest=digest)
        except ChecksumMismatch:
            store.evict(key)
            raise RetrievalFailed(
                "the retrieved bytes do not match the catalogue checksum"
            ) from None
        except FillFailed as e:
            store.evict(key)
            raise RetrievalFailed(str(e)) from None
        finally:
            sink.close()
    done = store.update(key, sha256=digest.sha256.hexdigest(), verified=digest.checkable)
    if done is None or not done.complete:
        raise RetrievalFailed("the object was evicted during the retrieval")
    log.info("retrieved %s/%s: %d bytes", target.dataset, target.path, done.size)
    return done
