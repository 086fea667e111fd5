"""The shared cache tier: blocks and object records in an S3 bucket every replica and worker
reads (`cache.store: s3://bucket/prefix`).

Each process keeps its local tier (the diskcache `Store`) in front: a block missing there
is looked for here before the upstream is asked, and a block filled from the upstream is
copied here in the background. In the bucket:
- `{prefix}/objects/{key}.json`: an object's record (size, validators, type, checksums);
- `{prefix}/blocks/{key}/{version}/{index}`: a block, its sha-256 in `x-amz-meta-sha256`,
  so a block of one version never serves another, and a damaged one is never served.

Every call here blocks (boto3): the engine runs them in threads. A tier that fails is left
alone for `PAUSE` seconds, so a dead or silent object store costs one timeout, not one per
request.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from cache.retention import Rule, evict_planned
from cache.store import ObjectRecord, Store, version_tag
from policies.config import CacheConfig
from upstreams.base import ObjectNotFound, Timeouts, UpstreamError
from upstreams.memo import Memo
from upstreams.s3 import make_clients, map_boto_errors

log = logging.getLogger("fdp.cache")

#: whole copies remembered as present, and for how long
WHOLE_MEMO, WHOLE_TTL = 65536, 60.0
#: how long "no record of it" stands (a replica that just filled it publishes its record)
ABSENT_TTL = 5.0
#: Redis: when each shared object was last read; who sweeps the bucket now
ACCESSED, SWEEPER = "fdp:cache:accessed", "fdp:cache:sweeper"
#: seconds the tier is skipped after it failed (the upstream serves meanwhile)
PAUSE = 30.0
#: a shared store answers quickly or not at all: requests wait on these
TIMEOUTS = Timeouts(connect=2.0, read=5.0)
#: record fields another process may use (the rest is each tier's own bookkeeping)
SHARED_FIELDS = (
    "dataset",
    "path",
    "size",
    "block_size",
    "etag",
    "last_modified",
    "media_type",
    "checksum",
    "sha256",
    "verified",
)


class SharedTier:
    def __init__(self, config: CacheConfig, redis_url: str | None = None) -> None:
        assert config.shared is not None
        bucket, prefix = config.shared
        self.client, self.public = make_clients(config.s3, TIMEOUTS)
        self.bucket, self.prefix = bucket, f"{prefix}/" if prefix else ""
        #: whole copies known to be in the bucket (for presigned redirects)
        self._whole: Memo[str, bool] = Memo(WHOLE_MEMO, WHOLE_TTL)
        #: objects the bucket had no record of lately
        self._absent: Memo[str, bool] = Memo(WHOLE_MEMO, ABSENT_TTL)
        self.url = config.store
        self._paused_until = 0.0
        self._lock = threading.Lock()
        #: access times of shared objects, and the sweeper's lease (without Redis: none)
        self.redis = (
            Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=1)
            if redis_url
            else None
        )
        self.identity = f"{socket.gethostname()}:{os.getpid()}"

    # -- health ----------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._paused_until

    def failed(self, what: str, error: Exception) -> None:
        """Note a failure: the tier is skipped for PAUSE seconds (logged once a pause)."""
        with self._lock:
            if self.available:
                log.warning(
                    "shared cache %s: %s (%s); skipped for %g s", self.url, what, error, PAUSE
                )
            self._paused_until = time.monotonic() + PAUSE

    # -- records ---------------------------------------------------------------------------

    def _record_key(self, key: str) -> str:
        return f"{self.prefix}objects/{key}.json"

    def record(self, key: str) -> tuple[ObjectRecord, bool] | None:
        """The shared record of an object (no blocks; `created` as first recorded), and
        whether every block of it is in the bucket; None when there is none. A miss is
        remembered for a few seconds: one request asks the bucket, not every stage of it."""
        if not self.available or key in self._absent:
            return None
        try:
            with map_boto_errors("a shared record"):
                body = self.client.get_object(Bucket=self.bucket, Key=self._record_key(key))["Body"]
                with body:
                    raw = json.loads(body.read(1 << 20))
        except ObjectNotFound:
            self._absent[key] = True
            return None
        except (UpstreamError, ValueError) as e:
            self.failed("reading a record", e)
            return None
        if not isinstance(raw, dict):
            return None
        doc = {k: raw[k] for k in SHARED_FIELDS if k in raw}
        sizes = (doc.get("size"), doc.get("block_size"))
        if not all(isinstance(n, int) and n >= 0 for n in sizes) or not doc["block_size"]:
            return None  # not a record we wrote
        created = raw.get("created")
        created = float(created) if isinstance(created, int | float) else 0.0
        record = ObjectRecord(key=key, created=created, accessed=created, **doc)
        return record, raw.get("complete") is True

    def put_record(self, record: ObjectRecord, complete: bool = False) -> bool:
        """Write the record; `complete` once every block of it is in the bucket. Whether it
        was written."""
        if not self.available:
            return False
        self._absent.pop(record.key)
        doc = {k: v for k, v in asdict(record).items() if k in SHARED_FIELDS}
        doc |= {"complete": complete, "created": record.created}
        try:
            with map_boto_errors("writing a shared record"):
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self._record_key(record.key),
                    Body=json.dumps(doc).encode(),
                    ContentType="application/json",
                )
        except UpstreamError as e:
            self.failed("writing a record", e)
            return False
        return True

    # -- blocks ----------------------------------------------------------------------------

    def _block_key(self, record: ObjectRecord, index: int) -> str:
        tag = version_tag(record.size, record.etag, record.last_modified)
        return f"{self.prefix}blocks/{record.key}/{tag}/{index}"

    def read_block(self, record: ObjectRecord, index: int, fd: int) -> str | None:
        """Copy block `index` into `fd` (from offset 0) and return its sha-256, or None when
        the tier does not have it, fails, or holds bytes that do not match their sha-256."""
        if not self.available:
            return None
        b0, b1 = record.block_range(index)
        try:
            with map_boto_errors("a shared block"):
                answer = self.client.get_object(
                    Bucket=self.bucket, Key=self._block_key(record, index)
                )
                expected = answer.get("Metadata", {}).get("sha256")
                digest, pos = hashlib.sha256(), 0
                with answer["Body"] as body:
                    while chunk := body.read(1 << 20):
                        if pos + len(chunk) > b1 - b0:
                            break
                        os.pwrite(fd, chunk, pos)
                        digest.update(chunk)
                        pos += len(chunk)
        except ObjectNotFound:
            return None
        except (UpstreamError, OSError) as e:
            self.failed("reading a block", e)
            return None
        sha = digest.hexdigest()
        if pos != b1 - b0 or sha != expected:
            log.error("shared cache block %s/%d is damaged: not used", record.key, index)
            return None
        return sha

    def write_block(self, record: ObjectRecord, index: int, data: bytes, sha256: str) -> bool:
        """Copy one block (with its sha-256) into the bucket; whether it was written."""
        if not self.available:
            return False
        try:
            with map_boto_errors("writing a shared block"):
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self._block_key(record, index),
                    Body=io.BytesIO(data),
                    Metadata={"sha256": sha256},
                )
        except UpstreamError as e:
            self.failed("writing a block", e)
            return False
        return True

    def publish(self, store: Store, record: ObjectRecord) -> bool:
        """Copy a whole object from a local store (a finished retrieval): its blocks, then
        its record marked complete, so other replicas serve it without the upstream."""
        for index in record.blocks:
            data = store.block_bytes(record, index)
            if data is None or not self.write_block(
                record, index, data, record.block_sha256[index]
            ):
                return False
        return self.put_record(record, complete=record.complete)

    # -- whole copies, for presigned redirects into the bucket ---------------------------

    def _whole_key(self, record: ObjectRecord) -> str:
        tag = version_tag(record.size, record.etag, record.last_modified)
        return f"{self.prefix}whole/{record.key}/{tag}"

    def has_whole(self, record: ObjectRecord) -> bool:
        """Whether the bucket holds the object whole, in this version (one HEAD a minute)."""
        key = self._whole_key(record)
        if key in self._whole:
            return True
        if not self.available:
            return False
        try:
            with map_boto_errors("a whole copy"):
                self.client.head_object(Bucket=self.bucket, Key=key)
        except ObjectNotFound:
            return False
        except UpstreamError as e:
            self.failed("looking for a whole copy", e)
            return False
        self._whole[key] = True
        return True

    def write_whole(self, store: Store, record: ObjectRecord) -> None:
        """Copy a complete local object whole (multipart, read block by block)."""
        if not self.available or not record.complete or self.has_whole(record):
            return
        try:
            with map_boto_errors("writing a whole copy"), BlocksReader(store, record) as reader:
                self.client.upload_fileobj(
                    reader,
                    self.bucket,
                    self._whole_key(record),
                    ExtraArgs={"ContentType": record.media_type or "application/octet-stream"},
                )
        except (UpstreamError, OSError) as e:
            self.failed("writing a whole copy", e)
            return
        self._whole[self._whole_key(record)] = True

    def presign(self, record: ObjectRecord, expires: int) -> str:
        """A GET URL of the whole copy for clients (signed, never the credentials)."""
        return self.public.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._whole_key(record)},
            ExpiresIn=expires,
        )

    # -- retention: one sweeper at a time --------------------------------------------------

    def accessed(self, touched: dict[str, float]) -> None:
        """Note when objects were last read (a batch, from a store's flush)."""
        if self.redis is None or not touched:
            return
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for key, when in touched.items():
                    pipe.hset(ACCESSED, key, f"{when:.3f}")
                pipe.execute()
        except RedisError as e:
            log.warning("shared cache: access times not recorded (%s)", type(e).__name__)

    def elected(self, seconds: float) -> bool:
        """Whether this process sweeps the bucket now: it holds the lease (Redis), or there
        is no Redis to agree on one (each sweep is idempotent)."""
        if self.redis is None:
            return True
        ms = int(seconds * 1000)
        try:
            if self.redis.set(SWEEPER, self.identity, nx=True, px=ms):
                return True
            if (self.redis.get(SWEEPER) or b"").decode() == self.identity:
                self.redis.pexpire(SWEEPER, ms)
                return True
        except RedisError:
            return False
        return False

    def records(self) -> list[ObjectRecord]:
        """Every object in the bucket, as a record with the blocks it has there (any version
        other than its record's is garbage: those blocks are left out and deleted)."""
        stored: dict[str, dict[str, list[int]]] = {}
        stale: set[str] = set()  # keys with blocks an hour old (not a copy under way)
        hour_ago = datetime.now(UTC) - timedelta(hours=1)
        with map_boto_errors("listing the shared cache"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}blocks/"
            )
            for page in pages:
                for o in page.get("Contents", []):
                    key, tag, index = o["Key"][len(self.prefix) + 7 :].split("/")
                    stored.setdefault(key, {}).setdefault(tag, []).append(int(index))
                    if o["LastModified"] < hour_ago:
                        stale.add(key)
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}objects/"
            )
            keys = [
                o["Key"][len(self.prefix) + 8 : -5]
                for page in pages
                for o in page.get("Contents", [])
                if o["Key"].endswith(".json")
            ]
        times = self._access_times()
        out = []
        for key in keys:
            found = self.record(key)
            if found is None:  # unreadable now: its blocks are not orphans either
                stored.pop(key, None)
                continue
            record = found[0]
            tag = version_tag(record.size, record.etag, record.last_modified)
            blocks = tuple(sorted(stored.pop(key, {}).get(tag, [])))
            accessed = times.get(key, record.created)
            out.append(replace(record, blocks=blocks, accessed=accessed))
        for key in stored.keys() & stale:  # blocks no record names (an interrupted copy)
            out.append(ObjectRecord(key=key, dataset="", path="", size=0, block_size=1))
        return out

    def _access_times(self) -> dict[str, float]:
        if self.redis is None:
            return {}
        try:
            return {k.decode(): float(v) for k, v in self.redis.hgetall(ACCESSED).items()}
        except (RedisError, ValueError):
            return {}

    def evict(self, record: ObjectRecord) -> int:
        """Delete an object's record and every block of it (all versions); the bytes freed."""
        key = record.key
        with map_boto_errors("evicting from the shared cache"):
            self.client.delete_object(Bucket=self.bucket, Key=self._record_key(key))
            for folder in ("blocks", "whole"):
                pages = self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=f"{self.prefix}{folder}/{key}/"
                )
                for page in pages:
                    doomed = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                    if doomed:
                        self.client.delete_objects(
                            Bucket=self.bucket, Delete={"Objects": doomed, "Quiet": True}
                        )
        if self.redis is not None:
            with contextlib.suppress(RedisError):
                self.redis.hdel(ACCESSED, key)
        return record.stored_bytes

    def sweep(self, rules: Mapping[str, Rule], max_bytes: int | None, now: float) -> int:
        """Retention on the bucket, as `retention.sweep` does on a folder; the bytes freed.
        Blocking: run it in a thread, on the elected replica."""
        try:
            return evict_planned(self.records(), rules, max_bytes, now, self.evict, "shared: ")
        except UpstreamError as e:
            self.failed("retention", e)
            return 0


class BlocksReader(io.RawIOBase):
    """A complete cached object as one readable file, block after block (for uploads)."""

    def __init__(self, store: Store, record: ObjectRecord) -> None:
        self.store, self.record, self.pos = store, record, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.pos >= self.record.size:
            return 0
        index = self.pos // self.record.block_size
        f = self.store.block_file(self.record.key, index)
        if f is None:
            raise OSError(f"block {index} of {self.record.key} left the cache")
        b0, b1 = self.record.block_range(index)
        n = min(len(buffer), b1 - self.pos)
        data = os.pread(f.fileno(), n, self.pos - b0)
        if not data:
            raise OSError(f"block {index} of {self.record.key} is short")
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)
