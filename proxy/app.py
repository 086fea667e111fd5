"""The Starlette application: routes, shared clients, startup and shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from policies.config import Settings
from proxy import stac
from proxy.assets import asset
from proxy.problems import exception_handlers
from proxy.registry import Registry
from upstreams.http import make_client

log = logging.getLogger("fdp.proxy")


async def healthz(request: Request) -> Response:
    """Liveness: the process answers."""
    return JSONResponse({"status": "ok"})


def _cache_dir_check(store: str) -> tuple[bool, str]:
    path = Path(store)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".ready-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        return False, f"{store}: {e.strerror}"
    return True, store


async def readyz(request: Request) -> Response:
    """Readiness: datasets loaded and the cache directory writable; details say what is wrong."""
    settings: Settings = request.app.state.settings
    ok_cache, cache_detail = await anyio.to_thread.run_sync(_cache_dir_check, settings.cache.store)
    registry: Registry = request.app.state.registry
    checks = {
        "datasets": {"ok": True, "count": len(registry.entries)},
        "cache": {"ok": ok_cache, "detail": cache_detail},
    }
    ready = all(c["ok"] for c in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status_code=200 if ready else 503,
    )


def create_app(settings: Settings, source: str = "the config") -> Starlette:
    """Build the app; raises ConfigError here (not at startup) when a dataset cannot be served."""
    registry = Registry(settings, source)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with make_client() as client:
            app.state.http = client
            try:
                yield
            finally:
                app.state.registry.close()

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/assets/{dataset}/{path:path}", asset, methods=["GET", "HEAD"]),
            *stac.routes,
        ],
        exception_handlers=exception_handlers(),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = registry
    return app
