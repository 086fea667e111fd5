"""One retrieval: bring an object from a slow upstream into the cache, whole and verified.

Runs in a worker (an RQ worker process or the embedded runner's thread). The object lands in
a temporary file first and enters the cache only once complete and verified, so a worker
killed half-way leaves no cache entry behind, only a temporary file that retention removes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from cache.integrity import Digest
from cache.store import ObjectRecord, Store
from upstreams.base import UpstreamObject
from upstreams.http import map_transport_errors, stream_sync

log = logging.getLogger("fdp.workers")

Progress = Callable[[int, int | None], None]


class RetrievalFailed(Exception):
    """A retrieval that cannot succeed as things stand; the text is safe to show users."""


@dataclass(frozen=True)
class Target:
    dataset: str
    path: str
    block_size: int


def fetch_into_cache(
    store: Store,
    target: Target,
    obj: UpstreamObject,
    progress: Progress,
    client: httpx.Client,
) -> ObjectRecord:
    """Download the whole object to a temporary file, verify it, then ingest it."""
    tmp = store.tmp / f"job-{os.getpid()}-{time.monotonic_ns()}.part"
    digest = Digest(obj.checksum)  # the sha256 itself is recorded by ingest()
    done = 0
    try:
        # the proxy's rules: allowed origins only, credentials never cross to another one
        with stream_sync(client, obj) as r, map_transport_errors("GET body"):
            total = obj.size or int(r.headers.get("content-length") or 0) or None
            progress(0, total)
            with tmp.open("wb") as f:
                for chunk in r.iter_raw(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    progress(done, total)
            etag, last_modified = r.headers.get("etag"), r.headers.get("last-modified")
            media_type = obj.media_type or r.headers.get("content-type")
        if total is not None and done != total:
            raise RetrievalFailed(f"upstream sent {done} of {total} bytes")
        if not digest.matches():
            raise RetrievalFailed("the retrieved bytes do not match the catalogue checksum")
        record = store.ingest(
            target.dataset,
            target.path,
            tmp,
            target.block_size,
            media_type,
            etag=etag,
            last_modified=last_modified,
            checksum=obj.checksum,
        )
        log.info("retrieved %s/%s: %d bytes", target.dataset, target.path, done)
        return record
    finally:
        tmp.unlink(missing_ok=True)
