"""Slow archives: retrieval jobs on both queue backends, held requests, 202/503, /jobs."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from proxy.demo import providers_yaml
from tests.harness.procs import BIN, ServerProcess, worker_process
from tests.test_queue import fresh_redis  # one database counter for every module

ARCHIVE_DELAY = 5.0  # the demo upstream stages an archived file for this long


def archive_config(upstream_url, work, redis_url=None, **async_policy):
    (work / "providers.yml").write_text(providers_yaml(upstream_url))
    return {
        "cache": {"store": str(work / "cache")},
        "queue": {"redis_url": redis_url},
        "eodag": {"providers_file": str(work / "providers.yml")},
        "datasets": {
            "archive": {
                "upstream": {"eodag": {"provider": "fdp_demo", "collection": "demo-archive"}},
                "archive": True,
                "async": async_policy,
            },
            "orderable": {
                "upstream": {"eodag": {"provider": "fdp_demo", "collection": "demo-orderable"}},
                "async": async_policy,
            },
        },
    }


@pytest.fixture(params=["embedded", "rq"])
def backend(request, redis_url, tmp_path):
    """Start proxies (and, for RQ, one `fdp worker`) on the chosen queue backend."""
    workers: list[ServerProcess] = []

    def worker(config_path):
        proc = worker_process(config_path, tmp_path, f"worker-{len(workers)}")
        workers.append(proc.start())
        time.sleep(0.5)
        return proc

    yield request.param, (redis_url if request.param == "rq" else None), worker
    for w in workers:
        w.stop()


def start(start_proxy, upstream, tmp_path, backend, **async_policy):
    _, redis, worker = backend
    if redis:
        redis = fresh_redis(redis)
    config = archive_config(upstream.url, tmp_path, redis, **async_policy)
    proxy = start_proxy(config)
    if redis:
        worker(proxy.config)
    return proxy


def source(upstream, rel):
    return upstream.file(f"demo-archive/{rel}")


def test_head_is_immediate_and_unmodified_gdal_reads_a_5s_archive(
    start_proxy, upstream, tmp_path, backend
):
    proxy = start(start_proxy, upstream, tmp_path, backend, hold_seconds=25)
    url = f"{proxy.url}/assets/archive/archived-a/B04"
    t = time.monotonic()
    head = httpx.head(url)
    assert time.monotonic() - t < 1.0
    assert head.status_code == 200
    assert int(head.headers["content-length"]) == len(source(upstream, "archived-a/B04.tif"))
    window = Window(10, 20, 200, 100)
    with rasterio.open(upstream.data / "demo-archive/archived-a/B04.tif") as src:
        want = src.read(1, window=window)
    t = time.monotonic()
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), rasterio.open(url) as remote:
        got = remote.read(1, window=window)
    assert time.monotonic() - t >= ARCHIVE_DELAY - 1  # it really waited for the archive
    np.testing.assert_array_equal(got, want)
    gets = [e for e in upstream.data_requests() if e["method"] == "GET"]
    assert len(gets) == 1 and gets[0]["range"] is None  # one whole retrieval, no ranges


def test_gdal_with_documented_retry_settings_outlasts_the_hold(
    start_proxy, upstream, tmp_path, backend
):
    proxy = start(start_proxy, upstream, tmp_path, backend, hold_seconds=1, retry_after=1)
    url = f"{proxy.url}/assets/archive/archived-b/B04"
    r = httpx.get(url, headers={"Range": "bytes=0-99"})
    assert r.status_code == 202 and r.headers["location"].startswith(f"{proxy.url}/jobs/")
    assert 1 <= int(r.headers["retry-after"]) <= 3600
    env = {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "GDAL_HTTP_MAX_RETRY": "10",
        "GDAL_HTTP_RETRY_DELAY": "1",
        "GDAL_HTTP_RETRY_CODES": "202",
    }
    with rasterio.Env(**env), rasterio.open(url) as remote:
        got = remote.read(1, window=Window(0, 0, 64, 64))
    with rasterio.open(upstream.data / "demo-archive/archived-b/B04.tif") as src:
        np.testing.assert_array_equal(got, src.read(1, window=Window(0, 0, 64, 64)))


def test_respond_async_then_poll_the_job_and_follow_the_303(
    start_proxy, upstream, tmp_path, backend
):
    proxy = start(start_proxy, upstream, tmp_path, backend)
    url = f"{proxy.url}/assets/archive/archived-a/visual"
    r = httpx.get(url, headers={"Prefer": "respond-async"})
    assert r.status_code == 202
    assert r.headers["preference-applied"] == "respond-async"
    job = r.headers["location"]
    assert r.json()["state"] in ("queued", "running")
    deadline = time.monotonic() + 30
    while True:
        status = httpx.get(job)
        if status.status_code == 303:
            break
        assert status.status_code == 200 and status.json()["state"] in ("queued", "running")
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert status.headers["location"] == url
    data = httpx.get(status.headers["location"], headers={"Range": "bytes=100-199"})
    assert data.status_code == 206
    assert data.content == source(upstream, "archived-a/visual.tif")[100:200]
    assert httpx.get(f"{proxy.url}/jobs/{'0' * 32}").status_code == 404


def test_not_ready_status_503_with_wait_preference(start_proxy, upstream, tmp_path, backend):
    proxy = start(start_proxy, upstream, tmp_path, backend, not_ready_status=503)
    t = time.monotonic()
    r = httpx.get(f"{proxy.url}/assets/archive/archived-b/visual", headers={"Prefer": "wait=1"})
    assert 0.9 <= time.monotonic() - t < 4  # the hold was shortened to 1 s
    assert r.status_code == 503 and "retry-after" in r.headers and "location" in r.headers
    assert "preference-applied" not in r.headers


def test_a_failed_retrieval_is_a_502_and_a_later_request_tries_again(
    start_proxy, upstream, tmp_path, backend
):
    proxy = start(start_proxy, upstream, tmp_path, backend, max_attempts=2)
    upstream.fault("archived-a/B04", status=500)
    r = httpx.get(f"{proxy.url}/assets/archive/archived-a/B04", timeout=60)
    assert r.status_code == 502
    body = r.json()
    assert body["title"] == "Bad Gateway" and "500" in body["detail"]
    assert "2 attempts" in body["detail"]
    assert len([e for e in upstream.data_requests() if e["method"] == "GET"]) == 2
    upstream.reset()
    r = httpx.get(f"{proxy.url}/assets/archive/archived-a/B04", timeout=60)
    assert r.status_code == 200 and r.content == source(upstream, "archived-a/B04.tif")


def test_many_requests_on_two_replicas_make_one_retrieval(
    start_proxy, upstream, redis_url, tmp_path
):
    redis = fresh_redis(redis_url)
    config = archive_config(upstream.url, tmp_path, redis)
    first = start_proxy(config)
    second = start_proxy(dict(config))
    worker = worker_process(first.config, tmp_path, "worker")
    with worker:

        def get(n):
            proxy = (first, second)[n % 2]
            return httpx.get(
                f"{proxy.url}/assets/archive/archived-b/B04",
                headers={"Range": f"bytes={n}-{n + 99}"},
                timeout=60,
            )

        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(get, range(20)))
    data = source(upstream, "archived-b/B04.tif")
    for n, r in enumerate(results):
        assert r.status_code == 206 and r.content == data[n : n + 100]
    assert len([e for e in upstream.data_requests() if e["method"] == "GET"]) == 1


def test_a_worker_killed_mid_job_leaves_nothing_and_another_takes_over(
    start_proxy, upstream, redis_url, tmp_path
):
    import os
    import signal
    import subprocess

    redis = fresh_redis(redis_url)
    config = archive_config(upstream.url, tmp_path, redis)
    proxy = start_proxy(config)
    first = worker_process(proxy.config, tmp_path, "worker-a").start()
    url = f"{proxy.url}/assets/archive/archived-b/visual"
    job = httpx.get(url, headers={"Prefer": "respond-async"}).headers["location"]
    deadline = time.monotonic() + 20
    while not [e for e in upstream.data_requests() if e["method"] == "GET"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert httpx.get(job).json()["state"] == "running"
    os.killpg(first.pid, signal.SIGKILL)  # mid-download: the archive takes 5 s to answer
    first.proc.wait(5)
    ls = subprocess.run(
        [BIN / "fdp", "cache", "ls", "--config", proxy.config],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "archived-b/visual" not in ls.stdout  # no partial entry
    with worker_process(proxy.config, tmp_path, "worker-b"):
        deadline = time.monotonic() + 40
        while (status := httpx.get(job)).status_code != 303:
            assert status.json()["state"] in ("queued", "running"), status.text
            assert time.monotonic() < deadline
            time.sleep(0.5)
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == source(upstream, "archived-b/visual.tif")
    assert len([e for e in upstream.data_requests() if e["method"] == "GET"]) == 2


def test_eodag_orderable_item_full_cycle(start_proxy, upstream, tmp_path, backend):
    """order -> poll (honouring Retry-After) -> download, through EODAG's downloader."""
    proxy = start(start_proxy, upstream, tmp_path, backend)
    url = f"{proxy.url}/assets/orderable/offline-a/visual"
    head = httpx.head(url)  # at once, from the catalogue
    assert head.status_code == 200
    want = upstream.file("demo-orderable/offline-a/visual.tif")
    assert int(head.headers["content-length"]) == len(want)
    r = httpx.get(url, headers={"Range": "bytes=0-1023"}, timeout=60)  # held ~3 s
    assert r.status_code == 206 and r.content == want[:1024]
    log = upstream.log("/orders/")
    methods = [e["method"] for e in log]
    assert methods[0] == "POST" and methods.count("POST") == 1 and methods.count("GET") >= 1
    gets = [e for e in upstream.data_requests() if e["method"] == "GET"]
    assert len(gets) == 1  # downloaded once the order succeeded, never before
    order_post = next(e["time"] for e in log if e["method"] == "POST")
    assert gets[0]["time"] - order_post >= 2.5  # waited for the order's 3 s


