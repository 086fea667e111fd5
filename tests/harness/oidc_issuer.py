"""An OIDC issuer for tests: a real HTTP discovery + JWKS server, tokens signed in the test.

The server (`python -m tests.harness.oidc_issuer --port P --jwks-file F`) re-reads F on
every JWKS request, so a test rotates keys by rewriting the file, and it counts JWKS
requests (`GET /_stats`) so tests can prove the proxy caches keys. A missing JWKS file
answers 503: delete it to simulate an issuer outage. A slow issuer: `--delay S` (or
`POST /_delay {"seconds": S}` at run time) holds every discovery and JWKS answer S seconds.

`TokenFactory` holds the private keys (joserfc; authlib's JOSE module is deprecated) and
mints good and hostile tokens.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.harness.procs import ServerProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
SIGNING_ALGS = ["RS256", "PS256", "ES256"]


# --- the issuer's HTTP side ---------------------------------------------------------------


def create_app(issuer: str, jwks_file: Path, delay: float = 0.0) -> Starlette:
    """Discovery, JWKS (re-read per request, both after `delay` seconds) and request counters."""
    issuer = issuer.rstrip("/")
    stats = {"jwks_requests": 0, "discovery_requests": 0}
    slow = {"seconds": delay}

    async def discovery(request: Request) -> Response:
        stats["discovery_requests"] += 1
        await anyio.sleep(slow["seconds"])
        return JSONResponse(
            {
                "issuer": issuer,
                "jwks_uri": f"{issuer}/jwks",
                "authorization_endpoint": f"{issuer}/authorize",
                "token_endpoint": f"{issuer}/token",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": SIGNING_ALGS,
                "grant_types_supported": ["authorization_code", "client_credentials"],
            }
        )

    async def jwks(request: Request) -> Response:
        stats["jwks_requests"] += 1
        await anyio.sleep(slow["seconds"])
        try:
            body = await anyio.Path(jwks_file).read_bytes()
        except FileNotFoundError:
            return JSONResponse({"error": "jwks unavailable"}, status_code=503)
        return Response(body, media_type="application/json")

    async def token(request: Request) -> Response:
        # Tokens are minted in-process by TokenFactory; this only makes the endpoint exist.
        return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)

    async def get_stats(request: Request) -> Response:
        return JSONResponse(stats)

    async def set_delay(request: Request) -> Response:
        slow["seconds"] = float((await request.json())["seconds"])
        return Response(status_code=204)

    return Starlette(
        routes=[
            Route("/.well-known/openid-configuration", discovery),
            Route("/jwks", jwks),
            Route("/token", token, methods=["POST"]),
            Route("/_stats", get_stats),
            Route("/_delay", set_delay, methods=["POST"]),
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--jwks-file", type=Path, required=True)
    parser.add_argument("--issuer", help="default: http://127.0.0.1:PORT")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args(argv)
    issuer = args.issuer or f"http://127.0.0.1:{args.port}"
    app = create_app(issuer, args.jwks_file, args.delay)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


# --- tokens -------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64json(obj: dict[str, Any]) -> str:
    return _b64url(json.dumps(obj, separators=(",", ":")).encode())


class TokenFactory:
    """Keys and tokens for one issuer; publishes the public JWKS to `jwks_file`.

    Holds an RSA key (`kid`, used for RS256/PS256) and an EC P-256 key (`ec_kid`, ES256).
    Retired keys stay usable for signing (`token(kid=old)`) but leave the JWKS.
    """

    def __init__(self, issuer: str, jwks_file: Path) -> None:
        self.issuer = issuer.rstrip("/")
        self.jwks_file = Path(jwks_file)
        self._generation = 1
        self.kid = "rsa-1"
        self.ec_kid = "ec-1"
        self._keys: dict[str, RSAKey | ECKey] = {
            self.kid: RSAKey.generate_key(2048, parameters={"kid": self.kid, "use": "sig"}),
            self.ec_kid: ECKey.generate_key("P-256", parameters={"kid": self.ec_kid, "use": "sig"}),
        }
        self._published = [self.kid, self.ec_kid]
        self._write_jwks()

    # keys

    def public_jwks(self) -> dict[str, Any]:
        """The JWKS as published (public parts only)."""
        keys = KeySet([self._keys[k] for k in self._published])
        return dict(keys.as_dict(private=False))

    def _write_jwks(self) -> None:
        # Atomic replace: the issuer re-reads the file on every request and must never
        # see it half written.
        self.jwks_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.jwks_file.parent, prefix=".jwks-")
        with os.fdopen(fd, "w") as f:
            json.dump(self.public_jwks(), f)
        os.replace(tmp, self.jwks_file)

    def rotate(self, keep_old: bool = False) -> str:
        """Make a new RSA key the signing key and publish it; returns its kid.

        The old key leaves the JWKS unless `keep_old` (an overlapping rotation).
        """
        self._generation += 1
        new_kid = f"rsa-{self._generation}"
        self._keys[new_kid] = RSAKey.generate_key(2048, parameters={"kid": new_kid, "use": "sig"})
        if not keep_old:
            self._published.remove(self.kid)
        self._published.insert(0, new_kid)
        self.kid = new_kid
        self._write_jwks()
        return new_kid

    # tokens

    def claims(
        self,
        sub: str = "alice",
        aud: str | list[str] | None = "fdp",
        groups: list[str] | None = None,
        scope: str | list[str] | None = None,
        exp_in: int = 300,
        nbf_in: int | None = None,
        iat: int | None = None,
        extra_claims: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The claim set `token()` signs. A `None` in `extra_claims` removes that claim."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": sub,
            "aud": aud,
            "iat": now if iat is None else int(iat),
            "exp": now + exp_in,
            "jti": secrets.token_hex(8),
        }
        if nbf_in is not None:
            claims["nbf"] = now + nbf_in
        if groups is not None:
            claims["groups"] = list(groups)
        if scope is not None:
            claims["scope"] = scope if isinstance(scope, str) else " ".join(scope)
        claims.update(extra_claims or {})
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self,
        sub: str = "alice",
        aud: str | list[str] | None = "fdp",
        groups: list[str] | None = None,
        scope: str | list[str] | None = None,
        exp_in: int = 300,
        nbf_in: int | None = None,
        iat: int | None = None,
        kid: str | None = None,
        alg: str = "RS256",
        extra_claims: dict[str, Any] | None = None,
        header_overrides: dict[str, Any] | None = None,
    ) -> str:
        """A signed JWT. `exp_in`/`nbf_in` are seconds from now (negative = past).

        `kid` picks a known key (current or retired); an unknown kid is still put in the
        header, signed with the default key for `alg`, to test unknown-kid handling.
        A `None` in `header_overrides` removes that header field.
        """
        claims = self.claims(sub, aud, groups, scope, exp_in, nbf_in, iat, extra_claims)
        default_kid = self.ec_kid if alg.startswith("ES") else self.kid
        key = self._keys.get(kid or default_kid, self._keys[default_kid])
        header: dict[str, Any] = {"typ": "JWT", "alg": alg, "kid": kid or default_kid}
        header.update(header_overrides or {})
        header = {k: v for k, v in header.items() if v is not None}
        return jwt.encode(header, claims, key, algorithms=[header["alg"]], default_type=None)

    # hostile tokens

    def forged_hs256_with_public_key(self, **claims: Any) -> str:
        """HS256 keyed with the RSA public key PEM: the classic algorithm-confusion attack."""
        header = {"typ": "JWT", "alg": "HS256", "kid": self.kid}
        rsa_key = self._keys[self.kid]
        secret = rsa_key.as_pem(private=False)
        signing_input = f"{_b64json(header)}.{_b64json(self.claims(**claims))}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{_b64url(mac)}"

    def alg_none(self, **claims: Any) -> str:
        """An unsigned token (`alg: none`, empty signature)."""
        header = {"typ": "JWT", "alg": "none"}
        return f"{_b64json(header)}.{_b64json(self.claims(**claims))}."

    def bad_signature(self, **token_kwargs: Any) -> str:
        """A well-formed token whose signature has one bit flipped."""
        head, payload, sig = self.token(**token_kwargs).split(".")
        raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
        raw[len(raw) // 2] ^= 0x01
        return f"{head}.{payload}.{_b64url(bytes(raw))}"


class OidcIssuer(TokenFactory):
    """A running issuer process plus its `TokenFactory`."""

    def __init__(self, issuer: str, jwks_file: Path, proc: ServerProcess | None = None) -> None:
        super().__init__(issuer, jwks_file)
        self.proc = proc

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/jwks"

    def stats(self) -> dict[str, int]:
        """Request counters of the issuer process (`jwks_requests`, `discovery_requests`)."""
        return dict(httpx.get(f"{self.issuer}/_stats", timeout=5).json())

    def jwks_requests(self) -> int:
        return self.stats()["jwks_requests"]

    def set_delay(self, seconds: float) -> None:
        """Hold every later discovery and JWKS answer `seconds` (0: answer at once)."""
        httpx.post(f"{self.issuer}/_delay", json={"seconds": seconds}, timeout=5).raise_for_status()


def _ready(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    return check


def start_oidc_issuer(log_dir: Path, data_dir: Path, delay: float = 0.0) -> OidcIssuer:
    """Start the issuer on a free loopback port; returns it with its keys.

    `delay`: seconds every discovery and JWKS answer takes (a slow issuer).
    """
    from tests.harness.services import GroupServerProcess, _start_with_retry, free_ports

    def make() -> tuple[ServerProcess, OidcIssuer]:
        (port,) = free_ports(1)
        jwks_file = Path(data_dir) / f"jwks-{port}.json"
        issuer = OidcIssuer(f"http://127.0.0.1:{port}", jwks_file)
        argv = [
            sys.executable,
            "-m",
            "tests.harness.oidc_issuer",
            "--port",
            str(port),
            "--jwks-file",
            str(jwks_file),
            "--delay",
            str(delay),
        ]
        proc = GroupServerProcess(
            "oidc-issuer",
            argv,
            log_dir=log_dir,
            ready=_ready(f"{issuer.issuer}/_stats"),  # not delayed
            cwd=REPO_ROOT,
            timeout=30,
            grace=5,
        )
        issuer.proc = proc
        return proc, issuer

    _, issuer = _start_with_retry(make)
    return issuer


if __name__ == "__main__":
    main()
