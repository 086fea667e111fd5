"""When a failed retrieval is tried again: never if it cannot succeed, else after a jittered pause.

The same rules for both backends, so a missing object costs one attempt everywhere and a
provider outage does not bring every failed job back in the same second.
"""

from __future__ import annotations

import math
import random

from upstreams.base import BadPath, DatasetNotFound, ObjectNotFound

#: seconds before the 2nd, 3rd, ... attempt (the last value repeats), before jitter
BACKOFF = (2.0, 5.0, 15.0, 30.0, 60.0)
#: how far a pause may stray from the schedule, either way
JITTER = 0.5
#: failures no retry can fix: the object is not there, or the path cannot name one
FINAL: tuple[type[Exception], ...] = (ObjectNotFound, DatasetNotFound, BadPath)

_random = random.Random()  # noqa: S311 (jitter, not secrets)


def backoff(attempt: int, rng: random.Random = _random) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based)."""
    base = BACKOFF[min(max(attempt, 1) - 1, len(BACKOFF) - 1)]
    return base * rng.uniform(1 - JITTER, 1 + JITTER)


def intervals(max_attempts: int, rng: random.Random = _random) -> list[int]:
    """RQ `Retry` intervals (whole seconds) for a job of `max_attempts` tries, jittered."""
    return [max(1, math.ceil(backoff(n, rng))) for n in range(1, max_attempts)]


def is_final(exc: BaseException) -> bool:
    """Whether a retrieval that failed with `exc` must fail its job at once."""
    return isinstance(exc, FINAL)
