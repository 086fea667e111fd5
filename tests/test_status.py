"""`/status` and `/status.json` after known traffic, and the page in a real headless
browser (Debian's chromium): the key figures are on it, and its screenshot is kept in
`test-artifacts/status.png`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_metrics import config as metrics_config

B04 = "scene-a/B04.tif"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def config(upstream: Any, work: Path, **extra: Any) -> dict[str, Any]:
    """The metrics tests' datasets, and `direct` (pass-through) for an upstream failure."""
    cfg = metrics_config(upstream, work) | extra
    files = cfg["datasets"]["cached"]["upstream"]
    cfg["datasets"]["direct"] = {"upstream": files, "retention": {"mode": "lru", "max_bytes": 0}}
    return cfg


def traffic(proxy: Any, upstream: Any) -> None:
    """A miss, a hit, a QoS refusal, a retrieval job, and an upstream answering 503."""
    assert httpx.get(f"{proxy.url}/assets/cached/{B04}").status_code == 200
    assert httpx.get(f"{proxy.url}/assets/cached/{B04}").status_code == 200
    assert httpx.get(f"{proxy.url}/assets/limited/{B04}").status_code == 200
    assert httpx.get(f"{proxy.url}/assets/limited/{B04}").status_code == 429
    assert httpx.get(f"{proxy.url}/assets/vault/scene-b/B04.tif", timeout=60).status_code == 200
    upstream.fault("scene-c/B04", status=503)
    assert httpx.get(f"{proxy.url}/assets/direct/scene-c/B04.tif").status_code == 502


def test_status_figures_after_known_traffic(start_proxy, upstream, tmp_path):
    proxy = start_proxy(config(upstream, tmp_path))
    traffic(proxy, upstream)
    f = httpx.get(f"{proxy.url}/status.json").json()
    cached = f["datasets"]["cached"]
    assert (cached["hits"], cached["misses"], cached["hit_ratio"]) == (1, 1, 0.5)
    assert cached["cache_objects"] == 1 and cached["policy_version"] == 1
    size = len(upstream.file(f"demo-cogs/{B04}"))
    assert cached["cache_bytes"] == size
    origin = f["upstreams"][upstream.url.split("//", 1)[1]]
    assert origin["requests"] >= 4 and origin["errors"] == {"5xx": 1}
    assert origin["ok"] is False and origin["error"] == "5xx"  # its last answer was a 503
    jobs = f["queue"]["recent_jobs"]
    assert [(j["dataset"], j["state"]) for j in jobs] == [("vault", "succeeded")]
    assert f["queue"]["depth"] == 0
    refusals = f["qos"]["recent_rejections"]
    assert [(r["dataset"], r["kind"], r["scope"]) for r in refusals] == [
        ("limited", "requests", "address")
    ]


def test_the_status_page_in_a_browser(start_proxy, upstream, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is missing: `make test` installs it (apt-get install chromium)"
    proxy = start_proxy(config(upstream, tmp_path))
    traffic(proxy, upstream)
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"]
    dom = subprocess.run(
        [*browser, "--dump-dom", f"{proxy.url}/status"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    for figure in ("fdp status", "cached", "50%", "vault", "succeeded", "failing", "5xx: 1"):
        assert figure in page, figure
    assert "limited" in page and "address 127.0.0.1" in page
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status.png"
    shot.unlink(missing_ok=True)
    done = subprocess.run(
        [*browser, f"--screenshot={shot}", f"{proxy.url}/status"],
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one


@pytest.mark.parametrize("path", ["/status", "/status.json"])
def test_status_is_for_admins_when_there_is_an_issuer(start_proxy, upstream, oidc, tmp_path, path):
    proxy = start_proxy(config(upstream, tmp_path, auth={"oidc_issuer": oidc.issuer}))
    assert httpx.get(proxy.url + path).status_code == 401
    user = {"authorization": f"Bearer {oidc.token(sub='eve')}"}
    assert httpx.get(proxy.url + path, headers=user).status_code == 403
    admin = {"authorization": f"Bearer {oidc.token(sub='root', groups=['fdp-admins'])}"}
    assert httpx.get(proxy.url + path, headers=admin).status_code == 200
