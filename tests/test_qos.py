"""QoS through real proxies: request and miss limits per user, group and address, in
memory and shared by two processes through one Redis, and what a failing Redis does."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from policies.config import Qos, Settings
from proxy.app import create_app
from tests.conftest import fdp_serve
from tests.harness.procs import BIN

B04 = "scene-a/B04.tif"


def config(upstream, tmp_path, limits: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One cached `http` dataset (a fresh name, so budgets never meet across tests)."""
    name = "q" + secrets.token_hex(4)
    return {
        "cache": {"store": str(tmp_path / "cache")},
        "datasets": {
            name: {
                "upstream": {"http": {"base_url": f"{upstream.url}/data/demo-cogs/"}},
                "qos": limits,
            }
        },
        **extra,
    }


def dataset_of(cfg: dict[str, Any]) -> str:
    return next(iter(cfg["datasets"]))


def assert_limited(r: httpx.Response, policy: str, quota: int, window: int) -> None:
    assert r.status_code == 429, r.text
    if r.request.method != "HEAD":
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"].endswith("/rate-limited")
    assert 1 <= int(r.headers["retry-after"]) <= window
    assert r.headers["ratelimit-policy"] == f'"{policy}";q={quota};w={window}'
    assert r.headers["ratelimit"].startswith(f'"{policy}";r=0;t=')


def test_a_request_limit_per_address_with_ratelimit_fields(start_proxy, upstream, tmp_path):
    cfg = config(upstream, tmp_path, {"requests_per_minute": 3})
    proxy = start_proxy(cfg)
    url = f"{proxy.url}/assets/{dataset_of(cfg)}/{B04}"
    for left in (2, 1, 0):
        r = httpx.get(url, headers={"range": "bytes=0-99"})
        assert r.status_code == 206
        assert r.headers["ratelimit-policy"] == '"requests-anonymous";q=3;w=60'
        assert r.headers["ratelimit"].startswith(f'"requests-anonymous";r={left};t=')
    assert_limited(httpx.get(url), "requests-anonymous", 3, 60)
    assert_limited(httpx.head(url), "requests-anonymous", 3, 60)  # HEAD counts too


def test_a_spent_miss_budget_refuses_misses_and_serves_hits(start_proxy, upstream, tmp_path):
    cfg = config(upstream, tmp_path, {"miss_requests": {"limit": 1, "per": "1h"}})
    proxy = start_proxy(cfg)
    base = f"{proxy.url}/assets/{dataset_of(cfg)}"
    assert httpx.get(f"{base}/{B04}").status_code == 200  # a miss: fills the cache
    upstream.reset()
    for _ in range(3):  # hits keep flowing
        assert httpx.get(f"{base}/{B04}", headers={"range": "bytes=0-9"}).status_code == 206
    assert_limited(httpx.get(f"{base}/scene-b/B04.tif"), "miss-requests-anonymous", 1, 3600)
    assert upstream.data_requests() == []  # the refused miss never reached the upstream


def test_a_forged_forwarding_header_counts_for_nothing_unless_trusted(
    start_proxy, upstream, tmp_path
):
    cfg = config(upstream, tmp_path / "a", {"requests_per_minute": 2})
    proxy = start_proxy(cfg)
    url = f"{proxy.url}/assets/{dataset_of(cfg)}/{B04}"
    for forged in ("10.0.0.1", "10.0.0.2"):
        assert httpx.get(url, headers={"x-forwarded-for": forged}).status_code == 200
    assert httpx.get(url, headers={"x-forwarded-for": "10.0.0.3"}).status_code == 429

    trusted = config(
        upstream,
        tmp_path / "b",
        {"requests_per_minute": 2},
        server={"trusted_proxy_header": "X-Forwarded-For"},
    )
    behind = start_proxy(trusted)
    url = f"{behind.url}/assets/{dataset_of(trusted)}/{B04}"
    for _ in range(2):  # the client forges the first entry; the proxy appended the last
        forged = {"x-forwarded-for": f"1.2.3.{secrets.randbelow(250)}, 10.0.0.7"}
        assert httpx.get(url, headers=forged).status_code == 200
    assert httpx.get(url, headers={"x-forwarded-for": "10.0.0.7"}).status_code == 429
    assert httpx.get(url, headers={"x-forwarded-for": "10.0.0.8"}).status_code == 200


