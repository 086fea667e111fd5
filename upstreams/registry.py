"""The configured datasets, each with its policy and the resolver for its upstream."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policies.config import Dataset, Settings
from policies.loader import ConfigError
from upstreams.base import DatasetNotFound, Resolver
from upstreams.eodag import EodagResolver, EodagWorkdir, make_gateway
from upstreams.http import HttpResolver
from upstreams.s3 import S3Resolver


@dataclass
class Entry:
    name: str
    policy: Dataset
    resolver: Resolver


class Registry:
    """Datasets by name. Building it may start EODAG (about a second), so do it once."""

    def __init__(self, settings: Settings, source: str = "the config") -> None:
        self.entries: dict[str, Entry] = {}
        self.gateway: Any = None
        self._workdir: EodagWorkdir | None = None
        problems: list[str] = []
        for name, ds in settings.datasets.items():
            up = ds.upstream
            if up.http is not None:
                resolver: Resolver = HttpResolver(str(up.http.base_url), up.http.objects)
            elif up.fdp is not None:
                base = str(up.fdp.base_url).rstrip("/")
                resolver = HttpResolver(f"{base}/assets/{up.fdp.dataset or name}/")
            elif up.s3 is not None:
                key_id, secret = up.s3.credentials()
                resolver = S3Resolver(
                    up.s3.bucket,
                    up.s3.prefix,
                    str(up.s3.endpoint_url) if up.s3.endpoint_url else None,
                    str(up.s3.public_endpoint_url) if up.s3.public_endpoint_url else None,
                    up.s3.region,
                    key_id,
                    secret,
                )
            elif up.eodag is not None:
                gateway = self._gateway(settings)
                if up.eodag.provider not in gateway.providers:
                    known = ", ".join(sorted(gateway.providers)) or "none"
                    problems.append(
                        f"datasets.{name}.upstream.eodag.provider: unknown EODAG provider "
                        f"{up.eodag.provider!r} (the providers file defines: {known})"
                    )
                    continue
                resolver = EodagResolver(gateway, up.eodag.provider, up.eodag.collection)
            else:
                problems.append(
                    f"datasets.{name}.upstream: '{up.kind}' upstreams are not "
                    "supported by this version (http, fdp, s3 and eodag are)"
                )
                continue
            self.entries[name] = Entry(name, ds, resolver)
        if problems:
            self.close()
            raise ConfigError(source, problems)

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
