"""A cluster on loopback, as the Helm chart runs one: Redis, SeaweedFS as the shared cache
tier, two proxies and two workers, each with its own local folder."""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time

import httpx
import yaml

from tests.conftest import fdp_serve
from tests.harness.procs import worker_process
from tests.harness.services import boto3_client
from tests.test_async import archive_config
from tests.test_policies import Admin
from tests.test_queue import fresh_redis

ARCHIVED = "demo-archive/archived-b/visual.tif"


def _wait(predicate, seconds, what):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_cluster_shares_its_cache_limits_and_policies_and_survives_losing_members(
    upstream, s3, redis_url, oidc, tmp_path
):
    bucket = f"fdp-{secrets.token_hex(4)}"
    boto3_client(s3).create_bucket(Bucket=bucket)
    redis = fresh_redis(redis_url)
    (tmp_path / "shared").mkdir()
    base = archive_config(upstream.url, tmp_path / "shared", redis)
    base["auth"] = {"oidc_issuer": oidc.issuer}
    base["datasets"]["files"] = {
        "upstream": {"http": {"base_url": f"{upstream.url}/data/demo-cogs"}},
        "qos": {"anonymous": {"requests_per_minute": 6}},
    }
    base["datasets"]["plain"] = {
        "upstream": {"http": {"base_url": f"{upstream.url}/data/demo-cogs"}}
    }
    members = {}
    for name in ("proxy-a", "proxy-b", "worker-a", "worker-b"):
        (tmp_path / name).mkdir()
        config = {**base, "cache": {
            "store": f"s3://{bucket}/cache",
            "s3": {"endpoint_url": s3.endpoint_url, "region": s3.region,
                   "access_key_id": s3.access_key, "secret_access_key": s3.secret_key},
            "local": {"store": str(tmp_path / name / "local")},
            "block_size": "256KiB",
        }, "server": {"drain_seconds": 1, "grace_seconds": 30}}  # fmt: skip
        members[name] = config
    a = fdp_serve(members["proxy-a"], tmp_path / "proxy-a", name="proxy-a")
    b = fdp_serve(members["proxy-b"], tmp_path / "proxy-b", name="proxy-b")

    def worker(name):
        return worker_process(tmp_path / name / "fdp.yaml", tmp_path / name, name)

    for name in ("worker-a", "worker-b"):  # their config files, written as fdp_serve does
        config = {**members[name], "server": {"public_url": a.url}}
        (tmp_path / name / "fdp.yaml").write_text(yaml.safe_dump(config))
    with a.proc, b.proc:
        # 1. an archive request on A is retrieved by a worker; the first worker dies mid-job
        url = "/assets/archive/archived-b/visual"
        first = worker("worker-a").start()
        try:
            job = httpx.get(a.url + url, headers={"Prefer": "respond-async"}).headers["location"]
            _wait(
                lambda: [e for e in upstream.data_requests() if e["method"] == "GET"],
                20, "the first worker never started",
            )  # fmt: skip
            os.killpg(first.pid, signal.SIGKILL)  # mid-download: the archive takes 5 s
            first.proc.wait(5)
        finally:
            first.stop()
        with worker("worker-b"):  # the other worker takes the job over and finishes it
            _wait(lambda: httpx.get(job).status_code == 303, 60, "the job never finished")
        # ... and B serves it from the shared tier without asking the upstream
        fetched = len(upstream.data_requests())
        r = httpx.get(b.url + url)
        assert r.status_code == 200 and r.content == upstream.file(ARCHIVED)
        assert len(upstream.data_requests()) == fetched

        # 2. one QoS budget for both proxies (6 a minute for this address)
        codes = [httpx.get(f"{p.url}/assets/files/scene-a/B04.tif").status_code
                 for p in (a, b, a, b, a, b, a)]  # fmt: skip
        assert codes == [200] * 6 + [429]
        assert httpx.get(f"{b.url}/assets/files/scene-a/B04.tif").status_code == 429

        # 3. a policy edit on A applies on B
        admin = Admin(a.url, oidc.token(sub="olga", groups=["fdp-admins"]))
        etag = admin.get("archive").headers["etag"]
        r = admin.patch("archive", {"access": {"public": False, "authenticated": True}},
                        **{"if-match": etag})  # fmt: skip
        assert r.status_code == 200
        _wait(lambda: httpx.get(b.url + url).status_code == 401, 10, "B kept the old policy")
        admin.client.close()

        # 4. SIGTERM of A mid-download: the download finishes
        upstream.fault("^/data/demo-cogs/scene-c/visual.tif$", chunk_delay=0.2)
        out: dict = {}

        def download() -> None:
            with httpx.stream("GET", f"{a.url}/assets/plain/scene-c/visual.tif", timeout=60) as r:
                out["status"], out["body"] = r.status_code, b"".join(r.iter_bytes())

        thread = threading.Thread(target=download)
        thread.start()
        _wait(lambda: any("scene-c" in e["path"] for e in upstream.data_requests()), 10,
              "the download never started")  # fmt: skip
        a.proc._signal(signal.SIGTERM)
        thread.join(60)
        assert a.proc.proc.wait(30) in (0, -signal.SIGTERM)
    assert out.get("status") == 200 and out["body"] == upstream.file("demo-cogs/scene-c/visual.tif")
