"""Pacing and upstream caps in-process: GCRA bookings on an injected clock, slots that wait
and give up, and Redis leases that a dead holder cannot keep."""

from __future__ import annotations

import threading
import time

import pytest

from policies.config import QosService, UpstreamLimit
from policies.pacing import Pace
from tests.test_queue import fresh_redis
from upstreams import caps as caps_module
from upstreams.caps import Caps, MemoryBackend, RedisBackend, UpstreamBusy


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_pace_lines_bookings_up_at_its_rate():
    clock = Clock()
    pace = Pace(1000, burst=0.1, clock=clock)  # 1000 bytes a second
    assert pace.book(100) == 0.0  # the burst allowance: a tenth of a second's worth at once
    assert pace.book(100) == 0.0
    assert pace.book(100) == pytest.approx(0.1)  # then each booking waits its turn
    assert pace.book(500) == pytest.approx(0.2)
    assert pace.backlog == pytest.approx(0.7)
    clock.now += 10  # idle: the unused time is not saved up beyond the burst
    assert pace.book(100) == 0.0
    assert pace.book(100) == 0.0
    assert pace.book(100) == pytest.approx(0.1)


def test_two_takers_of_one_flow_share_its_rate():
    clock = Clock()
    pace = Pace(1000, burst=0.0, clock=clock)
    waits = [pace.book(250) for _ in range(8)]  # two readers, alternating
    assert waits == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75])


def caps_of(limit: dict, backend=None) -> Caps:
    caps = Caps(lambda: {"up.example:80": UpstreamLimit.model_validate(limit)}, None, QosService())
    caps.backend = backend or MemoryBackend()
    return caps


def test_a_slot_waits_for_a_free_one_then_gives_up():
    caps = caps_of({"concurrent": 1, "wait_seconds": 0.3})
    href = "http://up.example:80/a.tif"
    with caps.slot(href):
        t = time.monotonic()
        with pytest.raises(UpstreamBusy) as busy, caps.slot(href):
            pass
        assert 0.25 <= time.monotonic() - t < 1.0
        assert busy.value.retry_after == 1 and caps.busy == {"up.example:80": 1}
        with caps.slot("http://other.example/b.tif"):  # another origin: not capped
            pass
    freed = threading.Event()

    def hold() -> None:
        with caps.slot(href):
            freed.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.05)
    threading.Timer(0.1, freed.set).start()
    with caps.slot(href):  # waits until the holder lets go (within wait_seconds)
        pass
    holder.join()


def test_a_lease_of_a_dead_holder_expires(redis_url, monkeypatch):
    monkeypatch.setattr(caps_module, "LEASE", 0.5)
    backend = RedisBackend(fresh_redis(redis_url), 1.0)
    assert backend.acquire("up.example:80", 1, "dead")  # never released: its process died
    assert not backend.acquire("up.example:80", 1, "alive")
    time.sleep(0.6)
    assert backend.acquire("up.example:80", 1, "alive")
    backend.release("up.example:80", "alive")
    assert backend.acquire("up.example:80", 1, "next")


def test_redis_bookings_pace_every_process_together(redis_url):
    backend = RedisBackend(fresh_redis(redis_url), 1.0)
    waits = [backend.book("up.example:80", 1 << 20, 256 << 10) for _ in range(6)]
    # 1 MiB/s: a tenth of a second free, then a quarter of a second per 256 KiB booking
    assert waits[0] == 0.0
    assert waits[-1] == pytest.approx(5 * 0.25 - 0.1, abs=0.05)
