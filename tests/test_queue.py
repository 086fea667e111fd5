"""The job queues in-process, against a real Redis, real `fdp worker`s and the real upstream.

What a queue promises: a missing object costs one attempt; a job waiting for its retry holds
no runner; retries come back jittered; owners are a set any replica adds to; a worker's
heartbeat lives only as long as its job; a Redis that stops answering is QueueUnavailable in
seconds without stalling the event loop; the announcement subscription survives a
connection that went silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis as redis_lib
import yaml
from rq import Queue, get_current_job

from policies.config import QueueConfig, Settings
from policies.loader import load_settings
from tests.harness.procs import worker_process
from tests.harness.services import start_redis
from workers.base import running
from workers.embedded import EmbeddedQueue
from workers.jobs import FAILED, QUEUED, SUCCEEDED, job_id
from workers.retry import BACKOFF, JITTER, intervals
from workers.rq_queue import PING_SECONDS, RECONNECT_SECONDS, RQQueue
from workers.worker import CHANNEL, LEASE_SECONDS, QUEUE_NAME, Worker

_dbs = itertools.count(1)


def fresh_redis(redis_url: str) -> str:
    """An empty Redis database of its own (job ids repeat across tests)."""
    url = f"{redis_url.rsplit('/', 1)[0]}/{next(_dbs) % 16}"
    redis_lib.Redis.from_url(url).flushdb()
    return url


def config(upstream_url: str, work: Path, redis_url: str | None = None) -> dict[str, Any]:
    """`vault`: the demo archive (5 s to stage a file); `cogs`: always online; both jobs."""
    return {
        "cache": {"store": str(work / "cache")},
        "queue": {"redis_url": redis_url, "workers": 1},
        "datasets": {
            "vault": {
                "upstream": {"http": {"base_url": f"{upstream_url}/data/demo-archive/"}},
                "archive": True,
            },
            "cogs": {
                "upstream": {"http": {"base_url": f"{upstream_url}/data/demo-cogs/"}},
                "archive": True,
            },
        },
    }


def settings_of(doc: dict[str, Any]) -> Settings:
    return load_settings(None, environ={}, default=doc)


def gets(upstream: Any, fragment: str) -> list[dict[str, Any]]:
    return [e for e in upstream.data_requests() if e["method"] == "GET" and fragment in e["path"]]


async def until(check: Callable[[], Any], seconds: float, every: float = 0.05) -> None:
    """Wait until `check()` is true; fail after `seconds`."""
    with anyio.fail_after(seconds):
        while True:
            if check():
                return
            await anyio.sleep(every)


@contextlib.contextmanager
def fdp_worker(doc: dict[str, Any], work: Path) -> Any:
    path = work / "worker.yaml"
    path.write_text(yaml.safe_dump(doc))
    with worker_process(path, work, f"worker-{time.monotonic_ns()}") as proc:
        yield proc


# -- retries ---------------------------------------------------------------------------------


def test_retry_intervals_are_jittered_around_the_schedule() -> None:
    runs = [intervals(4) for _ in range(50)]
    for waits in runs:
        assert len(waits) == 3
        for wait, base in zip(waits, BACKOFF, strict=False):
            assert max(1, int(base * (1 - JITTER))) <= wait <= base * (1 + JITTER) + 1
    assert len({tuple(w) for w in runs}) > 1  # not one schedule for every job


@pytest.mark.anyio
async def test_embedded_a_missing_object_fails_its_job_at_once(upstream, tmp_path) -> None:
    async with running(EmbeddedQueue(settings_of(config(upstream.url, tmp_path)))) as queue:
        info = await queue.submit("vault", "missing/a.tif", "alice", max_attempts=3)
        info = await queue.wait(info.id, 10)
    assert info is not None and info.state == FAILED
    assert info.not_found and info.attempts == 1
    assert len(gets(upstream, "missing/a.tif")) == 1  # no retry of a 404


@pytest.mark.anyio
async def test_embedded_a_job_waiting_to_retry_holds_no_runner(upstream, tmp_path) -> None:
    upstream.fault("scene-a/B04", method="GET", status=500)  # every attempt fails
    settings = settings_of(config(upstream.url, tmp_path))
    async with running(EmbeddedQueue(settings)) as queue:  # one runner
        failing = await queue.submit("cogs", "scene-a/B04.tif", "alice", max_attempts=3)

        with anyio.fail_after(10):  # until the first attempt failed and waits to retry
            while True:
                info = await queue.get(failing.id)
                if info is not None and info.attempts == 1 and info.state == QUEUED:
                    break
                await anyio.sleep(0.02)
        joined = await queue.submit("cogs", "scene-a/B04.tif", "bob", max_attempts=3)
        assert joined.owners == ["alice", "bob"] and joined.error and "500" in joined.error
        t = time.monotonic()
        other = await queue.submit("cogs", "scene-b/B04.tif", "carol", max_attempts=3)
        other = await queue.wait(other.id, 10)
        took = time.monotonic() - t
        assert other is not None and other.state == SUCCEEDED
        assert took < 1.5  # the only runner was free (it used to sleep 2 s for the retry)
        done = await queue.wait(failing.id, 30)
    assert done is not None and done.state == FAILED and done.attempts == 3
    assert not done.not_found
    times = [e["time"] for e in gets(upstream, "scene-a/B04")]
    assert len(times) == 3
    first, second = times[1] - times[0], times[2] - times[1]
    assert BACKOFF[0] * (1 - JITTER) - 0.1 <= first <= BACKOFF[0] * (1 + JITTER) + 0.5
    assert BACKOFF[1] * (1 - JITTER) - 0.1 <= second <= BACKOFF[1] * (1 + JITTER) + 0.5


@pytest.mark.anyio
async def test_rq_a_missing_object_fails_at_once_and_retries_are_jittered(
    upstream, redis_url, tmp_path
) -> None:
    doc = config(upstream.url, tmp_path, fresh_redis(redis_url))
    async with running(RQQueue(settings_of(doc).queue)) as queue:
        with fdp_worker(doc, tmp_path):
            info = await queue.submit("vault", "missing/b.tif", "alice", max_attempts=3)
            info = await queue.wait(info.id, 20)
            assert info is not None and info.state == FAILED
            assert info.not_found and info.attempts == 1
            assert len(gets(upstream, "missing/b.tif")) == 1
        # no worker now: these stay queued, with the retry schedule RQ will use
        schedules = set()
        for n in range(8):
            await queue.submit("cogs", f"later/{n}.tif", "alice", max_attempts=3)
            job = queue.queue.fetch_job(job_id("cogs", f"later/{n}.tif"))
            assert job is not None and job.retries_left == 2
            schedules.add(tuple(job.retry_intervals))
        assert len(schedules) > 1  # jittered per job


# -- owners ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_rq_owners_are_a_set_that_every_replica_adds_to(
    upstream, redis_url, tmp_path
) -> None:
    settings = settings_of(config(upstream.url, tmp_path, fresh_redis(redis_url)))
    users = [f"user-{n}" for n in range(16)]
    async with running(RQQueue(settings.queue)) as one, running(RQQueue(settings.queue)) as two:
        replicas = (one, two)
        first = await one.submit("vault", "archived-a/B04.tif", users[0], 3)
        job = one.queue.fetch_job(first.id)  # as a worker holds it while it runs
        assert job is not None
        async with anyio.create_task_group() as tg:
            for n, user in enumerate(users[1:], 1):
                tg.start_soon(replicas[n % 2].submit, "vault", "archived-a/B04.tif", user, 3)
        job.meta["bytes_done"] = 1  # the worker writes its (stale) meta as it pleases
        job.save_meta()
        for replica in replicas:
            info = await replica.get(first.id)
            assert info is not None and info.owners == sorted(users)


# -- the worker's heartbeat ------------------------------------------------------------------


class Crash(BaseException):
    """Something worse than an Exception, in the middle of a job."""


def beating_job() -> None:
    """Runs inside Worker: sees its heartbeat renew a short lease, then crashes."""
    job = get_current_job()
    assert job is not None
    registry = job.started_job_registry

    def expiry() -> float:
        [(_, score)] = registry.connection.zrange(registry.key, 0, -1, withscores=True)
        return score

    first = expiry()
    assert first <= time.time() + LEASE_SECONDS + 1  # not job_timeout + 60
    deadline = time.monotonic() + LEASE_SECONDS
    while expiry() == first and time.monotonic() < deadline:
        time.sleep(0.1)
    job.meta["renewed"] = expiry() > first
    job.meta["beating"] = any(t.name == "fdp-heartbeat" for t in threading.enumerate())
    job.save_meta()
    raise Crash


def test_a_worker_heartbeats_only_while_its_job_runs(redis_url) -> None:
    connection = redis_lib.Redis.from_url(fresh_redis(redis_url))
    queue = Queue(QUEUE_NAME, connection=connection)
    job = queue.enqueue(beating_job)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        Worker([queue], connection=connection).work(burst=True)
    finally:
        for sig, handler in handlers.items():  # RQ installs its own
            signal.signal(sig, handler)
    job.refresh()
    assert job.meta["renewed"] and job.meta["beating"]
    assert job.get_status() == "failed"
    assert not any(t.name == "fdp-heartbeat" and t.is_alive() for t in threading.enumerate())
    assert len(queue.started_job_registry) == 0


# -- a Redis that stops answering ------------------------------------------------------------


class Relay:
    """A TCP relay to Redis that can go silent like a vanished host: connections stay open,
    what is sent is swallowed, nothing comes back. `freeze()` silences the open connections
    (new ones pass); `silence()` silences every connection, present and future."""

    def __init__(self, target: str) -> None:
        self.target = target  # redis://host:port/db
        self.port = 0
        self.silent = False
        self.frozen: list[dict[str, bool]] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.accepted = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/{self.target.rsplit('/', 1)[1]}"

    def freeze(self) -> None:
        for conn in self.frozen:
            conn["frozen"] = True

    def silence(self) -> None:
        self.silent = True
        self.freeze()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Relay]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            for writer in self.writers:  # ends every pipe
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        conn = {"frozen": self.silent}
        self.frozen.append(conn)
        host, port = self.target.split("//", 1)[1].split("/", 1)[0].split(":")
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if not conn["frozen"]:
                        dst.write(data)
                        await dst.drain()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            up_writer.close()
            writer.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis server of this test's own."""
    server, url = start_redis(tmp_path / "redis")
    try:
        yield url
    finally:
        server.stop()


