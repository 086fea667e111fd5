"""Stopping a proxy as Kubernetes does: SIGTERM, readiness off, in-flight responses finish."""

from __future__ import annotations

import hashlib
import signal
import socket
import threading
import time

import httpx

from tests.conftest import NO_CACHE, fdp_serve
from tests.harness.procs import worker_process
from tests.test_async import archive_config
from tests.test_queue import fresh_redis

FILE = "demo-cogs/scene-a/visual.tif"


def _config(upstream, work, **server):
    return {
        "server": server,
        "cache": {"store": str(work / "cache")},
        "datasets": {
            "files": {
                "upstream": {"http": {"base_url": f"{upstream.url}/data/demo-cogs"}},
                "retention": NO_CACHE,
            }
        },
    }


def _refused(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return True
    return False


def _download(url: str, out: dict) -> None:
    try:
        with httpx.stream("GET", url, timeout=60) as r:
            out["status"] = r.status_code
            out["body"] = b"".join(r.iter_bytes())
    except httpx.HTTPError as e:
        out["error"] = type(e).__name__


def test_sigterm_drains_then_lets_downloads_finish(upstream, tmp_path):
    upstream.fault("^/data/demo-cogs/scene-a/visual.tif$", chunk_delay=0.25)  # a slow body
    proxy = fdp_serve(_config(upstream, tmp_path, drain_seconds=2, grace_seconds=30), tmp_path)
    with proxy.proc:
        assert httpx.get(f"{proxy.url}/readyz").status_code == 200
        url = f"{proxy.url}/assets/files/scene-a/visual.tif"
        out: dict = {}
        download = threading.Thread(target=_download, args=(url, out))
        download.start()
        deadline = time.monotonic() + 10
        while not upstream.data_requests() and time.monotonic() < deadline:
            time.sleep(0.02)  # the download is under way
        proxy.proc._signal(signal.SIGTERM)
        stopped = time.monotonic()
        r = httpx.get(f"{proxy.url}/readyz")
        assert r.status_code == 503 and r.json()["status"] == "draining"
        # still served while draining: load balancers are catching up
        assert httpx.get(f"{proxy.url}/assets/files/scene-b/B04.tif").status_code == 200
        while not _refused(proxy.url):
            assert time.monotonic() - stopped < 6, "the listener never closed"
            time.sleep(0.05)
        assert time.monotonic() - stopped >= 1.5  # not before the drain was over
        download.join(60)
        assert out.get("status") == 200 and "error" not in out
        expected = upstream.file(FILE)
        assert hashlib.sha256(out["body"]).digest() == hashlib.sha256(expected).digest()
        # uvicorn ends by re-raising the signal it caught, once everything is closed
        assert proxy.proc.proc.wait(30) in (0, -signal.SIGTERM)


def test_the_grace_period_bounds_a_stop(upstream, tmp_path):
    upstream.fault("^/data/demo-cogs/scene-a/visual.tif$", chunk_delay=2)  # minutes long
    proxy = fdp_serve(_config(upstream, tmp_path, grace_seconds=1), tmp_path)
    with proxy.proc:
        out: dict = {}
        download = threading.Thread(
            target=_download, args=(f"{proxy.url}/assets/files/scene-a/visual.tif", out)
        )
        download.start()
        deadline = time.monotonic() + 10
        while not upstream.data_requests() and time.monotonic() < deadline:
            time.sleep(0.02)
        proxy.proc._signal(signal.SIGTERM)
        stopped = time.monotonic()
        proxy.proc.proc.wait(15)
        assert time.monotonic() - stopped < 8  # the grace period, then the cut
        download.join(30)
        assert "error" in out  # the client learns the body is incomplete, never a short 200


def test_a_worker_told_to_stop_finishes_its_job_first(start_proxy, upstream, redis_url, tmp_path):
    config = archive_config(upstream.url, tmp_path, fresh_redis(redis_url))
    proxy = start_proxy(config)
    worker = worker_process(proxy.config, tmp_path, "worker").start()
    try:
        url = f"{proxy.url}/assets/archive/archived-a/visual"
        job = httpx.get(url, headers={"Prefer": "respond-async"}).headers["location"]
        deadline = time.monotonic() + 20
        while not [e for e in upstream.data_requests() if e["method"] == "GET"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        worker._signal(signal.SIGTERM)  # mid-job: the archive takes seconds to answer
        assert worker.proc.wait(60) in (0, 1, -signal.SIGTERM)
        status = httpx.get(job)
        assert status.status_code == 303, status.text  # done before the worker left
    finally:
        worker.stop()
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == upstream.file("demo-archive/archived-a/visual.tif")


def test_a_worker_that_cannot_finish_in_its_grace_hands_the_job_back(
    start_proxy, upstream, redis_url, tmp_path
):
    config = archive_config(upstream.url, tmp_path, fresh_redis(redis_url))
    config["queue"]["worker_grace_seconds"] = 1  # the archive takes 5 s to answer
    proxy = start_proxy(config)
    worker = worker_process(proxy.config, tmp_path, "worker-a").start()
    url = f"{proxy.url}/assets/archive/archived-b/visual"
    try:
        job = httpx.get(url, headers={"Prefer": "respond-async"}).headers["location"]
        deadline = time.monotonic() + 20
        while not [e for e in upstream.data_requests() if e["method"] == "GET"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        worker._signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert worker.proc.wait(15) == 0
        assert time.monotonic() - stopped < 4  # the grace, not the job, set the pace
        assert httpx.get(job).json()["state"] == "queued"  # back in the queue at once
    finally:
        worker.stop()
    with worker_process(proxy.config, tmp_path, "worker-b"):
        deadline = time.monotonic() + 40
        while (status := httpx.get(job)).status_code != 303:
            assert status.json()["state"] in ("queued", "running"), status.text
            assert time.monotonic() < deadline
            time.sleep(0.2)
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == upstream.file("demo-archive/archived-b/visual.tif")
