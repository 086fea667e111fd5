"""The runtime policy store: every dataset's policy document, versioned, with its history.

The config file seeds it; edits through the admin API live in Redis (`queue.redis_url`,
shared by every replica) or in a local JSON file written atomically. Each write is a
compare-and-set on the dataset's version, so of two edits made from the same version one
wins and the other is told it is stale. Every version is kept in the history (up to
`keep_versions`) with who made it, when, and what changed. Calls here block: run them in
a thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import redis

from policies.documents import Document, diff, etag, masked

log = logging.getLogger("fdp.policies")

#: the channel a write is announced on, and how often watchers look anyway
CHANNEL = "fdp:policies:changed"
POLL_SECONDS = 2.0
#: `expected` for a write that does not care which version it replaces
ANY = -1


@dataclass(frozen=True)
class Version:
    """One version of a dataset's policy; `document` is None once the dataset is deleted."""

    dataset: str
    version: int
    document: Document | None
    updated: float
    by: str
    action: str  # config | put | patch | delete | rollback
    #: hash of the config file's entry it was last seeded from (a changed file wins again)
    seed: str | None = None
    #: what changed from the version before, secrets masked
    changes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def etag(self) -> str:
        """Strong: the version, and a hash of what GET shows of it (no secret goes in)."""
        return etag(self.version, masked(self.document) if self.document else None)

    @property
    def deleted(self) -> bool:
        return self.document is None

    def public(self) -> dict[str, Any]:
        """What the admin API shows of it (never a secret: `changes` are masked)."""
        return {
            "dataset": self.dataset,
            "version": self.version,
            "updated": self.updated,
            "by": self.by,
            "action": self.action,
            "deleted": self.deleted,
            "changes": self.changes,
        }


class Stale(Exception):
    """The dataset's policy is no longer at the version the write was made from."""

    def __init__(self, current: Version | None) -> None:
        super().__init__("the policy changed since")
        self.current = current


def seed_hash(doc: Document) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class Backend(Protocol):
    def versions(self) -> dict[str, Version]: ...
    def get(self, name: str) -> Version | None: ...
    def history(self, name: str) -> list[Version]: ...
    def put(self, record: Version, expected: int) -> Version: ...
    def serial(self) -> int: ...
    def close(self) -> None: ...


def _record(data: dict[str, Any]) -> Version:
    return Version(**data)


