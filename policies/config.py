"""The configuration model: what a config file may say, validated with pydantic.

The keys are the public contract of DESIGN.md (what an upstream may be is in
`policies.upstream`); unknown keys are errors so that a typo
never silently falls back to a default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BeforeValidator,
    ByteSize,
    Field,
    PositiveInt,
    SecretStr,
    field_validator,
    model_validator,
)

from policies.model import SecretFile, Strict, secret
from policies.upstream import (
    S3Access,
    TimeoutOverride,
    Upstream,
    UpstreamDefaults,
    check_allowed_host,
)

DATASET_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class ServerConfig(Strict):
    public_url: AnyHttpUrl = AnyHttpUrl("http://127.0.0.1:8080")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    #: what this fdp calls itself in `Via` (tiers of fdps detect loops by it); default:
    #: `public_url`'s host:port. Each fdp of a chain needs its own.
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9._:-]{1,100}$")
    #: a request whose line and headers exceed this is refused with 431 and closed
    max_header_bytes: ByteSize = Field(ByteSize(64 * 2**10), ge=1024)
    #: seconds a client may take to send its headers (and may pause within a body)
    request_timeout: float = Field(10.0, gt=0)
    #: the header a trusted reverse proxy puts the client's address in (e.g.
    #: x-forwarded-for: its last entry counts); without it, the connection's address
    trusted_proxy_header: str | None = None
    #: on SIGTERM: seconds to keep serving while /readyz says 503 (load balancers and
    #: Kubernetes endpoints stop sending new requests), before the listener closes
    drain_seconds: float = Field(0.0, ge=0, le=3600)
    #: then: seconds in-flight responses may take to finish before they are cut
    grace_seconds: float = Field(10.0, ge=0, le=86400)


class LocalTier(Strict):
    """The local tier in front of a shared `s3://` cache: hot blocks, and fills staged."""

    store: str = "./var/cache-local"
    max_bytes: ByteSize = ByteSize(10 * 2**30)


class CacheConfig(Strict):
    #: a folder, or `s3://bucket/prefix`: one cache every replica and worker shares
    store: str = "./var/cache"
    #: an `s3://` store's endpoint and credentials (as for `s3` upstreams)
    s3: S3Access = S3Access()
    local: LocalTier = LocalTier()
    max_bytes: ByteSize = ByteSize(50 * 2**30)
    block_size: ByteSize = Field(ByteSize(4 * 2**20), ge=64 * 2**10)
    sweep_seconds: float = Field(60.0, gt=0)  # how often retention runs
    #: blocks fetched ahead of the one a long response is sending (in parallel)
    read_ahead: int = Field(4, ge=0, le=64)
    #: multi-block objects with a catalogue checksum up to this size are completed and
    #: verified in the background once their first block is cached
    verify_max_bytes: ByteSize = ByteSize(2**30)
    #: cached bytes re-hashed against their recorded sha-256 per retention sweep
    scrub_bytes: ByteSize = ByteSize(256 * 2**20)

    @property
    def shared(self) -> tuple[str, str] | None:
        """(bucket, prefix) of an `s3://` store; None for a folder."""
        if not self.store.startswith("s3://"):
            return None
        bucket, _, prefix = self.store.removeprefix("s3://").partition("/")
        return bucket, prefix.strip("/")

    @property
    def folder(self) -> str:
        """The local folder: the store itself, or the local tier in front of `s3://`."""
        return self.local.store if self.shared else self.store

    @field_validator("store")
    @classmethod
    def _bucket(cls, v: str) -> str:
        if v.startswith("s3://") and not v.removeprefix("s3://").split("/")[0]:
            raise ValueError("an s3:// store needs a bucket: s3://bucket/prefix")
        return v


class QueueConfig(Strict):
    redis_url: str | None = None
    #: how often a held request re-reads its job if no completion event arrives
    poll_seconds: float = Field(2.0, gt=0)
    #: how long one Redis call may wait for an answer before the queue counts as unavailable
    timeout_seconds: float = Field(2.0, gt=0, le=60)
    #: how long connecting to Redis may take
    connect_timeout_seconds: float = Field(1.0, gt=0, le=60)
    #: retrievals the embedded runner (no redis_url) runs at once
    workers: int = Field(2, ge=1, le=64)
    #: `fdp worker` told to stop (SIGTERM) finishes its job if it can within this many
    #: seconds, else hands the job back to the queue and exits; None: waits for the job
    worker_grace_seconds: float | None = Field(None, ge=0)


class AuthConfig(Strict):
    oidc_issuer: AnyHttpUrl | None = None
    audience: str = "fdp"
    groups_claim: str = "groups"
    admin_group: str = "fdp-admins"
    jwks_refetch_seconds: float = Field(10.0, ge=0)  # at most one key refetch per interval
    #: the token scope that lets a relay register and heartbeat at `POST /admin/relays`
    relay_scope: str = "fdp:relay"


class RelaysConfig(Strict):
    """The directory of relays (datasets with `delivery: relay`)."""

    #: how often relays are told to heartbeat, and after how long without one they are dropped
    heartbeat_seconds: float = Field(10.0, gt=0, le=3600)
    expire_seconds: float = Field(30.0, gt=0, le=86400)
    max_relays: int = Field(256, ge=1, le=100_000)
    #: objects of its datasets a relay is asked to prefetch at each heartbeat (most requested)
    prefetch_objects: int = Field(20, ge=0, le=10_000)


class RelayOfConfig(Strict):
    """Run as a relay of another fdp (`fdp serve --relay-of URL`)."""

    directory: AnyHttpUrl | None = None
    #: the relay-scoped bearer token shown to the directory (inline, or read from a file)
    token: SecretStr | None = None
    token_file: SecretFile | None = None
    #: the bandwidth it offers, declared to the directory (it chooses by it)
    bandwidth_bytes_per_second: ByteSize | None = None
    #: prefetches at once
    prefetch_concurrency: int = Field(2, ge=1, le=32)

    def bearer(self) -> str | None:
        return secret(self.token, self.token_file)


def _broker_url(value: str | None) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError("an mqtt://host[:port] or mqtts://host[:port] URL")
    if parts.username or parts.password:
        raise ValueError("no credentials in the URL: use username and password_file")
    return value


class HarvestConfig(Strict):
    """Look through these datasets' catalogues every `every_seconds` and announce what is new
    there (with a `cod` identity: its checksum is known once somebody has read it)."""

    datasets: list[str] = []
    every_seconds: float = Field(600.0, ge=1, le=7 * 86400)
    #: objects read from one catalogue at a look (its first ones, as the provider pages)
    max_items: int = Field(10_000, ge=1, le=1_000_000)


class Broker(Strict):
    """An MQTT broker of Sarracenia v03 messages (e.g. mqtt://127.0.0.1:1883)."""

    broker: Annotated[str | None, AfterValidator(_broker_url)] = None
    username: str | None = None
    password: SecretStr | None = None
    password_file: SecretFile | None = None
    #: topics are `{exchange}/{topic_prefix}/{dataset}/{folders of the path}`
    exchange: str = Field("xpublic", pattern=r"^[^/#+]{1,100}$")
    topic_prefix: str = Field("v03", pattern=r"^[^#+]{1,100}$")

    def broker_password(self) -> str | None:
        return secret(self.password, self.password_file)


class AnnounceConfig(Broker):
    """Announcements of what becomes available: `GET /feed` always, MQTT with a `broker`."""

    #: MQTT QoS of the messages (1: the broker acknowledges each)
    qos: int = Field(1, ge=0, le=2)
    #: how long announcements are kept for subscribers that were away
    keep_hours: float = Field(48.0, gt=0, le=24 * 366)
    #: and at most this many
    max_notices: int = Field(100_000, ge=100, le=100_000_000)
    #: default: `feed.sqlite` beside the cache folder (with `queue.redis_url`: a Redis stream)
    file: str | None = None
    harvest: HarvestConfig = HarvestConfig()

    @model_validator(mode="after")
    def _harvest_within_window(self) -> AnnounceConfig:
        if self.harvest.every_seconds * 2 > self.keep_hours * 3600:
            raise ValueError(
                "harvest.every_seconds: at most half of keep_hours (names seen are kept that long)"
            )
        return self


class Subscription(Broker):
    """Site mode: follow another fdp's `/feed`, or Sarracenia v03 messages on an MQTT broker,
    and keep what is announced here, over a poor link (`fdp serve --subscribe URL`). Each
    selected object goes into the dataset named by the first folder of its `relPath`, which
    must exist here (usually with the announcing fdp as its upstream)."""

    #: another fdp's feed; its query (`?dataset=a,b&path=prefix/`) selects there already
    #: (or a `broker`, subscribed to with a persistent session)
    feed: AnyHttpUrl | None = None
    #: with a broker: where messages may send this fdp (their `baseUrl` must start with one)
    fetch_from: list[AnyHttpUrl] = []
    #: shown to that fdp (its access rules and delivery logs see this identity)
    token: SecretStr | None = None
    token_file: SecretFile | None = None
    #: announced datasets to keep (default: each one that exists here)
    datasets: list[str] | None = None
    #: shell patterns on the object's path (`*` crosses folders)
    paths: list[str] = ["*"]
    #: the link's share for these transfers (default: no cap)
    max_bytes_per_second: ByteSize | None = None
    #: transfers at once
    concurrency: int = Field(2, ge=1, le=16)
    #: waits after a failure double from this, up to the maximum (hours of disconnection
    #: cost a reconnection attempt every `max_retry_seconds`)
    retry_seconds: float = Field(1.0, gt=0, le=3600)
    max_retry_seconds: float = Field(300.0, gt=0, le=86400)
    #: transfers of an object whose bytes do not match its identity, before it is given up
    attempts: int = Field(5, ge=1, le=100)
    #: an object the other side keeps failing (down for it, refusing: 401, 408, 429, 5xx, a
    #: dropped link) this long with no byte gained is set aside and tried again apart, so it
    #: holds neither a transfer slot nor the place in the feed (kept `session_hours`)
    set_aside_seconds: float = Field(600.0, ge=0, le=86400)
    #: how long the broker keeps this site's messages while it is away (MQTT session expiry)
    session_hours: float = Field(48.0, gt=0, le=24 * 366)

    def bearer(self) -> str | None:
        return secret(self.token, self.token_file)

    @property
    def source(self) -> str:
        """What is followed (shown in `/status` and logs)."""
        return str(self.feed or self.broker)

    @field_validator("feed", "fetch_from")
    @classmethod
    def _no_userinfo(cls, v: Any) -> Any:
        for url in v if isinstance(v, list) else [v]:
            if url is not None and (url.username or url.password):
                raise ValueError("no credentials in the URL: use token_file")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> Subscription:
        if (self.feed is None) == (self.broker is None):
            raise ValueError("give either 'feed' (an fdp's /feed) or 'broker' (mqtt://...)")
        if self.broker is not None and not self.fetch_from:
            raise ValueError("a broker's messages need 'fetch_from': the URLs they may name")
        return self


class EodagConfig(Strict):
    providers_file: str | None = None


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


#: periods a limit may be given per, in seconds (`requests_per_minute`, `per: 1m`, `per: 90s`)
PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: the limit kinds: requests and cache-miss requests (counted), bytes and miss bytes (sized)
LIMIT_KINDS = ("requests", "miss_requests", "bytes", "miss_bytes")


def _seconds(value: Any) -> Any:
    """`90`, `"90s"`, `"1m"`, `"2h"`, `"1d"` or a period name -> seconds."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in PERIODS:
            return PERIODS[text]
        number, unit = text[:-1], text[-1:]
        if unit in _UNITS and number.replace(".", "", 1).isdigit():
            return float(number) * _UNITS[unit]
    return value


class Rate(Strict):
    """`limit` units (requests, or bytes for byte kinds) per `per` seconds."""

    limit: ByteSize = Field(gt=0)
    per: Annotated[float, BeforeValidator(_seconds), Field(ge=1, le=31 * 86400)] = 60


class Limits(Strict):
    """The four limit kinds; each also as `<kind>_per_<second|minute|hour|day>: N`."""

    requests: Rate | None = None
    miss_requests: Rate | None = None
    bytes: Rate | None = None
    miss_bytes: Rate | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = {}
        for key, value in data.items():
            kind, _, period = str(key).partition("_per_")
            if period and kind in LIMIT_KINDS and period in PERIODS:
                if kind in data:
                    raise ValueError(f"'{key}' and '{kind}' both set")
                out[kind] = {"limit": value, "per": PERIODS[period]}
            else:
                out[key] = value
        return out


class Qos(Limits):
    """The top-level limits apply to each user (and each anonymous address, unless
    `anonymous` says otherwise); a group's limits are one budget for all its members."""

    groups: dict[str, Limits] = {}
    anonymous: Limits | None = None
    #: pace each response to this rate instead of refusing (a slow shared link)
    max_bytes_per_second: ByteSize | None = Field(None, ge=1024)
    #: pace all of one caller's responses together (each user, or anonymous address)
    max_bytes_per_second_per_user: ByteSize | None = Field(None, ge=1024)

    @property
    def limited(self) -> bool:
        """Any limit at all: a dataset without one costs its requests nothing here."""
        return bool(
            self.requests
            or self.miss_requests
            or self.bytes
            or self.miss_bytes
            or self.groups
            or self.anonymous
        )


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
    #: relay: 302 to a registered relay that holds the object, else served like cache
    delivery: Literal["cache", "redirect", "presign", "relay"] = "cache"
    retention: Retention = Retention()
    qos: Qos = Qos()
    async_: Annotated[AsyncPolicy, Field(alias="async")] = AsyncPolicy()
    forward_token: bool = False
    #: groups whose members see everyone's deliveries of this dataset (`/me/deliveries`)
    owners: list[str] = []
    #: origins besides the upstream's own that hrefs and redirects may point at
    allowed_hosts: list[Annotated[str, AfterValidator(check_allowed_host)]] = []
    timeouts: TimeoutOverride | None = None  # default: upstream_defaults
    presign_expires: int = Field(900, ge=1, le=7 * 86400)  # seconds a presigned URL lives
    #: Cache-Control max-age of public data (private data is always `private`)
    max_age: int = Field(3600, ge=0)


class LogConfig(Strict):
    format: Literal["text", "json"] = "text"  # json: one JSON object per line


class QosService(Strict):
    #: a Redis that does not answer: admit everyone (open) or refuse with 503 (closed)
    on_redis_error: Literal["open", "closed"] = "open"
    #: how long one limiter call may take before Redis counts as not answering
    timeout_seconds: float = Field(0.5, gt=0, le=10)


class UpstreamLimit(Strict):
    """Caps on what the whole deployment asks of one upstream origin at a time."""

    #: fetches from it at once (cache fills, pass-through reads and retrieval jobs)
    concurrent: PositiveInt | None = None
    #: bytes a second from it, all fetches together (each is slowed, none refused)
    bytes_per_second: ByteSize | None = Field(None, ge=1024)
    #: how long a fetch may wait for a free slot before the request gets 503 + Retry-After
    wait_seconds: float = Field(10.0, ge=0, le=600)


def _origin_key(entry: str) -> str:
    """`host`, `host:port` or a URL -> `host[:port]`, lower case; `*` stays."""
    if entry == "*":
        return entry
    check_allowed_host(entry)
    return urlsplit(entry if "://" in entry else f"//{entry}").netloc.lower()


class PolicyStoreConfig(Strict):
    """Where runtime policy edits live without Redis (with `queue.redis_url`: in Redis)."""

    #: default: `policies.json` beside the cache folder
    file: str | None = None
    #: versions of each dataset's policy kept in its history
    keep_versions: int = Field(100, ge=2, le=10_000)


class DeliveryLogConfig(Strict):
    """Who got which object: in Redis with `queue.redis_url`, else a SQLite file."""

    #: days a delivery is kept
    keep_days: float = Field(30.0, gt=0, le=3660)
    #: default: `deliveries.sqlite` beside the cache folder
    file: str | None = None


class StacConfig(Strict):
    #: how long a provider's answer to one search page (or a listing) is reused; 0: never
    cache_seconds: float = Field(60.0, ge=0, le=86400)
    #: how long one dataset's search page may take before it counts as failed
    timeout_seconds: float = Field(20.0, gt=0, le=600)


class Settings(Strict):
    stac: StacConfig = StacConfig()
    deliveries: DeliveryLogConfig = DeliveryLogConfig()
    announce: AnnounceConfig = AnnounceConfig()
    subscriptions: list[Subscription] = []
    policy_store: PolicyStoreConfig = PolicyStoreConfig()
    #: per upstream origin (`host[:port]` or a URL); `*` for each origin not named
    upstream_limits: dict[Annotated[str, AfterValidator(_origin_key)], UpstreamLimit] = {}
    qos_defaults: Qos = Qos()  # for every dataset, kind by kind, unless it sets its own
    qos: QosService = QosService()
    server: ServerConfig = ServerConfig()
    cache: CacheConfig = CacheConfig()
    queue: QueueConfig = QueueConfig()
    auth: AuthConfig = AuthConfig()
    eodag: EodagConfig = EodagConfig()
    log: LogConfig = LogConfig()
    relays: RelaysConfig = RelaysConfig()
    relay: RelayOfConfig = RelayOfConfig()
    upstream_defaults: UpstreamDefaults = UpstreamDefaults()
    datasets: dict[Annotated[str, Field(pattern=DATASET_NAME)], Dataset] = {}

    @model_validator(mode="after")
    def _subscribed_datasets_exist(self) -> Settings:
        for n, sub in enumerate(self.subscriptions):
            for name in sub.datasets or ():
                if name not in self.datasets:
                    raise ValueError(
                        f"subscriptions.{n}.datasets: no dataset {name!r} here to keep it in"
                    )
        sources = [sub.source for sub in self.subscriptions]
        if len(set(sources)) < len(sources):
            raise ValueError("subscriptions: each feed or broker once (one place in each)")
        for name in self.announce.harvest.datasets:
            if name not in self.datasets:
                raise ValueError(f"announce.harvest.datasets: no dataset {name!r}")
        return self

    @model_validator(mode="after")
    def _presign_needs_s3(self) -> Settings:
        for name, ds in self.datasets.items():
            if ds.delivery == "presign" and ds.upstream.s3 is None and not self.cache.shared:
                raise ValueError(
                    f"datasets.{name}.delivery 'presign' needs an s3 upstream "
                    "or an s3:// cache store"
                )
        return self

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
