"""The configured datasets, each with its policy and the resolver for its upstream."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio

from policies.config import Dataset, Settings
from policies.loader import ConfigError
from policies.upstream import Mirror, MirrorHealth, Upstream
from upstreams.base import DatasetNotFound, Origins, Presigning, Resolver, Timeouts
from upstreams.eodag import (
    EodagResolver,
    EodagWorkdir,
    FederatedResolver,
    limit_provider,
    make_gateway,
    provider_origins,
)
from upstreams.http import HttpResolver
from upstreams.mirrors import Member, MirrorSet, Rules
from upstreams.s3 import S3Resolver


@dataclass
class Entry:
    name: str
    policy: Dataset
    resolver: Resolver
    #: where this dataset's fetches may go: its upstream's own origins plus `allowed_hosts`
    origins: Origins
    timeouts: Timeouts

    @property
    def tiered(self) -> bool:
        """Its upstream is another fdp (or a mirror is): requests carry `Via` on to it."""
        up = self.policy.upstream
        return up.fdp is not None or any(m.fdp is not None for m in up.mirrors or ())

    @property
    def presigns_from_cache(self) -> bool:
        """`delivery: presign` with an upstream that cannot presign: clients are sent to
        the object's whole copy in the shared cache tier, which is filled for them."""
        return self.policy.delivery == "presign" and not isinstance(self.resolver, Presigning)


def mirror_rules(health: MirrorHealth) -> Rules:
    return Rules(
        probe=health.probe,
        interval=health.interval_seconds,
        timeout=health.timeout_seconds,
        probe_max_bytes=int(health.probe_max_bytes),
        slow=health.slow_seconds,
        backoff=health.backoff_seconds,
        max_backoff=health.max_backoff_seconds,
        inconsistent_for=health.inconsistent_seconds,
    )


def member_name(mirror: Mirror) -> str:
    """How /status names a mirror: its base URL, bucket or provider (never credentials)."""
    if mirror.http is not None or mirror.fdp is not None:
        url = urlsplit(str((mirror.http or mirror.fdp).base_url))  # type: ignore[union-attr]
        return url._replace(netloc=url.netloc.rpartition("@")[2]).geturl()
    if mirror.s3 is not None:
        where = f"{mirror.s3.endpoint_url}/" if mirror.s3.endpoint_url else "s3://"
        return f"{where}{mirror.s3.bucket}/{mirror.s3.prefix}"
    assert mirror.eodag is not None
    return f"eodag:{','.join(mirror.eodag.names)}/{mirror.eodag.collection}"


def dataset_timeouts(settings: Settings, ds: Dataset) -> Timeouts:
    """The dataset's timeouts, each defaulting to `upstream_defaults`."""
    default, own = settings.upstream_defaults, ds.timeouts
    return Timeouts(
        connect=own.connect_timeout if own and own.connect_timeout else default.connect_timeout,
        read=own.read_timeout if own and own.read_timeout else default.read_timeout,
    )


