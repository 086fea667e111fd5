"""The configuration model: what a config file may say, validated with pydantic.

The keys are the public contract of DESIGN.md; unknown keys are errors so that a typo
never silently falls back to a default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    FilePath,
    PositiveInt,
    SecretStr,
    field_validator,
    model_validator,
)

DATASET_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ServerConfig(Strict):
    public_url: AnyHttpUrl = AnyHttpUrl("http://127.0.0.1:8080")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class CacheConfig(Strict):
    store: str = "./var/cache"
    max_bytes: ByteSize = ByteSize(50 * 2**30)
    block_size: ByteSize = Field(ByteSize(4 * 2**20), ge=64 * 2**10)
    sweep_seconds: float = Field(60.0, gt=0)  # how often retention runs


class QueueConfig(Strict):
    redis_url: str | None = None
    #: how often a held request re-reads its job if no completion event arrives
    poll_seconds: float = Field(2.0, gt=0)


class AuthConfig(Strict):
    oidc_issuer: AnyHttpUrl | None = None
    audience: str = "fdp"
    groups_claim: str = "groups"
    admin_group: str = "fdp-admins"
    jwks_refetch_seconds: float = Field(10.0, ge=0)  # at most one key refetch per interval


class EodagConfig(Strict):
    providers_file: str | None = None


class HttpUpstream(Strict):
    base_url: AnyHttpUrl
    objects: list[str] | None = None

    @field_validator("base_url")
    @classmethod
    def _directory(cls, v: AnyHttpUrl) -> AnyHttpUrl:
        return v if str(v).endswith("/") else AnyHttpUrl(f"{v}/")


class EodagUpstream(Strict):
    provider: str
    collection: str


class S3Upstream(Strict):
    bucket: str
    prefix: str = ""
    endpoint_url: AnyHttpUrl | None = None
    region: str | None = None
    #: where clients reach the store, for presigned URLs (default: endpoint_url)
    public_endpoint_url: AnyHttpUrl | None = None
    # credentials: inline (e.g. from FDP_DATASETS__X__UPSTREAM__S3__SECRET_ACCESS_KEY), from
    # files (*_file, e.g. Kubernetes secrets), else boto3's default chain (AWS_* variables...)
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    access_key_id_file: FilePath | None = None
    secret_access_key_file: FilePath | None = None

    def credentials(self) -> tuple[str | None, str | None]:
        """(access key id, secret key), read from the files when given that way."""

        def pick(inline: SecretStr | None, file: FilePath | None) -> str | None:
            if file is not None:
                return file.read_text().strip()
            return inline.get_secret_value() if inline is not None else None

        return (
            pick(self.access_key_id, self.access_key_id_file),
            pick(self.secret_access_key, self.secret_access_key_file),
        )


class FdpUpstream(Strict):
    base_url: AnyHttpUrl
    dataset: str | None = None  # the dataset's name at the other fdp; default: the same name


class Mirror(Strict):
    http: HttpUpstream | None = None
    s3: S3Upstream | None = None
    fdp: FdpUpstream | None = None
    priority: int = 100


class Upstream(Strict):
    """Exactly one kind of upstream."""

    eodag: EodagUpstream | None = None
    s3: S3Upstream | None = None
    http: HttpUpstream | None = None
    fdp: FdpUpstream | None = None
    mirrors: list[Mirror] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Upstream:
        kinds = [k for k in ("eodag", "s3", "http", "fdp", "mirrors") if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError(
                "expected exactly one of eodag, s3, http, fdp, mirrors"
                + (f" (got {', '.join(kinds)})" if kinds else "")
            )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("eodag", "s3", "http", "fdp", "mirrors") if getattr(self, k))


class Access(Strict):
    public: bool = False
    authenticated: bool = False
    groups: list[str] | None = None
    scopes: list[str] | None = None


class Retention(Strict):
    mode: Literal["permanent", "rolling", "lru"] = "lru"
    days: PositiveInt | None = None
    max_bytes: ByteSize | None = None

    @model_validator(mode="after")
    def _mode_fields(self) -> Retention:
        if self.mode == "rolling" and self.days is None:
            raise ValueError("mode 'rolling' needs 'days: N'")
        return self


class Qos(Strict):
    requests_per_minute: PositiveInt | None = None
    miss_requests_per_minute: PositiveInt | None = None
    bytes_per_day: ByteSize | None = None
    miss_bytes_per_day: ByteSize | None = None


class AsyncPolicy(Strict):
    hold_seconds: float = Field(25.0, ge=0, le=3600)
    not_ready_status: Literal[202, 503] = 202
    retry_after: PositiveInt = 10  # the first Retry-After estimate, before any job has run
    max_attempts: int = Field(3, ge=1, le=20)  # tries of one retrieval before it fails
    background_above: ByteSize | None = None  # objects larger than this are retrieved as jobs


class Dataset(Strict):
    upstream: Upstream
    title: str | None = None
    description: str | None = None
    archive: bool = False
    access: Access = Access(public=True)
    delivery: Literal["cache", "redirect", "presign"] = "cache"
    retention: Retention = Retention()
    qos: Qos = Qos()
    async_: Annotated[AsyncPolicy, Field(alias="async")] = AsyncPolicy()
    forward_token: bool = False
    presign_expires: int = Field(900, ge=1, le=7 * 86400)  # seconds a presigned URL lives

    @model_validator(mode="after")
    def _presign_needs_s3(self) -> Dataset:
        if self.delivery == "presign" and self.upstream.s3 is None:
            raise ValueError("delivery 'presign' needs an s3 upstream")
        return self


class Settings(Strict):
    server: ServerConfig = ServerConfig()
    cache: CacheConfig = CacheConfig()
    queue: QueueConfig = QueueConfig()
    auth: AuthConfig = AuthConfig()
    eodag: EodagConfig = EodagConfig()
    datasets: dict[Annotated[str, Field(pattern=DATASET_NAME)], Dataset] = {}

    @model_validator(mode="after")
    def _auth_for_protected(self) -> Settings:
        if self.auth.oidc_issuer is None:
            closed = [n for n, d in self.datasets.items() if not d.access.public]
            if closed:
                raise ValueError(
                    f"datasets.{closed[0]}.access is not public: it needs auth.oidc_issuer"
                )
        return self

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