def test_user_and_group_limits_combine(start_proxy, upstream, oidc, tmp_path):
    qos = {"requests_per_minute": 3, "groups": {"eo": {"requests_per_minute": 4}}}
    cfg = config(upstream, tmp_path, qos, auth={"oidc_issuer": oidc.issuer})
    proxy = start_proxy(cfg)
    url = f"{proxy.url}/assets/{dataset_of(cfg)}/{B04}"

    def get(token: str) -> httpx.Response:
        return httpx.get(url, headers={"authorization": f"Bearer {token}", "range": "bytes=0-9"})

    ann, bob, eve = (oidc.token(sub=s, groups=["eo"]) for s in ("ann", "bob", "eve"))
    carl = oidc.token(sub="carl", groups=[])
    assert [get(ann).status_code for _ in range(3)] == [206, 206, 206]
    assert_limited(get(ann), "requests-user", 3, 60)  # ann's own limit (the group has 1 left)
    assert get(bob).status_code == 206  # the group's 4th
    assert_limited(get(eve), "requests-group", 4, 60)  # eve's own budget is untouched
    assert get(carl).status_code == 206  # not in the group: only his own limit


def test_two_processes_share_one_budget_through_redis(upstream, redis_url, tmp_path):
    cfg = config(upstream, tmp_path, {"requests_per_minute": 10}, queue={"redis_url": redis_url})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = fdp_serve(cfg, tmp_path / "a"), fdp_serve(cfg, tmp_path / "b")
    path = f"/assets/{dataset_of(cfg)}/{B04}"
    with a.proc, b.proc:
        codes = [httpx.get((a, b)[i % 2].url + path).status_code for i in range(10)]
        assert codes == [200] * 10
        assert_limited(httpx.get(a.url + path), "requests-anonymous", 10, 60)
        assert_limited(httpx.get(b.url + path), "requests-anonymous", 10, 60)


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_a_redis_that_never_answers_admits_or_refuses_at_once(
    start_proxy, upstream, blackhole, tmp_path, mode
):
    cfg = config(
        upstream,
        tmp_path,
        {"requests_per_minute": 10},
        queue={"redis_url": blackhole.redis_url, "timeout_seconds": 1},
        qos={"on_redis_error": mode, "timeout_seconds": 0.3},
    )
    proxy = start_proxy(cfg)
    url = f"{proxy.url}/assets/{dataset_of(cfg)}/{B04}"
    for _ in range(3):
        t = time.monotonic()
        r = httpx.get(url, timeout=10)
        assert time.monotonic() - t < 2.0  # bounded by qos.timeout_seconds, never a stall
        if mode == "open":
            assert r.status_code == 200 and r.content == upstream.file(f"demo-cogs/{B04}")
        else:
            assert r.status_code == 503 and r.headers["retry-after"]
            assert r.json()["type"].endswith("/qos-unavailable")
    assert "QoS counters unavailable" in proxy.proc.log_text()
    assert proxy.proc.log_text().count("QoS counters unavailable") == 1  # once a minute


def test_a_byte_budget_finishes_the_response_that_crosses_it(start_proxy, upstream, tmp_path):
    body = upstream.file(f"demo-cogs/{B04}")
    cfg = config(upstream, tmp_path, {"bytes": {"limit": len(body) + 1000, "per": "1h"}})
    proxy = start_proxy(cfg)
    url = f"{proxy.url}/assets/{dataset_of(cfg)}/{B04}"
    first = httpx.get(url)
    assert first.content == body
    assert first.headers["ratelimit-policy"].endswith(';qu="content-bytes"')
    second = httpx.get(url)  # 1000 bytes were left: admitted, and never cut short
    assert second.status_code == 200 and second.content == body
    third = httpx.get(url)
    assert third.status_code == 429 and third.content.startswith(b"{")  # before any body byte
    policy = f'"bytes-anonymous";q={len(body) + 1000};w=3600;qu="content-bytes"'
    assert third.headers["ratelimit-policy"] == policy
    assert third.headers["ratelimit"].startswith('"bytes-anonymous";r=0;t=')


