"""QoS: per-user, per-group and per-address limits, one budget across every replica.

The counting is `limits`' sliding-window counter (one atomic `INCRBY` per window in Redis,
or in memory for one process). Requests count when admitted; bytes are spent, as a cost,
when a response has been sent. Every call is bounded by `qos.timeout_seconds`; a Redis that
fails or does not answer admits everyone (`on_redis_error: open`, logged once a minute and
counted) or refuses with 503.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass

from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from prometheus_client import Counter as Metric

from policies.config import Limits, Qos, QosService, Rate

log = logging.getLogger("fdp.qos")

ADMITTED = Metric("fdp_qos_admissions", "Requests admitted under QoS limits", ["dataset"])
REJECTED = Metric(
    "fdp_qos_rejections", "Requests refused with 429, by the limit kind", ["dataset", "kind"]
)
ERRORS = Metric("fdp_qos_errors", "Admissions the shared QoS counters did not answer")

ERROR_LOG_INTERVAL = 60.0
#: refusals remembered for /status
RECENT = 50
#: kinds counted when a request is admitted; the byte kinds are spent when it has been sent
COUNTED = ("requests", "miss_requests")
SIZED = ("bytes", "miss_bytes")


@dataclass(frozen=True)
class Applied:
    """One limit that applies to a request: whose budget, of what kind, how large."""

    dataset: str
    kind: str  # requests | miss_requests | bytes | miss_bytes
    scope: str  # user | group | address
    who: str  # the subject, group name or address
    rate: Rate

    @property
    def name(self) -> str:
        """The policy's name in `RateLimit-Policy` (a structured-field key)."""
        scope = "anonymous" if self.scope == "address" else self.scope
        return f"{self.kind.replace('_', '-')}-{scope}"

    @property
    def item(self) -> RateLimitItemPerSecond:
        return RateLimitItemPerSecond(int(self.rate.limit), max(1, int(self.rate.per)))

    @property
    def key(self) -> tuple[str, ...]:
        return (self.dataset, self.kind, self.scope, self.who)


KINDS = (*COUNTED, *SIZED)


@dataclass(frozen=True)
class Standing:
    """Where a budget stands after this request: for the `RateLimit` fields."""

    applied: Applied
    remaining: int
    reset: int  # seconds until the window frees what it holds

    def policy_field(self) -> str:
        rate = self.applied.rate
        unit = ';qu="content-bytes"' if self.applied.kind in SIZED else ""
        return f'"{self.applied.name}";q={int(rate.limit)};w={int(rate.per)}{unit}'

    def field(self) -> str:
        return f'"{self.applied.name}";r={max(0, self.remaining)};t={max(0, self.reset)}'

    def public(self) -> dict[str, object]:
        """What `GET /me/usage` shows of it."""
        a = self.applied
        return {
            "kind": a.kind,
            "scope": a.scope,
            **({"group": a.who} if a.scope == "group" else {}),
            "limit": int(a.rate.limit),
            "per_seconds": int(a.rate.per),
            "remaining": max(0, self.remaining),
            "reset_seconds": max(0, self.reset),
        }


class RateLimited(Exception):
    """Over a limit: 429 with `Retry-After` and the `RateLimit` fields of that limit."""

    def __init__(self, standing: Standing) -> None:
        a = standing.applied
        who = "your address" if a.scope == "address" else f"{a.scope} {a.who!r}"
        super().__init__(
            f"{a.kind.replace('_', ' ')} limit of {a.dataset!r} for {who}: "
            f"{int(a.rate.limit)} per {int(a.rate.per)} s"
        )
        self.standing = standing

    @property
    def headers(self) -> dict[str, str]:
        s = self.standing
        return {
            "retry-after": str(max(1, s.reset)),
            "ratelimit-policy": s.policy_field(),
            "ratelimit": s.field(),
        }


class QosUnavailable(Exception):
    """The shared counters do not answer and QoS is configured to fail closed."""


def _rates(limits: Limits | None, kind: str) -> Rate | None:
    return getattr(limits, kind) if limits is not None else None


def applicable(
    dataset: str,
    policy: Qos,
    defaults: Qos,
    kinds: Iterable[str],
    subject: str | None,
    groups: Iterable[str],
    address: str | None,
) -> list[Applied]:
    """The limits a request falls under: the caller's own (user, or address when
    anonymous) and each of its groups', kind by kind; the dataset's own, else the defaults."""
    out: list[Applied] = []
    for kind in kinds:
        if subject is not None:
            rate = _rates(policy, kind) or _rates(defaults, kind)
            if rate is not None:
                out.append(Applied(dataset, kind, "user", subject, rate))
        else:
            rate = (
                _rates(policy.anonymous, kind)
                or _rates(defaults.anonymous, kind)
                or _rates(policy, kind)
                or _rates(defaults, kind)
            )
            if rate is not None:
                out.append(Applied(dataset, kind, "address", address or "unknown", rate))
        for group in sorted(groups):
            rate = _rates(policy.groups.get(group), kind) or _rates(
                defaults.groups.get(group), kind
            )
            if rate is not None:
                out.append(Applied(dataset, kind, "group", group, rate))
    return out


