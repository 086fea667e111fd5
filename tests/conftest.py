"""Fixtures for the upstream (our fault-injecting STAC + asset server) and the proxy itself.

Both run as real processes on free loopback ports, started from fixtures and stopped by pid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from proxy.demo import providers_yaml
from tests.harness.procs import BIN, PYTHON, ServerProcess, free_port, http_ok
from upstreams.demo.data import ensure_demo_data

pytest_plugins = ["tests.harness.fixtures"]


@dataclass
class Upstream:
    """Handle on the upstream process: its URL, its request log, its faults, its files."""

    url: str
    data: Path
    proc: ServerProcess

    def log(self, path_prefix: str = "") -> list[dict[str, Any]]:
        entries = httpx.get(f"{self.url}/_log").json()
        return [e for e in entries if e["path"].startswith(path_prefix)]

    def data_requests(self) -> list[dict[str, Any]]:
        return self.log("/data/")

    def reset(self) -> None:
        httpx.delete(f"{self.url}/_faults").raise_for_status()  # (then no faulted request
        httpx.delete(f"{self.url}/_log").raise_for_status()  # is logged after the clearing)

    def heal(self) -> None:
        """Clear the faults only (the log goes on: requests under way stay counted)."""
        httpx.delete(f"{self.url}/_faults").raise_for_status()

    def fault(self, match: str, **spec: Any) -> None:
        httpx.post(f"{self.url}/_faults", json={"match": match, **spec}).raise_for_status()

    def file(self, rel: str) -> bytes:
        return (self.data / rel).read_bytes()


@dataclass
class Proxy:
    url: str
    proc: ServerProcess
    config: Path


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo-data")
    ensure_demo_data(root)
    return root


def demo_upstream(data: Path, log_dir: Path, name: str = "upstream") -> Upstream:
    """Our fault-injecting upstream over `data`, on a free port, not started yet."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = ServerProcess(
        name,
        [PYTHON, "-m", "upstreams.demo.server", "--data", str(data), "--port", str(port)],
        log_dir=log_dir,
        ready=http_ok(f"{url}/conformance"),
    )
    return Upstream(url, data, proc)


@pytest.fixture(scope="session")
def upstream_server(
    demo_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Upstream]:
    upstream = demo_upstream(demo_data, tmp_path_factory.mktemp("logs"))
    with upstream.proc:
        yield upstream


@pytest.fixture
def upstream(upstream_server: Upstream) -> Upstream:
    """The session's upstream with an empty request log and no faults."""
    upstream_server.reset()
    return upstream_server


#: A retention that keeps nothing: these datasets stream pass-through.
NO_CACHE = {"mode": "lru", "max_bytes": 0}


def standard_config(upstream_url: str, work: Path) -> dict[str, Any]:
    """Pass-through datasets: `files` (http), `listed` (http with objects), `scenes` (EODAG)."""
    providers = work / "providers.yml"
    providers.write_text(providers_yaml(upstream_url))
    return {
        "cache": {"store": str(work / "cache")},
        "eodag": {"providers_file": "providers.yml"},
        "datasets": {
            "files": {
                "upstream": {"http": {"base_url": f"{upstream_url}/data/demo-cogs"}},
                "retention": NO_CACHE,
            },
            "listed": {
                "upstream": {
                    "http": {
                        "base_url": f"{upstream_url}/data/demo-cogs/",
                        "objects": ["scene-a/B04.tif", "scene-b/B04.tif"],
                    }
                },
                "retention": NO_CACHE,
            },
            "scenes": {"upstream": {"eodag": {"provider": "fdp_demo", "collection": "demo-cogs"}}},
        },
    }


def fdp_serve(
    config: dict[str, Any],
    work: Path,
    *args: str,
    env: dict[str, str] | None = None,
    name: str = "fdp",
    set_public_url: bool = True,
) -> Proxy:
    """`fdp serve --config FILE --port P [args]` on a free port, not started yet."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if set_public_url:  # otherwise the CLI derives it from --port
        config.setdefault("server", {})["public_url"] = url
    work.mkdir(parents=True, exist_ok=True)
    path = work / "fdp.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = ServerProcess(
        name,
        [str(BIN / "fdp"), "serve", "--config", str(path), "--port", str(port), *args],
        log_dir=work,
        cwd=work,
        env={"FDP_LOG_LEVEL": "INFO", **(env or {})},
        ready=http_ok(f"{url}/healthz"),
    )
    return Proxy(url, proc, path)


@pytest.fixture(scope="session")
def start_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Proxy]]:
    """Start `fdp serve --config FILE --port P` (as a user would); all are stopped at the end."""
    started: list[ServerProcess] = []

    def start(config: dict[str, Any], env: dict[str, str] | None = None) -> Proxy:
        proxy = fdp_serve(config, tmp_path_factory.mktemp("proxy"), env=env)
        started.append(proxy.proc.start())
        return proxy

    yield start
    with ThreadPoolExecutor(16) as pool:  # each takes a moment to drain: all at once
        list(pool.map(ServerProcess.stop, started))


@pytest.fixture(scope="session")
def proxy(
    start_proxy: Callable[..., Proxy],
    upstream_server: Upstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Proxy:
    """A proxy with an http dataset (`files`), a listed one (`listed`), an EODAG one (`scenes`)."""
    work = tmp_path_factory.mktemp("standard")
    config = standard_config(upstream_server.url, work)
    config["eodag"]["providers_file"] = str(work / "providers.yml")
    return start_proxy(config)


@pytest.fixture
def client(proxy: Proxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, timeout=30) as c:
        yield c
