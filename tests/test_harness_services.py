"""The service fixtures start real servers that behave like production ones.

Each test checks a property later tests rely on: Redis stores, S3 serves ranges and
refuses bad or expired signatures, the OIDC issuer publishes keys that verify its tokens
and rotates them, and hostile tokens are refused by joserfc when algorithms are pinned.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import sys
import time
import uuid
from urllib.parse import parse_qs, urlsplit

import botocore.exceptions
import httpx
import pytest
import redis
from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ExpiredTokenError,
    InvalidClaimError,
    InvalidKeyIdError,
    JoseError,
    UnsupportedAlgorithmError,
)
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry

from tests.harness.oidc_issuer import OidcIssuer
from tests.harness.services import (
    GroupServerProcess,
    S3Server,
    boto3_client,
    group_members,
    start_redis,
)

# Also registered by tests/conftest.py; listing it here lets this module run on its own.
pytest_plugins = ["tests.harness.fixtures"]

ALLOWED_ALGS = ["RS256", "ES256", "PS256"]


# --- process handling ---------------------------------------------------------------------


def test_stop_kills_the_whole_group_of_the_started_pid(tmp_path):
    script = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    proc = GroupServerProcess(
        "grouptest",
        [sys.executable, "-c", script],
        log_dir=tmp_path,
        ready=lambda: True,
        grace=2,
    )
    proc.start()
    try:
        deadline = time.monotonic() + 10
        while len(group_members(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        members = group_members(proc.pid)
        assert len(members) == 2, members
    finally:
        proc.stop()
    assert group_members(proc.pid) == []


def test_redis_stop_ends_the_server(tmp_path):
    proc, url = start_redis(tmp_path)
    assert redis.Redis.from_url(url).ping()
    proc.stop()
    assert group_members(proc.pid) == []
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()


# --- Redis --------------------------------------------------------------------------------


def test_redis_set_get(redis_url):
    assert redis_url.startswith("redis://127.0.0.1:")
    client = redis.Redis.from_url(redis_url)
    key = f"harness:{uuid.uuid4().hex}"
    client.set(key, b"value", ex=60)
    assert client.get(key) == b"value"
    client.close()


# --- S3 -----------------------------------------------------------------------------------

SIZE = 300 * 1024 + 7  # not a multiple of anything a server might round to


@pytest.fixture(scope="module")
def s3_object(s3: S3Server) -> tuple[str, str, bytes]:
    client = boto3_client(s3)
    bucket = f"harness-{uuid.uuid4().hex[:12]}"
    key = "dir/object.bin"
    data = os.urandom(SIZE)
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key=key, Body=data)
    return bucket, key, data


def test_s3_listens_on_loopback_and_reports_startup(s3):
    assert s3.endpoint_url.startswith("http://127.0.0.1:")
    # SeaweedFS has fixed internal sleeps of ~2 s; much more means something regressed.
    print(f"seaweedfs startup: {s3.startup_seconds:.2f} s")
    assert s3.startup_seconds < 20


def test_s3_rejects_a_wrong_secret(s3):
    wrong = S3Server(s3.endpoint_url, s3.access_key, "not-the-secret", s3.region, s3.proc)
    with pytest.raises(botocore.exceptions.ClientError) as err:
        boto3_client(wrong, retries={"max_attempts": 1}).list_buckets()
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_s3_boto3_range_get(s3, s3_object):
    bucket, key, data = s3_object
    client = boto3_client(s3)
    whole = client.get_object(Bucket=bucket, Key=key)
    assert whole["ContentLength"] == SIZE
    assert whole["Body"].read() == data
    part = client.get_object(Bucket=bucket, Key=key, Range="bytes=1000-70999")
    assert part["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert part["ContentRange"] == f"bytes 1000-70999/{SIZE}"
    assert part["Body"].read() == data[1000:71000]


def _presign(s3: S3Server, bucket: str, key: str, op: str = "get_object", expires: int = 300):
    return boto3_client(s3).generate_presigned_url(
        op, Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires
    )


def test_presigned_get_full_range_and_head(s3, s3_object):
    bucket, key, data = s3_object
    url = _presign(s3, bucket, key)
    assert url.startswith(f"{s3.endpoint_url}/{bucket}/")  # path-style
    with httpx.Client(timeout=10) as http:
        full = http.get(url)
        assert full.status_code == 200
        assert full.content == data
        assert int(full.headers["content-length"]) == SIZE

        part = http.get(url, headers={"Range": "bytes=100000-199999"})
        assert part.status_code == 206
        assert part.headers["content-range"] == f"bytes 100000-199999/{SIZE}"
        assert part.content == data[100000:200000]

        suffix = http.get(url, headers={"Range": "bytes=-10"})
        assert suffix.status_code == 206
        assert suffix.content == data[-10:]

        head = http.head(_presign(s3, bucket, key, op="head_object"))
        assert head.status_code == 200
        assert int(head.headers["content-length"]) == SIZE
        assert head.headers.get("accept-ranges") == "bytes"


def test_presigned_get_url_refuses_head(s3, s3_object):
    # SigV4 signs the method: a URL presigned for GET does not allow HEAD (as on AWS).
    # Clients that HEAD first (GDAL) need their own HEAD URL or a GET with a Range.
    bucket, key, _ = s3_object
    assert httpx.head(_presign(s3, bucket, key), timeout=10).status_code == 403


def test_presigned_url_with_tampered_signature_is_refused(s3, s3_object):
    bucket, key, _ = s3_object
    url = _presign(s3, bucket, key)
    sig = parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]
    bad_sig = ("1" if sig[0] != "1" else "2") + sig[1:]
    tampered = url.replace(f"X-Amz-Signature={sig}", f"X-Amz-Signature={bad_sig}")
    assert tampered != url
    assert httpx.get(url, timeout=10).status_code == 200
    assert httpx.get(tampered, timeout=10).status_code == 403


def test_expired_presigned_url_is_refused(s3, s3_object):
    bucket, key, _ = s3_object
    assert httpx.get(_presign(s3, bucket, key, expires=60), timeout=10).status_code == 200
    signed_at = time.time()
    url = _presign(s3, bucket, key, expires=1)
    # X-Amz-Date has whole seconds and SeaweedFS allows no skew: dead by signed_at + 1.
    time.sleep(max(0.0, signed_at + 2.0 - time.time()))
    assert httpx.get(url, timeout=10).status_code == 403


# --- OIDC ---------------------------------------------------------------------------------


def _discover(oidc: OidcIssuer) -> dict:
    resp = httpx.get(f"{oidc.issuer}/.well-known/openid-configuration", timeout=5)
    assert resp.status_code == 200
    return resp.json()


def _fetch_jwks(oidc: OidcIssuer) -> KeySet:
    resp = httpx.get(_discover(oidc)["jwks_uri"], timeout=5)
    assert resp.status_code == 200
    return KeySet.import_key_set(resp.json())


def _verify(token: str, keys: KeySet, issuer: str, aud: str = "fdp") -> dict:
    decoded = jwt.decode(token, keys, algorithms=ALLOWED_ALGS)
    JWTClaimsRegistry(
        iss={"essential": True, "value": issuer},
        aud={"essential": True, "value": aud},
        exp={"essential": True},
    ).validate(decoded.claims)
    return decoded.claims


def test_oidc_discovery_names_issuer_and_jwks(oidc):
    assert oidc.issuer.startswith("http://127.0.0.1:")
    doc = _discover(oidc)
    assert doc["issuer"] == oidc.issuer
    assert doc["jwks_uri"] == f"{oidc.issuer}/jwks" == oidc.jwks_uri
    assert doc["token_endpoint"].startswith(oidc.issuer)


@pytest.mark.parametrize("alg", ALLOWED_ALGS)
def test_oidc_factory_token_verifies_against_served_jwks(oidc, alg):
    keys = _fetch_jwks(oidc)
    token = oidc.token(sub="bob", groups=["eo-users"], scope="read:data", alg=alg)
    claims = _verify(token, keys, oidc.issuer)
    assert claims["sub"] == "bob"
    assert claims["groups"] == ["eo-users"]
    assert claims["scope"] == "read:data"


def test_oidc_claims_registry_refuses_expired_and_wrong_audience(oidc):
    keys = _fetch_jwks(oidc)
    with pytest.raises(ExpiredTokenError):
        _verify(oidc.token(exp_in=-120), keys, oidc.issuer)
    with pytest.raises(InvalidClaimError):
        _verify(oidc.token(aud="someone-else"), keys, oidc.issuer)
    with pytest.raises(InvalidClaimError):
        _verify(oidc.token(), keys, "http://127.0.0.1:1")


def test_oidc_jwks_requests_are_counted(oidc):
    before = oidc.jwks_requests()
    _fetch_jwks(oidc)
    _fetch_jwks(oidc)
    assert oidc.jwks_requests() == before + 2


def test_oidc_jwks_outage_answers_503(oidc):
    parked = oidc.jwks_file.with_suffix(".parked")
    oidc.jwks_file.rename(parked)
    try:
        assert httpx.get(oidc.jwks_uri, timeout=5).status_code == 503
    finally:
        parked.rename(oidc.jwks_file)
    assert httpx.get(oidc.jwks_uri, timeout=5).status_code == 200


def test_oidc_rotate_replaces_the_published_key(oidc):
    old_kid = oidc.kid
    old_token = oidc.token()
    assert old_kid in {k.kid for k in _fetch_jwks(oidc)}

    new_kid = oidc.rotate()

    assert new_kid != old_kid
    assert oidc.kid == new_kid
    keys = _fetch_jwks(oidc)
    kids = {k.kid for k in keys}
    assert new_kid in kids
    assert old_kid not in kids
    assert oidc.ec_kid in kids
    new_token = oidc.token()
    assert jwt.decode(new_token, keys).header["kid"] == new_kid
    _verify(new_token, keys, oidc.issuer)
    with pytest.raises(InvalidKeyIdError):
        _verify(old_token, keys, oidc.issuer)


def test_oidc_forged_hs256_with_public_key_is_refused(oidc):
    token = oidc.forged_hs256_with_public_key()
    head, payload, sig = token.split(".")
    # The forgery is a correct HMAC keyed with the published RSA key: only the pinned
    # algorithm list stands between it and acceptance.
    pem = KeySet.import_key_set(oidc.public_jwks()).get_by_kid(oidc.kid).as_pem(private=False)
    expected = hmac.new(pem, f"{head}.{payload}".encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)) == expected
    with pytest.raises(UnsupportedAlgorithmError):
        jwt.decode(token, _fetch_jwks(oidc), algorithms=ALLOWED_ALGS)


def test_oidc_alg_none_and_bad_signature_are_refused(oidc):
    keys = _fetch_jwks(oidc)
    with pytest.raises(UnsupportedAlgorithmError):
        jwt.decode(oidc.alg_none(), keys, algorithms=ALLOWED_ALGS)
    with pytest.raises(BadSignatureError):
        jwt.decode(oidc.bad_signature(), keys, algorithms=ALLOWED_ALGS)
    with pytest.raises(JoseError):
        jwt.decode(oidc.bad_signature(alg="ES256"), keys, algorithms=ALLOWED_ALGS)


def test_missing_redis_server_says_how_to_install(tmp_path, monkeypatch):
    import tests.harness.services as services

    monkeypatch.setattr(services, "REDIS_SERVER", tmp_path / "no-redis-server")
    with pytest.raises(RuntimeError, match="make test"):
        services.start_redis(tmp_path)