def subscribers(admin: redis_lib.Redis) -> int:
    [(_, count)] = admin.pubsub_numsub(CHANNEL)
    return int(count)


@pytest.mark.anyio
async def test_rq_a_silent_redis_is_queue_unavailable_in_seconds_and_the_loop_runs_on(
    redis_url,
) -> None:
    target = fresh_redis(redis_url)
    async with Relay(target).running() as relay:
        queue = RQQueue(QueueConfig(redis_url=relay.url, timeout_seconds=1.0))
        async with running(queue):
            assert await queue.problem() is None
            relay.silence()
            lags: list[float] = []
            outcomes: list[BaseException | None] = []

            async def ticker() -> None:
                while True:
                    t = time.monotonic()
                    await anyio.sleep(0.02)
                    lags.append(time.monotonic() - t - 0.02)

            async def submit(n: int) -> None:
                try:
                    await queue.submit("vault", f"x/{n}.tif", "alice", 3)
                    outcomes.append(None)
                except Exception as e:
                    outcomes.append(e)

            t = time.monotonic()
            async with anyio.create_task_group() as tg:
                tg.start_soon(ticker)
                async with anyio.create_task_group() as calls:
                    for n in range(20):  # more than the queue has threads
                        calls.start_soon(submit, n)
                tg.cancel_scope.cancel()
            took = time.monotonic() - t
            assert len(outcomes) == 20
            assert all(type(o).__name__ == "QueueUnavailable" for o in outcomes), outcomes
            assert took < 1.0 + 1.5  # one timeout, then the others fail fast
            assert max(lags) < 0.5  # the event loop never waited for Redis (1 s timeouts)
            t = time.monotonic()
            problem = await queue.problem()
            assert problem and "unavailable" in problem and time.monotonic() - t < 0.5


