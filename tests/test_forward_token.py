"""`forward_token`: the provider decides with the caller's own token, and the cache never
hands one user's copy to a user the provider refuses."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import NO_CACHE
from tests.test_assets import assert_problem

B04 = "demo-cogs/scene-a/B04.tif"


@pytest.fixture(scope="module")
def fproxy(start_proxy, upstream_server, oidc, tmp_path_factory):
    work = tmp_path_factory.mktemp("forward")
    files = {"http": {"base_url": f"{upstream_server.url}/data/demo-cogs/"}}
    trusted = {"upstream": files, "access": {"authenticated": True}, "forward_token": True}
    return start_proxy(
        {
            "cache": {"store": str(work / "cache")},
            "auth": {"oidc_issuer": oidc.issuer, "audience": "fdp"},
            "datasets": {
                "cached": trusted,
                "through": {**trusted, "retention": NO_CACHE},
            },
        }
    )


@pytest.mark.parametrize("dataset", ["cached", "through"])
def test_a_user_the_provider_refuses_never_reads_another_users_copy(
    fproxy, upstream, oidc, dataset
):
    alice, bob = oidc.token(sub="alice"), oidc.token(sub="bob")
    url = f"{fproxy.url}/assets/{dataset}/scene-a/B04.tif"
    first = httpx.get(url, headers={"authorization": f"Bearer {alice}"})
    assert first.status_code == 200 and first.content == upstream.file(B04)
    upstream.fault("scene-a/B04", authorization=f"Bearer {bob}", status=403)
    for method in ("GET", "HEAD"):
        r = httpx.request(method, url, headers={"authorization": f"Bearer {bob}"})
        assert r.status_code == 403, method
    body = assert_problem(httpx.get(url, headers={"authorization": f"Bearer {bob}"}), 403)
    assert "provider" in body["detail"]
    seen = [e for e in upstream.data_requests() if e["authorization"]]
    assert seen, "the provider was never asked about bob"
    again = httpx.get(url, headers={"authorization": f"Bearer {alice}"})
    assert again.status_code == 200 and again.content == upstream.file(B04)


def test_a_slow_identity_provider_stalls_only_requests_with_unknown_keys(
    start_proxy, upstream_server, oidc, tmp_path
):
    from tests.test_dependable import Prober

    files = {"http": {"base_url": f"{upstream_server.url}/data/demo-cogs/"}}
    proxy = start_proxy(
        {
            "cache": {"store": str(tmp_path / "cache")},
            "auth": {"oidc_issuer": oidc.issuer, "audience": "fdp", "jwks_refetch_seconds": 2},
            "datasets": {"members": {"upstream": files, "access": {"authenticated": True}}},
        }
    )
    url = f"{proxy.url}/assets/members/scene-a/B04.tif"
    token = {"authorization": f"Bearer {oidc.token()}"}
    assert httpx.get(url, headers=token).status_code == 200  # keys loaded, object cached
    time.sleep(2.5)  # past the refetch interval: an unknown kid may ask the issuer again
    asked = oidc.stats()["discovery_requests"]
    oidc.set_delay(20)
    try:
        with Prober([url, f"{proxy.url}/healthz"], headers=token) as probe:
            rotated = {"authorization": f"Bearer {oidc.token(kid='not-a-known-kid')}"}
            first = httpx.get(url, headers=rotated, timeout=30)
            assert first.status_code == 401 and first.elapsed.total_seconds() > 4  # it waited
            t = httpx.get(url, headers=rotated, timeout=30)  # no second wait: rate-limited
            assert t.status_code == 401 and t.elapsed.total_seconds() < 1
    finally:
        oidc.set_delay(0)
    assert set(probe.statuses) == {200, 206} and len(probe.times) > 20
    assert probe.p99 < 0.1, f"p99 {probe.p99 * 1000:.0f} ms"
    assert oidc.stats()["discovery_requests"] - asked <= 1


def test_an_unreachable_identity_provider_is_asked_once_per_interval(
    start_proxy, upstream_server, oidc, tmp_path
):
    files = {"http": {"base_url": f"{upstream_server.url}/data/demo-cogs/"}}
    oidc.set_delay(20)
    try:
        proxy = start_proxy(
            {
                "cache": {"store": str(tmp_path / "cache")},
                "auth": {"oidc_issuer": oidc.issuer, "jwks_refetch_seconds": 30},
                "datasets": {
                    "open": {"upstream": files},
                    "members": {"upstream": files, "access": {"authenticated": True}},
                },
            }
        )
        asked = oidc.stats()["discovery_requests"]
        token = {"authorization": f"Bearer {oidc.token()}"}
        url = f"{proxy.url}/assets/members/scene-a/B04.tif"
        first = httpx.get(url, headers=token, timeout=30)
        assert_problem(first, 503)
        assert first.elapsed.total_seconds() < 10  # bounded by the IdP timeout
        for _ in range(5):
            again = httpx.get(url, headers=token, timeout=30)
            assert_problem(again, 503)
            assert again.elapsed.total_seconds() < 1 and "retry-after" in again.headers
        public = httpx.get(
            f"{proxy.url}/assets/open/scene-a/B04.tif", headers={"range": "bytes=0-9"}
        )
        assert public.status_code == 206
        assert oidc.stats()["discovery_requests"] - asked == 1
    finally:
        oidc.set_delay(0)
