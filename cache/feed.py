"""Announcements: what became available, as Sarracenia v03 messages, kept for a window.

When an object becomes whole in the cache (a verified fill, a retrieval job, `fdp cache put`,
an upload), it is hashed with sha-512 (Sarracenia's default identity method, the one its
subscribers verify; off the fill path, as sha-512 costs three times sha-256 here) and one
notice per name and content is appended to a log kept `announce.keep_hours`: a Redis stream
with `queue.redis_url` (every replica and worker writes to it), else a SQLite file beside the
cache (`--workers` processes share it). `GET /feed` reads the log, the MQTT publisher tails it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import quote

import redis

from cache.store import BlockMissing, CacheUnavailable, ObjectRecord, Store
from policies.config import Settings

log = logging.getLogger("fdp.feed")

#: read at a time when hashing (small: it runs beside the requests being served)
CHUNK = 256 * 1024
#: records waiting to be hashed and announced; beyond that they are dropped (and counted)
MAX_WAITING = 10_000
#: what a `Last-Event-ID` may look like: a SQLite row id or a Redis stream id
EVENT_ID = re.compile(r"^\d{1,18}(-\d{1,18})?$")
#: a page of a Redis stream: (entry id, fields)
Entries = list[tuple[bytes, dict[bytes, bytes]]]


#: Sarracenia's identity of an object whose checksum the announcer does not know
COD = {"method": "cod", "value": "sha512"}


@dataclass(frozen=True)
class Notice:
    """One announcement: this content is available under this name."""

    dataset: str
    path: str
    size: int  # -1: unknown
    sha512: str  # base64, as Sarracenia's `identity.value`; "": unknown (`cod`)
    mtime: float
    time: float
    media_type: str | None = None
    id: str = ""  # the log's (a row id, or a stream id)


def stamp(t: float) -> str:
    """Sarracenia's time: `YYYYMMDDTHHMMSS.fff`, UTC."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}"


def v03(n: Notice, public_url: str) -> dict[str, Any]:
    """The Sarracenia v03 message: `baseUrl` + `relPath` is the object's URL at this fdp.
    Without a sha-512 (a harvest's find), the identity is `cod`: calculate it on download."""
    identity = {"method": "sha512", "value": n.sha512} if n.sha512 else COD
    message: dict[str, Any] = {
        "pubTime": stamp(n.time),
        "baseUrl": f"{public_url}/assets/",
        "relPath": f"{n.dataset}/{n.path}",
        "identity": identity,
        "mtime": stamp(n.mtime),
    }
    if n.size >= 0:
        message["size"] = n.size
    if n.media_type:
        message["contentType"] = n.media_type
    return message


def topic_level(name: str) -> str:
    """A name as one MQTT topic level: its wildcards and `/` quoted."""
    return quote(name, safe=" -._~!$&'()*,;=:@")


def topic(n: Notice, root: str) -> str:
    """`{root}/{dataset}/{folders}` (Sarracenia: exchange, topic prefix, relPath's folders)."""
    levels = [n.dataset, *n.path.split("/")[:-1]]
    return "/".join([root, *(topic_level(level) for level in levels)])


def mtime_of(record: ObjectRecord) -> float:
    if record.last_modified:
        with contextlib.suppress(TypeError, ValueError):
            return parsedate_to_datetime(record.last_modified).timestamp()
    return record.created


def sha512_of(store: Store, record: ObjectRecord) -> str | None:
    """The object's sha-512 (base64) from its stored blocks; None when it is gone meanwhile."""
    digest = hashlib.sha512()
    try:
        for chunk in store.chunks(record, CHUNK):
            digest.update(chunk)
    except BlockMissing:
        return None
    return base64.b64encode(digest.digest()).decode("ascii")


def _version(record: ObjectRecord) -> tuple[object, ...]:
    return (record.size, record.etag, record.last_modified, record.sha256, record.created)


def notice_of(store: Store, record: ObjectRecord) -> Notice | None:
    sha512 = record.sha512 or sha512_of(store, record)
    if sha512 is None:
        return None
    if record.sha512 is None:  # hashing took a while: still the version that was hashed?
        current = store.record(record.key)
        if current is None or _version(current) != _version(record):
            return None  # (the new version is announced on its own)
        store.update(record.key, sha512=sha512)
    return Notice(
        record.dataset,
        record.path,
        record.size,
        sha512,
        mtime_of(record),
        time.time(),
        record.media_type,
    )