def test_callers_see_their_own_usage(start_proxy, upstream, oidc, tmp_path):
    body = upstream.file(f"demo-cogs/{B04}")
    limits = {"requests_per_minute": 5, "bytes_per_hour": 10 * len(body)}
    cfg = config(upstream, tmp_path, limits, auth={"oidc_issuer": oidc.issuer})
    name = dataset_of(cfg)
    hidden = {"upstream": cfg["datasets"][name]["upstream"], "access": {"groups": ["secret"]}}
    cfg["datasets"]["hidden" + secrets.token_hex(3)] = {**hidden, "qos": limits}
    proxy = start_proxy(cfg)
    for _ in range(2):
        assert httpx.get(f"{proxy.url}/assets/{name}/{B04}").content == body
    mine = httpx.get(f"{proxy.url}/me/usage").json()
    assert mine["caller"] == {"address": "127.0.0.1"}
    assert list(mine["datasets"]) == [name]  # a dataset it cannot read is not shown
    kinds = {u["kind"]: u for u in mine["datasets"][name]}
    assert kinds["requests"]["remaining"] == 3 and kinds["requests"]["limit"] == 5
    assert kinds["bytes"]["remaining"] == 8 * len(body)
    assert kinds["requests"]["scope"] == "address"
    token = oidc.token(sub="ann")
    hers = httpx.get(f"{proxy.url}/me/usage", headers={"authorization": f"Bearer {token}"})
    assert hers.json()["caller"] == {"subject": "ann"}
    fresh = {u["kind"]: u["remaining"] for u in hers.json()["datasets"][name]}
    assert fresh["requests"] == 5  # her own budget, untouched by the address's requests


def rss(pid: int) -> int:
    """Resident bytes of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_paced_dataset_streams_at_its_rate(start_proxy, upstream, tmp_path):
    """Shaping instead of refusing: 4 MiB at 1 MiB/s takes 4 s (±15%), bytes intact, the
    proxy's memory flat while it holds the body back."""
    data = os.urandom(4 << 20)
    (upstream.data / "demo-cogs" / "paced.bin").write_bytes(data)
    cfg = config(upstream, tmp_path, {"max_bytes_per_second": "1MiB"})
    proxy = start_proxy(cfg)
    url = f"{proxy.url}/assets/{dataset_of(cfg)}/paced.bin"
    for attempt in ("miss", "hit"):  # both paced
        before = rss(proxy.proc.pid)
        with ThreadPoolExecutor(1) as pool:
            t = time.monotonic()
            download = pool.submit(httpx.get, url, timeout=30)
            peak = before
            while not download.done():  # the proxy's memory while it holds the body back
                peak = max(peak, rss(proxy.proc.pid))
                time.sleep(0.05)
            took = time.monotonic() - t
        assert download.result().content == data
        assert 4 * 0.85 <= took <= 4 * 1.15, took
        if attempt == "hit":
            assert peak - before < (3 << 20), (peak - before) / 2**20  # never the 4 MiB body


def test_a_callers_responses_share_their_pace(start_proxy, upstream, tmp_path):
    """`max_bytes_per_second_per_user`: two downloads of one address at once share its
    512 KiB/s (1 MiB each: ~4 s), while another address gets its own (~2 s)."""
    data = os.urandom(1 << 20)
    for name in ("one.bin", "two.bin", "three.bin"):
        (upstream.data / "demo-cogs" / name).write_bytes(data)
    cfg = config(upstream, tmp_path, {"max_bytes_per_second_per_user": "512KiB"})
    proxy = start_proxy(cfg)
    base = f"{proxy.url}/assets/{dataset_of(cfg)}"

    def fetch(name: str, address: str) -> float:
        with httpx.Client(transport=httpx.HTTPTransport(local_address=address)) as c:
            t = time.monotonic()
            r = c.get(f"{base}/{name}", timeout=30)
            assert r.content == data
            return time.monotonic() - t

    with ThreadPoolExecutor(3) as pool:
        mine = [pool.submit(fetch, n, "127.0.0.1") for n in ("one.bin", "two.bin")]
        other = pool.submit(fetch, "three.bin", "127.0.0.2")
        took = [f.result() for f in mine]
        assert 1.6 <= other.result() <= 2.6, other.result()
    assert all(3.3 <= t <= 4.8 for t in took), took


def test_miss_bytes_count_what_the_upstream_sent(start_proxy, upstream, tmp_path):
    """A 100-byte read of an uncached object costs its miss-byte budget the whole block the
    upstream sent; its byte budget, the 100 bytes; a hit costs no miss bytes."""
    size = len(upstream.file(f"demo-cogs/{B04}"))  # one block
    limits = {"miss_bytes_per_hour": 10 * size, "bytes_per_hour": 10 * size}
    cfg = config(upstream, tmp_path, limits)
    proxy = start_proxy(cfg)
    name = dataset_of(cfg)

    def remaining() -> dict[str, int]:
        usage = httpx.get(f"{proxy.url}/me/usage").json()["datasets"][name]
        return {u["kind"]: u["remaining"] for u in usage}

    url = f"{proxy.url}/assets/{name}/{B04}"
    assert httpx.get(url, headers={"range": "bytes=0-99"}).status_code == 206
    assert remaining() == {"bytes": 10 * size - 100, "miss_bytes": 9 * size}
    assert httpx.get(url, headers={"range": "bytes=100-199"}).status_code == 206  # a hit
    assert remaining() == {"bytes": 10 * size - 200, "miss_bytes": 9 * size}