class Registry:
    """Datasets by name. Building it may start EODAG (about a second), so do it once."""

    def __init__(self, settings: Settings, source: str = "the config") -> None:
        self.entries: dict[str, Entry] = {}
        #: QoS limits for datasets that set none of a kind (read at each request)
        self.qos_defaults = settings.qos_defaults
        self.upstream_limits = settings.upstream_limits
        self.gateway: Any = None
        self._workdir: EodagWorkdir | None = None
        #: `upstream_defaults` as Timeouts: for the shared HTTP client (`make_client`)
        self.timeouts = Timeouts(
            settings.upstream_defaults.connect_timeout, settings.upstream_defaults.read_timeout
        )
        #: one thread limiter per upstream (S3 endpoint, EODAG provider), shared by its datasets
        self.limiters: dict[str, anyio.CapacityLimiter] = {}
        self.settings = settings
        self._lock = threading.Lock()
        problems: list[str] = []
        for name, ds in settings.datasets.items():
            try:
                self.entries[name] = self.build(name, ds)
            except ConfigError as e:
                problems += e.problems
        if problems:
            self.close()
            raise ConfigError(source, problems)

    def build(self, name: str, ds: Dataset) -> Entry:
        """The entry of dataset `name` under policy `ds`, with its resolver; raises
        ConfigError when its upstream cannot be served (may start EODAG: blocks)."""
        up = ds.upstream
        timeouts = dataset_timeouts(self.settings, ds)
        allowed = Origins.parse(ds.allowed_hosts)
        resolver: Resolver
        if up.mirrors is not None:
            rules = mirror_rules(up.health or MirrorHealth())
            members = [
                Member(
                    member_name(m),
                    self._single(name, m, f"upstream.mirrors.{n}", timeouts, allowed),
                    m.priority,
                    m.weight,
                    rules,
                )
                for n, m in enumerate(up.mirrors)
            ]
            resolver = MirrorSet(members, rules)
        else:
            resolver = self._single(name, up, "upstream", timeouts, allowed)
        return Entry(name, ds, resolver, resolver.origins, timeouts)

    def _single(
        self, name: str, up: Upstream | Mirror, where: str, timeouts: Timeouts, allowed: Origins
    ) -> Resolver:
        """The resolver of one upstream (a dataset's, or one mirror's)."""
        settings = self.settings
        if up.http is not None:
            return HttpResolver(str(up.http.base_url), up.http.objects, allowed, timeouts)
        if up.fdp is not None:
            base = str(up.fdp.base_url).rstrip("/")
            token = up.fdp.bearer()
            return HttpResolver(
                f"{base}/assets/{up.fdp.dataset or name}/",
                None,
                allowed,
                timeouts,
                autoindex=False,
                headers={"authorization": f"Bearer {token}"} if token else None,
            )
        if up.s3 is not None:
            return S3Resolver(
                up.s3.bucket,
                up.s3.prefix,
                up.s3,
                timeouts=timeouts,
                limiter=self._limiter(settings, f"s3 {up.s3.endpoint_url}"),
                origins=allowed,
            )
        assert up.eodag is not None
        with self._lock:
            gateway = self._gateway(settings)
        members = []
        for n, provider in enumerate(up.eodag.names):
            if provider not in gateway.providers:
                known = ", ".join(sorted(gateway.providers)) or "none"
                key = f"providers.{n}" if up.eodag.providers else "provider"
                raise ConfigError(
                    "the policy",
                    [
                        f"datasets.{name}.{where}.eodag.{key}: unknown EODAG provider "
                        f"{provider!r} (the providers file defines: {known})"
                    ],
                )
            limit_provider(gateway, provider, timeouts)
            members.append(
                EodagResolver(
                    gateway,
                    provider,
                    up.eodag.collection,
                    timeouts=timeouts,
                    limiter=self._limiter(settings, f"eodag {provider}"),
                    origins=allowed | provider_origins(gateway, provider),
                )
            )
        return members[0] if len(members) == 1 else FederatedResolver(members)

    def reusable(self, name: str, ds: Dataset) -> Entry | None:
        """Dataset `name` under policy `ds` with the resolver it has now, if its upstream
        did not change (None: it needs `build`)."""
        old = self.entries.get(name)
        if (
            old is not None
            and old.policy.upstream == ds.upstream
            and old.policy.timeouts == ds.timeouts
            and old.policy.allowed_hosts == ds.allowed_hosts
        ):
            return Entry(name, ds, old.resolver, old.origins, old.timeouts)
        return None

    def apply(self, name: str, ds: Dataset | None, entry: Entry | None = None) -> None:
        """Serve dataset `name` under policy `ds` from the next request on (None: stop
        serving it), with `entry` if the caller built it already. The entries are replaced
        whole, never changed in place: other threads may be reading them meanwhile, and
        writers (the policy watcher, a relay) take turns."""
        if ds is None:
            entry = None
        else:
            entry = entry or self.reusable(name, ds) or self.build(name, ds)
        with self._lock:
            entries = dict(self.entries)
            if entry is None:
                entries.pop(name, None)
            else:
                entries[name] = entry
            self.entries = entries

    def _limiter(self, settings: Settings, upstream: str) -> anyio.CapacityLimiter:
        if upstream not in self.limiters:
            self.limiters[upstream] = anyio.CapacityLimiter(settings.upstream_defaults.max_threads)
        return self.limiters[upstream]

    def _gateway(self, settings: Settings) -> Any:
        if self.gateway is None:
            providers = settings.eodag.providers_file
            self._workdir = EodagWorkdir()
            self.gateway = make_gateway(Path(providers) if providers else None, self._workdir.path)
        return self.gateway

    def get(self, name: str) -> Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise DatasetNotFound(f"no dataset named {name!r}") from None

    def close(self) -> None:
        if self._workdir is not None:
            self._workdir.close()


def mirror_sets(registry: Registry) -> dict[str, MirrorSet]:
    """The datasets served from mirror sets, by name."""
    return {n: e.resolver for n, e in registry.entries.items() if isinstance(e.resolver, MirrorSet)}