class Limiter:
    """Counts requests against their limits, in Redis (shared) or in memory."""

    def __init__(self, config: QosService, redis_url: str | None) -> None:
        self.config = config
        storage: Storage
        if redis_url is not None:
            uri = "async+" + redis_url if not redis_url.startswith("async+") else redis_url
            storage = RedisStorage(
                uri,
                implementation="redispy",
                wrap_exceptions=True,
                socket_timeout=config.timeout_seconds,
                socket_connect_timeout=config.timeout_seconds,
            )
        else:
            storage = MemoryStorage()
        self.strategy = SlidingWindowCounterRateLimiter(storage)
        #: for the metrics issue: admissions by dataset, rejections by (dataset, limit kind)
        self.admitted: Counter[str] = Counter()
        self.rejected: Counter[tuple[str, str]] = Counter()
        #: the latest refusals, for /status: (time, dataset, kind, scope, who)
        self.recent: deque[tuple[float, str, str, str, str]] = deque(maxlen=RECENT)
        self.errors = 0
        self._logged = 0.0

    async def admit(self, applied: list[Applied]) -> Standing | None:
        """Count the request against every limit, or raise RateLimited for the first one
        it would break (then nothing is counted). Returns the tightest standing."""
        if not applied:
            return None
        try:
            return await asyncio.wait_for(self._admit(applied), self.config.timeout_seconds)
        except RateLimited:
            raise
        except Exception as e:
            self.errors += 1
            ERRORS.inc()
            now = time.monotonic()
            if now - self._logged > ERROR_LOG_INTERVAL:
                self._logged = now
                log.error("QoS counters unavailable (%s): %s", type(e).__name__, self.mode)
            if self.config.on_redis_error == "closed":
                raise QosUnavailable("the QoS counters do not answer") from None
            return None

    @property
    def mode(self) -> str:
        return "admitting" if self.config.on_redis_error == "open" else "refusing"

    async def _admit(self, applied: list[Applied]) -> Standing:
        for a in applied:  # a byte budget must have something left to start a response
            if not await self.strategy.test(a.item, *a.key):
                standing = await self._standing(a)
                self.rejected[a.dataset, a.kind] += 1
                self.recent.append((time.time(), a.dataset, a.kind, a.scope, a.who))
                REJECTED.labels(a.dataset, a.kind).inc()
                raise RateLimited(standing)
        for a in applied:
            if a.kind in COUNTED:
                await self.strategy.hit(a.item, *a.key)
        self.admitted[applied[0].dataset] += 1
        ADMITTED.labels(applied[0].dataset).inc()
        standings = [await self._standing(a) for a in applied]
        return min(standings, key=lambda s: s.remaining / int(s.applied.rate.limit))

    async def usage(self, applied: list[Applied]) -> list[Standing]:
        """Where each of these budgets stands now (nothing is counted); raises
        QosUnavailable when the counters do not answer in time."""
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(self._standing(a) for a in applied)), self.config.timeout_seconds
            )
        except Exception as e:  # (whatever Redis did, there is nothing to show)
            raise QosUnavailable(f"the QoS counters do not answer ({type(e).__name__})") from None

    async def spend(self, applied: list[Applied], sent: int, fetched: int | None = None) -> None:
        """Count a response's bytes against its byte budgets: `sent` against `bytes`, what
        the upstream sent for it (`fetched`, else `sent`) against `miss_bytes`. A response
        that crosses a budget was finished; the budget is then spent to the end of its window."""
        costs = [
            (a, fetched if a.kind == "miss_bytes" and fetched is not None else sent)
            for a in applied
            if a.kind in SIZED
        ]
        costs = [(a, n) for a, n in costs if n > 0]
        if not costs:
            return
        try:
            await asyncio.wait_for(self._spend(costs), self.config.timeout_seconds)
        except Exception as e:  # (the response has gone out either way)
            self.errors += 1
            log.warning("QoS bytes not counted (%s)", type(e).__name__)

    async def _spend(self, costs: list[tuple[Applied, int]]) -> None:
        for a, n in costs:
            left = (await self.strategy.get_window_stats(a.item, *a.key)).remaining
            if left > 0:
                await self.strategy.hit(a.item, *a.key, cost=min(n, left))

    async def _standing(self, a: Applied) -> Standing:
        stats = await self.strategy.get_window_stats(a.item, *a.key)
        return Standing(a, stats.remaining, math.ceil(max(0.0, stats.reset_time - time.time())))
