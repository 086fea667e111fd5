"""Upstream caps: how many fetches one origin serves at once and how many bytes a second it
sends, for the whole deployment (Redis) or this process (memory).

Every fetch from an upstream (a cache fill's ranged GET, a pass-through read, a retrieval
job's GET) holds a slot of its origin while it runs and books the bytes it reads against
the origin's rate (GCRA: readers line up behind each other and are slowed, never cut off).
A fetch that finds no free slot waits, up to `wait_seconds` from when it was asked for,
then fails with `UpstreamBusy` (503 + Retry-After). A slot in Redis is a lease that expires
unless its fetch keeps reading, so a killed process frees its slots within `LEASE` seconds.
Calls here block: run them in a thread (fetches already do).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, Protocol

import anyio
import anyio.to_thread
import redis
from prometheus_client import Counter

from policies.config import QosService, UpstreamLimit
from policies.pacing import Pace
from upstreams.base import UpstreamUnavailable, host_of

log = logging.getLogger("fdp.upstream")

BUSY = Counter(
    "fdp_upstream_busy", "Fetches refused for want of a slot of their origin", ["upstream"]
)

#: seconds a slot in Redis lives without a sign of its fetch; renewed every LEASE / 3
LEASE = 60.0
ERROR_LOG_INTERVAL = 60.0
#: the first and the longest pause between looks for a free slot
POLL = (0.005, 0.1)

#: Take a slot: drop expired leases, then add ours if fewer than the cap are held.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
#: Renew a slot's lease (if it still has one).
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""
#: GCRA: book ARGV[1] bytes at ARGV[2] bytes/s; returns the microseconds to wait.
BOOK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local due = tonumber(redis.call('GET', KEYS[1]) or '0')
local burst = tonumber(ARGV[3])
if due < now - burst then due = now - burst end
local after = due + tonumber(ARGV[1]) / tonumber(ARGV[2])
local ttl = math.ceil((after - now) * 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.6f', after), 'PX', ttl)
if due <= now then return 0 end
return math.floor((due - now) * 1e6)
"""


class UpstreamBusy(UpstreamUnavailable):
    """The upstream's cap is reached and no slot freed in time: 503 with Retry-After."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, 503)
        self.retry_after = retry_after


class Backend(Protocol):
    def acquire(self, origin: str, cap: int, lease: str) -> bool: ...
    def release(self, origin: str, lease: str) -> None: ...
    def renew(self, origin: str, lease: str) -> None: ...
    def book(self, origin: str, rate: float, n: int) -> float: ...


class MemoryBackend:
    """Slots and flows of this process."""

    def __init__(self) -> None:
        self._held: dict[str, set[str]] = {}
        self._paces: dict[str, Pace] = {}
        self._lock = threading.Lock()

    def acquire(self, origin: str, cap: int, lease: str) -> bool:
        with self._lock:
            held = self._held.setdefault(origin, set())
            if len(held) >= cap:
                return False
            held.add(lease)
            return True

    def release(self, origin: str, lease: str) -> None:
        with self._lock:
            held = self._held.get(origin)
            if held is not None:
                held.discard(lease)
                if not held:
                    del self._held[origin]

    def renew(self, origin: str, lease: str) -> None:
        pass

    def book(self, origin: str, rate: float, n: int) -> float:
        with self._lock:
            pace = self._paces.get(origin)
            if pace is None or pace.rate != rate:
                pace = self._paces[origin] = Pace(rate)
        return pace.book(n)


class RedisBackend:
    """Slots and flows shared by every process using the same Redis."""

    def __init__(self, url: str, timeout: float) -> None:
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._acquire = self.client.register_script(ACQUIRE)
        self._renew = self.client.register_script(RENEW)
        self._book = self.client.register_script(BOOK)

    def acquire(self, origin: str, cap: int, lease: str) -> bool:
        ms = int(LEASE * 1000)
        return bool(self._acquire(keys=[_key(origin, "fetching")], args=[cap, ms, lease]))

    def release(self, origin: str, lease: str) -> None:
        self.client.zrem(_key(origin, "fetching"), lease)

    def renew(self, origin: str, lease: str) -> None:
        self._renew(keys=[_key(origin, "fetching")], args=[int(LEASE * 1000), lease])

    def book(self, origin: str, rate: float, n: int) -> float:
        waited = self._book(keys=[_key(origin, "due")], args=[n, rate, 0.1])
        return int(waited) / 1e6  # type: ignore[arg-type]


#: the slots and flows of this process, shared by its proxy and its embedded workers
PROCESS = MemoryBackend()


def _key(origin: str, what: str) -> str:
    return f"fdp:upstream:{origin}:{what}"


class Meter:
    """One fetch's slot: books what it reads against its origin's rate, keeps its lease."""

    def __init__(self, caps: Caps, origin: str, limit: UpstreamLimit | None, lease: str) -> None:
        self.caps, self.origin, self.lease = caps, origin, lease
        self.rate = float(limit.bytes_per_second) if limit and limit.bytes_per_second else 0.0
        #: bytes read before a booking (about a tenth of a second's worth)
        self.quantum = int(min(4 << 20, max(64 << 10, self.rate / 10))) if self.rate else 0
        self.pending = 0
        self.renewed = time.monotonic()
        self.held = limit is not None and limit.concurrent is not None

    @property
    def idle(self) -> bool:
        """Nothing to book and no lease to keep."""
        return not self.rate and not self.held

    def add(self, n: int) -> bool:
        """Note `n` bytes read; True when `settle` is due (a booking or a lease renewal)."""
        self.pending += n
        if self.rate and self.pending >= self.quantum:
            return True
        return self.held and time.monotonic() - self.renewed > LEASE / 3

    def settle(self) -> float:
        """Book the bytes read so far and renew the lease; the seconds to wait (blocks)."""
        n, self.pending = self.pending, 0
        try:
            if self.held and time.monotonic() - self.renewed > LEASE / 3:
                self.renewed = time.monotonic()
                self.caps.backend.renew(self.origin, self.lease)
            return self.caps.backend.book(self.origin, self.rate, n) if self.rate and n else 0.0
        except redis.RedisError as e:
            self.caps.failed(e)
            return 0.0  # a fetch under way is not stopped for that

    def took(self, n: int) -> None:
        """Note `n` bytes read and wait as the origin's rate requires (blocks)."""
        if self.add(n):
            wait = self.settle()
            if wait > 0:
                time.sleep(wait)

    def wrap(self, body: Any) -> Any:
        """`body` whose `read` keeps to this meter (the body itself if there is no cap)."""
        return body if self.idle else _MeteredBody(body, self)


