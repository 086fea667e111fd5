"""The online cache's storage: object records and fixed-size blocks, both in diskcache.

diskcache gives transactions and safe sharing between processes on one host; block values
are files in its folder. Reads do not go through diskcache each time: a block's file is
opened once and held (`os.pread` on the held descriptor), and records are kept in memory
for a few seconds, so a cache hit costs no SQLite query, no stat and no thread hop. A held
file stays readable after another process evicts it (POSIX unlink), so eviction never breaks
a response that is being served.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import io
import logging
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import diskcache

log = logging.getLogger("fdp.cache")

#: How long an in-memory record is trusted before the index is asked again (another
#: process may have evicted the object meanwhile).
RECHECK_SECONDS = 5.0
#: Held block files; dropping one closes it once no response still uses it.
MAX_OPEN_BLOCKS = 4096
#: Records held in memory (least recently used go first).
MAX_HELD = 65536
#: Errors that mean "the cache cannot write/read right now" (disk full, unwritable...).
STORE_ERRORS = (OSError, sqlite3.Error, diskcache.Timeout)


@functools.lru_cache(maxsize=65536)
def object_key(dataset: str, path: str) -> str:
    """The cache key: the dataset and the object's path in it (stable across re-resolution)."""
    return hashlib.sha256(f"{dataset}\0{path}".encode()).hexdigest()[:40]