@pytest.mark.anyio
async def test_rq_announcements_survive_a_connection_that_went_silent(own_redis, caplog) -> None:
    target = own_redis  # subscribers are counted server-wide: no other proxy may listen
    admin = redis_lib.Redis.from_url(target)
    caplog.set_level(logging.INFO, logger="fdp.workers")
    async with Relay(target).running() as relay:
        queue = RQQueue(QueueConfig(redis_url=relay.url, timeout_seconds=1.0, poll_seconds=60))
        async with running(queue):
            await until(lambda: subscribers(admin) == 1, 5)
            relay.freeze()  # the subscription's connection now swallows everything
            t = time.monotonic()
            await until(lambda: subscribers(admin) == 2, PING_SECONDS + 1.0 + 5)  # resubscribed
            assert time.monotonic() - t < PING_SECONDS + 1.0 + RECONNECT_SECONDS[0] + 2
            with queue.waiters.waiting("some-job") as event:
                admin.publish(CHANNEL, "some-job")
                with anyio.fail_after(2):
                    await event.wait()
    warnings = [r for r in caplog.records if "announcements unavailable" in r.getMessage()]
    assert len(warnings) == 1
    assert any("announcements restored" in r.getMessage() for r in caplog.records)


@pytest.mark.anyio
async def test_rq_an_unreachable_redis_is_retried_with_back_off_and_one_log_line(
    redis_url, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="fdp.workers")
    async with Relay(fresh_redis(redis_url)).running() as relay:
        relay.silence()
        async with running(RQQueue(QueueConfig(redis_url=relay.url, timeout_seconds=0.5))):
            await until(lambda: relay.accepted >= 3, 15)  # tried again, and again
    warnings = [r for r in caplog.records if "announcements unavailable" in r.getMessage()]
    assert len(warnings) == 1  # at most one line a minute
