"""Every upstream call has a timeout, and blocking upstream work (boto3, EODAG) runs on each
upstream's own threads: an upstream that stops answering costs its own datasets a timeout,
and nobody else anything.

The stalled upstreams are a blackhole (accepts connections, never answers) standing in for
an S3 endpoint, an EODAG provider's STAC API and a plain HTTP server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
import yaml

from policies.config import Settings
from proxy.demo import providers_yaml
from tests.conftest import Proxy, Upstream
from tests.harness.stalls import Blackhole
from upstreams.base import Timeouts, UpstreamTimeout, run_blocking
from upstreams.registry import Registry, dataset_timeouts

TIMEOUT = 1.0  # connect and read timeout of the stalled datasets
#: The longest a stalled call may take: two attempts (botocore's and EODAG's retries are
#: cut to one), a short backoff, and slack for a busy machine.
BOUND = 2 * 2 * TIMEOUT + 2.0


# --- pieces, in-process ---------------------------------------------------------------------


def test_blocking_work_uses_its_own_threads_and_a_busy_upstream_fails_fast():
    async def go() -> None:
        limiter = anyio.CapacityLimiter(1)
        started, release = threading.Event(), threading.Event()

        def stalled() -> str:
            started.set()
            release.wait(10)
            return "done"

        shared = anyio.to_thread.current_default_thread_limiter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_blocking, limiter, 5.0, stalled)
            await anyio.to_thread.run_sync(started.wait, 5)
            assert limiter.borrowed_tokens == 1
            assert shared.borrowed_tokens == 0  # the shared pool is untouched
            t = time.monotonic()
            with pytest.raises(UpstreamTimeout, match="busy"):
                await run_blocking(limiter, 0.3, str, 1)
            assert 0.3 <= time.monotonic() - t < 1.0
            release.set()
        assert limiter.borrowed_tokens == 0
        assert await run_blocking(limiter, 1.0, str, 2) == "2"

    anyio.run(go)


def test_timeouts_default_and_per_dataset():
    settings = Settings.model_validate(
        {
            "upstream_defaults": {"connect_timeout": 2, "read_timeout": 20, "max_threads": 3},
            "datasets": {
                "plain": {"upstream": {"http": {"base_url": "http://127.0.0.1:9/"}}},
                "quick": {
                    "upstream": {"http": {"base_url": "http://127.0.0.1:9/"}},
                    "timeouts": {"read_timeout": 4},
                },
            },
        }
    )
    assert dataset_timeouts(settings, settings.datasets["plain"]) == Timeouts(2, 20)
    assert dataset_timeouts(settings, settings.datasets["quick"]) == Timeouts(2, 4)
    assert Settings().upstream_defaults.read_timeout == 30  # seconds, not minutes
    registry = Registry(settings)
    try:
        assert registry.get("quick").timeouts == Timeouts(2, 4)
    finally:
        registry.close()


# --- a real proxy ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stalled_proxy(
    upstream_server: Upstream,
    blackhole: Blackhole,
    start_proxy: Callable[..., Proxy],
    tmp_path_factory: pytest.TempPathFactory,
) -> Proxy:
    work = tmp_path_factory.mktemp("stalled")
    providers = yaml.safe_load(providers_yaml(upstream_server.url))
    stalled_provider = yaml.safe_load(providers_yaml(blackhole.url))["fdp_demo"]
    providers["stalled_stac"] = stalled_provider
    (work / "providers.yml").write_text(yaml.safe_dump(providers))
    quick = {"connect_timeout": TIMEOUT, "read_timeout": TIMEOUT}
    config: dict[str, Any] = {
        "cache": {"store": str(work / "cache")},
        "eodag": {"providers_file": str(work / "providers.yml")},
        "upstream_defaults": {"max_threads": 4},
        "datasets": {
            "files": {"upstream": {"http": {"base_url": f"{upstream_server.url}/data/demo-cogs"}}},
            "stalled-s3": {
                "upstream": {
                    "s3": {
                        "bucket": "data",
                        "endpoint_url": blackhole.url,
                        "access_key_id": "fdp-test",
                        "secret_access_key": "fdp-test-secret",
                    }
                },
                "timeouts": quick,
            },
            "stalled-stac": {
                "upstream": {"eodag": {"provider": "stalled_stac", "collection": "demo-cogs"}},
                "timeouts": quick,
            },
            "stalled-http": {
                "upstream": {"http": {"base_url": f"{blackhole.url}/data/"}},
                "timeouts": quick,
            },
        },
    }
    return start_proxy(config)


def _timed_get(url: str, out: list[tuple[int, float]]) -> None:
    t = time.monotonic()
    r = httpx.get(url, timeout=60)
    out.append((r.status_code, time.monotonic() - t))
    assert r.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("dataset", ["stalled-s3", "stalled-stac", "stalled-http"])
def test_stalled_upstream_answers_a_gateway_error_in_about_its_timeout(
    stalled_proxy, blackhole, dataset
):
    before = blackhole.connections()
    out: list[tuple[int, float]] = []
    _timed_get(f"{stalled_proxy.url}/assets/{dataset}/scene-a/B04.tif", out)
    (status, took) = out[0]
    assert status in (502, 504)
    assert TIMEOUT * 0.9 <= took < BOUND, took
    assert blackhole.connections() > before  # the stalled upstream was really asked


def test_other_datasets_stay_fast_while_one_upstream_stalls(stalled_proxy, upstream):
    """Twenty requests hang on the stalled S3 endpoint (more than its 4 threads) and on the
    stalled catalogue; meanwhile the http dataset answers every request quickly."""
    with httpx.Client(base_url=stalled_proxy.url, timeout=10) as c:
        warm = c.get("/assets/files/scene-a/B04.tif", headers={"Range": "bytes=0-16383"})
        assert warm.status_code == 206
    stalled: list[tuple[int, float]] = []
    threads = [
        threading.Thread(
            target=_timed_get,
            args=(f"{stalled_proxy.url}/assets/{ds}/scene-{i}/B04.tif", stalled),
        )
        for i in range(10)
        for ds in ("stalled-s3", "stalled-stac")
    ]
    for t in threads:
        t.start()
    fast: list[float] = []
    data = upstream.file("demo-cogs/scene-a/B04.tif")
    with httpx.Client(base_url=stalled_proxy.url, timeout=10) as c:
        time.sleep(0.2)  # let the stalled requests reach their upstreams
        deadline = time.monotonic() + 2 * TIMEOUT
        i = 0
        while time.monotonic() < deadline:
            start = (i * 4096) % (len(data) - 4096)
            t = time.monotonic()
            r = c.get(
                "/assets/files/scene-a/B04.tif",
                headers={"Range": f"bytes={start}-{start + 4095}"},
            )
            fast.append(time.monotonic() - t)
            assert r.status_code == 206 and r.content == data[start : start + 4096]
            i += 1
    for t in threads:
        t.join(30)
    assert len(stalled) == len(threads)
    assert all(status in (502, 504) for status, _ in stalled), stalled
    # queued requests wait for a thread at most one call's time, then run one call
    assert max(took for _, took in stalled) < BOUND + 2 * TIMEOUT, stalled
    fast.sort()
    p99 = fast[int(len(fast) * 0.99) - 1] if len(fast) >= 100 else fast[-1]
    assert len(fast) >= 20 and p99 < 0.1, (len(fast), p99, fast[-5:])