class Log(Protocol):
    """Where notices are kept for the window; every method blocks (call it in a thread)."""

    def append(self, notice: Notice) -> str | None:
        """Its id; None when this name with this content is in the window already."""

    def after(self, last: str | None, limit: int) -> list[Notice]:
        """The oldest `limit` notices after `last` (from the start of the window: None)."""

    def newest(self) -> str | None:
        """The last notice's id (None: none yet): where a new reader of what comes starts."""

    def named(self, sha512: str) -> list[tuple[str, str]]:
        """The (dataset, path) names this content was announced under, in the window."""

    def known(self, dataset: str, paths: list[str]) -> list[str]:
        """Those of `paths` not seen in `dataset` within the window; all are seen now."""

    def lease(self, role: str, owner: str, seconds: float) -> bool:
        """Hold `role` (one publisher among processes) for `seconds`; False when another does."""

    def release(self, role: str, owner: str) -> None:
        """Give `role` up (a process stopping), so another takes it at once."""

    def mark(self, role: str, value: str | None = None) -> str | None:
        """Where `role` got to: set it (`value`) or read it."""

    def close(self) -> None: ...


class SqliteLog:
    """One SQLite file (WAL) per host: `fdp serve --workers` processes and `fdp cache put`
    share it. Ids only grow (AUTOINCREMENT), so `Last-Event-ID` never points at another; a
    new log's ids start at the time (in ms, times 1000), above those of a log deleted (or held
    in memory) before, so a client's `Last-Event-ID` from that one does not hide them."""

    def __init__(self, path: Path, keep_seconds: float, max_notices: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=5.0, check_same_thread=False)
        self.lock = threading.Lock()
        self.keep_seconds, self.max_notices = keep_seconds, max_notices
        with self.lock, self.db:
            self.db.execute("pragma journal_mode=wal")
            self.db.execute(
                "create table if not exists notices (id integer primary key autoincrement,"
                " dataset text, path text, size int, sha512 text, mtime real, time real,"
                " media_type text, unique (dataset, path, sha512))"
            )
            self.db.execute(
                "insert into sqlite_sequence (name, seq) select 'notices', ?"
                " where not exists (select 1 from sqlite_sequence where name = 'notices')",
                (int(time.time() * 1000) * 1000,),
            )
            self.db.execute("create index if not exists by_time on notices (time)")
            self.db.execute("create index if not exists by_content on notices (sha512)")
            self.db.execute(
                "create table if not exists marks (role text primary key, value text,"
                " owner text, until real)"
            )
            self.db.execute(
                "create table if not exists known (dataset text, path text, seen real,"
                " primary key (dataset, path))"
            )

    def append(self, notice: Notice) -> str | None:
        with self.lock, self.db:
            self.db.execute(
                "delete from notices where time < ?", (time.time() - self.keep_seconds,)
            )
            cursor = self.db.execute(
                "insert or ignore into notices (dataset, path, size, sha512, mtime, time,"
                " media_type) values (?, ?, ?, ?, ?, ?, ?)",
                (*_fields(notice),),
            )
            if cursor.rowcount == 0:
                return None
            row = cursor.lastrowid
            self.db.execute("delete from notices where id <= ?", (row - self.max_notices,))
            return str(row)

    def after(self, last: str | None, limit: int) -> list[Notice]:
        since = time.time() - self.keep_seconds
        with self.lock:
            rows = self.db.execute(
                "select dataset, path, size, sha512, mtime, time, media_type, id from notices"
                " where id > ? and time >= ? order by id limit ?",
                (int((last or "0").partition("-")[0]), since, limit),
            ).fetchall()
        return [Notice(*row[:7], id=str(row[7])) for row in rows]

    def newest(self) -> str | None:
        with self.lock:
            (row,) = self.db.execute("select max(id) from notices").fetchone()
        return None if row is None else str(row)

    def named(self, sha512: str) -> list[tuple[str, str]]:
        with self.lock:
            rows = self.db.execute(
                "select dataset, path from notices where sha512 = ? order by id desc limit 16",
                (sha512,),
            ).fetchall()
        return [(dataset, path) for dataset, path in rows]

    def known(self, dataset: str, paths: list[str]) -> list[str]:
        now, new = time.time(), []
        with self.lock, self.db:  # (first: a name unseen for the window is new again)
            self.db.execute(
                "delete from known where dataset = ? and seen < ?",
                (dataset, now - self.keep_seconds),
            )
        for start in range(0, len(paths), 1000):  # (short transactions: appends go on)
            with self.lock, self.db:
                for path in paths[start : start + 1000]:
                    added = self.db.execute(
                        "insert or ignore into known values (?, ?, ?)", (dataset, path, now)
                    )
                    if added.rowcount:
                        new.append(path)
                    else:
                        self.db.execute(
                            "update known set seen = ? where dataset = ? and path = ?",
                            (now, dataset, path),
                        )
        return new

    def lease(self, role: str, owner: str, seconds: float) -> bool:
        now = time.time()
        with self.lock, self.db:
            self.db.execute("insert or ignore into marks (role) values (?)", (role,))
            taken = self.db.execute(
                "update marks set owner = ?, until = ? where role = ?"
                " and (owner is null or owner = ? or until < ?)",
                (owner, now + seconds, role, owner, now),
            )
            return taken.rowcount == 1

    def release(self, role: str, owner: str) -> None:
        with self.lock, self.db:
            self.db.execute(
                "update marks set owner = null where role = ? and owner = ?", (role, owner)
            )

    def mark(self, role: str, value: str | None = None) -> str | None:
        with self.lock, self.db:
            if value is not None:
                self.db.execute("insert or ignore into marks (role) values (?)", (role,))
                self.db.execute("update marks set value = ? where role = ?", (value, role))
                return value
            row = self.db.execute("select value from marks where role = ?", (role,)).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        self.db.close()