def test_large_objects_go_to_a_job_when_the_policy_says_so(start_proxy, upstream, tmp_path):
    (tmp_path / "providers.yml").write_text(providers_yaml(upstream.url))
    config = {
        "cache": {"store": str(tmp_path / "cache")},
        "eodag": {"providers_file": str(tmp_path / "providers.yml")},
        "datasets": {
            "scenes": {
                "upstream": {"eodag": {"provider": "fdp_demo", "collection": "demo-cogs"}},
                "async": {"background_above": "1MiB"},  # visual ~3.5 MiB, B04 ~0.6 MiB
            },
        },
    }
    proxy = start_proxy(config)
    big = httpx.get(
        f"{proxy.url}/assets/scenes/scene-a/visual", headers={"Prefer": "respond-async"}
    )
    assert big.status_code == 202 and "/jobs/" in big.headers["location"]
    small = httpx.get(f"{proxy.url}/assets/scenes/scene-a/B04", headers={"Prefer": "respond-async"})
    assert small.status_code == 200  # under the threshold: served on the request
    assert small.content == upstream.file("demo-cogs/scene-a/B04.tif")


def test_redis_down_is_a_503_for_slow_data_only(start_proxy, upstream, tmp_path):
    from tests.harness.procs import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    proxy = start_proxy(archive_config(upstream.url, tmp_path, dead))
    url = f"{proxy.url}/assets/archive/archived-a/B04"
    assert httpx.head(url).status_code == 200  # HEAD needs no queue
    r = httpx.get(url)
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.headers["content-type"] == "application/problem+json"
    assert "queue is unavailable" in r.json()["detail"]
    ready = httpx.get(f"{proxy.url}/readyz").json()["checks"]["queue"]
    assert ready["ok"] is False and ready["backend"] == "redis"
    assert "Traceback" not in proxy.proc.log_text()


def test_a_finished_job_wakes_held_requests_at_once(start_proxy, upstream, redis_url, tmp_path):
    """Completion travels by Redis pub/sub: with polling every 60 s, the hold still ends."""
    config = archive_config(upstream.url, tmp_path, fresh_redis(redis_url))
    config["queue"]["poll_seconds"] = 60
    proxy = start_proxy(config)
    with worker_process(proxy.config, tmp_path, "worker"):
        t = time.monotonic()
        r = httpx.get(f"{proxy.url}/assets/archive/archived-b/B04", timeout=60)
        took = time.monotonic() - t
    assert r.status_code == 200 and r.content == source(upstream, "archived-b/B04.tif")
    assert ARCHIVE_DELAY - 1 < took < ARCHIVE_DELAY + 5  # far from the 60 s poll