def version_tag(size: int, etag: str | None, last_modified: str | None) -> str:
    """A short name for one version of an object (part files of other versions never mix)."""
    return hashlib.sha256(f"{size}\0{etag}\0{last_modified}".encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Adopt:
    """A finished block file to take into the store: a hard link, not a copy. Its part
    path stays until its filler removes it, so a process that opens that path meanwhile
    finds the claim still held and waits for the commit, instead of fetching again."""

    path: Path
    size: int


class BlockDisk(diskcache.Disk):
    """diskcache's Disk that can also take a file over by linking it into its folder."""

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if isinstance(value, Adopt):
            filename, full_path = self.filename(key, value)
            os.makedirs(os.path.dirname(full_path), exist_ok=True)
            os.link(value.path, full_path)
            return value.size, diskcache.core.MODE_BINARY, filename, None
        return super().store(value, read, key)


class BlockMissing(LookupError):
    """A block of the object left the store while it was being read whole."""


class CacheUnavailable(Exception):
    """The cache folder cannot be used; requests go straight to the upstream meanwhile."""


@dataclass(frozen=True)
class ObjectRecord:
    key: str
    dataset: str
    path: str  # the request path within the dataset, for `fdp cache ls`
    size: int
    block_size: int
    etag: str | None = None
    last_modified: str | None = None
    media_type: str | None = None
    checksum: str | None = None  # expected multihash from the catalogue
    sha256: str | None = None  # recorded when the whole object passed through
    sha512: str | None = None  # base64, recorded when it is announced (`cache.feed`)
    created: float = 0.0
    accessed: float = 0.0
    hits: int = 0
    blocks: tuple[int, ...] = ()
    verified: bool = False
    #: each stored block's own sha-256, checked whenever a block file is opened
    block_sha256: dict[int, str] = field(default_factory=dict)

    @property
    def nblocks(self) -> int:
        return -(-self.size // self.block_size)  # an empty object has none: it is complete

    @property
    def complete(self) -> bool:
        return len(self.blocks) == self.nblocks

    @property
    def stored_bytes(self) -> int:
        last = self.nblocks - 1
        tail = self.size - last * self.block_size
        return sum(tail if i == last else self.block_size for i in self.blocks)

    def block_range(self, index: int) -> tuple[int, int]:
        start = index * self.block_size
        return start, min(self.size, start + self.block_size)


def _sha256(f: io.BufferedReader) -> str:
    """The sha-256 of a whole open file, read with pread (its position is left alone)."""
    digest, pos, fd = hashlib.sha256(), 0, f.fileno()
    while chunk := os.pread(fd, 1 << 20, pos):
        digest.update(chunk)
        pos += len(chunk)
    return digest.hexdigest()


def _decode(raw: dict[str, Any]) -> ObjectRecord:
    """A record as stored in the index (blocks come back as a list)."""
    return ObjectRecord(**{**raw, "blocks": tuple(raw["blocks"])})


@dataclass
class _Held:
    record: ObjectRecord
    checked: float
    files: dict[int, io.BufferedReader] = field(default_factory=dict)


class Store:
    """Records under `objects/`, blocks under `blocks/`, fills in progress under `tmp/`."""

    def __init__(
        self, root: str | os.PathLike[str], clock: Callable[[], float] = time.time
    ) -> None:
        self.root = Path(root)
        self.clock = clock
        self.tmp = self.root / "tmp"
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._open_blocks = 0
        self._touched: dict[str, tuple[float, int]] = {}
        #: blocks found not to match their sha-256 when opened (and evicted with their object)
        self.corrupt_blocks = 0
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            opts: dict[str, Any] = {
                "eviction_policy": "none",
                "size_limit": 2**62,
                "statistics": False,
                "timeout": 10,
            }
            self.objects = diskcache.Cache(str(self.root / "objects"), **opts)
            self.blocks = diskcache.Cache(
                str(self.root / "blocks"), disk=BlockDisk, disk_min_file_size=0, **opts
            )
            self.blocks.create_tag_index()  # evict(object key) removes its blocks
        except STORE_ERRORS as e:
            raise CacheUnavailable(f"cache folder {self.root}: {e}") from e

    # -- records -------------------------------------------------------------------------

    def record(self, key: str) -> ObjectRecord | None:
        """The object's record; memory first, the index every RECHECK_SECONDS."""
        held = self._held.get(key)
        now = time.monotonic()
        if held is not None and now - held.checked < RECHECK_SECONDS:
            return held.record
        raw = self.objects.get(key)
        if raw is None:
            self._forget(key)
            return None
        record = _decode(raw)
        if held is None or held.record.blocks != record.blocks or held.record.etag != record.etag:
            self._forget(key)
            held = self._held[key] = _Held(record, now)
            if len(self._held) > MAX_HELD:
                self._forget(next(iter(self._held)))
        held.record, held.checked = record, now
        self._held.move_to_end(key)
        return record

    def peek(self, key: str) -> tuple[ObjectRecord | None, bool]:
        """(the record held in memory, whether it is still fresh): never touches the index.

        The proxy serves a stale held record and re-reads the index off its event loop, so
        a locked or slow index never stalls a cache hit.
        """
        held = self._held.get(key)
        if held is None:
            return None, False
        return held.record, time.monotonic() - held.checked < RECHECK_SECONDS

    def held_block(self, key: str, index: int) -> io.BufferedReader | None:
        """Block `index` if its file is already held open (no index read)."""
        held = self._held.get(key)
        return None if held is None else held.files.get(index)

    def refresh(self, key: str) -> ObjectRecord | None:
        """The record as the index has it now (another process may just have written it)."""
        self._forget(key)
        return self.record(key)

    def put_record(self, record: ObjectRecord) -> None:
        self.objects.set(record.key, asdict(record))
        self._forget(record.key)

    def add_record(self, record: ObjectRecord) -> ObjectRecord:
        """Store a new record, unless another process has just stored one of the same
        version: then that one (with the blocks it may have by now) is the record."""
        with self.objects.transact():
            raw = self.objects.get(record.key)
            if raw is not None and (raw["size"], raw["etag"], raw["last_modified"]) == (
                record.size,
                record.etag,
                record.last_modified,
            ):
                record = _decode(raw)
            else:
                self.objects.set(record.key, asdict(record))
        self._forget(record.key)
        return record

    def update(self, key: str, **changes: Any) -> ObjectRecord | None:
        """Read-modify-write one record in a transaction (other processes may write too)."""
        with self.objects.transact():
            raw = self.objects.get(key)
            if raw is None:
                return None
            record = replace(_decode(raw), **changes)
            self.objects.set(key, asdict(record))
        held = self._held.get(key)
        if held is not None:
            held.record = record
        return record

    def records(self) -> Iterator[ObjectRecord]:
        for key in list(self.objects.iterkeys()):
            raw = self.objects.get(key)
            if raw is not None:
                yield _decode(raw)

    # -- blocks --------------------------------------------------------------------------

    def block_file(self, key: str, index: int) -> io.BufferedReader | None:
        """An open file holding block `index`, or None when it is not cached."""
        held = self._held.get(key)
        if held is not None:
            f = held.files.get(index)
            if f is not None:
                return f
        elif self.record(key) is None:
            return None
        else:
            held = self._held[key]
        if index not in held.record.blocks:
            return None
        value = self.blocks.get((key, index), read=True)
        if value is None:
            return None
        if not isinstance(value, io.BufferedReader):  # never: blocks are stored as files
            return None
        f = value  # read with os.pread(f.fileno(), ...): its buffer and position are unused
        expected = held.record.block_sha256.get(index)
        if expected is not None and _sha256(f) != expected:
            f.close()
            self.corrupt_blocks += 1
            log.error("cached block %s/%d does not match its sha-256: object evicted", key, index)
            self.evict(key)
            return None
        held.files[index] = f
        self._open_blocks += 1
        if self._open_blocks > MAX_OPEN_BLOCKS:
            self._shed()
        return f

    def chunks(self, record: ObjectRecord, size: int) -> Iterator[bytes]:
        """The whole object from its stored blocks, `size` bytes at a time (pread: a block
        file may be shared with readers, and is left open); raises BlockMissing."""
        for index in range(record.nblocks):
            f = self.block_file(record.key, index)
            if f is None:
                raise BlockMissing(f"{record.dataset}/{record.path}: block {index} is gone")
            pos, (b0, b1) = 0, record.block_range(index)
            while pos < b1 - b0:
                chunk = os.pread(f.fileno(), min(size, b1 - b0 - pos), pos)
                if not chunk:
                    break
                pos += len(chunk)
                yield chunk

    def block_bytes(self, record: ObjectRecord, index: int) -> bytes | None:
        """Block `index` of the object, read whole (None when it is not cached)."""
        f = self.block_file(record.key, index)
        if f is None:
            return None
        b0, b1 = record.block_range(index)
        return os.pread(f.fileno(), b1 - b0, 0)

    def commit_block(
        self, record: ObjectRecord, index: int, part: Path, sha256: str
    ) -> ObjectRecord | None:
        """Link a finished, checked block file into the store and mark it present (the
        caller removes `part` afterwards, and holds its claim on the block until then).

        Only into the version it was fetched for: if the index now describes another
        version, or no longer has the object, the block is dropped (None).
        """
        size = part.stat().st_size
        b0, b1 = record.block_range(index)
        if size != b1 - b0:
            raise OSError(f"block file of {size} bytes, expected {b1 - b0}")
        key = record.key
        self.blocks.set((key, index), Adopt(part, size), read=True, tag=key)
        with self.objects.transact():
            raw = self.objects.get(key)
            if raw is None or (raw["size"], raw["etag"]) != (record.size, record.etag):
                self.blocks.delete((key, index))  # evicted or replaced while we filled
                return None
            blocks = tuple(sorted(set(raw["blocks"]) | {index}))
            shas = {**raw.get("block_sha256", {}), index: sha256}
            record = ObjectRecord(**{**raw, "blocks": blocks, "block_sha256": shas})
            self.objects.set(key, asdict(record))
        held = self._held.get(key)
        if held is not None:
            held.record, held.checked = record, time.monotonic()
            if index not in held.files:  # hashed as it was written: held without a re-read
                value = self.blocks.get((key, index), read=True)
                if isinstance(value, io.BufferedReader):
                    held.files[index] = value
                    self._open_blocks += 1
                    if self._open_blocks > MAX_OPEN_BLOCKS:
                        self._shed()
        return record

    def ingest(
        self,
        dataset: str,
        path: str,
        source: Path,
        block_size: int,
        media_type: str | None = None,
        etag: str | None = None,
        last_modified: str | None = None,
        checksum: str | None = None,
        sha512: str | None = None,
    ) -> ObjectRecord:
        """Put a whole local file in the cache (a retrieval, or harvested data).

        Blocks go in first and the record last, so the object appears at once and whole; an
        interruption leaves only blocks that no record points to.
        """
        key = object_key(dataset, path)
        self.evict(key)
        size = source.stat().st_size
        sha = hashlib.sha256()
        nblocks = -(-size // block_size)
        shas: dict[int, str] = {}
        with source.open("rb") as f:
            for index in range(nblocks):
                data = f.read(block_size)
                sha.update(data)
                shas[index] = hashlib.sha256(data).hexdigest()
                self.blocks.set((key, index), io.BytesIO(data), read=True, tag=key)
        now = self.clock()
        record = ObjectRecord(
            key=key,
            dataset=dataset,
            path=path,
            size=size,
            block_size=block_size,
            etag=etag or f'"{sha.hexdigest()[:32]}"',
            last_modified=last_modified,
            media_type=media_type,
            checksum=checksum,
            sha256=sha.hexdigest(),
            sha512=sha512,
            created=now,
            accessed=now,
            blocks=tuple(range(nblocks)),
            verified=checksum is not None,
            block_sha256=shas,
        )
        self.put_record(record)
        return record

    def twin(self, source: ObjectRecord, dataset: str, path: str) -> ObjectRecord | None:
        """The same content under another name, stored once: its block files are hard
        links to the source's. None when the source went meanwhile."""
        key = object_key(dataset, path)
        self.evict(key)
        for index in source.blocks:
            f = self.blocks.get((source.key, index), read=True)
            if not isinstance(f, io.BufferedReader):
                return None
            with f:
                size = os.fstat(f.fileno()).st_size
                self.blocks.set((key, index), Adopt(Path(f.name), size), read=True, tag=key)
        now = self.clock()
        record = replace(
            source, key=key, dataset=dataset, path=path, created=now, accessed=now, hits=0
        )
        self.put_record(record)
        return record

    def evict(self, key: str) -> int:
        """Remove an object and its blocks; returns the bytes freed."""
        with self.objects.transact():
            raw = self.objects.pop(key, default=None)
        self.blocks.evict(key)
        self._forget(key)
        if raw is None:
            return 0
        return _decode(raw).stored_bytes

    # -- access statistics, written in batches --------------------------------------------

    def touch(self, key: str) -> None:
        """Count a hit in memory; `flush()` writes them (never a write on the hot path)."""
        _, hits = self._touched.get(key, (0.0, 0))
        self._touched[key] = (self.clock(), hits + 1)

    def flush(self) -> dict[str, float]:
        """Write the hits counted since the last flush; returns when each object was read."""
        touched, self._touched = self._touched, {}
        for key, (when, hits) in touched.items():
            with self.objects.transact():
                raw = self.objects.get(key)
                if raw is not None:
                    raw["accessed"] = max(raw["accessed"], when)
                    raw["hits"] += hits
                    self.objects.set(key, raw)
        return {key: when for key, (when, _) in touched.items()}

    # -- housekeeping ---------------------------------------------------------------------

    def clean_tmp(self, older_than: float = 3600.0, sites_older_than: float = 48 * 3600.0) -> int:
        """Remove part files left by killed fills and workers; returns how many.

        A part file whose fill is alive is locked by its owner and stays. A site's partial
        transfer (`site-*.part`) is resumed after a link drop, so it stays idle longer.
        """
        now = time.time()
        removed = 0
        for path in self.tmp.glob("*.part"):
            idle = sites_older_than if path.name.startswith("site-") else older_than
            try:
                if path.stat().st_mtime >= now - idle:
                    continue
                with path.open("rb") as f:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    path.unlink()
                removed += 1
            except (FileNotFoundError, BlockingIOError):
                continue
        return removed

    def scrub(self, budget: int, after: str | None = None) -> str | None:
        """Re-hash stored blocks against their recorded sha-256, about `budget` bytes of
        them, in key order from `after`; returns where to go on next time (None: from the
        start). A block that does not match evicts its object and is counted."""
        keys = sorted(k for k in self.objects.iterkeys() if after is None or k > after)
        for key in keys:
            raw = self.objects.get(key)
            if raw is None:
                continue
            record = _decode(raw)
            for index in record.blocks:
                expected = record.block_sha256.get(index)
                f = self.blocks.get((key, index), read=True) if expected else None
                if not isinstance(f, io.BufferedReader):
                    continue
                with f:
                    ok = _sha256(f) == expected
                if not ok:
                    self.corrupt_blocks += 1
                    log.error("scrub: block %s/%d does not match its sha-256: evicted", key, index)
                    self.evict(key)
                    break
            budget -= record.stored_bytes
            if budget <= 0:
                return key
        return None

    def _forget(self, key: str) -> None:
        held = self._held.pop(key, None)
        if held is not None:
            self._open_blocks -= len(held.files)

    def _shed(self) -> None:
        while self._open_blocks > MAX_OPEN_BLOCKS // 2 and self._held:
            key = next(iter(self._held))
            self._forget(key)

    def close(self) -> None:
        self.flush()
        self._held.clear()
        self.objects.close()
        self.blocks.close()
