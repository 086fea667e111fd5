"""The announcement log's edges: a Redis page of stale entries is read past, a recreated
SQLite log's ids stay above the old ones, the publisher gives up within a page when its lease
is lost, a released lease passes on at once, and a site's partial transfer outlives a long link
outage in the store's tmp."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import anyio
import redis as redis_lib

from cache.feed import Notice, RedisLog, SqliteLog
from cache.store import Store
from policies.config import AnnounceConfig
from proxy.feed import Feed
from proxy.publisher import LEASE_SECONDS, ROLE, Publisher
from tests.test_queue import fresh_redis

HOUR = 3600.0


def notice(name: str, at: float) -> Notice:
    return Notice("d", name, 1, "c2hh", at, at)


def test_redis_after_reads_past_a_page_of_stale_entries(redis_url):
    url = fresh_redis(redis_url)
    feed = RedisLog(url, HOUR, 100_000, 5.0)
    client = redis_lib.Redis.from_url(url)
    old = time.time() - 2 * HOUR  # left by approximate trimming: ids fresh, notices not
    for i in range(12):
        client.xadd(RedisLog.KEY, {"n": json.dumps(asdict(notice(f"old-{i}", old)))})
    feed.append(notice("new-0", time.time()))
    feed.append(notice("new-1", time.time()))
    assert [n.path for n in feed.after(None, 5)] == ["new-0", "new-1"]
    assert [n.path for n in feed.after("0-0", 5)] == ["new-0", "new-1"]  # an old last
    assert feed.after(feed.after(None, 5)[-1].id, 5) == []  # the end
    feed.close()
    client.close()


def test_a_recreated_sqlite_log_numbers_above_the_old_one(tmp_path):
    path = tmp_path / "feed.sqlite"
    first = SqliteLog(path, HOUR, 1000)
    old = first.append(notice("a", time.time()))
    first.close()
    os.unlink(path)  # (an operator's clean-up)
    second = SqliteLog(path, HOUR, 1000)
    new = second.append(notice("b", time.time()))
    assert old is not None and new is not None and int(new) > int(old)
    assert [n.path for n in second.after(old, 10)] == ["b"]
    second.close()
    reopened = SqliteLog(path, HOUR, 1000)  # an existing file keeps its sequence
    assert int(reopened.append(notice("c", time.time())) or 0) == int(new) + 1
    reopened.close()


def test_a_memory_log_after_a_restart_numbers_above_the_old_one():
    before = SqliteLog(Path(":memory:"), HOUR, 1000)
    old = before.append(notice("a", time.time()))
    before.close()
    time.sleep(0.002)
    after = SqliteLog(Path(":memory:"), HOUR, 1000)
    new = after.append(notice("b", time.time()))
    assert old is not None and new is not None and int(new) > int(old)
    after.close()


class Broker:
    """Takes every message; after the second, a third of the lease has passed."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher, self.topics = publisher, []

    async def publish(self, topic: str, body: str, **_: object) -> None:
        self.topics.append(topic)
        if len(self.topics) == 2:
            self.publisher.renewed -= LEASE_SECONDS


def test_the_publisher_stops_within_a_page_when_its_lease_is_lost(tmp_path):
    log = SqliteLog(tmp_path / "feed.sqlite", HOUR, 1000)
    ids = [log.append(notice(f"n{i}", time.time())) for i in range(5)]
    assert log.lease(ROLE, "another process", LEASE_SECONDS)  # it took over meanwhile
    publisher = Publisher(Feed(log), AnnounceConfig(broker="mqtt://127.0.0.1"), "http://x")
    broker = Broker(publisher)

    async def publish() -> None:
        publisher.renewed = anyio.current_time()
        with anyio.fail_after(5):
            await publisher._publish(broker, "0")  # type: ignore[arg-type]

    anyio.run(publish)
    assert len(broker.topics) == 2  # not the page's other three
    assert publisher.mark == ids[1]
    assert log.mark(ROLE) is None  # the holder's place is not moved by one that lost it
    log.close()


def test_clean_tmp_keeps_a_site_transfer_longer(tmp_path):
    store = Store(tmp_path / "cache")
    site, fill = store.tmp / "site-x.part", store.tmp / "fill.part"
    for part in (site, fill):
        part.write_bytes(b"x")
        os.utime(part, (time.time() - 2 * HOUR,) * 2)  # a link outage of two hours
    assert store.clean_tmp() == 1
    assert site.exists() and not fill.exists()
    os.utime(site, (time.time() - 49 * HOUR,) * 2)
    assert store.clean_tmp(sites_older_than=48 * HOUR) == 1
    assert not site.exists()
    store.close()


def test_both_logs_know_what_a_harvest_saw_for_the_window_after_it_was_last_seen(
    tmp_path, redis_url
):
    """`known`: new names once; a name not seen for the window is forgotten, in its own
    dataset only, so it is new again (the same in SQLite and in Redis)."""
    window = 0.5
    for feed in (
        SqliteLog(tmp_path / "feed.sqlite", window, 1000),
        RedisLog(fresh_redis(redis_url), window, 1000, 5.0),
    ):
        assert feed.known("d", ["a", "b"]) == ["a", "b"]
        assert feed.known("e", ["a"]) == ["a"]  # (another dataset's names are its own)
        assert feed.known("d", ["a", "b", "c"]) == ["c"]
        time.sleep(window / 2)
        assert feed.known("d", ["a"]) == []  # seen again: kept a window from now
        time.sleep(window / 2 + 0.1)
        assert feed.known("d", ["a", "b"]) == ["b"]  # b was last seen over a window ago
        assert feed.known("e", ["a"]) == ["a"]
        feed.close()


def test_both_logs_hand_a_released_lease_over_at_once(tmp_path, redis_url):
    """A lease is one holder's until it runs out or the holder releases it (a process
    stopping); another holder's release changes nothing."""
    for feed in (
        SqliteLog(tmp_path / "feed.sqlite", HOUR, 1000),
        RedisLog(fresh_redis(redis_url), HOUR, 1000, 5.0),
    ):
        assert feed.lease("role", "one", 60) and feed.lease("role", "one", 60)  # (renewed)
        assert not feed.lease("role", "two", 60)
        feed.release("role", "two")  # not its own: held still
        assert not feed.lease("role", "two", 60)
        feed.release("role", "one")
        assert feed.lease("role", "two", 60)
        assert not feed.lease("role", "one", 60)
        feed.release("unheld", "one")
        assert feed.lease("unheld", "two", 60)
        feed.close()
