"""What a dataset's upstream may be: one provider (http, eodag, s3, another fdp) or a set of
mirrors, with the timeouts of its calls and where its store is."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import (
    AnyHttpUrl,
    ByteSize,
    Field,
    PositiveInt,
    SecretStr,
    field_validator,
    model_validator,
)

from policies.model import SecretFile, Strict, secret


class S3Access(Strict):
    """Where an S3-compatible store is and how to sign for it."""

    endpoint_url: AnyHttpUrl | None = None
    region: str | None = None
    #: where clients reach the store, for presigned URLs (default: endpoint_url)
    public_endpoint_url: AnyHttpUrl | None = None
    # credentials: inline (e.g. from FDP_DATASETS__X__UPSTREAM__S3__SECRET_ACCESS_KEY), from
    # files (*_file, e.g. Kubernetes secrets), else boto3's default chain (AWS_* variables...)
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    access_key_id_file: SecretFile | None = None
    secret_access_key_file: SecretFile | None = None

    def credentials(self) -> tuple[str | None, str | None]:
        """(access key id, secret key), read from the files (now, for rotation) when given so."""
        return (
            secret(self.access_key_id, self.access_key_id_file),
            secret(self.secret_access_key, self.secret_access_key_file),
        )


class UpstreamTimeouts(Strict):
    """Seconds one upstream call may wait: to connect, then for each read (boto3 and EODAG too)."""

    connect_timeout: float = Field(5.0, gt=0, le=600)
    read_timeout: float = Field(30.0, gt=0, le=3600)


class UpstreamDefaults(UpstreamTimeouts):
    #: threads per upstream for blocking clients (boto3, EODAG), apart from the shared pool
    max_threads: int = Field(8, ge=1, le=256)


class TimeoutOverride(Strict):
    """A dataset's own timeouts; what it leaves out comes from `upstream_defaults`."""

    connect_timeout: float | None = Field(None, gt=0, le=600)
    read_timeout: float | None = Field(None, gt=0, le=3600)


def check_allowed_host(entry: str) -> str:
    """`host`, `host:port` or an http(s) URL (its origin counts; a path is ignored)."""
    is_url = "://" in entry
    parts = urlsplit(entry if is_url else f"//{entry}")
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise ValueError(f"{entry!r}: bad port") from None
    if (
        not parts.hostname
        or (is_url and parts.scheme not in ("http", "https"))
        or (not is_url and (parts.path or parts.query or parts.fragment or "@" in entry))
    ):
        raise ValueError(f"{entry!r} is not a host, host:port or http(s) URL")
    return entry


class HttpUpstream(Strict):
    base_url: AnyHttpUrl
    objects: list[str] | None = None

    @field_validator("base_url")
    @classmethod
    def _directory(cls, v: AnyHttpUrl) -> AnyHttpUrl:
        return v if str(v).endswith("/") else AnyHttpUrl(f"{v}/")


class EodagUpstream(Strict):
    """One collection at one EODAG provider, or at several (`providers`, tried in order)."""

    provider: str | None = None
    providers: list[str] | None = Field(None, min_length=1)
    collection: str

    @model_validator(mode="after")
    def _one_way(self) -> EodagUpstream:
        if (self.provider is None) == (self.providers is None):
            raise ValueError("expected provider (one) or providers (a list), not both")
        return self

    @property
    def names(self) -> list[str]:
        return self.providers or [self.provider or ""]


class S3Upstream(S3Access):
    bucket: str
    prefix: str = ""


class FdpUpstream(Strict):
    """Another fdp (a central tier): its `/assets/{dataset}/` are this dataset's objects."""

    base_url: AnyHttpUrl
    dataset: str | None = None  # the dataset's name at the other fdp; default: the same name
    #: the bearer token this fdp shows the other one (a service account; inline, from
    #: FDP_DATASETS__X__UPSTREAM__FDP__TOKEN, or `token_file`); else the caller's own with
    #: the dataset's `forward_token`, else none (anonymous)
    token: SecretStr | None = None
    token_file: SecretFile | None = None

    def bearer(self) -> str | None:
        """The service token, if one is configured (read when the dataset's resolver is
        built: a new token in the file takes effect at a restart or a policy edit)."""
        return secret(self.token, self.token_file)


#: the kinds of upstream a dataset (or one mirror of a set) can have
SINGLE_KINDS = ("eodag", "s3", "http", "fdp")


class Mirror(Strict):
    """One member of a mirror set: an upstream, and how much it is preferred."""

    eodag: EodagUpstream | None = None
    s3: S3Upstream | None = None
    http: HttpUpstream | None = None
    fdp: FdpUpstream | None = None
    #: lower is tried first (RFC 6249's `pri`); mirrors of one priority share by `weight`
    priority: int = Field(100, ge=1, le=999999)
    weight: PositiveInt = 1

    @model_validator(mode="after")
    def _exactly_one(self) -> Mirror:
        kinds = [k for k in SINGLE_KINDS if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError(
                "a mirror is exactly one of eodag, s3, http, fdp"
                + (f" (got {', '.join(kinds)})" if kinds else "")
            )
        return self


class MirrorHealth(Strict):
    """How a mirror set watches its mirrors.

    Passive, always: a mirror that fails, or answers slower than `slow_seconds`, is down for
    `backoff_seconds`, doubling with each failure in a row up to `max_backoff_seconds`.
    Active, with `probe` (an object path of the dataset): every `interval_seconds` each
    mirror is asked for it (bounded by `timeout_seconds`), and its size and sha-256 are
    compared across mirrors: one that disagrees with the rest is inconsistent, not used.
    """

    probe: str | None = None
    interval_seconds: float = Field(60.0, ge=1, le=86400)
    timeout_seconds: float = Field(10.0, gt=0, le=600)
    #: the largest probe object read whole to be hashed (a bigger one is compared by size)
    probe_max_bytes: ByteSize = Field(ByteSize(16 * 2**20), ge=0)
    slow_seconds: float = Field(10.0, gt=0, le=3600)
    backoff_seconds: float = Field(5.0, gt=0, le=3600)
    max_backoff_seconds: float = Field(300.0, gt=0, le=86400)
    #: how long an inconsistent mirror is left out before it gets another chance
    #: (a probe that finds it consistent again brings it back sooner)
    inconsistent_seconds: float = Field(3600.0, gt=0, le=30 * 86400)


class Upstream(Strict):
    """Exactly one kind of upstream."""

    eodag: EodagUpstream | None = None
    s3: S3Upstream | None = None
    http: HttpUpstream | None = None
    fdp: FdpUpstream | None = None
    mirrors: list[Mirror] | None = Field(None, min_length=1)
    #: for `mirrors`: how their health is watched
    health: MirrorHealth | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Upstream:
        kinds = [k for k in (*SINGLE_KINDS, "mirrors") if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError(
                "expected exactly one of eodag, s3, http, fdp, mirrors"
                + (f" (got {', '.join(kinds)})" if kinds else "")
            )
        if self.health is not None and self.mirrors is None:
            raise ValueError("'health' watches the members of 'mirrors'; this is one upstream")
        return self