class _MeteredBody:
    def __init__(self, body: Any, meter: Meter) -> None:
        self.body, self.meter = body, meter
        self.status, self.headers = body.status, body.headers

    def read(self, most: int) -> bytes:
        data: bytes = self.body.read(most)
        self.meter.took(len(data))
        return data


class Caps:
    """The caps of every upstream origin, read from `limits()` at each fetch (live edits)."""

    def __init__(
        self,
        limits: Callable[[], Mapping[str, UpstreamLimit]],
        redis_url: str | None,
        service: QosService,
    ) -> None:
        self.limits = limits
        self.service = service
        self.backend: Backend = (
            RedisBackend(redis_url, service.timeout_seconds) if redis_url else PROCESS
        )
        #: fetches refused for want of a slot, by origin; errors of the shared state
        self.busy: dict[str, int] = {}
        self.errors = 0
        self._logged = 0.0

    def limit_for(self, origin: str) -> UpstreamLimit | None:
        limits = self.limits()
        return limits.get(origin) or limits.get("*") if limits else None

    @contextlib.contextmanager
    def slot(
        self, href: str, since: float | None = None, wait: float | None = None
    ) -> Iterator[Meter]:
        """Hold a slot of `href`'s origin for one fetch (waiting for one, at most `wait`
        seconds or the origin's `wait_seconds`, counted from `since`); raises UpstreamBusy."""
        origin = host_of(href)
        limit = self.limit_for(origin)
        meter = Meter(self, origin, limit, uuid.uuid4().hex)
        if meter.held:
            assert limit is not None and limit.concurrent is not None
            wait = limit.wait_seconds if wait is None else wait
            meter.held = self._acquire(origin, limit.concurrent, meter.lease, since, wait)
        try:
            yield meter
        finally:
            if meter.held:
                try:
                    self.backend.release(origin, meter.lease)
                except redis.RedisError as e:
                    self.failed(e)  # (the lease expires by itself)

    @contextlib.asynccontextmanager
    async def aslot(self, href: str) -> AsyncIterator[Meter]:
        """`slot` for the event loop: the blocking parts run in threads (Redis), and the
        slot is given back even when the response is cancelled."""
        cm = self.slot(href)
        meter = await anyio.to_thread.run_sync(cm.__enter__)
        try:
            yield meter
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(cm.__exit__, None, None, None)

    async def settle(self, meter: Meter) -> None:
        """`Meter.settle` and its wait, off the event loop."""
        wait = await anyio.to_thread.run_sync(meter.settle)
        if wait > 0:
            await anyio.sleep(wait)

    def _acquire(self, origin: str, cap: int, lease: str, since: float | None, wait: float) -> bool:
        deadline = (since if since is not None else time.monotonic()) + wait
        pause = POLL[0]
        while True:
            try:
                if self.backend.acquire(origin, cap, lease):
                    return True
            except redis.RedisError as e:
                self.failed(e)
                if self.service.on_redis_error == "closed":
                    raise UpstreamBusy("the upstream caps cannot be checked", 5) from None
                return False  # open: fetch without a slot
            left = deadline - time.monotonic()
            if left <= 0:
                self.busy[origin] = self.busy.get(origin, 0) + 1
                BUSY.labels(origin).inc()
                raise UpstreamBusy(
                    f"the upstream is at its limit of {cap} fetches at once",
                    max(1, math.ceil(wait)),
                )
            time.sleep(min(pause, left))
            pause = min(POLL[1], pause * 2)

    def failed(self, exc: Exception) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._logged > ERROR_LOG_INTERVAL:
            self._logged = now
            mode = "fetching uncapped" if self.service.on_redis_error == "open" else "refusing"
            log.error("upstream caps unavailable (%s): %s", type(exc).__name__, mode)
