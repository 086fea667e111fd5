"""Delivery logs: who got which object, when, how many bytes, from the cache or not.

The `account` stage hands each delivery to `DeliveryLog.add`, which adds it up in memory
(the request never waits for a disk or Redis): answers of one kind to one caller for one
object within a second are one delivery with their bytes and count. A thread writes them
each second, to a Redis stream per user and per dataset (`queue.redis_url`, shared by every
replica) or to a SQLite file beside the cache; both keep `deliveries.keep_days` days.
`GET /me/deliveries` shows callers their own; members of a dataset's `owners` groups (and
admins) see that dataset's with `?dataset=`; nobody sees anyone else's. Paged newest first
(`cursor`), filterable by dataset and time (`since`, `until`: RFC 3339 or Unix seconds).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from dataclasses import asdict, astuple, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import anyio.to_thread
import redis
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from policies.config import DeliveryLogConfig
from proxy.auth import Identity, Unauthorized, identity
from proxy.exchange import Exchange
from proxy.problems import BadRequest, ProxyError

log = logging.getLogger("fdp.deliveries")

#: distinct deliveries waiting for the writer; beyond that they are dropped (and counted)
MAX_PENDING = 100_000
FLUSH_SECONDS = 1.0
PAGE = 100
MAX_PAGE = 1000


@dataclass(frozen=True)
class Delivery:
    time: float
    user: str | None
    client: str | None
    dataset: str
    path: str
    status: int
    bytes: int
    cache: str  # hit, miss, pass-through, presign, redirect, slow
    #: answers of the same kind it stands for (range reads of one object within a second)
    requests: int = 1


class Backend(Protocol):
    def write(self, batch: list[Delivery]) -> None: ...
    def query(
        self,
        user: str | None,
        dataset: str | None,
        since: float,
        until: float,
        before: str | None,
        limit: int,
    ) -> tuple[list[Delivery], str | None]: ...
    def expire(self, older_than: float) -> None: ...
    def close(self) -> None: ...


SELECT = (
    "select id, time, user, client, dataset, path, status, bytes, cache, requests from deliveries"
)


class SqliteBackend:
    """One SQLite file (WAL) per host; `--workers` processes share it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=5.0, check_same_thread=False)
        self.lock = threading.Lock()
        with self.lock, self.db:
            self.db.execute("pragma journal_mode=wal")
            self.db.execute(
                "create table if not exists deliveries (id integer primary key, time real,"
                " user text, client text, dataset text, path text, status int, bytes int,"
                " cache text, requests int)"
            )
            self.db.execute("create index if not exists by_user on deliveries (user, id)")
            self.db.execute("create index if not exists by_dataset on deliveries (dataset, id)")

    def write(self, batch: list[Delivery]) -> None:
        rows = [astuple(d) for d in batch]
        with self.lock, self.db:
            self.db.executemany(
                "insert into deliveries (time, user, client, dataset, path, status, bytes, cache,"
                " requests) values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def query(
        self,
        user: str | None,
        dataset: str | None,
        since: float,
        until: float,
        before: str | None,
        limit: int,
    ) -> tuple[list[Delivery], str | None]:
        where, args = ["time >= ?", "time <= ?"], [since, until]
        if user is not None:
            where.append("user = ?")
            args.append(user)
        if dataset is not None:
            where.append("dataset = ?")
            args.append(dataset)
        if before is not None:
            where.append("id < ?")
            args.append(int(before))
        # constant clauses only; every value is bound
        sql = f"{SELECT} where {' and '.join(where)} order by id desc limit ?"
        with self.lock:
            rows = self.db.execute(sql, [*args, limit + 1]).fetchall()
        page = [Delivery(*row[1:]) for row in rows[:limit]]
        return page, (str(rows[limit - 1][0]) if len(rows) > limit else None)

    def expire(self, older_than: float) -> None:
        with self.lock, self.db:
            self.db.execute("delete from deliveries where time < ?", (older_than,))

    def close(self) -> None:
        self.db.close()


class RedisBackend:
    """A stream per user and per dataset, trimmed to the kept period as it is written."""

    def __init__(self, url: str, keep_seconds: float, timeout: float) -> None:
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self.keep_seconds = keep_seconds

    @staticmethod
    def _key(kind: str, name: str) -> str:
        return f"fdp:deliveries:{kind}:{name}"

    def write(self, batch: list[Delivery]) -> None:
        oldest = int((time.time() - self.keep_seconds) * 1000)
        with self.client.pipeline(transaction=False) as p:
            for d in batch:
                fields = {"d": json.dumps(asdict(d))}
                keys = [self._key("dataset", d.dataset)]
                if d.user is not None:
                    keys.append(self._key("user", d.user))
                for key in keys:
                    p.xadd(key, fields, minid=oldest, approximate=True)  # type: ignore[arg-type]
                    p.pexpire(key, int(self.keep_seconds * 1000))
            p.execute()

    def query(
        self,
        user: str | None,
        dataset: str | None,
        since: float,
        until: float,
        before: str | None,
        limit: int,
    ) -> tuple[list[Delivery], str | None]:
        key = self._key("user", user) if user is not None else self._key("dataset", dataset or "")
        high = f"({before}" if before is not None else str(int(until * 1000))
        low = str(int(since * 1000))
        out: list[Delivery] = []
        while len(out) < limit:
            entries = self.client.xrevrange(key, high, low, count=limit * 2)
            if not entries:
                return out, None
            for entry_id, fields in entries:  # type: ignore[union-attr]
                d = Delivery(**json.loads(fields[b"d"]))
                if (dataset is None or d.dataset == dataset) and d.time <= until:
                    out.append(d)
                    if len(out) == limit:
                        return out, entry_id.decode()
            high = f"({entries[-1][0].decode()}"  # type: ignore[index]
        return out, None

    def expire(self, older_than: float) -> None:
        pass  # (trimmed as written, and each stream expires when idle for the kept period)

    def close(self) -> None:
        self.client.close()