class RedisLog:
    """One stream, trimmed to the window as it is written; a name with the same content is
    appended once per window (a `SET NX` ahead of `XADD`)."""

    KEY = "fdp:feed"

    def __init__(self, url: str, keep_seconds: float, max_notices: int, timeout: float) -> None:
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self.keep_seconds, self.max_notices = keep_seconds, max_notices

    def append(self, notice: Notice) -> str | None:
        name = hashlib.sha256(f"{notice.dataset}\0{notice.path}\0{notice.sha512}".encode())
        seen = f"{self.KEY}:seen:{name.hexdigest()[:40]}"
        if not self.client.set(seen, b"1", nx=True, px=int(self.keep_seconds * 1000)):
            return None
        oldest = int((time.time() - self.keep_seconds) * 1000)
        fields = {"n": json.dumps(asdict(notice))}
        names = self._names(notice.sha512)
        try:
            with self.client.pipeline(transaction=False) as p:
                p.xadd(self.KEY, fields, minid=oldest, approximate=True)  # type: ignore[arg-type]
                p.xtrim(self.KEY, maxlen=self.max_notices, approximate=True)
                if notice.sha512:
                    p.hset(names, f"{notice.dataset}/{notice.path}", "")
                    p.pexpire(names, int(self.keep_seconds * 1000))
                entry_id, *_ = p.execute()
        except redis.RedisError:
            with contextlib.suppress(redis.RedisError):
                self.client.delete(seen)  # not appended: a later attempt may announce it
            raise
        return entry_id.decode()  # type: ignore[no-any-return]

    def after(self, last: str | None, limit: int) -> list[Notice]:
        """Reads on past pages that are older than the window (trimming is approximate, and
        `last` may be old), so that an empty answer means the end of the stream."""
        oldest = int((time.time() - self.keep_seconds) * 1000)
        low = str(oldest)
        if last:
            ms, _, seq = last.partition("-")
            if int(ms) >= oldest:
                low = f"({ms}-{seq or 18446744073709551615}"
        for _ in range(self.max_notices // limit + 2):  # the stream holds about max_notices
            entries = cast(Entries, self.client.xrange(self.KEY, low, "+", count=limit))
            out = []
            for entry_id, fields in entries:
                raw = json.loads(fields[b"n"])
                raw["id"] = entry_id.decode()
                if raw["time"] * 1000 >= oldest:
                    out.append(Notice(**raw))
            if out or len(entries) < limit:
                return out
            low = f"({entries[-1][0].decode()}"
        return []

    def _names(self, sha512: str) -> str:
        return f"{self.KEY}:names:{hashlib.sha256(sha512.encode()).hexdigest()[:40]}"

    def newest(self) -> str | None:
        last = self.client.xrevrange(self.KEY, count=1)
        return last[0][0].decode() if last else None  # type: ignore[index]

    def named(self, sha512: str) -> list[tuple[str, str]]:
        names = self.client.hkeys(self._names(sha512))
        return [tuple(n.decode().split("/", 1)) for n in names[:16]]  # type: ignore[misc]

    def known(self, dataset: str, paths: list[str]) -> list[str]:
        """(A sorted set per dataset, scored by when each name was last seen.)"""
        key = f"{self.KEY}:known:{hashlib.sha256(dataset.encode()).hexdigest()[:40]}"
        now, new = time.time(), []
        self.client.zremrangebyscore(key, 0, now - self.keep_seconds)
        for start in range(0, len(paths), 1000):
            batch = paths[start : start + 1000]
            with self.client.pipeline(transaction=False) as p:
                for path in batch:
                    p.zadd(key, {path: now})
                added = p.execute()
            new += [path for path, n in zip(batch, added, strict=True) if n]
        self.client.pexpire(key, int(self.keep_seconds * 1000))
        return new

    #: take the lease if free, renew it if this owner's: one step, so never another's
    LEASE = (
        "if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end "
        "if redis.call('get', KEYS[1]) == ARGV[1] then "
        "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
    )
    RELEASE = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end "
        "return 0"
    )

    def lease(self, role: str, owner: str, seconds: float) -> bool:
        key = f"{self.KEY}:lease:{role}"
        return bool(self.client.eval(self.LEASE, 1, key, owner, int(seconds * 1000)))

    def release(self, role: str, owner: str) -> None:
        self.client.eval(self.RELEASE, 1, f"{self.KEY}:lease:{role}", owner)

    def mark(self, role: str, value: str | None = None) -> str | None:
        key = f"{self.KEY}:mark:{role}"
        if value is not None:
            self.client.set(key, value)
            return value
        raw = self.client.get(key)
        return raw.decode() if raw else None  # type: ignore[union-attr]

    def close(self) -> None:
        self.client.close()


