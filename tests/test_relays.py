"""The relay directory and `fdp serve --relay-of`: real processes, a real OIDC issuer."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from cache.store import Store, object_key
from tests.conftest import fdp_serve

B04 = "scene-a/B04.tif"


def wait_for(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def listed(directory_url: str, admin: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{directory_url}/admin/relays", headers={"authorization": f"Bearer {admin}"})
    r.raise_for_status()
    return r.json()["relays"]


def rot(cache: Path, dataset: str, path: str) -> None:
    """Flip a byte of the object's first block in a cache folder (disk rot)."""
    opened = Store(cache)
    try:
        f = opened.blocks.get((object_key(dataset, path), 0), read=True)
        name = f.name
        f.close()
    finally:
        opened.close()
    with open(name, "r+b") as block:
        block.seek(100)
        byte = block.read(1)
        block.seek(100)
        block.write(bytes([byte[0] ^ 0xFF]))


def test_a_relay_registers_is_sent_clients_and_is_dropped_when_it_stops(upstream, oidc, tmp_path):
    directory = fdp_serve(
        {
            "cache": {"store": str(tmp_path / "directory" / "cache")},
            "auth": {"oidc_issuer": oidc.issuer, "audience": "fdp"},
            "relays": {"heartbeat_seconds": 0.5, "expire_seconds": 2},
            "datasets": {
                "pub": {
                    "upstream": {"http": {"base_url": f"{upstream.url}/data/demo-cogs/"}},
                    "delivery": "relay",
                }
            },
        },
        tmp_path / "directory",
        name="directory",
    )
    (tmp_path / "relay-token").write_text(oidc.token(sub="relay-1", scope="fdp:relay", exp_in=3600))
    relay_cache = tmp_path / "relay" / "cache"  # (its policy file goes beside it)
    relay = fdp_serve(
        {
            "cache": {
                "store": str(relay_cache),
                "max_bytes": "1GiB",
                "sweep_seconds": 0.3,
                "scrub_bytes": "1GiB",
            },
            "relay": {"token_file": str(tmp_path / "relay-token")},
        },
        tmp_path / "relay",
        "--relay-of",
        directory.url,
        name="relay",
    )
    admin = oidc.token(sub="operator", groups=["fdp-admins"])
    want = upstream.file(f"demo-cogs/{B04}")
    with directory.proc:
        beat = {"url": "http://127.0.0.1:9/", "disk_bytes": 0}
        anyone = oidc.token(sub="mallory")
        r = httpx.post(
            f"{directory.url}/admin/relays",
            json=beat,
            headers={"authorization": f"Bearer {anyone}"},
        )
        assert r.status_code == 403  # no relay scope
        assert httpx.post(f"{directory.url}/admin/relays", json=beat).status_code == 401
        with relay.proc:
            wait_for(lambda: [r["url"] for r in listed(directory.url, admin)] == [relay.url])
            assert listed(directory.url, admin)[0]["datasets"] == ["pub"]
            # no relay holds it yet: the directory serves it, and counts the request
            r = httpx.get(f"{directory.url}/assets/pub/{B04}", timeout=30)
            assert r.status_code == 200 and r.content == want
            # the relay is told to prefetch it, and then holds it
            wait_for(lambda: listed(directory.url, admin)[0]["objects"] == 1)
            r = httpx.get(f"{directory.url}/assets/pub/{B04}", timeout=30)
            assert r.status_code == 302
            assert r.headers["location"] == f"{relay.url}/assets/pub/{B04}"
            asked = len(upstream.data_requests())
            r = httpx.get(r.headers["location"], timeout=30)
            assert r.status_code == 200 and r.content == want
            assert len(upstream.data_requests()) == asked  # from the relay's own cache
            figures = httpx.get(
                f"{directory.url}/status.json", headers={"authorization": f"Bearer {admin}"}
            ).json()
            assert figures["relays"][0]["clients_sent"] == 1
            # its copy rots on disk: the relay's scrub expunges it (and, as the object is
            # still wanted, fetches it again): clients sent there get the right bytes
            rot(relay_cache, "pub", B04)
            checks = lambda: httpx.get(f"{relay.url}/readyz").json()["checks"]  # noqa: E731
            wait_for(lambda: checks()["cache"]["integrity_failures"] >= 1)
            assert "does not match its sha-256: evicted" in relay.proc.log_text()
            wait_for(lambda: listed(directory.url, admin)[0]["objects"] == 1)
            r = httpx.get(f"{directory.url}/assets/pub/{B04}", follow_redirects=True, timeout=30)
            assert r.content == want and str(r.url).startswith(relay.url)
        # (it may fetch it again meanwhile; stopped, it stops heartbeating and is dropped)
        wait_for(lambda: listed(directory.url, admin) == [])
        r = httpx.get(f"{directory.url}/assets/pub/{B04}", timeout=30)
        assert r.status_code == 200 and r.content == want
