"""fdp in front of fdp: an edge that caches what a central fdp serves, `Via` loop
protection, and the identity an edge shows the central one."""

from __future__ import annotations

import time

import httpx
import yaml

from tests.conftest import fdp_serve

B04 = "scene-a/B04.tif"


def served(proxy_url: str, dataset: str) -> int:
    """Requests for a dataset's data that a proxy has answered (from its /metrics), once
    none is under way (a response's last byte can reach the client before it is counted)."""
    deadline = time.monotonic() + 10
    while httpx.get(f"{proxy_url}/status.json").json()["responses_in_flight"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    total = 0.0
    for line in httpx.get(f"{proxy_url}/metrics").text.splitlines():
        if line.startswith("fdp_requests_total{") and f'dataset="{dataset}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def test_the_second_read_at_the_edge_touches_neither_central_nor_the_provider(upstream, tmp_path):
    central = fdp_serve(
        {
            "cache": {"store": str(tmp_path / "central" / "cache")},
            "datasets": {
                "d": {"upstream": {"http": {"base_url": f"{upstream.url}/data/demo-cogs/"}}}
            },
        },
        tmp_path / "central",
        name="central",
    )
    edge = fdp_serve(
        {
            "cache": {"store": str(tmp_path / "edge" / "cache")},
            "datasets": {"d": {"upstream": {"fdp": {"base_url": central.url}}}},
        },
        tmp_path / "edge",
        name="edge",
    )
    want = upstream.file(f"demo-cogs/{B04}")
    with central.proc, edge.proc:
        first = httpx.get(f"{edge.url}/assets/d/{B04}", timeout=30)
        assert first.status_code == 200 and first.content == want
        window = httpx.get(f"{edge.url}/assets/d/{B04}", headers={"range": "bytes=1000-1999"})
        assert window.status_code == 206 and window.content == want[1000:2000]
        asked_central, asked_upstream = served(central.url, "d"), len(upstream.data_requests())
        assert asked_central > 0 and asked_upstream > 0
        again = httpx.get(f"{edge.url}/assets/d/{B04}", timeout=30)
        assert again.status_code == 200 and again.content == want
        assert again.headers["etag"] == first.headers["etag"]
        assert served(central.url, "d") == asked_central
        assert len(upstream.data_requests()) == asked_upstream


def test_fdps_configured_in_a_circle_answer_508(tmp_path):
    a = fdp_serve({}, tmp_path / "a", name="a")
    b = fdp_serve({}, tmp_path / "b", name="b")
    for me, other in ((a, b), (b, a)):  # each one's `loop` is the other's
        config = yaml.safe_load(me.config.read_text())
        config["datasets"] = {"loop": {"upstream": {"fdp": {"base_url": other.url}}}}
        config["cache"] = {"store": str(me.config.parent / "cache")}
        me.config.write_text(yaml.safe_dump(config))
    with a.proc, b.proc:
        r = httpx.get(f"{a.url}/assets/loop/x.tif", timeout=30)
        assert r.status_code == 508
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"].endswith("/loop-detected")
        # B saw A's request, with A in its Via, and refused to go round again
        r = httpx.get(f"{b.url}/assets/loop/x.tif", headers={"via": f"1.1 {a.url[7:]}"})
        assert r.status_code == 508


def test_the_edge_shows_central_its_service_token_and_never_its_callers(upstream, oidc, tmp_path):
    files = {"http": {"base_url": f"{upstream.url}/data/demo-cogs/"}}
    central = fdp_serve(
        {
            "cache": {"store": str(tmp_path / "central" / "cache")},
            "auth": {"oidc_issuer": oidc.issuer, "audience": "fdp"},
            "datasets": {"p": {"upstream": files, "access": {"groups": ["partners"]}}},
        },
        tmp_path / "central",
        name="central",
    )
    token = oidc.token(sub="edge-service", groups=["partners"], exp_in=3600)
    (tmp_path / "token").write_text(token + "\n")
    edge = fdp_serve(
        {
            "cache": {"store": str(tmp_path / "edge" / "cache")},
            "datasets": {
                "p": {
                    "upstream": {
                        "fdp": {"base_url": central.url, "token_file": str(tmp_path / "token")}
                    }
                },
                "anonymous": {"upstream": {"fdp": {"base_url": central.url, "dataset": "p"}}},
            },
        },
        tmp_path / "edge",
        name="edge",
    )
    with central.proc, edge.proc:
        r = httpx.get(f"{edge.url}/assets/p/{B04}", timeout=30)
        logs = f"{r.text}\nedge:\n{edge.proc.log_text()}\ncentral:\n{central.proc.log_text()}"
        assert r.status_code == 200, logs
        assert r.content == upstream.file(f"demo-cogs/{B04}")
        r = httpx.get(f"{edge.url}/assets/anonymous/{B04}", timeout=30)
        assert r.status_code == 502  # central wants a token the edge does not have
        assert token not in r.text
        assert token not in edge.proc.log_text() and token not in central.proc.log_text()
