"""Pacing by GCRA (the generic cell rate algorithm): one number per flow, the time at which
its next byte is due. A taker books its bytes and waits until its booking starts; takers
sharing a flow line up behind each other, so together they keep to its rate."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Pace:
    """A flow of `rate` bytes a second, in this process (thread-safe); `burst` seconds of
    unused time may be spent at once after a pause."""

    def __init__(
        self, rate: float, burst: float = 0.1, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._due = 0.0  # when the next booking may start
        self._lock = threading.Lock()

    def book(self, n: int) -> float:
        """Book `n` bytes; returns the seconds to wait before sending them."""
        with self._lock:
            now = self.clock()
            due = max(self._due, now - self.burst)
            self._due = due + n / self.rate
            return max(0.0, due - now)

    @property
    def backlog(self) -> float:
        """Seconds of bookings ahead of now."""
        return max(0.0, self._due - self.clock())
