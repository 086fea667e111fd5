"""OIDC bearer tokens against our test issuer, access rules, /stac visibility, /jobs, /admin."""

from __future__ import annotations

import secrets
import time

import httpx
import pytest

from proxy.demo import providers_yaml
from tests.conftest import NO_CACHE

B04 = "demo-cogs/scene-a/B04.tif"


@pytest.fixture(scope="module")
def aproxy(start_proxy, upstream_server, oidc, tmp_path_factory):
    work = tmp_path_factory.mktemp("auth")
    (work / "providers.yml").write_text(providers_yaml(upstream_server.url))
    files = {"http": {"base_url": f"{upstream_server.url}/data/demo-cogs/"}}
    config = {
        "cache": {"store": str(work / "cache")},
        "auth": {
            "oidc_issuer": oidc.issuer,
            "audience": "fdp",
            "groups_claim": "groups",
            "admin_group": "fdp-admins",
            "jwks_refetch_seconds": 2,
        },
        "eodag": {"providers_file": str(work / "providers.yml")},
        "datasets": {
            "open": {"upstream": files, "retention": NO_CACHE},
            "members": {
                "upstream": files,
                "access": {"authenticated": True},
                "retention": NO_CACHE,
            },
            "eo": {
                "upstream": files,
                "access": {"groups": ["eo-users", "eo-staff"]},
                "retention": NO_CACHE,
            },
            "trusted": {
                "upstream": files,
                "access": {"authenticated": True},
                "forward_token": True,
                "retention": NO_CACHE,
            },
            "scoped": {
                "upstream": files,
                "access": {"scopes": ["read:data"]},
                "retention": NO_CACHE,
            },
            "vault": {
                "upstream": {"eodag": {"provider": "fdp_demo", "collection": "demo-archive"}},
                "archive": True,
                "access": {"authenticated": True},
            },
        },
    }
    return start_proxy(config)


def get(proxy, dataset, token=None, path="scene-a/B04.tif"):
    headers = {"Range": "bytes=0-99"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.get(f"{proxy.url}/assets/{dataset}/{path}", headers=headers)


def test_valid_token_reads_protected_data(aproxy, oidc, upstream):
    r = get(aproxy, "members", oidc.token())
    assert r.status_code == 206 and r.content == upstream.file(B04)[:100]
    assert upstream.data_requests()[0]["authorization"] is False  # never sent upstream


def test_token_goes_upstream_only_where_the_dataset_opts_in(aproxy, oidc, upstream):
    token = oidc.token()
    assert get(aproxy, "trusted", token).status_code == 206
    assert get(aproxy, "members", token).status_code == 206
    sent = [e["authorization"] for e in upstream.data_requests()]
    assert sent == [True, False]


def test_no_token_where_needed_is_401_with_a_bearer_challenge(aproxy):
    r = get(aproxy, "members")
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert "invalid_token" not in r.headers["www-authenticate"]
    assert r.headers["content-type"] == "application/problem+json"
    assert get(aproxy, "open").status_code == 206


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda f: f.token(exp_in=-120), id="expired"),
        pytest.param(lambda f: f.token(nbf_in=300), id="not-yet-valid"),
        pytest.param(lambda f: f.token(aud="someone-else"), id="wrong-audience"),
        pytest.param(
            lambda f: f.token(extra_claims={"iss": "http://127.0.0.1:9/evil"}), id="wrong-issuer"
        ),
        pytest.param(lambda f: f.bad_signature(), id="bad-signature"),
        pytest.param(lambda f: f.alg_none(), id="alg-none"),
        pytest.param(lambda f: f.forged_hs256_with_public_key(), id="hs256-with-public-key"),
        pytest.param(lambda f: f.token(kid="no-such-kid"), id="unknown-kid"),
        pytest.param(lambda f: "not.a.jwt", id="garbage"),
    ],
)
def test_bad_tokens_are_401_invalid_token(aproxy, oidc, make):
    for dataset in ("members", "open"):  # a bad token is refused even on public data
        r = get(aproxy, dataset, make(oidc))
        assert r.status_code == 401, (dataset, r.text)
        assert 'error="invalid_token"' in r.headers["www-authenticate"]


def test_small_clock_skew_is_tolerated(aproxy, oidc):
    assert get(aproxy, "members", oidc.token(nbf_in=10)).status_code == 206


