"""Delivery logs through a real proxy, kept in SQLite and in Redis: each user sees their
own, a dataset's owners see everyone's deliveries of it, nobody else's are visible; paged
and filtered by dataset and time."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.test_queue import fresh_redis

B04 = "scene-a/B04.tif"


@pytest.fixture(params=["sqlite", "redis"])
def proxy(request, start_proxy, upstream, oidc, redis_url, tmp_path):
    files = {"http": {"base_url": f"{upstream.url}/data/demo-cogs/"}}
    cfg: dict[str, Any] = {
        "cache": {"store": str(tmp_path / "cache")},
        "auth": {"oidc_issuer": oidc.issuer},
        "datasets": {
            "shared": {
                "upstream": files,
                "access": {"authenticated": True},
                "owners": ["stewards"],
            },
            "other": {"upstream": files, "access": {"authenticated": True}},
        },
    }
    if request.param == "redis":
        cfg["queue"] = {"redis_url": fresh_redis(redis_url)}
    return start_proxy(cfg)


def bearer(oidc: Any, sub: str, *groups: str) -> dict[str, str]:
    return {"authorization": f"Bearer {oidc.token(sub=sub, groups=list(groups))}"}


def logged(proxy: Any, headers: dict[str, str], want: int, **params: str) -> dict[str, Any]:
    """The deliveries page once it holds `want` entries (they are written within a second)."""
    deadline = time.monotonic() + 10
    while True:
        r = httpx.get(f"{proxy.url}/me/deliveries", headers=headers, params=params)
        assert r.status_code == 200, r.text
        if len(r.json()["deliveries"]) >= want or time.monotonic() > deadline:
            return r.json()
        time.sleep(0.1)


def test_each_user_sees_their_own_and_owners_see_their_datasets(proxy, upstream, oidc):
    alice, bob = bearer(oidc, "alice"), bearer(oidc, "bob")
    steward = bearer(oidc, "sam", "stewards")
    size = len(upstream.file(f"demo-cogs/{B04}"))
    assert httpx.get(f"{proxy.url}/assets/shared/{B04}", headers=alice).status_code == 200
    ranged = {**alice, "range": "bytes=0-99"}
    assert httpx.get(f"{proxy.url}/assets/shared/{B04}", headers=ranged).status_code == 206
    assert httpx.get(f"{proxy.url}/assets/other/{B04}", headers=alice).status_code == 200
    assert httpx.get(f"{proxy.url}/assets/shared/scene-b/B04.tif", headers=bob).status_code == 200
    assert httpx.get(f"{proxy.url}/assets/shared/nope.tif", headers=bob).status_code == 404

    mine = logged(proxy, alice, 3)["deliveries"]
    assert [(d["dataset"], d["path"], d["status"], d["cache"]) for d in mine] == [
        ("other", B04, 200, "miss"),
        ("shared", B04, 206, "hit"),
        ("shared", B04, 200, "miss"),
    ]
    assert [d["bytes"] for d in mine][1:] == [100, size]
    assert {d["user"] for d in mine} == {"alice"} and "client" not in mine[0]

    # bob is not an owner: asking for the dataset shows him only his own
    his = logged(proxy, bob, 1, dataset="shared")["deliveries"]
    assert [(d["user"], d["path"]) for d in his] == [("bob", "scene-b/B04.tif")]
    # the dataset's owners see everyone's deliveries of it, and only of it
    everyone = logged(proxy, steward, 3, dataset="shared")["deliveries"]
    assert [d["user"] for d in everyone] == ["bob", "alice", "alice"]
    assert all(d["dataset"] == "shared" and d["client"] == "127.0.0.1" for d in everyone)
    theirs_elsewhere = logged(proxy, steward, 0, dataset="other")["deliveries"]
    assert theirs_elsewhere == []  # not an owner of `other`: their own (none)

    # paging: newest first, `next` until the end
    first = logged(proxy, alice, 1, limit="2")
    assert len(first["deliveries"]) == 2
    rest = httpx.get(first["next"], headers=alice).json()
    assert [d["dataset"] for d in rest["deliveries"]] == ["shared"] and "next" not in rest
    # time: nothing after now, everything since an RFC 3339 instant long past
    assert logged(proxy, alice, 0, since=str(time.time() + 30))["deliveries"] == []
    since = logged(proxy, alice, 3, since="2020-01-01T00:00:00Z")["deliveries"]
    assert len(since) == 3
    bad = httpx.get(f"{proxy.url}/me/deliveries", headers=alice, params={"since": "yesterday"})
    assert bad.status_code == 400 and bad.json()["detail"].startswith("since:")
    assert httpx.get(f"{proxy.url}/me/deliveries").status_code == 401


def test_range_reads_of_one_object_are_one_delivery(proxy, upstream, oidc):
    """A client's many range reads within a second: one delivery, their bytes added up."""
    alice = bearer(oidc, "alice")
    url = f"{proxy.url}/assets/shared/{B04}"
    assert httpx.get(url, headers=alice).status_code == 200  # cached
    with httpx.Client(headers=alice) as c:
        for n in range(30):
            r = c.get(url, headers={"range": f"bytes={n * 100}-{n * 100 + 99}"})
            assert r.status_code == 206
    deadline = time.monotonic() + 10
    while True:  # written within a second or two
        ranges = [d for d in logged(proxy, alice, 2)["deliveries"] if d["status"] == 206]
        if sum(d["requests"] for d in ranges) == 30 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sum(d["requests"] for d in ranges) == 30 and sum(d["bytes"] for d in ranges) == 3000
    assert len(ranges) <= 3  # (a flush may fall between them)


def test_a_delivery_log_that_never_answers_costs_data_nothing(
    start_proxy, upstream, oidc, blackhole, tmp_path
):
    """Redis accepts and never answers: data keeps flowing at once, the log answers a quick
    503, and the lost deliveries are logged, not raised."""
    files = {"http": {"base_url": f"{upstream.url}/data/demo-cogs/"}}
    proxy = start_proxy(
        {
            "cache": {"store": str(tmp_path / "cache")},
            "auth": {"oidc_issuer": oidc.issuer},
            "queue": {"redis_url": blackhole.redis_url, "timeout_seconds": 0.5},
            "datasets": {"shared": {"upstream": files, "access": {"authenticated": True}}},
        }
    )
    alice = bearer(oidc, "alice")
    for _ in range(3):
        t = time.monotonic()
        r = httpx.get(f"{proxy.url}/assets/shared/{B04}", headers=alice, timeout=10)
        assert r.status_code == 200 and time.monotonic() - t < 1.0
    t = time.monotonic()
    r = httpx.get(f"{proxy.url}/me/deliveries", headers=alice, timeout=10)
    assert r.status_code == 503 and r.json()["type"].endswith("/deliveries-unavailable")
    assert time.monotonic() - t < 3.0
    deadline = time.monotonic() + 10
    while "deliveries not logged" not in proxy.proc.log_text():
        assert time.monotonic() < deadline, "the writer's failure was not logged"
        time.sleep(0.1)
