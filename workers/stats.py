"""How retrieval jobs end, for `/metrics`: attempts by outcome and a histogram of their
durations. Kept where every worker can add to it: a Redis hash (RQ workers on any host)
or this process (the embedded runner). Never in a job's way: a failure to count is logged."""

from __future__ import annotations

import logging
import math
import threading

import redis

log = logging.getLogger("fdp.workers")

KEY = "fdp:stats:jobs"
#: upper bounds of the duration buckets, in seconds
BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, math.inf)
#: outcomes of one attempt
OUTCOMES = ("succeeded", "failed", "retried")

Snapshot = tuple[dict[str, int], list[tuple[float, int]], float]


def bucket_label(le: float) -> str:
    """A histogram bound as Prometheus writes it (`le`)."""
    return "+Inf" if math.isinf(le) else f"{le:g}"


class JobStats:
    def __init__(self, client: redis.Redis | None = None) -> None:
        self.client = client
        self._counts: dict[str, float] = {}
        self._lock = threading.Lock()

    def record(self, outcome: str, seconds: float) -> None:
        """One attempt ended (blocks: a Redis call when shared)."""
        fields = {f"outcome:{outcome}": 1.0, "sum": max(0.0, seconds)}
        fields |= {f"le:{bucket_label(le)}": 1.0 for le in BUCKETS if seconds <= le}
        if self.client is None:
            with self._lock:
                for k, v in fields.items():
                    self._counts[k] = self._counts.get(k, 0.0) + v
            return
        try:
            with self.client.pipeline(transaction=True) as p:
                for k, v in fields.items():
                    p.hincrbyfloat(KEY, k, v)
                p.execute()
        except redis.RedisError as e:
            log.warning("job not counted in the stats (%s)", type(e).__name__)

    def snapshot(self) -> Snapshot:
        """(attempts by outcome, cumulative buckets, total seconds); blocks."""
        if self.client is None:
            with self._lock:
                counts = dict(self._counts)
        else:
            raw = self.client.hgetall(KEY)
            counts = {k.decode(): float(v) for k, v in raw.items()}  # type: ignore[union-attr]
        outcomes = {o: int(counts.get(f"outcome:{o}", 0)) for o in OUTCOMES}
        buckets = [(le, int(counts.get(f"le:{bucket_label(le)}", 0))) for le in BUCKETS]
        return outcomes, buckets, counts.get("sum", 0.0)