class FileBackend:
    """One JSON file (mode 0600: it holds upstream credentials), replaced atomically under
    an exclusive lock, for the processes of one host."""

    def __init__(self, path: Path, keep: int) -> None:
        self.path = path
        self.keep = keep
        self._lock_path = path.with_name(path.name + ".lock")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())  # type: ignore[no-any-return]
        except FileNotFoundError:
            return {"datasets": {}, "history": {}}

    def _write(self, data: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def versions(self) -> dict[str, Version]:
        return {n: _record(v) for n, v in self._read()["datasets"].items()}

    def get(self, name: str) -> Version | None:
        data = self._read()["datasets"].get(name)
        return _record(data) if data else None

    def history(self, name: str) -> list[Version]:
        return [_record(v) for v in self._read()["history"].get(name, [])]

    def put(self, record: Version, expected: int) -> Version:
        with self._locked():
            data = self._read()
            current = data["datasets"].get(record.dataset)
            version = current["version"] if current else 0
            if expected != ANY and expected != version:
                raise Stale(_record(current) if current else None)
            new = Version(**{**asdict(record), "version": version + 1})
            data["datasets"][record.dataset] = asdict(new)
            history = data["history"].setdefault(record.dataset, [])
            history.insert(0, asdict(new))
            del history[self.keep :]
            self._write(data)
            return new

    def serial(self) -> int:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return 0
        return hash((st.st_mtime_ns, st.st_size, st.st_ino))

    def close(self) -> None:
        pass


#: Compare-and-set one dataset's version, then record it: the new version number, or -1
#: when the current version is not the expected one. Documents are spliced in as text
#: (Lua's cjson cannot tell an empty list from an empty object).
WRITE = """
local version = tonumber(redis.call('GET', KEYS[1]) or '0')
local expected = tonumber(ARGV[1])
if expected >= 0 and expected ~= version then return -1 end
local new = version + 1
local record = '{"version":' .. new .. ',' .. string.sub(ARGV[2], 2)
redis.call('SET', KEYS[1], new)
redis.call('SET', KEYS[2], record)
redis.call('LPUSH', KEYS[3], record)
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[3]) - 1)
redis.call('SADD', KEYS[4], ARGV[4])
redis.call('INCR', KEYS[5])
redis.call('PUBLISH', ARGV[5], ARGV[4])
return new
"""


class RedisBackend:
    """Shared by every replica and worker using the same Redis."""

    def __init__(self, url: str, keep: int, timeout: float) -> None:
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self.keep = keep
        self._write = self.client.register_script(WRITE)

    @staticmethod
    def _keys(name: str) -> list[str]:
        base = f"fdp:policy:{name}"
        return [f"{base}:version", base, f"{base}:history", "fdp:policies", "fdp:policies:serial"]

    def versions(self) -> dict[str, Version]:
        names = sorted(n.decode() for n in self.client.smembers("fdp:policies"))  # type: ignore[union-attr]
        raw = self.client.mget([f"fdp:policy:{n}" for n in names]) if names else []
        return {n: _record(json.loads(r)) for n, r in zip(names, raw, strict=True) if r}  # type: ignore[arg-type]

    def get(self, name: str) -> Version | None:
        raw = self.client.get(f"fdp:policy:{name}")
        return _record(json.loads(raw)) if raw else None  # type: ignore[arg-type]

    def history(self, name: str) -> list[Version]:
        raw = self.client.lrange(f"fdp:policy:{name}:history", 0, -1)
        return [_record(json.loads(r)) for r in raw]  # type: ignore[union-attr]

    def put(self, record: Version, expected: int) -> Version:
        body = asdict(record)
        body.pop("version")
        text = json.dumps(body)
        args = [expected, text, self.keep, record.dataset, CHANNEL]
        version = int(self._write(keys=self._keys(record.dataset), args=args))  # type: ignore[arg-type]
        if version < 0:
            raise Stale(self.get(record.dataset))
        return Version(**{**asdict(record), "version": version})

    def serial(self) -> int:
        return int(self.client.get("fdp:policies:serial") or 0)  # type: ignore[arg-type]

    def close(self) -> None:
        self.client.close()


class PolicyStore:
    """Versions of every dataset's policy, and the writes that make new ones."""

    def __init__(self, backend: Backend, clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.clock = clock

    def versions(self) -> dict[str, Version]:
        return self.backend.versions()

    def get(self, name: str) -> Version | None:
        return self.backend.get(name)

    def history(self, name: str) -> list[Version]:
        return self.backend.history(name)

    def write(
        self,
        name: str,
        document: Document | None,
        by: str,
        action: str,
        expected: int = ANY,
        seed: str | None = None,
    ) -> Version:
        """Make `document` (None: deleted) the dataset's next version, if its current one
        is `expected` (ANY: whichever); raises Stale. The change is audited."""
        current = self.backend.get(name)
        if expected != ANY and (current.version if current else 0) != expected:
            raise Stale(current)
        old = current.document if current else None
        changes = diff(
            masked(old) if old is not None else None,
            masked(document) if document is not None else None,
        )
        record = Version(
            dataset=name,
            version=0,  # (set by the backend)
            document=document,
            updated=self.clock(),
            by=by,
            action=action,
            seed=seed if seed is not None else (current.seed if current else None),
            changes=changes,
        )
        new = self.backend.put(record, current.version if current else 0)
        log.info(
            "policy %s v%d: %s by %s (%d changes)", name, new.version, action, by, len(changes)
        )
        return new

    def seed(self, documents: dict[str, Document]) -> None:
        """Bring in the config file's datasets: new ones, and ones whose entry in the file
        changed since it was last seeded (the file wins then, as a new version)."""
        for name, doc in documents.items():
            digest = seed_hash(doc)
            for _ in range(3):  # another replica may be seeding at the same moment
                current = self.backend.get(name)
                if current is not None and current.seed == digest:
                    break
                try:
                    self.write(
                        name, doc, "config", "config", current.version if current else 0, digest
                    )
                    break
                except Stale:
                    continue

    def close(self) -> None:
        self.backend.close()


def watch(
    store: PolicyStore,
    redis_url: str | None,
    on_change: Callable[[], None],
    stop: threading.Event,
    poll: float = POLL_SECONDS,
) -> None:
    """Call `on_change` whenever the store may have changed: at once on a Redis
    announcement, else when its serial moves (looked at every `poll` seconds). Runs until
    `stop` is set; for a thread of its own."""
    pubsub = None
    last = None
    while not stop.is_set():
        try:
            if redis_url is not None and pubsub is None:
                pubsub = redis.Redis.from_url(redis_url, socket_timeout=poll + 5).pubsub(
                    ignore_subscribe_messages=True
                )
                pubsub.subscribe(CHANNEL)
            serial = store.backend.serial()
            if last is not None and serial != last:
                on_change()
            last = serial
            if pubsub is not None:
                if pubsub.get_message(timeout=poll) is not None:
                    on_change()
                    last = store.backend.serial()
            else:
                stop.wait(poll)
        except Exception as e:  # (Redis away: look again later; the next poll catches up)
            log.warning("policy store not reachable (%s); looking again", type(e).__name__)
            if pubsub is not None:
                with contextlib.suppress(Exception):
                    pubsub.close()
                pubsub = None
            stop.wait(poll)
    if pubsub is not None:
        with contextlib.suppress(Exception):
            pubsub.close()
