"""Live policy editing through the admin API, against real proxies: documents with strong
ETags and preconditions, validation that changes nothing, versions and audit, effects on
the next request, and two replicas that share one Redis policy store."""

from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import Upstream, fdp_serve
from tests.harness.procs import BIN
from tests.test_queue import fresh_redis

B04 = "scene-a/B04.tif"


def config(upstream: Upstream, oidc: Any, work: Path, **extra: Any) -> dict[str, Any]:
    files = {"http": {"base_url": f"{upstream.url}/data/demo-cogs/"}}
    return {
        "cache": {"store": str(work / "cache")},
        "auth": {"oidc_issuer": oidc.issuer},
        "datasets": {
            "open": {"upstream": files},
            "keys": {
                "upstream": {
                    "s3": {
                        "bucket": "b",
                        "endpoint_url": "http://127.0.0.1:9",
                        "access_key_id": "AKIDEXAMPLE",
                        "secret_access_key": "very-secret-value",
                    }
                },
                "access": {"authenticated": True},
            },
        },
        **extra,
    }


class Admin:
    """An admin's HTTP client for one proxy."""

    def __init__(self, url: str, token: str) -> None:
        self.client = httpx.Client(
            base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=30
        )

    def get(self, name: str) -> httpx.Response:
        return self.client.get(f"/admin/policies/{name}")

    def put(self, name: str, doc: Any, **headers: str) -> httpx.Response:
        return self.client.put(f"/admin/policies/{name}", json=doc, headers=headers)

    def patch(self, name: str, patch: Any, **headers: str) -> httpx.Response:
        headers = {"content-type": "application/merge-patch+json", **headers}
        return self.client.patch(
            f"/admin/policies/{name}", content=json.dumps(patch), headers=headers
        )


def at(r: httpx.Response) -> dict[str, str]:
    """`If-Match` with the ETag `r` carried."""
    return {"if-match": r.headers["etag"]}


@pytest.fixture
def admin_of(oidc):
    token = oidc.token(sub="olga", groups=["fdp-admins"])
    clients: list[Admin] = []

    def make(url: str) -> Admin:
        clients.append(Admin(url, token))
        return clients[-1]

    yield make
    for c in clients:
        c.client.close()


def test_a_policy_round_trips_with_an_etag_and_never_shows_a_secret(
    start_proxy, upstream, oidc, admin_of, tmp_path
):
    proxy = start_proxy(config(upstream, oidc, tmp_path))
    admin = admin_of(proxy.url)
    r = admin.get("keys")
    assert r.status_code == 200
    etag = r.headers["etag"]
    assert etag.startswith('"v1-')  # strong
    doc = r.json()
    assert doc["upstream"]["s3"]["secret_access_key"] == "**********"
    assert "very-secret-value" not in r.text and "AKIDEXAMPLE" not in r.text
    assert doc["access"] == {"public": False, "authenticated": True}
    assert (
        admin.client.get("/admin/policies/keys", headers={"if-none-match": etag}).status_code == 304
    )
    # what GET returned, PUT accepts back: the masked secrets are kept as they were
    doc["max_age"] = 60
    put = admin.put("keys", doc, **{"if-match": etag})
    assert put.status_code == 200, put.text
    assert put.headers["etag"].startswith('"v2-') and put.json()["max_age"] == 60
    store = json.loads((tmp_path / "policies.json").read_text())
    kept = store["datasets"]["keys"]["document"]["upstream"]["s3"]
    assert kept["secret_access_key"] == "very-secret-value"
    history = admin.client.get("/admin/policies/keys/history").json()["versions"]
    assert [v["version"] for v in history] == [2, 1]
    assert history[0]["by"] == "olga" and history[1]["by"] == "config"
    assert history[0]["changes"] == [{"path": "max_age", "old": 3600, "new": 60}]
    assert "very-secret-value" not in json.dumps(history)
    listed = admin.client.get("/admin/policies").json()["policies"]
    assert {p["dataset"]: p["version"] for p in listed} == {"open": 1, "keys": 2}


def test_writes_need_the_current_etag_and_invalid_ones_change_nothing(
    start_proxy, upstream, oidc, admin_of, tmp_path
):
    proxy = start_proxy(config(upstream, oidc, tmp_path))
    admin = admin_of(proxy.url)
    first = admin.get("open")
    doc, etag = first.json(), first.headers["etag"]
    missing = admin.put("open", doc)
    assert missing.status_code == 428 and missing.json()["type"].endswith("/precondition-required")
    stale = admin.put("open", doc, **{"if-match": '"v0-0000"'})
    assert stale.status_code == 412
    bad = {**doc, "delivery": "teleport", "retention": {"mode": "rolling"}, "colour": "red"}
    invalid = admin.put("open", bad, **{"if-match": etag})
    assert (
        invalid.status_code == 422 and invalid.headers["content-type"] == "application/problem+json"
    )
    errors = invalid.json()["errors"]
    assert any(e.startswith("delivery:") for e in errors)
    assert any(e.startswith("retention:") and "days" in e for e in errors)
    assert any(e.startswith("colour: unknown key") for e in errors)
    assert admin.get("open").headers["etag"] == etag  # nothing changed
    dry = admin.client.post("/admin/policies/validate?dataset=open", json=bad)
    assert dry.status_code == 422 and dry.json()["errors"] == errors
    ok = admin.client.post("/admin/policies/validate?dataset=open", json=doc)
    assert ok.status_code == 200 and ok.json()["valid"] is True
    assert admin.get("open").headers["etag"] == etag  # a dry run writes nothing
    plain = httpx.put(
        f"{proxy.url}/admin/policies/open",
        json=doc,
        headers={"authorization": f"Bearer {oidc.token(sub='eve')}", "if-match": etag},
    )
    assert plain.status_code == 403  # the admin group only