def test_operators_see_anyones_usage_and_the_counters(start_proxy, upstream, oidc, tmp_path):
    """`fdp qos show USER` (the admin API) shows a user's budgets with the groups of their
    latest token; admissions and refusals are counted by dataset and limit kind."""
    # an hour's window: a minute's could roll over while the test runs, and a sliding
    # window would then give one request back (seen twice in loaded full runs)
    qos = {"requests": {"limit": 2, "per": "1h"}, "groups": {"eo": {"miss_requests_per_hour": 50}}}
    cfg = config(upstream, tmp_path, qos, auth={"oidc_issuer": oidc.issuer})
    proxy = start_proxy(cfg)
    name = dataset_of(cfg)
    ann = {"authorization": f"Bearer {oidc.token(sub='ann', groups=['eo'])}"}
    codes = [httpx.get(f"{proxy.url}/assets/{name}/{B04}", headers=ann).status_code for _ in "abc"]
    assert codes == [200, 200, 429]

    def fdp_qos(*args: str, token: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "FDP_TOKEN": token, "FDP_URL": proxy.url}
        return subprocess.run(
            [str(BIN / "fdp"), "qos", "show", *args], env=env, capture_output=True, text=True
        )

    admin = oidc.token(sub="root", groups=["fdp-admins"])
    shown = fdp_qos("ann", token=admin)
    assert shown.returncode == 0, shown.stderr
    assert "user ann, groups: eo" in shown.stdout
    rows = {tuple(line.split()[:3]) for line in shown.stdout.splitlines()[2:]}
    assert (name, "requests", "user") in rows and (name, "miss_requests", "group") in rows
    as_json = json.loads(fdp_qos("ann", "--json", token=admin).stdout)
    kinds = {u["kind"]: u for u in as_json["datasets"][name]}
    assert kinds["requests"]["remaining"] == 0 and kinds["miss_requests"]["remaining"] == 49
    refused = fdp_qos("ann", token=oidc.token(sub="ann", groups=["eo"]))
    assert refused.returncode != 0 and "403" in refused.stderr and "Bearer" not in refused.stderr
    counted = httpx.get(f"{proxy.url}/admin/qos", headers={"authorization": f"Bearer {admin}"})
    assert counted.json()["admitted"] == {name: 2}
    assert counted.json()["rejected"] == {name: {"requests": 1}}


def test_an_archive_miss_over_budget_says_when_its_job_may_run(start_proxy, upstream, tmp_path):
    cfg = config(upstream, tmp_path, {"miss_requests": {"limit": 1, "per": "1h"}})
    cfg["datasets"][dataset_of(cfg)]["archive"] = True
    proxy = start_proxy(cfg)
    base = f"{proxy.url}/assets/{dataset_of(cfg)}"
    retrieved = httpx.get(f"{base}/{B04}", timeout=60)  # held while the job retrieves it
    assert retrieved.status_code == 200 and retrieved.content == upstream.file(f"demo-cogs/{B04}")
    assert httpx.get(f"{base}/{B04}").status_code == 200  # a hit: not a miss
    upstream.reset()
    refused = httpx.get(f"{base}/scene-b/B04.tif", headers={"prefer": "respond-async"})
    assert_limited(refused, "miss-requests-anonymous", 1, 3600)
    when = refused.headers["retry-after"]  # when the budget has room for the job again
    assert refused.headers["ratelimit"].endswith(f";t={when}")
    assert upstream.data_requests() == []  # no job, no upstream request


def test_qos_edits_apply_to_the_next_request(upstream, tmp_path):
    """Limits are read from the policy in force at each admission (what the operators'
    policy store will replace): no copy is taken at start-up."""
    cfg = config(upstream, tmp_path, {})
    name = dataset_of(cfg)
    app = create_app(Settings.model_validate(cfg))
    registry = app.state.registry
    url = f"/assets/{name}/{B04}"
    with TestClient(app) as client:
        assert [client.get(url).status_code for _ in range(3)] == [200] * 3
        entry = registry.entries[name]
        strict = Qos.model_validate({"requests_per_minute": 1})
        registry.entries[name] = replace(
            entry, policy=entry.policy.model_copy(update={"qos": strict})
        )
        assert client.get(url).status_code == 200
        assert client.get(url).status_code == 429
        registry.entries[name] = entry  # back: no limit of its own ...
        assert client.get(url).status_code == 200
        registry.qos_defaults = Qos.model_validate({"requests_per_minute": 1})  # ... a default
        assert client.get(url).status_code == 429