def test_groups_any_of_and_scopes(aproxy, oidc):
    assert get(aproxy, "eo", oidc.token(groups=["other"])).status_code == 403
    assert get(aproxy, "eo", oidc.token()).status_code == 403
    assert get(aproxy, "eo", oidc.token(groups=["x", "eo-staff"])).status_code == 206
    assert get(aproxy, "scoped", oidc.token(scope="openid")).status_code == 403
    assert get(aproxy, "scoped", oidc.token(scope="openid read:data")).status_code == 206
    assert get(aproxy, "scoped", oidc.token(groups=["fdp-admins"])).status_code == 206  # admin
    r = get(aproxy, "eo", oidc.token())
    assert r.headers["content-type"] == "application/problem+json"


def test_rotated_keys_and_a_flood_of_bogus_kids(aproxy, oidc):
    old = oidc.token()
    assert get(aproxy, "members", old).status_code == 206
    oidc.rotate()  # old kid removed, new one served
    time.sleep(2.1)  # past the refetch rate limit that earlier bogus kids may have used
    assert get(aproxy, "members", oidc.token()).status_code == 206  # refetched on unknown kid
    assert get(aproxy, "members", old).status_code == 401  # its key is gone
    before = oidc.jwks_requests()
    for _ in range(30):
        bogus = oidc.token(kid=f"bogus-{secrets.token_hex(4)}")
        assert get(aproxy, "members", bogus).status_code == 401
    assert oidc.jwks_requests() - before <= 2  # rate-limited: one per 2 s at most


def test_stac_shows_only_what_the_caller_may_read(aproxy, oidc):
    def collections(token=None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        r = httpx.get(f"{aproxy.url}/stac/collections", headers=headers)
        assert r.status_code == 200
        return {c["id"] for c in r.json()["collections"]}

    assert collections() == {"open"}
    members = {"open", "members", "vault", "trusted"}
    assert collections(oidc.token()) == members
    assert collections(oidc.token(groups=["eo-users"])) == members | {"eo"}
    assert httpx.get(f"{aproxy.url}/stac/collections/eo").status_code == 404
    r = httpx.get(f"{aproxy.url}/stac/search", params={"collections": "eo"})
    assert r.status_code == 404
    children = [
        link["href"].rsplit("/", 1)[1]
        for link in httpx.get(f"{aproxy.url}/stac").json()["links"]
        if link["rel"] == "child"
    ]
    assert children == ["open"]  # the landing page too


def test_jobs_are_visible_to_their_requester_and_admins_only(aproxy, oidc, upstream):
    alice = {"Authorization": f"Bearer {oidc.token(sub='alice')}"}
    r = httpx.get(
        f"{aproxy.url}/assets/vault/archived-a/B04", headers={**alice, "Prefer": "respond-async"}
    )
    assert r.status_code == 202
    job = r.headers["location"]
    assert httpx.get(job, headers=alice).status_code == 200
    bob = {"Authorization": f"Bearer {oidc.token(sub='bob')}"}
    assert httpx.get(job, headers=bob).status_code == 404
    assert httpx.get(job).status_code == 404
    admin = {"Authorization": f"Bearer {oidc.token(sub='root', groups=['fdp-admins'])}"}
    assert httpx.get(job, headers=admin).status_code in (200, 303)
    deadline = time.monotonic() + 30
    while httpx.get(job, headers=alice).status_code != 303:
        assert time.monotonic() < deadline
        time.sleep(0.3)


def test_admin_api_needs_the_admin_group(aproxy, oidc):
    url = f"{aproxy.url}/admin/policies"
    assert httpx.get(url).status_code == 401
    user = {"Authorization": f"Bearer {oidc.token()}"}
    assert httpx.get(url, headers=user).status_code == 403
    admin = {"Authorization": f"Bearer {oidc.token(groups=['fdp-admins'])}"}
    assert httpx.get(url, headers=admin).status_code == 200


def test_protected_dataset_without_issuer_is_a_config_error(tmp_path):
    from policies.loader import ConfigError, validate

    with pytest.raises(ConfigError, match=r"datasets\.d\.access is not public"):
        validate(
            {
                "datasets": {
                    "d": {
                        "upstream": {"http": {"base_url": "http://x"}},
                        "access": {"authenticated": True},
                    }
                }
            },
            "t",
        )


def test_logs_never_contain_tokens(aproxy, oidc):
    token = oidc.token()
    get(aproxy, "members", token)
    get(aproxy, "eo", token)
    get(aproxy, "members", oidc.bad_signature())
    log = aproxy.proc.log_text()
    assert token not in log and token.split(".")[2] not in log
    assert "Traceback" not in log
