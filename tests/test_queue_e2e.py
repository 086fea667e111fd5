"""The queue through `fdp serve` (and `fdp worker`): what users and operators see.

Missing objects cannot clog the queue; every user who joined a job on any replica can read
it; Ctrl+C stops the embedded proxy mid-retrieval; a Redis that stops answering is a quick
503 for slow data and blocks nothing else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_lib

from tests.conftest import NO_CACHE, fdp_serve
from tests.harness.procs import BIN, ServerProcess, worker_process
from tests.harness.services import start_redis
from tests.test_queue import config, fresh_redis, gets

ARCHIVE_DELAY = 5.0  # the demo upstream stages an archived file for this long
REAL = "archived-a/B04.tif"


@pytest.fixture(params=["embedded", "rq"])
def backend(request, redis_url, tmp_path) -> Iterator[tuple[str | None, list[ServerProcess]]]:
    """The queue's Redis (None: embedded) and the `fdp worker`s to stop afterwards."""
    workers: list[ServerProcess] = []
    yield (fresh_redis(redis_url) if request.param == "rq" else None), workers
    for worker in workers:
        worker.stop()


def worker(config_path: Path, log_dir: Path) -> ServerProcess:
    return worker_process(config_path, log_dir, f"worker-{time.monotonic_ns()}").start()


def test_missing_objects_do_not_delay_a_real_retrieval(
    start_proxy, upstream, tmp_path, backend
) -> None:
    redis, workers = backend
    proxy = start_proxy(config(upstream.url, tmp_path, redis))
    if redis:
        workers.append(worker(proxy.config, tmp_path))
    base = f"{proxy.url}/assets/vault"

    def missing(n: int) -> httpx.Response:  # anonymous, as a scanner would
        return httpx.get(f"{base}/missing/m-{n}.tif", headers={"Prefer": "respond-async"})

    with ThreadPoolExecutor(20) as pool:
        first = list(pool.map(missing, range(20)))
    assert all(r.status_code in (202, 404) for r in first)  # 404 when the proxy checks first
    t = time.monotonic()
    r = httpx.get(f"{base}/{REAL}", timeout=60)  # held while the archive stages it
    took = time.monotonic() - t
    assert r.status_code == 200 and r.content == upstream.file(f"demo-archive/{REAL}")
    assert took < ARCHIVE_DELAY + 3  # about its normal time
    again = httpx.get(f"{base}/missing/m-0.tif", timeout=60)
    assert again.status_code == 404  # not a 502 after retries
    for n in range(20):
        assert len(gets(upstream, f"missing/m-{n}.tif")) <= 1  # never retried


def test_every_user_who_joined_a_job_on_any_replica_can_read_it(
    start_proxy, upstream, redis_url, oidc, tmp_path
) -> None:
    doc = config(upstream.url, tmp_path, fresh_redis(redis_url))
    doc["auth"] = {"oidc_issuer": oidc.issuer, "audience": "fdp"}
    replicas = [start_proxy(doc), start_proxy(dict(doc))]  # no worker: the job stays queued
    users = ["alice", "bob", "carol", "dave", "erin", "frank"]
    tokens = {user: oidc.token(sub=user) for user in [*users, "mallory"]}

    def join(n: int) -> httpx.Response:
        replica = replicas[n % 2]
        return httpx.get(
            f"{replica.url}/assets/vault/{REAL}",
            headers={"Prefer": "respond-async", "Authorization": f"Bearer {tokens[users[n]]}"},
        )

    with ThreadPoolExecutor(len(users)) as pool:  # all at once, through both replicas
        joined = list(pool.map(join, range(len(users))))
    assert all(r.status_code == 202 for r in joined)
    jobs = {r.headers["location"].rsplit("/", 1)[1] for r in joined}
    assert len(jobs) == 1
    (job,) = jobs

    def status(replica: Any, user: str | None) -> int:
        headers = {"Authorization": f"Bearer {tokens[user]}"} if user else {}
        return httpx.get(f"{replica.url}/jobs/{job}", headers=headers).status_code

    for replica in replicas:
        for user in users:
            assert status(replica, user) == 200, (replica.url, user)
        assert status(replica, "mallory") == 404  # never joined
        assert status(replica, None) == 404


def test_ctrl_c_stops_the_embedded_proxy_during_a_retrieval(upstream, tmp_path) -> None:
    upstream.fault("archived-a/B04", method="GET", delay=60)  # the archive stalls
    proxy = fdp_serve(config(upstream.url, tmp_path), tmp_path)
    with proxy.proc:
        r = httpx.get(f"{proxy.url}/assets/vault/{REAL}", headers={"Prefer": "respond-async"})
        assert r.status_code == 202
        deadline = time.monotonic() + 10
        while not gets(upstream, REAL):  # the job is waiting for the archive's bytes
            assert time.monotonic() < deadline
            time.sleep(0.05)
        t = time.monotonic()
        os.kill(proxy.proc.pid, signal.SIGINT)
        try:
            proxy.proc.proc.wait(10)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            pytest.fail("fdp serve was still running 10 s after Ctrl+C")
        took = time.monotonic() - t
    assert took < 5, f"Ctrl+C took {took:.1f} s"
    ls = subprocess.run(
        [BIN / "fdp", "cache", "ls", "--config", proxy.config],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert REAL not in ls.stdout  # nothing half-retrieved was kept


def test_a_redis_that_stops_answering_is_a_quick_503_and_blocks_nothing(
    start_proxy, upstream, tmp_path
) -> None:
    server, url = start_redis(tmp_path / "redis")
    try:
        doc = config(upstream.url, tmp_path, url)
        doc["datasets"]["files"] = {
            "upstream": {"http": {"base_url": f"{upstream.url}/data/demo-cogs/"}},
            "retention": NO_CACHE,
        }
        proxy = start_proxy(doc)
        assert httpx.get(f"{proxy.url}/readyz").json()["checks"]["queue"]["ok"] is True
        pause = 6.0
        redis_lib.Redis.from_url(url).execute_command("CLIENT", "PAUSE", int(pause * 1000), "ALL")
        paused = time.monotonic()
        slow_url = f"{proxy.url}/assets/vault/{REAL}"
        with ThreadPoolExecutor(8) as pool:
            slow = [pool.submit(httpx.get, slow_url, timeout=30) for _ in range(6)]
            ready = pool.submit(httpx.get, f"{proxy.url}/readyz", timeout=30)
            while not all(f.done() for f in slow):  # meanwhile everything else answers at once
                t = time.monotonic()
                assert httpx.get(f"{proxy.url}/healthz", timeout=5).status_code == 200
                part = httpx.get(
                    f"{proxy.url}/assets/files/scene-a/B04.tif",
                    headers={"Range": "bytes=0-99"},
                    timeout=5,
                )
                assert part.status_code == 206
                assert time.monotonic() - t < 1.0  # a queue call would take 2 s
            answered = time.monotonic() - paused
            for f in slow:
                r = f.result()
                assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
                assert "queue is unavailable" in r.json()["detail"]
            readiness = ready.result().json()["checks"]["queue"]
        assert answered < 2.0 + 2.0  # queue.timeout_seconds, then fail fast: well inside the pause
        assert readiness["ok"] is False and readiness["error"]
        redis_lib.Redis.from_url(url, socket_timeout=pause + 5).ping()  # answered once unpaused
        deadline = time.monotonic() + 15
        while (r := httpx.get(slow_url, headers={"Prefer": "respond-async"})).status_code != 202:
            assert r.status_code == 503 and time.monotonic() < deadline  # until the cool-down
            time.sleep(0.5)
    finally:
        server.stop()