class NoBackend:
    """No place to keep deliveries (an unusable folder): they are counted as dropped."""

    def write(self, batch: list[Delivery]) -> None:
        raise OSError("no delivery log")

    def query(self, *args: Any) -> tuple[list[Delivery], str | None]:
        raise sqlite3.OperationalError("no delivery log")

    def expire(self, older_than: float) -> None:
        pass

    def close(self) -> None:
        pass


class DeliveryLog:
    """Deliveries on their way to the backend, written by a thread of their own.

    Answers of the same kind to the same caller for the same object within one flush (a
    client's range reads of a file) become one delivery with their bytes and count added
    up: what the log is for, and a few rows a second however many requests there are."""

    def __init__(self, backend: Backend, config: DeliveryLogConfig) -> None:
        self.backend = backend
        self.keep_seconds = config.keep_days * 86400
        #: (user, client, dataset, path, status, delivery) -> [first time, requests, bytes]
        self.pending: dict[tuple[Any, ...], list[Any]] = {}
        self.dropped = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fdp-deliveries", daemon=True)
        self._thread.start()

    def add(self, x: Exchange) -> None:
        """Note the delivery `x` made, if it made one (a data answer of a dataset); never
        waits on anything but this log's own lock."""
        if x.entry is None or x.plan is None or x.method != "GET" or not 200 <= x.status < 400:
            return
        key = (x.who.subject, x.client, x.dataset, x.rel, x.status, x.plan.kind)
        with self._lock:
            entry = self.pending.get(key)
            if entry is not None:
                entry[1] += 1
                entry[2] += x.sent
            elif len(self.pending) < MAX_PENDING:
                self.pending[key] = [time.time(), 1, x.sent]
            else:
                self.dropped += 1

    def _run(self) -> None:
        last_expiry = 0.0
        while not self._stop.is_set():
            self._stop.wait(FLUSH_SECONDS)
            self.flush()
            if time.time() - last_expiry > 3600:
                last_expiry = time.time()
                with contextlib.suppress(Exception):
                    self.backend.expire(time.time() - self.keep_seconds)

    def flush(self) -> None:
        """Write everything pending (blocks)."""
        with self._lock:
            pending, self.pending = self.pending, {}
        if not pending:
            return
        batch = [
            Delivery(at, user, client, dataset, path, status, sent, str(kind), n)
            for (user, client, dataset, path, status, kind), (at, n, sent) in pending.items()
        ]
        batch.sort(key=lambda d: d.time)
        try:
            self.backend.write(batch)
        except Exception as e:  # (a store away: these are lost, the next flush tries again)
            self.dropped += len(batch)
            log.warning("%d deliveries not logged (%s)", len(batch), type(e).__name__)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()
        self.backend.close()


# -- the HTTP side --------------------------------------------------------------------------


def _instant(value: str | None, default: float, name: str) -> float:
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise BadRequest(f"{name}: an RFC 3339 time or Unix seconds") from None


class DeliveriesUnavailable(ProxyError):
    status, slug = 503, "deliveries-unavailable"


def _may_see_dataset(request: Request, who: Identity, dataset: str) -> bool:
    entry = request.app.state.registry.entries.get(dataset)
    if entry is None:
        return who.admin
    owners = set(entry.policy.owners)
    return who.admin or bool(owners & who.groups)


async def deliveries(request: Request) -> Response:
    """The caller's own deliveries; with `?dataset=` and an `owners` group of it (or the
    admin group), everyone's deliveries of that dataset."""
    who = await identity(request)
    if who.subject is None:
        raise Unauthorized("delivery logs need a bearer token", invalid=False)
    q = request.query_params
    dataset = q.get("dataset")
    try:
        limit = max(1, min(MAX_PAGE, int(q.get("limit", PAGE))))
    except ValueError:
        raise BadRequest("limit: a number") from None
    cursor = q.get("cursor")
    if cursor is not None and not cursor.replace("-", "").isdigit():
        raise BadRequest("cursor: as given in `next`")
    since = _instant(q.get("since"), 0.0, "since")
    until = _instant(q.get("until"), time.time() + 60, "until")
    everyone = (
        dataset is not None and q.get("mine") != "1" and _may_see_dataset(request, who, dataset)
    )
    user = None if everyone else who.subject
    log_: DeliveryLog = request.app.state.deliveries
    try:
        page, after = await anyio.to_thread.run_sync(
            log_.backend.query, user, dataset, since, until, cursor, limit
        )
    except (redis.RedisError, sqlite3.Error) as e:
        raise DeliveriesUnavailable(
            f"the delivery log is not available ({type(e).__name__})", headers={"retry-after": "5"}
        ) from None
    body: dict[str, Any] = {"deliveries": [_shown(d, everyone) for d in page]}
    if after is not None:
        params = {k: v for k, v in q.items() if k != "cursor"} | {"cursor": after}
        body["next"] = str(request.url.replace_query_params(**params))
    return JSONResponse(body, headers={"cache-control": "no-store"})


def _shown(d: Delivery, everyone: bool) -> dict[str, Any]:
    out = asdict(d)
    if not everyone:
        out.pop("client")  # (the caller knows where they were)
    return out
