"""Who is asking: OIDC bearer tokens checked against the issuer's keys, and access rules.

Keys come from the issuer's discovery document and JWKS, cached; a token signed with an
unknown `kid` triggers one refetch (at most one per `auth.jwks_refetch_seconds`, so bogus
kids cannot hammer the IdP). Only asymmetric algorithms are accepted: never `none`, never
HMAC (which would let anyone sign with the public key).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet
from starlette.requests import Request

from policies.config import Access, AuthConfig
from proxy.problems import ProxyError

log = logging.getLogger("fdp.auth")

ALGORITHMS = ["RS256", "ES256", "PS256"]
LEEWAY = 30  # seconds of clock skew tolerated for exp/nbf/iat
IDP_TIMEOUT = 5.0  # seconds for each call to the identity provider


@dataclass(frozen=True)
class Identity:
    subject: str | None = None  # None: anonymous
    groups: frozenset[str] = field(default_factory=frozenset)
    scopes: frozenset[str] = field(default_factory=frozenset)
    admin: bool = False

    @property
    def owner(self) -> str:
        """The name jobs are kept under."""
        return self.subject or "anonymous"


ANONYMOUS = Identity()


class Unauthorized(ProxyError):
    """401: no token where one is needed, or a token we cannot accept (RFC 6750)."""

    status, slug = 401, "unauthorized"

    def __init__(self, detail: str, invalid: bool = True) -> None:
        challenge = 'Bearer realm="fdp"'
        if invalid:
            safe = detail.replace('"', "'")
            challenge += f', error="invalid_token", error_description="{safe}"'
        super().__init__(detail, headers={"www-authenticate": challenge})


class Forbidden(ProxyError):
    status, slug = 403, "forbidden"


def _claim(claims: dict[str, Any], path: str) -> Any:
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _names(value: Any) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list | tuple):
        return frozenset(str(v) for v in value)
    return frozenset()


class IdentityProviderUnavailable(ProxyError):
    """We hold no keys and the identity provider does not answer: nobody can be checked."""

    status, slug = 503, "identity-provider-unavailable"


class Authenticator:
    """Validates bearer tokens for one issuer and audience.

    Tokens signed with a key we hold are checked with no I/O and no lock. Only a token
    with an unknown `kid` waits for a (single-flight) refetch, and the issuer is asked at
    most once per `jwks_refetch_seconds` however it answers, so a slow or failing identity
    provider never stalls requests whose keys are known, nor gets hammered.
    """

    def __init__(self, config: AuthConfig, client: httpx.AsyncClient) -> None:
        assert config.oidc_issuer is not None
        self.issuer = str(config.oidc_issuer).rstrip("/")
        self.config = config
        self.client = client
        self.keys: KeySet | None = None
        self.fetched = -math.inf  # when the issuer was last asked (monotonic)
        self._lock = asyncio.Lock()
        self._timeout = httpx.Timeout(IDP_TIMEOUT)

    async def _refresh(self) -> None:
        """Fetch the keys, unless someone asked the issuer within the last interval."""
        async with self._lock:
            if time.monotonic() - self.fetched < self.config.jwks_refetch_seconds:
                return  # just asked (maybe by a request we waited behind): rate limit
            self.fetched = time.monotonic()
            try:
                disco = await self.client.get(
                    f"{self.issuer}/.well-known/openid-configuration", timeout=self._timeout
                )
                disco.raise_for_status()
                jwks = await self.client.get(disco.json()["jwks_uri"], timeout=self._timeout)
                jwks.raise_for_status()
                self.keys = KeySet.import_key_set(jwks.json())
                log.info("issuer keys loaded (%d)", len(self.keys.keys))
            except (httpx.HTTPError, ValueError, KeyError, JoseError) as e:
                log.error("cannot fetch the issuer's keys: %s", type(e).__name__)
            finally:
                self.fetched = time.monotonic()  # the interval counts from the answer

    async def identify(self, authorization: str | None) -> Identity:
        """The caller's identity; anonymous without a header; Unauthorized for a bad token."""
        if authorization is None:
            return ANONYMOUS
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("expected 'Authorization: Bearer <token>'")
        if self.keys is None:
            await self._refresh()
            if self.keys is None:
                raise IdentityProviderUnavailable(
                    "the identity provider cannot be reached; try again later",
                    headers={
                        "retry-after": str(max(1, math.ceil(self.config.jwks_refetch_seconds)))
                    },
                )
        try:
            try:
                decoded = self._decode(token)
            except InvalidKeyIdError:
                await self._refresh()  # a rotated key, perhaps
                decoded = self._decode(token)
        except (JoseError, ValueError) as e:
            raise Unauthorized(f"invalid token ({type(e).__name__})") from None
        claims = decoded.claims
        registry = jwt.JWTClaimsRegistry(
            leeway=LEEWAY,
            iss={"essential": True, "value": self.issuer},
            aud={"essential": True, "value": self.config.audience},
            exp={"essential": True},
            sub={"essential": True},
        )
        try:
            registry.validate(claims)
        except JoseError as e:
            raise Unauthorized(
                f"invalid token ({e.error}: {e.description or ''})".strip()
            ) from None
        groups = _names(_claim(claims, self.config.groups_claim))
        scopes = _names(claims.get("scope")) | _names(claims.get("scp"))
        return Identity(str(claims["sub"]), groups, scopes, self.config.admin_group in groups)

    def _decode(self, token: str) -> jwt.Token:
        assert self.keys is not None
        return jwt.decode(token, self.keys, algorithms=ALGORITHMS)


async def identity(request: Request) -> Identity:
    """The caller of a Starlette route, by the same rules as /assets (`state.identify`)."""
    return await request.app.state.identify(request.headers.get("authorization"))


def allowed(access: Access, who: Identity) -> bool:
    """Does `access` let `who` read? groups: any of them; scopes: all of them."""
    if access.public:
        return True
    if who.subject is None:
        return False
    if who.admin:
        return True
    if access.groups is not None and not (who.groups & set(access.groups)):
        return False
    if access.scopes is not None and not set(access.scopes) <= who.scopes:
        return False
    return access.authenticated or access.groups is not None or access.scopes is not None


def check(access: Access, who: Identity) -> None:
    """Raise 401 (anonymous, needs a token) or 403 (a token that is not enough)."""
    if allowed(access, who):
        return
    if who.subject is None:
        raise Unauthorized("this dataset needs a bearer token", invalid=False)
    raise Forbidden("your token does not grant access to this dataset")
