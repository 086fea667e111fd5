"""S3 upstreams against SeaweedFS (which enforces signatures): presign, redirect, cache."""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from tests.harness.recorder import RecordingFront
from tests.harness.services import boto3_client

COG = "demo-cogs/scene-b/visual.tif"


@pytest.fixture(scope="module")
def store(s3, demo_data):
    """A bucket with a COG and a random blob, behind a recording front."""
    client = boto3_client(s3)
    client.create_bucket(Bucket="eo-vault")
    client.put_object(Bucket="eo-vault", Key="l2/scene-b.tif", Body=(demo_data / COG).read_bytes())
    blob = os.urandom(3 * 1024 * 1024 + 17)
    client.put_object(Bucket="eo-vault", Key="l2/blob.bin", Body=blob)
    front = RecordingFront(int(urlsplit(s3.endpoint_url).port))
    yield front, blob
    front.close()


@pytest.fixture(scope="module")
def sproxy(start_proxy, s3, store, oidc, upstream_server, tmp_path_factory):
    front, _ = store
    work = tmp_path_factory.mktemp("s3proxy")
    secret_file = work / "secret"
    secret_file.write_text(s3.secret_key + "\n")
    s3cfg = {
        "bucket": "eo-vault",
        "prefix": "l2",
        "endpoint_url": front.url,
        "region": s3.region,
        "access_key_id": s3.access_key,
        "secret_access_key_file": str(secret_file),
    }
    config = {
        "cache": {"store": str(work / "cache")},
        "auth": {"oidc_issuer": oidc.issuer, "audience": "fdp"},
        "datasets": {
            "vault": {
                "upstream": {"s3": s3cfg},
                "delivery": "presign",
                "presign_expires": 600,
                "access": {"groups": ["eo-users"]},
            },
            "mirror": {"upstream": {"s3": s3cfg}},  # delivery: cache, public
            "files": {
                "upstream": {"http": {"base_url": f"{upstream_server.url}/data/demo-cogs/"}},
                "delivery": "redirect",
            },
        },
    }
    return start_proxy(config)


def bearer(oidc, **kw):
    return {"Authorization": f"Bearer {oidc.token(**kw)}"}


def test_presign_redirect_works_for_get_range_and_head(sproxy, store, oidc, demo_data, s3):
    front, _ = store
    data = (demo_data / COG).read_bytes()
    auth = bearer(oidc, groups=["eo-users"])
    r = httpx.get(f"{sproxy.url}/assets/vault/scene-b.tif", headers=auth)
    assert r.status_code == 307
    assert r.headers["cache-control"] == "no-store" and "date" in r.headers
    location = r.headers["location"]
    assert location.startswith(front.url + "/eo-vault/l2/scene-b.tif?")
    assert "X-Amz-Expires=600" in location and "X-Amz-Signature=" in location
    assert s3.secret_key not in location and oidc.token() not in location
    full = httpx.get(location)
    assert full.status_code == 200 and full.content == data
    part = httpx.get(location, headers={"Range": "bytes=1000-1999"})
    assert part.status_code == 206 and part.content == data[1000:2000]
    # HEAD is redirected to a URL signed for HEAD: GDAL's first request works
    head = httpx.head(f"{sproxy.url}/assets/vault/scene-b.tif", headers=auth, follow_redirects=True)
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)


def test_a_tampered_presigned_url_is_refused_by_the_store(sproxy, oidc):
    r = httpx.get(
        f"{sproxy.url}/assets/vault/scene-b.tif", headers=bearer(oidc, groups=["eo-users"])
    )
    location = r.headers["location"]
    sig = re.search(r"X-Amz-Signature=([0-9a-f]+)", location).group(1)
    forged = location.replace(sig, ("0" if sig[0] != "0" else "1") + sig[1:])
    assert httpx.get(forged).status_code == 403
    other_key = location.replace("scene-b.tif", "blob.bin")
    assert httpx.get(other_key).status_code == 403


def test_no_location_for_the_unauthorised(sproxy, oidc):
    anonymous = httpx.get(f"{sproxy.url}/assets/vault/scene-b.tif")
    assert anonymous.status_code == 401 and "location" not in anonymous.headers
    outsider = httpx.get(f"{sproxy.url}/assets/vault/scene-b.tif", headers=bearer(oidc))
    assert outsider.status_code == 403 and "location" not in outsider.headers
    traversal = httpx.get(
        f"{sproxy.url}/assets/vault/..%2Fsecret", headers=bearer(oidc, groups=["eo-users"])
    )
    assert traversal.status_code in (400, 404) and "location" not in traversal.headers


def test_gdal_follows_the_presigned_redirect_and_the_store_never_sees_the_token(
    sproxy, store, oidc, demo_data
):
    front, _ = store
    token = oidc.token(groups=["eo-users"])
    before = len(front.sent)
    window = Window(256, 256, 256, 256)
    env = {
        "GDAL_HTTP_AUTH": "BEARER",
        "GDAL_HTTP_BEARER": token,
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    }
    with rasterio.Env(**env), rasterio.open(f"{sproxy.url}/assets/vault/scene-b.tif") as remote:
        got = remote.read(window=window)
    with rasterio.open(demo_data / COG) as src:
        np.testing.assert_array_equal(got, src.read(window=window))
    seen = bytes(front.sent[before:]).lower()
    assert b"get /eo-vault/l2/scene-b.tif" in seen  # GDAL did go to the store
    assert b"authorization: bearer" not in seen and token.encode().lower() not in seen


def test_s3_dataset_with_cache_delivery_does_ranged_gets_then_hits(sproxy, store):
    front, blob = store
    url = f"{sproxy.url}/assets/mirror/blob.bin"
    r = httpx.get(url, headers={"Range": "bytes=-100"})
    assert r.status_code == 206 and r.content == blob[-100:]
    seen = bytes(front.sent).decode("latin-1").lower()
    assert "range: bytes=0-" in seen  # the proxy fetched a block with a ranged GET
    count = len(front.requests())
    again = httpx.get(url, headers={"Range": "bytes=-100"})
    assert again.content == blob[-100:] and len(front.requests()) == count
    listing = httpx.get(f"{sproxy.url}/stac/collections/mirror/items").json()
    assert sorted(f["id"] for f in listing["features"]) == ["blob.bin", "scene-b.tif"]
    blob_item = next(f for f in listing["features"] if f["id"] == "blob.bin")
    assert blob_item["assets"]["blob"]["file:size"] == len(blob)  # the listing's own size
    assert httpx.get(f"{sproxy.url}/assets/mirror/nope.bin").status_code == 404


def test_redirect_delivery_for_public_hrefs(sproxy, upstream):
    r = httpx.get(f"{sproxy.url}/assets/files/scene-a/B04.tif")
    assert r.status_code == 307
    assert r.headers["location"] == f"{upstream.url}/data/demo-cogs/scene-a/B04.tif"


def test_credentials_and_tokens_never_reach_the_log(sproxy, s3, oidc):
    token = oidc.token(groups=["eo-users"])
    httpx.get(
        f"{sproxy.url}/assets/vault/scene-b.tif", headers={"Authorization": f"Bearer {token}"}
    )
    log = sproxy.proc.log_text()
    assert s3.secret_key not in log and token not in log and "X-Amz-Signature" not in log
    assert "Traceback" not in log
