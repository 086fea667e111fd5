"""`/metrics` after known traffic, parsed with prometheus-client's own parser: requests by
dataset, method, status class and delivery, bytes, QoS refusals, upstream answers, cache
contents, jobs; and one set of figures for all the processes of `fdp serve --workers 2`."""

from __future__ import annotations

import math
import time
from typing import Any

import httpx
import pytest
import redis as redis_lib
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Upstream, fdp_serve
from tests.test_queue import fresh_redis
from workers.stats import JobStats

B04 = "scene-a/B04.tif"


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all(dict(ls).get(k) == w for k, w in labels.items())
    )


def config(upstream: Upstream, work: Any) -> dict[str, Any]:
    files = {"http": {"base_url": f"{upstream.url}/data/demo-cogs/"}}
    return {
        "cache": {"store": str(work / "cache")},
        "datasets": {
            "cached": {"upstream": files},
            "limited": {"upstream": files, "qos": {"requests_per_minute": 1}},
            "vault": {"upstream": files, "archive": True},
        },
    }


def test_metrics_count_known_traffic(start_proxy, upstream, tmp_path):
    proxy = start_proxy(config(upstream, tmp_path))
    body = upstream.file(f"demo-cogs/{B04}")
    assert httpx.get(f"{proxy.url}/assets/cached/{B04}").content == body  # a miss
    for _ in range(2):  # two hits
        assert (
            httpx.get(
                f"{proxy.url}/assets/cached/{B04}", headers={"range": "bytes=0-9"}
            ).status_code
            == 206
        )
    assert httpx.get(f"{proxy.url}/assets/limited/{B04}").status_code == 200
    assert httpx.get(f"{proxy.url}/assets/limited/{B04}").status_code == 429
    assert httpx.get(f"{proxy.url}/assets/nope/x.tif").status_code == 404
    retrieved = httpx.get(f"{proxy.url}/assets/vault/scene-b/B04.tif", timeout=60)  # a job
    assert retrieved.status_code == 200

    m = scrape(proxy.url)
    req = "fdp_requests_total"
    assert value(m, req, dataset="cached", method="GET", status_class="2xx", cache="miss") == 1
    assert value(m, req, dataset="cached", method="GET", status_class="2xx", cache="hit") == 2
    assert total(m, req, dataset="limited", status_class="4xx") == 1
    assert value(m, req, dataset="(none)", method="GET", status_class="4xx", cache="none") == 1
    assert value(m, "fdp_response_bytes_total", dataset="cached", cache="miss") == len(body)
    assert value(m, "fdp_response_bytes_total", dataset="cached", cache="hit") == 20
    assert value(m, "fdp_qos_rejections_total", dataset="limited", kind="requests") == 1
    assert value(m, "fdp_qos_admissions_total", dataset="limited") == 1
    origin = upstream.url.split("//", 1)[1]
    assert value(m, "fdp_upstream_response_seconds_count", upstream=origin) >= 3
    assert value(m, "fdp_cache_objects", dataset="cached") == 1
    assert value(m, "fdp_cache_bytes", dataset="cached") == len(body)
    assert value(m, "fdp_cache_objects", dataset="vault") == 1
    assert value(m, "fdp_job_attempts_total", outcome="succeeded") == 1
    assert value(m, "fdp_job_duration_seconds_count") == 1
    assert value(m, "fdp_jobs_queued") == 0
    # bounded labels: no path, item or user ever becomes a label value
    assert not any("/" in v for (_, labels) in m for _, v in labels)


def test_worker_processes_report_one_set_of_figures(upstream, tmp_path):
    proxy = fdp_serve(config(upstream, tmp_path), tmp_path, "--workers", "2")
    with proxy.proc:
        for _ in range(20):  # spread over both processes by the kernel
            r = httpx.get(f"{proxy.url}/assets/cached/{B04}", headers={"range": "bytes=0-9"})
            assert r.status_code == 206
        deadline = time.monotonic() + 5
        while total(scrape(proxy.url), "fdp_requests_total", dataset="cached") != 20:
            assert time.monotonic() < deadline  # each process publishes its counts each second
            time.sleep(0.2)
        for _ in range(4):  # whichever process answers the scrape: the same sums
            m = scrape(proxy.url)
            assert total(m, "fdp_requests_total", dataset="cached") == 20
            assert total(m, "fdp_response_bytes_total", dataset="cached") == 200


@pytest.mark.parametrize("shared", [False, True])
def test_job_stats_add_up_attempts_from_every_worker(redis_url, shared):
    client = redis_lib.Redis.from_url(fresh_redis(redis_url)) if shared else None
    workers = [JobStats(client) for _ in range(2)] if shared else [JobStats()] * 2
    workers[0].record("succeeded", 0.5)
    workers[1].record("retried", 20.0)
    workers[1].record("failed", 4000.0)
    outcomes, buckets, seconds = JobStats(client).snapshot() if shared else workers[0].snapshot()
    assert outcomes == {"succeeded": 1, "failed": 1, "retried": 1}
    assert dict(buckets) == {1: 1, 5: 1, 15: 1, 60: 2, 300: 2, 900: 2, 3600: 2, math.inf: 3}
    assert seconds == pytest.approx(4020.5)


def test_metrics_with_a_redis_that_never_answers(start_proxy, upstream, blackhole, tmp_path):
    """The queue's Redis is silent: /metrics still answers, boundedly, without the job
    figures it cannot read."""
    cfg = config(upstream, tmp_path)
    cfg["queue"] = {"redis_url": blackhole.redis_url, "timeout_seconds": 0.5}
    del cfg["datasets"]["vault"]
    proxy = start_proxy(cfg)
    assert httpx.get(f"{proxy.url}/assets/cached/{B04}").status_code == 200
    t = time.monotonic()
    m = scrape(proxy.url)
    assert time.monotonic() - t < 5.0
    assert (
        value(
            m,
            "fdp_requests_total",
            dataset="cached",
            method="GET",
            status_class="2xx",
            cache="miss",
        )
        == 1
    )
    assert not any(name.startswith("fdp_job") for name, _ in m)