def test_edits_apply_to_the_next_request(start_proxy, upstream, oidc, admin_of, tmp_path):
    proxy = start_proxy(config(upstream, oidc, tmp_path))
    admin = admin_of(proxy.url)
    url = f"{proxy.url}/assets/open/{B04}"
    assert httpx.get(url).status_code == 200
    r = admin.get("open")
    closed = admin.patch(
        "open", {"access": {"public": False, "groups": ["eo"]}}, **{"if-match": r.headers["etag"]}
    )
    assert closed.status_code == 200, closed.text
    assert closed.json()["access"] == {"public": False, "authenticated": False, "groups": ["eo"]}
    assert httpx.get(url).status_code == 401  # access: the very next request
    member = {"authorization": f"Bearer {oidc.token(sub='ann', groups=['eo'])}"}
    assert httpx.get(url, headers=member).status_code == 200
    limited = admin.patch(
        "open", {"qos": {"requests_per_minute": 1}}, **{"if-match": closed.headers["etag"]}
    )
    assert limited.status_code == 200 and limited.headers["etag"].startswith('"v3-')
    assert httpx.get(url, headers=member).status_code == 200
    assert httpx.get(url, headers=member).status_code == 429  # QoS: the next admission
    new = {"upstream": {"http": {"base_url": f"{upstream.url}/data/demo-cogs/"}}}
    created = admin.put("fresh", new, **{"if-none-match": "*"})
    assert created.status_code == 201, created.text
    assert httpx.get(f"{proxy.url}/assets/fresh/{B04}").content == upstream.file(f"demo-cogs/{B04}")
    again = admin.put("fresh", new, **{"if-none-match": "*"})
    assert again.status_code == 412  # it exists now
    gone = admin.client.delete(
        "/admin/policies/fresh", headers={"if-match": created.headers["etag"]}
    )
    assert gone.status_code == 204
    dropped = httpx.get(f"{proxy.url}/assets/fresh/{B04}")
    assert dropped.status_code == 404 and dropped.json()["type"].endswith("/unknown-dataset")
    assert admin.get("fresh").status_code == 404
    # rollback: version 1 of `open` (public) comes back as a new version
    back = admin.client.post("/admin/policies/open/rollback?version=1")
    assert back.status_code == 200 and back.headers["etag"].startswith('"v4-')
    assert httpx.get(url).status_code == 200
    latest = admin.client.get("/admin/policies/open/history").json()["versions"][0]
    assert latest["action"] == "rollback to v1" and latest["by"] == "olga"


def test_two_replicas_share_the_policy_store(upstream, oidc, redis_url, admin_of, tmp_path):
    cfg = config(upstream, oidc, tmp_path, queue={"redis_url": fresh_redis(redis_url)})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = fdp_serve(cfg, tmp_path / "a"), fdp_serve(cfg, tmp_path / "b")
    with a.proc, b.proc:
        on_a, on_b = admin_of(a.url), admin_of(b.url)
        etag = on_a.get("open").headers["etag"]
        assert on_b.get("open").headers["etag"] == etag  # seeded once, by either
        # two operators write from the same version at once: exactly one wins
        with ThreadPoolExecutor(2) as pool:
            tries = [
                pool.submit(c.patch, "open", {"max_age": n}, **{"if-match": etag})
                for c, n in ((on_a, 10), (on_b, 20))
            ]
            codes = sorted(f.result().status_code for f in tries)
        assert codes == [200, 412]
        etag = on_a.get("open").headers["etag"]
        t = time.monotonic()
        on_a.patch(
            "open", {"access": {"public": False, "authenticated": True}}, **{"if-match": etag}
        )
        while httpx.get(f"{b.url}/assets/open/{B04}").status_code != 401:  # B enforces it
            assert time.monotonic() - t < 5, "replica B still serves the old policy"
            time.sleep(0.05)


