"""The shared cache tier (`cache.store: s3://bucket/prefix`) on a real SeaweedFS: two proxies
with their own local tiers, one bucket between them."""

from __future__ import annotations

import hashlib
import secrets
import time

import httpx
import pytest

from tests.harness.procs import worker_process
from tests.harness.services import boto3_client
from tests.test_async import archive_config
from tests.test_queue import fresh_redis

OBJECT = "demo-cogs/scene-a/visual.tif"


def _config(upstream, s3, bucket, work, name, endpoint=None):
    return {
        "cache": {
            "store": f"s3://{bucket}/cache",
            "s3": {
                "endpoint_url": endpoint or s3.endpoint_url,
                "region": s3.region,
                "access_key_id": s3.access_key,
                "secret_access_key": s3.secret_key,
            },
            "local": {"store": str(work / f"{name}-local")},
            "block_size": "256KiB",
        },
        "datasets": {
            "files": {"upstream": {"http": {"base_url": f"{upstream.url}/data/demo-cogs"}}}
        },
    }


@pytest.fixture
def bucket(s3):
    name = f"fdp-{secrets.token_hex(4)}"
    boto3_client(s3).create_bucket(Bucket=name)
    return name


def _shared_blocks(s3, bucket):
    pages = (
        boto3_client(s3)
        .get_paginator("list_objects_v2")
        .paginate(Bucket=bucket, Prefix="cache/blocks/")
    )
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _wait_for(predicate, seconds=20):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_second_proxy_serves_from_the_shared_tier(start_proxy, upstream, s3, bucket, tmp_path):
    data = upstream.file(OBJECT)
    nblocks = -(-len(data) // (256 * 1024))
    a = start_proxy(_config(upstream, s3, bucket, tmp_path, "a"))
    b = start_proxy(_config(upstream, s3, bucket, tmp_path, "b"))
    url = "/assets/files/scene-a/visual.tif"
    r = httpx.get(a.url + url)
    assert r.status_code == 200 and r.content == data
    # copied in the background (slow when the machine is loaded: CI saw 20 s pass)
    _wait_for(lambda: len(_shared_blocks(s3, bucket)) == nblocks, 60)
    fetched = len(upstream.data_requests())
    r = httpx.get(b.url + url, headers={"Range": "bytes=1000-299999"})
    assert r.status_code == 206 and r.content == data[1000:300000]
    r = httpx.get(b.url + url)
    assert r.status_code == 200
    assert hashlib.sha256(r.content).digest() == hashlib.sha256(data).digest()
    assert len(upstream.data_requests()) == fetched  # B never asked the upstream: not even its size


def test_a_damaged_shared_block_is_never_served(start_proxy, upstream, s3, bucket, tmp_path):
    data = upstream.file(OBJECT)
    a = start_proxy(_config(upstream, s3, bucket, tmp_path, "a"))
    url = "/assets/files/scene-a/visual.tif"
    assert httpx.get(a.url + url, headers={"Range": "bytes=0-99"}).content == data[:100]
    _wait_for(lambda: len(_shared_blocks(s3, bucket)) == 1)
    [key] = _shared_blocks(s3, bucket)
    client = boto3_client(s3)
    sha = client.head_object(Bucket=bucket, Key=key)["Metadata"]["sha256"]
    client.put_object(Bucket=bucket, Key=key, Body=b"X" * 256 * 1024, Metadata={"sha256": sha})
    fetched = len(upstream.data_requests())
    b = start_proxy(_config(upstream, s3, bucket, tmp_path, "b"))
    r = httpx.get(b.url + url, headers={"Range": "bytes=0-99"})
    assert r.status_code == 206 and r.content == data[:100]  # from the upstream instead
    assert len(upstream.data_requests()) > fetched


def test_a_silent_shared_tier_costs_one_timeout_not_one_per_request(
    start_proxy, upstream, blackhole, tmp_path
):
    class Silent:  # a SeaweedFS stand-in that accepts connections and never answers
        endpoint_url, region, access_key, secret_key = blackhole.url, "us-east-1", "AK", "SK"

    proxy = start_proxy(_config(upstream, Silent, "nowhere", tmp_path, "silent"))
    data = upstream.file(OBJECT)
    started = time.monotonic()
    r = httpx.get(proxy.url + "/assets/files/scene-a/visual.tif", timeout=60)
    first = time.monotonic() - started
    assert r.status_code == 200 and r.content == data
    started = time.monotonic()
    r = httpx.get(proxy.url + "/assets/files/scene-b/visual.tif", timeout=60)
    assert r.status_code == 200 and r.content == upstream.file("demo-cogs/scene-b/visual.tif")
    assert time.monotonic() - started < 2  # the tier is skipped while it is down
    assert first < 30


def test_an_archive_retrieved_by_a_worker_is_served_by_another_proxy(
    start_proxy, upstream, s3, bucket, redis_url, tmp_path
):
    """Proxy A queues the retrieval, a worker fetches and publishes it to the shared tier,
    proxy B (its own local tier) serves it with no data request to the upstream."""
    shared = _config(upstream, s3, bucket, tmp_path, "unused")["cache"]
    redis = fresh_redis(redis_url)
    configs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        config = archive_config(upstream.url, tmp_path / name, redis)
        config["cache"] = {**shared, "local": {"store": str(tmp_path / f"{name}-local")}}
        configs.append(config)
    a, b = start_proxy(configs[0]), start_proxy(configs[1])
    url = "/assets/archive/archived-a/visual"
    with worker_process(a.config, tmp_path, "worker"):
        job = httpx.get(a.url + url, headers={"Prefer": "respond-async"}).headers["location"]
        deadline = time.monotonic() + 60
        while httpx.get(job).status_code != 303:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    data = upstream.file("demo-archive/archived-a/visual.tif")
    fetched = len(upstream.data_requests())
    r = httpx.get(b.url + url)
    assert r.status_code == 200 and r.content == data  # no job: the tier has it whole
    assert len(upstream.data_requests()) == fetched


def test_retention_runs_on_the_bucket_by_one_elected_replica(
    start_proxy, upstream, s3, bucket, redis_url, tmp_path
):
    redis = fresh_redis(redis_url)
    configs = []
    for name in ("a", "b"):
        config = _config(upstream, s3, bucket, tmp_path, name)
        config["cache"]["sweep_seconds"] = 1
        config["queue"] = {"redis_url": redis}
        config["datasets"]["files"]["retention"] = {"mode": "lru", "max_bytes": "1MiB"}
        configs.append(config)
    a, b = start_proxy(configs[0]), start_proxy(configs[1])
    first, second = "scene-a/B04.tif", "scene-b/B04.tif"
    sizes = [len(upstream.file(f"demo-cogs/{p}")) for p in (first, second)]
    assert max(sizes) < 2**20 < sum(sizes)  # both do not fit: the older one must go
    assert httpx.get(f"{a.url}/assets/files/{first}").status_code == 200
    time.sleep(1.1)  # (access times have a resolution: make the order plain)
    assert httpx.get(f"{b.url}/assets/files/{second}").status_code == 200

    def objects_left():
        keys = _shared_blocks(s3, bucket)
        return {k.split("/")[2] for k in keys}

    from cache.store import object_key

    _wait_for(lambda: objects_left() == {object_key("files", second)}, 30)
    listed = boto3_client(s3).list_objects_v2(Bucket=bucket, Prefix="cache/objects/")
    assert [o["Key"] for o in listed.get("Contents", [])] == [
        f"cache/objects/{object_key('files', second)}.json"
    ]
    import redis as redis_lib

    sweeper = redis_lib.Redis.from_url(redis).get("fdp:cache:sweeper")
    assert sweeper is not None and b":" in sweeper  # one replica holds the lease


def test_presign_delivery_redirects_into_the_bucket_once_it_holds_the_object(
    start_proxy, upstream, s3, bucket, tmp_path
):
    config = _config(upstream, s3, bucket, tmp_path, "a")
    config["datasets"]["files"]["delivery"] = "presign"
    proxy = start_proxy(config)
    url = f"{proxy.url}/assets/files/scene-b/B04.tif"
    data = upstream.file("demo-cogs/scene-b/B04.tif")
    r = httpx.get(url)  # not in the bucket yet: served, and filled
    assert r.status_code == 200 and r.content == data

    def redirected():
        return httpx.get(url).status_code == 307

    _wait_for(redirected)  # once the whole copy is up
    r = httpx.get(url)
    location = r.headers["location"]
    assert location.startswith(f"{s3.endpoint_url}/{bucket}/cache/whole/")
    assert s3.secret_key not in location and "X-Amz-Signature" in location
    fetched = len(upstream.data_requests())
    assert httpx.get(location).content == data  # signed: SeaweedFS enforces it
    assert len(upstream.data_requests()) == fetched
    r = httpx.get(url, headers={"Range": "bytes=0-99"})  # ranges are redirected too
    assert r.status_code == 307
    assert httpx.get(r.headers["location"], headers={"Range": "bytes=0-99"}).content == data[:100]
    tampered = location.replace("X-Amz-Signature=", "X-Amz-Signature=0")
    assert httpx.get(tampered).status_code == 403
