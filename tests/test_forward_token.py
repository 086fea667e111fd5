"""`forward_token`: the provider decides with the caller's own token, and the cache never
hands one user's copy to a user the provider refuses."""

from __future__ import annotations

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