def test_a_policy_store_that_never_answers_is_a_503(
    start_proxy, upstream, oidc, blackhole, admin_of, tmp_path
):
    cfg = config(
        upstream, oidc, tmp_path, queue={"redis_url": blackhole.redis_url, "timeout_seconds": 0.5}
    )
    proxy = start_proxy(cfg)  # starts on the config file's policies
    admin = admin_of(proxy.url)
    t = time.monotonic()
    r = admin.get("open")
    assert r.status_code == 503 and r.json()["type"].endswith("/policy-store-unavailable")
    assert time.monotonic() - t < 3
    assert httpx.get(f"{proxy.url}/assets/open/{B04}").status_code == 200  # data still flows


def test_the_cli_reads_edits_and_rolls_back_with_readable_diffs(
    start_proxy, upstream, oidc, tmp_path
):
    proxy = start_proxy(config(upstream, oidc, tmp_path))
    env = {
        **os.environ,
        "FDP_URL": proxy.url,
        "FDP_TOKEN": oidc.token(sub="olga", groups=["fdp-admins"]),
    }

    def fdp(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "fdp"), "policies", *args],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = fdp("list")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[:2] for line in listed.stdout.splitlines()] == [
        ["keys", "v1"],
        ["open", "v1"],
    ]
    got = yaml.safe_load(fdp("get", "open").stdout)
    assert got["open"]["max_age"] == 3600
    got["open"]["max_age"] = 120
    (tmp_path / "open.yaml").write_text(yaml.safe_dump(got))
    written = fdp("set", str(tmp_path / "open.yaml"))
    assert written.returncode == 0, written.stderr
    assert "-max_age: 3600\n+max_age: 120\n" in written.stdout
    assert "open: updated" in written.stdout

    got["open"]["retention"] = {"mode": "rolling"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"datasets": got}))
    refused = fdp("validate", str(tmp_path / "bad.yaml"))
    assert refused.returncode != 0 and "retention: Value error, mode 'rolling'" in refused.stderr
    assert "olga" not in refused.stderr and env["FDP_TOKEN"] not in refused.stderr

    edited = fdp("edit", "open", EDITOR="sed -i s/max_age:.120/max_age:\\ 30/")
    assert edited.returncode == 0, edited.stderr
    assert "-max_age: 120\n+max_age: 30\n" in edited.stdout
    history = fdp("history", "open").stdout
    assert "v3" in history and "olga" in history and "max_age: 120 -> 30" in history
    back = fdp("rollback", "open", "1")
    assert back.returncode == 0 and "+max_age: 3600" in back.stdout
    assert yaml.safe_load(fdp("get", "open").stdout)["open"]["max_age"] == 3600


def test_delivery_and_retention_edits_and_a_deleted_datasets_cache(
    start_proxy, upstream, oidc, admin_of, tmp_path
):
    """Delivery edits apply to the next resolution, retention edits on the next eviction
    pass; a deleted dataset's cached objects are left to the global cap."""
    cfg = config(
        upstream, oidc, tmp_path, cache={"store": str(tmp_path / "cache"), "sweep_seconds": 0.5}
    )
    proxy = start_proxy(cfg)
    admin = admin_of(proxy.url)
    url = f"{proxy.url}/assets/open/{B04}"
    assert httpx.get(url).status_code == 200  # cached
    redirected = admin.patch("open", {"delivery": "redirect"}, **at(admin.get("open")))
    r = httpx.get(url)
    assert r.status_code == 307 and r.headers["location"].startswith(upstream.url)
    admin.patch("open", {"delivery": "cache", "retention": {"max_bytes": 1000}}, **at(redirected))
    upstream.reset()
    deadline = time.monotonic() + 10
    while not upstream.data_requests():  # evicted by the next pass: the next GET is a miss
        assert time.monotonic() < deadline, "the retention edit was not applied"
        assert httpx.get(url, headers={"range": "bytes=0-9"}).status_code == 206
        time.sleep(0.2)
    kept = admin.patch("open", {"retention": {"max_bytes": None}}, **at(admin.get("open")))
    assert httpx.get(url).status_code == 200  # cached again, under the default retention
    admin.client.delete("/admin/policies/open", headers=at(kept))
    time.sleep(1.5)  # three eviction passes (nothing to wait for: nothing should happen)
    left = admin.client.get("/status.json").json()["datasets"]["open"]
    assert left["serving"] is False and left["cache_objects"] == 1


def test_worker_processes_follow_edits_in_the_policy_file(upstream, oidc, admin_of, tmp_path):
    """Without Redis, `--workers 2` share the policy file: an edit taken by one process is
    enforced by both within seconds."""
    proxy = fdp_serve(config(upstream, oidc, tmp_path), tmp_path, "--workers", "2")
    with proxy.proc:
        admin = admin_of(proxy.url)
        url = f"{proxy.url}/assets/open/{B04}"
        assert httpx.get(url).status_code == 200
        closing = {"access": {"public": False, "authenticated": True}}
        assert admin.patch("open", closing, **at(admin.get("open"))).status_code == 200
        t, streak = time.monotonic(), 0
        while streak < 20:  # both processes, whichever the kernel hands each request to
            streak = streak + 1 if httpx.get(url).status_code == 401 else 0
            assert time.monotonic() - t < 10, "a worker process still serves the old policy"
