"""Retention on a real diskcache store, with an injected clock instead of sleeping."""

from __future__ import annotations

import os

import pytest

from cache.retention import DAY, Rule, sweep
from cache.store import Store, object_key

KiB = 1024


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    s = Store(tmp_path / "cache", clock)
    yield s
    s.close()


def put(store, tmp_path, dataset, path, size=100 * KiB):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(size))
    return store.ingest(dataset, path, src, block_size=64 * KiB)


def present(store):
    return sorted((r.dataset, r.path) for r in store.records())


def test_rolling_keeps_n_days(store, tmp_path, clock):
    put(store, tmp_path, "r", "old")
    clock.now += 2 * DAY
    put(store, tmp_path, "r", "new")
    clock.now += 1.5 * DAY
    rules = {"r": Rule("rolling", days=3)}
    sweep(store, rules, None, clock())
    assert present(store) == [("r", "new")]  # "old" is 3.5 days old, "new" 1.5
    clock.now += 2 * DAY
    sweep(store, rules, None, clock())
    assert present(store) == []


def test_lru_evicts_least_recently_used_first(store, tmp_path, clock):
    for name in ("a", "b", "c"):
        put(store, tmp_path, "l", name)
        clock.now += 10
    store.touch(object_key("l", "a"))  # a is used again: b is now the oldest
    clock.now += 10
    freed = sweep(store, {"l": Rule("lru", max_bytes=250 * KiB)}, None, clock())
    assert freed == 100 * KiB
    assert present(store) == [("l", "a"), ("l", "c")]
    record = store.record(object_key("l", "a"))
    assert record.hits == 1 and record.accessed > record.created


def test_permanent_stays_and_global_cap_takes_others_first(store, tmp_path, clock):
    put(store, tmp_path, "p", "keep1")
    put(store, tmp_path, "p", "keep2")
    clock.now += 10
    put(store, tmp_path, "l", "x")
    clock.now += 10
    put(store, tmp_path, "l", "y")
    rules = {"p": Rule("permanent"), "l": Rule("lru")}
    sweep(store, rules, 350 * KiB, clock())
    # 400 KiB over a 350 KiB cap: the oldest non-permanent entry goes, permanent ones stay
    assert present(store) == [("l", "y"), ("p", "keep1"), ("p", "keep2")]
    clock.now += 365 * DAY
    sweep(store, rules, None, clock())
    assert ("p", "keep1") in present(store)


def test_unconfigured_datasets_lose_their_entries(store, tmp_path, clock):
    put(store, tmp_path, "gone", "x")
    sweep(store, {}, None, clock())
    assert present(store) == []


def test_eviction_never_breaks_a_read_in_progress(store, tmp_path):
    record = put(store, tmp_path, "l", "big", size=300 * KiB)
    f = store.block_file(record.key, 2)
    expected = os.pread(f.fileno(), 1000, 0)
    assert store.evict(record.key) == 300 * KiB
    assert store.record(record.key) is None
    assert store.block_file(record.key, 2) is None
    assert os.pread(f.fileno(), 1000, 0) == expected  # the held file still reads


def test_a_second_process_view_shares_the_store(tmp_path, clock):
    a = Store(tmp_path / "cache", clock)
    b = Store(tmp_path / "cache", clock)
    record = put(a, tmp_path, "d", "x")
    assert b.record(record.key) is not None
    f = b.block_file(record.key, 0)
    assert os.pread(f.fileno(), 10, 0) == os.pread(a.block_file(record.key, 0).fileno(), 10, 0)
    a.close()
    b.close()


def test_sweep_removes_stale_temporary_files(store, clock):
    old, fresh = store.tmp / "job-1-1.part", store.tmp / "job-2-2.part"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(old, (0, 0))  # long ago: left by a killed worker
    sweep(store, {}, None, clock())
    assert not old.exists() and fresh.exists()
