"""Upstream protection: per-origin caps on fetches at once and on bytes a second, shared by
proxies and workers through Redis (or within one process), measured at the upstream."""

from __future__ import annotations

import hashlib
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Upstream, fdp_serve
from tests.harness.procs import BIN, ServerProcess
from tests.test_queue import fresh_redis

SLOW = {"chunk_delay": 1.0}  # the demo upstream's 256 KiB chunks: ~3 s for a B04


def config(upstream: Upstream, work: Path, limit: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """`cached` and `direct` (pass-through) datasets on the demo upstream, capped by `limit`."""
    base = f"{upstream.url}/data/demo-cogs/"
    origin = upstream.url.split("//", 1)[1]
    return {
        "cache": {"store": str(work / "cache")},
        "upstream_limits": {origin: limit},
        "datasets": {
            "cached": {"upstream": {"http": {"base_url": base}}},
            "direct": {
                "upstream": {"http": {"base_url": base}},
                "retention": {"mode": "lru", "max_bytes": 0},
            },
            "vault": {"upstream": {"http": {"base_url": base}}, "archive": True},
        },
        **extra,
    }


def block_gets(upstream: Upstream, rel: str) -> list[dict[str, Any]]:
    """The upstream's GETs of `rel` other than 1-byte probes."""
    return [
        e
        for e in upstream.log(f"/data/demo-cogs/{rel}")
        if e["method"] == "GET" and e["range"] != "bytes=0-0"
    ]


def most_at_once(entries: list[dict[str, Any]]) -> int:
    """The most of these requests the upstream was sending at the same moment."""
    edges = sorted([(e["time"], 1) for e in entries] + [(e["last_byte"], -1) for e in entries])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_two_proxies_share_a_cap_on_fetches_at_once(upstream, redis_url, tmp_path):
    """Two fetches hold the origin's 2 slots (taken on proxy A); a third miss on proxy B
    waits its `wait_seconds`, then gets 503 + Retry-After without reaching the upstream."""
    redis = fresh_redis(redis_url)
    cfg = config(
        upstream, tmp_path, {"concurrent": 2, "wait_seconds": 1}, queue={"redis_url": redis}
    )
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = fdp_serve(cfg, tmp_path / "a"), fdp_serve(cfg, tmp_path / "b")
    upstream.fault("scene-[ab]/B04", method="GET", **SLOW)
    with a.proc, b.proc, ThreadPoolExecutor(2) as pool:
        slow = [
            pool.submit(httpx.get, f"{a.url}/assets/cached/scene-{s}/B04.tif", timeout=30)
            for s in "ab"
        ]
        wait_for(
            lambda: (
                len(block_gets(upstream, "scene-a/B04")) + len(block_gets(upstream, "scene-b/B04"))
                == 2
            )
        )
        t = time.monotonic()
        busy = httpx.get(f"{b.url}/assets/cached/scene-c/B04.tif", timeout=30)
        waited = time.monotonic() - t
        assert busy.status_code == 503, busy.headers
        assert busy.json()["type"].endswith("/upstream-busy")
        assert busy.headers["retry-after"] == "1"
        assert 0.9 <= waited < 3.0  # it waited for a slot, boundedly
        assert upstream.log("/data/demo-cogs/scene-c/") == []  # the provider never saw it
        for s, r in zip("ab", (f.result() for f in slow), strict=True):
            assert r.status_code == 200
            assert r.content == upstream.file(f"demo-cogs/scene-{s}/B04.tif")
        again = httpx.get(f"{b.url}/assets/cached/scene-c/B04.tif", timeout=30)
        assert again.content == upstream.file("demo-cogs/scene-c/B04.tif")  # slots freed


def test_a_byte_rate_cap_slows_every_fetch_from_the_origin_together(
    start_proxy, upstream, tmp_path
):
    """A cache fill and a pass-through read share 2 MiB/s: 7.3 MB take ~3.5 s, bytes intact."""
    cfg = config(upstream, tmp_path, {"bytes_per_second": "2MiB"})
    proxy = start_proxy(cfg)
    urls = [
        f"{proxy.url}/assets/cached/scene-a/visual.tif",
        f"{proxy.url}/assets/direct/scene-b/visual.tif",
    ]
    want = [
        upstream.file("demo-cogs/scene-a/visual.tif"),
        upstream.file("demo-cogs/scene-b/visual.tif"),
    ]
    t = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda u: httpx.get(u, timeout=30), urls))
    took = time.monotonic() - t
    assert [r.content for r in got] == want
    expected = sum(map(len, want)) / (2 << 20)
    assert expected * 0.85 <= took <= expected * 1.3, (took, expected)


def test_a_retrieval_job_waits_for_a_slot_held_by_a_proxy(upstream, redis_url, tmp_path):
    """One slot, shared through Redis: a worker's retrieval starts only once the proxy's
    pass-through read has let go of it, and then completes."""
    redis = fresh_redis(redis_url)
    cfg = config(
        upstream, tmp_path, {"concurrent": 1, "wait_seconds": 5}, queue={"redis_url": redis}
    )
    proxy = fdp_serve(cfg, tmp_path)
    worker = ServerProcess(
        f"worker-{secrets.token_hex(3)}",
        [str(BIN / "fdp"), "worker", "--config", str(proxy.config)],
        log_dir=tmp_path,
        ready=lambda: True,
    )
    upstream.fault("scene-a/B04", method="GET", **SLOW)
    with proxy.proc, worker, ThreadPoolExecutor(1) as pool:
        held = pool.submit(httpx.get, f"{proxy.url}/assets/direct/scene-a/B04.tif", timeout=30)
        wait_for(lambda: block_gets(upstream, "scene-a/B04"))
        job = httpx.get(f"{proxy.url}/assets/vault/scene-b/B04.tif", timeout=60)
        assert held.result().content == upstream.file("demo-cogs/scene-a/B04.tif")
        assert job.status_code == 200, job.headers
        assert job.content == upstream.file("demo-cogs/scene-b/B04.tif")
    gets = block_gets(upstream, "scene-a/B04") + block_gets(upstream, "scene-b/B04")
    assert len(gets) == 2 and most_at_once(gets) == 1


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_caps_whose_redis_never_answers_fetch_uncapped_or_refuse(
    start_proxy, upstream, blackhole, tmp_path, mode
):
    cfg = config(
        upstream,
        tmp_path,
        {"concurrent": 4},
        queue={"redis_url": blackhole.redis_url},
        qos={"on_redis_error": mode, "timeout_seconds": 0.3},
    )
    proxy = start_proxy(cfg)
    body = upstream.file("demo-cogs/scene-a/B04.tif")
    for dataset in ("cached", "direct"):
        t = time.monotonic()
        r = httpx.get(f"{proxy.url}/assets/{dataset}/scene-a/B04.tif", timeout=10)
        assert time.monotonic() - t < 3.0  # bounded by qos.timeout_seconds
        if mode == "open":
            assert (
                r.status_code == 200
                and hashlib.sha256(r.content).digest() == hashlib.sha256(body).digest()
            )
        else:
            assert r.status_code == 503 and r.headers["retry-after"] == "5"
            assert r.json()["type"].endswith("/upstream-busy")
    assert proxy.proc.log_text().count("upstream caps unavailable") == 1
