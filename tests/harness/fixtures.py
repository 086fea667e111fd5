"""Session fixtures that start real services on first use and stop them by their pid.

Enable with `pytest_plugins = ["tests.harness.fixtures"]` in tests/conftest.py. Each
fixture is session-scoped, so a service starts only if some selected test asks for it,
once per session; logs and data live under pytest's tmp_path_factory.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.oidc_issuer import OidcIssuer, start_oidc_issuer
from tests.harness.services import S3Server, start_redis, start_seaweedfs
from tests.harness.stalls import Blackhole, start_blackhole

#: How long the `slow_oidc` issuer takes to answer, unless a test sets another delay.
SLOW_OIDC_SECONDS = 3.0


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`redis://127.0.0.1:PORT/0` of a throwaway redis-server (no persistence)."""
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 endpoint that enforces SigV4 signatures and presigned-URL expiry.

    Use `tests.harness.services.boto3_client(s3)` for a client.
    """
    base = tmp_path_factory.mktemp("seaweedfs")
    server = start_seaweedfs(base / "logs", base / "data")
    try:
        yield server
    finally:
        server.proc.stop()


@pytest.fixture(scope="session")
def oidc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcIssuer]:
    """A running OIDC issuer (`.issuer`, `.jwks_uri`) that is also its TokenFactory.

    Session-wide: `rotate()` changes the signing key for later tests too, so use `oidc.kid`
    rather than a literal kid.
    """
    base = tmp_path_factory.mktemp("oidc")
    issuer = start_oidc_issuer(base / "logs", base / "data")
    try:
        yield issuer
    finally:
        if issuer.proc is not None:
            issuer.proc.stop()


@pytest.fixture(scope="session")
def _slow_oidc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcIssuer]:
    base = tmp_path_factory.mktemp("slow-oidc")
    issuer = start_oidc_issuer(base / "logs", base / "data", delay=SLOW_OIDC_SECONDS)
    try:
        yield issuer
    finally:
        if issuer.proc is not None:
            issuer.proc.stop()


@pytest.fixture
def slow_oidc(_slow_oidc_server: OidcIssuer) -> OidcIssuer:
    """An OIDC issuer (not the `oidc` one) whose discovery and JWKS answers take
    SLOW_OIDC_SECONDS; `slow_oidc.set_delay(s)` changes that for the rest of the test."""
    _slow_oidc_server.set_delay(SLOW_OIDC_SECONDS)
    return _slow_oidc_server


@pytest.fixture(scope="session")
def blackhole(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Blackhole]:
    """A server that accepts connections and never answers: `.url` (an S3 endpoint or HTTP
    upstream that hangs), `.redis_url` (a Redis that hangs), `.connections()`."""
    server = start_blackhole(tmp_path_factory.mktemp("blackhole"))
    try:
        yield server
    finally:
        server.stop()