def open_log(settings: Settings, memory: bool = False) -> Log:
    """In Redis with `queue.redis_url` (every replica and worker), else SQLite beside the
    cache; `memory`: in this process only (when the file cannot be opened)."""
    config = settings.announce
    keep = config.keep_hours * 3600
    if memory:
        return SqliteLog(Path(":memory:"), keep, config.max_notices)
    if settings.queue.redis_url:
        timeout = settings.queue.timeout_seconds
        return RedisLog(settings.queue.redis_url, keep, config.max_notices, timeout)
    file = config.file or Path(settings.cache.folder).parent / "feed.sqlite"
    return SqliteLog(Path(file), keep, config.max_notices)


def _fields(n: Notice) -> tuple[Any, ...]:
    return (n.dataset, n.path, n.size, n.sha512, n.mtime, n.time, n.media_type)


def announce(store: Store, feed: Log, record: ObjectRecord) -> Notice | None:
    """Hash a whole object and append its notice (blocking); None when it is gone or its
    name with this content was announced within the window."""
    current = store.record(record.key)
    same = (record.size, record.etag, record.last_modified)
    if (
        current is None
        or not current.complete
        or same != (current.size, current.etag, current.last_modified)
    ):
        return None
    notice = notice_of(store, current)
    if notice is None:
        return None
    entry = feed.append(notice)
    if entry is None:
        return None
    log.info("announced %s/%s (%d bytes)", notice.dataset, notice.path, notice.size)
    return replace(notice, id=entry)


def announce_quietly(store: Store, feed: Log, record: ObjectRecord) -> Notice | None:
    """`announce`, logging a failure instead of raising: the object is served regardless."""
    try:
        return announce(store, feed, record)
    except (OSError, sqlite3.Error, redis.RedisError, CacheUnavailable) as e:
        log.warning("%s/%s: not announced: %s", record.dataset, record.path, e)
        return None


class Announcer:
    """Announces whole objects from a thread of its own, so neither a fill nor the event loop
    waits for a sha-512 or the log; `on_notice` is called (in that thread) after each."""

    def __init__(self, store: Store, feed: Log, on_notice: Callable[[Notice], None]) -> None:
        self.store, self.feed, self.on_notice = store, feed, on_notice
        self.waiting: queue.Queue[ObjectRecord | None] = queue.Queue(MAX_WAITING)
        self.dropped = self.announced = 0
        self.thread = threading.Thread(target=self._run, name="fdp-announcer", daemon=True)
        self.thread.start()

    def submit(self, record: ObjectRecord) -> None:
        try:
            self.waiting.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while (record := self.waiting.get()) is not None:
            try:
                notice = announce_quietly(self.store, self.feed, record)
            except Exception:  # this thread must outlive any one object
                log.exception("%s/%s: not announced", record.dataset, record.path)
                continue
            if notice is not None:
                self.announced += 1
                self.on_notice(notice)

    def close(self) -> None:
        with contextlib.suppress(queue.Full):
            self.waiting.put_nowait(None)
        self.thread.join(timeout=5)
