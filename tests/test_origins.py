"""Upstream origins are allowed, not assumed: hrefs and redirects reach only allowed origins,
and a provider's credentials never follow a redirect to another origin.

Two demo upstreams on different ports are the two origins: A serves the catalogue (its asset
hrefs point at B) and the files; B serves the same files. Each logs what it was sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from pydantic import ValidationError

from policies.config import Settings
from proxy.demo import providers_yaml
from tests.conftest import NO_CACHE, Proxy, Upstream
from tests.harness.oidc_issuer import OidcIssuer
from tests.harness.procs import PYTHON, ServerProcess, free_port, http_ok
from upstreams.base import OriginNotAllowed, Origins, UpstreamObject, origin_of
from upstreams.http import head, make_client, make_pool, open_body, open_sync

B04 = "demo-cogs/scene-a/B04.tif"
SECRET = "Bearer provider-secret"


def _start_upstream(name: str, data: Path, logs: Path, *args: str) -> Upstream:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [PYTHON, "-m", "upstreams.demo.server", "--data", data, "--port", port, *args]
    proc = ServerProcess(name, argv, log_dir=logs, ready=http_ok(f"{url}/conformance"))
    return Upstream(url, data, proc.start())


@pytest.fixture(scope="module")
def origins_ab(
    demo_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Upstream, Upstream]]:
    logs = tmp_path_factory.mktemp("origins")
    b = _start_upstream("origin-b", demo_data, logs)
    try:
        a = _start_upstream("origin-a", demo_data, logs, "--asset-base", b.url)
        try:
            yield a, b
        finally:
            a.proc.stop()
    finally:
        b.proc.stop()


@pytest.fixture
def ab(origins_ab: tuple[Upstream, Upstream]) -> tuple[Upstream, Upstream]:
    for u in origins_ab:
        u.reset()
    return origins_ab


def _hostport(url: str) -> str:
    return url.split("://", 1)[1]


# --- the rules themselves ---------------------------------------------------------------------


def test_origins_parse_hosts_host_ports_and_urls():
    o = Origins.parse(["Data.Example", "cdn.example:8443", "http://127.0.0.1:9000/some/path"])
    assert "https://data.example/x" in o and "http://DATA.example:80/x" in o
    assert "https://data.example:8443/x" not in o
    assert "https://cdn.example:8443/x" in o and "http://cdn.example:8443/" in o
    assert "https://cdn.example/x" not in o
    assert "http://127.0.0.1:9000/other" in o and "https://127.0.0.1:9000/" not in o
    assert "s3://data.example/key" not in o and "not a url" not in o
    assert origin_of("HTTPS://A.b") == ("https", "a.b", 443)
    with pytest.raises(OriginNotAllowed):
        o.check("http://evil.example/x", "href")


@pytest.mark.parametrize("entry", ["ftp://host", "host/path", "host:port", "user@host", ""])
def test_allowed_hosts_entries_are_checked_with_the_config(entry):
    dataset = {"upstream": {"http": {"base_url": "http://127.0.0.1:9/"}}, "allowed_hosts": [entry]}
    with pytest.raises(ValidationError, match=r"datasets\.d\.allowed_hosts\.0"):
        Settings.model_validate({"datasets": {"d": dataset}})


# --- the upstream module on its own (no proxy) ------------------------------------------------


def _fetch(obj: UpstreamObject) -> tuple[int, bytes]:
    async def go() -> tuple[int, bytes]:
        async with make_client() as client, await open_body(client, obj, {}) as body:
            return body.status, b"".join([c async for c in body.chunks()])

    return anyio.run(go)


def test_redirect_to_another_origin_is_refused_and_the_target_sees_nothing(ab):
    a, b = ab
    a.fault("scene-a/B04", redirect=f"{b.url}{{path}}")
    obj = UpstreamObject(href=f"{a.url}/data/{B04}", headers={"authorization": SECRET})
    with pytest.raises(OriginNotAllowed):
        _fetch(obj)  # no origins given: only the href's own
    with pytest.raises(OriginNotAllowed):
        _fetch(UpstreamObject(href=obj.href, origins=Origins.of(a.url)))
    assert len(a.data_requests()) == 2
    assert b.log() == []


def test_allowed_redirect_leaves_the_credentials_behind(ab):
    a, b = ab
    a.fault("scene-a/B04", redirect=f"{b.url}{{path}}")
    obj = UpstreamObject(
        href=f"{a.url}/data/{B04}",
        headers={"authorization": SECRET},
        origins=Origins.of(a.url) | Origins.parse([_hostport(b.url)]),
    )
    assert _fetch(obj) == (200, b.file(B04))
    assert [e["authorization"] for e in a.data_requests()] == [True]
    assert [e["authorization"] for e in b.data_requests()] == [False]

    async def size() -> int:
        async with make_client() as client:
            return (await head(client, obj)).size

    assert anyio.run(size) == len(b.file(B04))
    assert [e["authorization"] for e in b.data_requests()] == [False, False]


def test_blocking_fetch_for_fills_and_workers_follows_the_same_rules(ab):
    a, b = ab
    a.fault("scene-a/B04", redirect=f"{b.url}{{path}}")
    obj = UpstreamObject(href=f"{a.url}/data/{B04}", headers={"authorization": SECRET})
    with make_pool() as pool:
        with pytest.raises(OriginNotAllowed), open_sync(pool, obj):
            pass
        assert b.log() == []
        allowed = replace(obj, origins=Origins.of(a.url, b.url))
        with open_sync(pool, allowed) as body:
            got = bytearray()
            while chunk := body.read(1 << 20):
                got += chunk
            assert bytes(got) == b.file(B04)
    assert [e["authorization"] for e in a.data_requests()] == [True, True]
    assert [e["authorization"] for e in b.data_requests()] == [False]


def test_same_origin_redirect_keeps_the_credentials(ab):
    a, _ = ab
    a.fault("scene-a/B04", redirect=f"{a.url}/data/demo-cogs/scene-b/B04.tif", times=1)
    obj = UpstreamObject(href=f"{a.url}/data/{B04}", headers={"authorization": SECRET})
    assert _fetch(obj) == (200, a.file("demo-cogs/scene-b/B04.tif"))
    assert [(e["path"], e["authorization"]) for e in a.data_requests()] == [
        (f"/data/{B04}", True),
        ("/data/demo-cogs/scene-b/B04.tif", True),
    ]


# --- through the proxy ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def origins_proxy(
    origins_ab: tuple[Upstream, Upstream],
    start_proxy: Callable[..., Proxy],
    oidc: OidcIssuer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Proxy:
    a, b = origins_ab
    work = tmp_path_factory.mktemp("origins-proxy")
    providers = work / "providers.yml"
    providers.write_text(providers_yaml(a.url))  # the catalogue is A; its hrefs point at B
    eodag = {"eodag": {"provider": "fdp_demo", "collection": "demo-cogs"}}
    http_a = {"http": {"base_url": f"{a.url}/data/demo-cogs/"}}
    config: dict[str, Any] = {
        "cache": {"store": str(work / "cache")},
        "eodag": {"providers_file": str(providers)},
        "auth": {"oidc_issuer": oidc.issuer, "audience": "fdp"},
        "datasets": {
            "scenes": {"upstream": eodag, "retention": NO_CACHE},
            "scenes-at-b": {
                "upstream": eodag,
                "retention": NO_CACHE,
                "allowed_hosts": [_hostport(b.url)],
            },
            "files": {"upstream": http_a, "retention": NO_CACHE},
            "files-to-b": {"upstream": http_a, "allowed_hosts": [b.url]},  # cached
            "token-to-b": {  # the caller's token is the provider's credential here
                "upstream": http_a,
                "allowed_hosts": [b.url],
                "access": {"authenticated": True},
                "forward_token": True,
                "retention": NO_CACHE,
            },
        },
    }
    return start_proxy(config)


def _assert_502_problem(r: httpx.Response) -> None:
    assert r.status_code == 502, r.text
    assert r.headers["content-type"] == "application/problem+json"
    if r.request.method != "HEAD":
        assert r.json()["status"] == 502 and "origin" in r.json()["detail"]


def test_catalogue_href_to_another_origin_is_refused(origins_proxy, ab):
    a, b = ab
    with httpx.Client(base_url=origins_proxy.url, timeout=30) as c:
        _assert_502_problem(c.get("/assets/scenes/scene-a/B04"))
        _assert_502_problem(c.head("/assets/scenes/scene-a/B04"))
    assert a.log("/search")  # the catalogue was asked ...
    assert b.log() == []  # ... and the other origin never was


def test_catalogue_href_to_an_allowed_host_is_fetched(origins_proxy, ab):
    a, b = ab
    with httpx.Client(base_url=origins_proxy.url, timeout=30) as c:
        r = c.get("/assets/scenes-at-b/scene-a/B04")
    assert r.status_code == 200 and r.content == b.file(B04)
    assert b.data_requests() and a.data_requests() == []


def test_redirect_to_another_origin_is_refused_by_the_proxy(origins_proxy, ab):
    a, b = ab
    a.fault("scene-a/B04", redirect=f"{b.url}{{path}}")
    with httpx.Client(base_url=origins_proxy.url, timeout=30) as c:
        _assert_502_problem(c.get("/assets/files/scene-a/B04.tif"))
    assert a.data_requests() and b.log() == []


def test_redirect_to_an_allowed_host_is_followed_when_filling_the_cache(origins_proxy, ab):
    a, b = ab
    a.fault("scene-a/B04", redirect=f"{b.url}{{path}}")
    with httpx.Client(base_url=origins_proxy.url, timeout=30) as c:
        r = c.get("/assets/files-to-b/scene-a/B04.tif")
    assert r.status_code == 200 and r.content == b.file(B04)
    assert b.data_requests()
    assert not any(e["authorization"] for e in b.log())


def test_forwarded_token_does_not_follow_a_redirect_to_another_origin(origins_proxy, ab, oidc):
    a, b = ab
    a.fault("scene-a/B04", redirect=f"{b.url}{{path}}")
    token = {"Authorization": f"Bearer {oidc.token()}"}
    with httpx.Client(base_url=origins_proxy.url, timeout=30) as c:
        r = c.get("/assets/token-to-b/scene-a/B04.tif", headers=token)
    assert r.status_code == 200 and r.content == b.file(B04)
    assert a.data_requests() and all(e["authorization"] for e in a.data_requests())
    assert b.data_requests() and not any(e["authorization"] for e in b.log())
