"""The application: `/assets` on a lean ASGI path, everything else through Starlette."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from urllib.parse import quote

import anyio
import anyio.to_thread
import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from cache.engine import FillEngine
from cache.feed import Announcer, open_log
from cache.retention import Rule, retain
from cache.shared import SharedTier
from cache.store import CacheUnavailable, Store
from policies.config import Dataset, Settings
from policies.loader import load_settings
from policies.qos import Limiter
from policies.store import FileBackend, PolicyStore, RedisBackend
from proxy import admin, deliveries, objects, relays, stac, status
from proxy.accesslog import AccessLog, configure_logging
from proxy.admin import Policies
from proxy.assets import Assets
from proxy.auth import Authenticator, Forbidden, Unauthorized, identity
from proxy.deliveries import DeliveryLog
from proxy.delivery import CacheDelivery
from proxy.discovery import Harvester
from proxy.feed import Feed, feed
from proxy.metrics import LiveFigures, metrics
from proxy.problems import BadRequest, ProxyError, error_response, exception_handlers
from proxy.publisher import Publisher
from proxy.relaying import Relay
from proxy.relays import Directory
from proxy.server import LimitedProtocol
from proxy.subscriptions import Follower
from proxy.usage import address_usage, my_usage, user_usage
from proxy.usage import counters as qos_counters
from upstreams.caps import Caps
from upstreams.http import make_client, make_pool
from upstreams.mirrors import watch as watch_mirrors
from upstreams.registry import Registry, mirror_sets
from workers.jobs import SUCCEEDED
from workers.queue import make_queue

log = logging.getLogger("fdp.proxy")
FLUSH_SECONDS = 5.0


async def healthz(request: Request) -> Response:
    """Liveness: the process answers."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Readiness with details. A cache that cannot write degrades to pass-through: still ready.

    A queue that cannot be reached only affects slow datasets: also still ready.
    """
    registry: Registry = request.app.state.registry
    settings: Settings = request.app.state.settings
    delivery: CacheDelivery = request.app.state.delivery
    health = delivery.health
    cache = {
        "ok": delivery.store is not None and health.error is None,
        "store": str(settings.cache.store),
        "error": health.error,
        "integrity_failures": health.integrity_failures
        + (delivery.store.corrupt_blocks if delivery.store is not None else 0),
        **health.counters,
    }
    queue_problem = await request.app.state.queue.problem()
    queue = {
        "ok": queue_problem is None,
        "error": queue_problem,
        "backend": "redis" if settings.queue.redis_url else "embedded",
    }
    checks = {
        "datasets": {"ok": True, "count": len(registry.entries)},
        "cache": cache,
        "queue": queue,
    }
    if getattr(request.app.state, "draining", False):
        return JSONResponse({"status": "draining", "checks": checks}, status_code=503)
    return JSONResponse({"status": "ready", "checks": checks})


async def job_status(request: Request) -> Response:
    """A retrieval's state for its requester (others get 404); 303 to the data when done."""
    queue = request.app.state.queue
    who = await identity(request)
    info = await queue.get(request.path_params["job_id"])
    if info is None or not (who.admin or who.owner in info.owners):
        raise HTTPException(404, "no such job")
    if info.state == SUCCEEDED:
        location = f"{request.app.state.public_url}/assets/{info.dataset}/{quote(info.path)}"
        return Response(
            status_code=303, headers={"location": location, "cache-control": "no-store"}
        )
    return JSONResponse(info.public(), headers={"cache-control": "no-store"})


def retention_rules(datasets: Mapping[str, Dataset]) -> dict[str, Rule]:
    """Each dataset's retention, as the policies in force say now."""
    return {
        name: Rule(ds.retention.mode, ds.retention.days, ds.retention.max_bytes)
        for name, ds in datasets.items()
    }


def delivery_log(settings: Settings) -> DeliveryLog:
    """In Redis with `queue.redis_url` (every replica), else in SQLite beside the cache."""
    config = settings.deliveries
    backend: deliveries.Backend
    if settings.queue.redis_url:
        backend = deliveries.RedisBackend(
            settings.queue.redis_url, config.keep_days * 86400, settings.queue.timeout_seconds
        )
    else:
        file = config.file or Path(settings.cache.folder).parent / "deliveries.sqlite"
        try:
            backend = deliveries.SqliteBackend(Path(file))
        except (OSError, sqlite3.Error) as e:
            log.error("delivery log unavailable (%s): deliveries are not logged", e)
            backend = deliveries.NoBackend()
    return DeliveryLog(backend, config)


def policy_store(settings: Settings) -> PolicyStore:
    """In Redis with `queue.redis_url` (every replica), else in a file beside the cache."""
    keep = settings.policy_store.keep_versions
    backend: FileBackend | RedisBackend
    if settings.queue.redis_url:
        backend = RedisBackend(settings.queue.redis_url, keep, settings.queue.timeout_seconds)
    else:
        file = settings.policy_store.file or Path(settings.cache.folder).parent / "policies.json"
        backend = FileBackend(Path(file), keep)
    return PolicyStore(backend)


def open_store(settings: Settings, clock: Callable[[], float]) -> tuple[Store | None, str | None]:
    try:
        return Store(settings.cache.folder, clock), None
    except CacheUnavailable as e:
        log.error("%s; serving pass-through until restart", e)
        return None, str(e)


class App:
    """Dispatch: `/assets/...` to the lean endpoint, the rest to Starlette."""

    def __init__(self, starlette: Starlette, assets: Assets) -> None:
        self.starlette = starlette
        self.assets = assets
        self.state = starlette.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.starlette(scope, receive, send)
        elif scope["path"].startswith("/assets/"):
            await self.assets(scope, receive, send)  # checks its headers itself
        elif sum(1 for name, _ in scope["headers"] if name == b"authorization") > 1:
            refused = BadRequest("more than one Authorization header")
            await error_response(refused, scope["path"])(scope, receive, send)
        elif (scope["path"] == "/admin/relays" and scope["method"] == "POST") or (
            scope["path"].startswith("/admin/objects/") and scope["method"] == "PUT"
        ):  # relay-scoped tokens, datasets' owners: these check them themselves
            await self.starlette(scope, receive, send)
        elif scope["path"].startswith("/admin"):
            await self.admin_gate(scope, receive, send)
        else:
            await self.starlette(scope, receive, send)

    def draining(self) -> None:
        """The server is stopping: not ready from now on, and every hold ends now (its
        client is told to come back), so shutdown is quick."""
        self.starlette.state.draining = True
        self.assets.stopping.set()

    async def admin_gate(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Everything under /admin needs a token of the admin group."""
        auth = dict(scope["headers"]).get(b"authorization")
        try:
            who = await self.assets.identify(auth.decode("latin-1") if auth else None)
            if who.subject is None:
                raise Unauthorized("the admin API needs a bearer token", invalid=False)
            if not who.admin:
                raise Forbidden("the admin API is for the admin group only")
        except ProxyError as e:
            await error_response(e, scope["path"])(scope, receive, send)
            return
        await self.starlette(scope, receive, send)


def create_app(
    settings: Settings, source: str = "the config", clock: Callable[[], float] = time.time
) -> App:
    """Build the app; raises ConfigError here (not at startup) when a dataset cannot be served."""
    configure_logging(settings.log.format)
    server = settings.server
    LimitedProtocol.limit(int(server.max_header_bytes), server.request_timeout)
    registry = Registry(settings, source)
    policies = Policies(policy_store(settings), settings, registry)
    policies.start()  # the store's versions (edits made while this process was away) win
    store, store_error = open_store(settings, clock)
    shared = SharedTier(settings.cache, settings.queue.redis_url) if settings.cache.shared else None
    local = settings.cache.local if settings.cache.shared else settings.cache
    max_bytes = int(local.max_bytes)
    public_url = str(settings.server.public_url).rstrip("/")
    try:
        feed_log = open_log(settings)
    except (OSError, sqlite3.Error) as e:
        log.error("announcement log unavailable (%s): kept in this process only", e)
        feed_log = open_log(settings, memory=True)
    hub = Feed(feed_log)
    announcer = Announcer(store, feed_log, hub.announced) if store is not None else None
    publisher = Publisher(hub, settings.announce, public_url) if settings.announce.broker else None
    harvest = settings.announce.harvest
    harvester = (
        Harvester(
            harvest,
            registry,
            hub,
            public_url,
            settings.stac.timeout_seconds,
            settings.announce.keep_hours * 3600,
        )
        if harvest.datasets
        else None
    )
    followers = [
        Follower(sub, settings, store, feed_log, registry, announcer)
        for sub in (settings.subscriptions if store is not None else [])
    ]

    async def housekeeping(delivery: CacheDelivery) -> None:
        """Batch access-time writes and run retention, off the request path."""
        assert store is not None
        last_sweep = 0.0
        scrubbed: str | None = None  # where the scrub goes on at the next sweep
        while True:
            await anyio.sleep(min(FLUSH_SECONDS, settings.cache.sweep_seconds))
            try:
                touched = await anyio.to_thread.run_sync(store.flush)
                if shared is not None:
                    await anyio.to_thread.run_sync(shared.accessed, touched)
                if time.monotonic() - last_sweep >= settings.cache.sweep_seconds:
                    last_sweep = time.monotonic()
                    rules = retention_rules({n: e.policy for n, e in registry.entries.items()})
                    # a deleted dataset's objects stay until the global cap needs room
                    rules |= {n: Rule("lru", None, None) for n in policies.deleted - set(rules)}
                    await anyio.to_thread.run_sync(
                        retain,
                        *(store, shared, rules, max_bytes, int(settings.cache.max_bytes)),
                        *(3 * settings.cache.sweep_seconds, clock()),
                    )
                    scrubbed = await anyio.to_thread.run_sync(
                        store.scrub, int(settings.cache.scrub_bytes), scrubbed
                    )
            except Exception as e:  # a full disk must not stop housekeeping for good
                delivery.health.failed("housekeeping", e)

    async def publish_metrics() -> None:
        """The requests counted since the last second, to the prometheus counters."""
        while True:
            await anyio.sleep(1.0)
            assets.metrics.publish()

    async def leaseholders(client: httpx.AsyncClient, released: anyio.Event) -> None:
        """The tasks that hold leases in the announcement log; stopped, they release them."""
        try:
            async with anyio.create_task_group() as tg:
                if publisher is not None:
                    tg.start_soon(publisher.run)
                if harvester is not None:
                    tg.start_soon(harvester.run)
                for follower in followers:
                    tg.start_soon(follower.run, client)
        finally:
            released.set()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with make_client(registry.timeouts) as client, anyio.create_task_group() as tg:
            pool = make_pool(registry.timeouts)
            engine = FillEngine(
                store,
                client,
                int(settings.cache.block_size),
                clock,
                pool,
                verify_max_bytes=int(settings.cache.verify_max_bytes),
                window=settings.cache.read_ahead,
                caps=assets.caps,
                shared=shared,
                wants_whole=lambda dataset: (
                    (entry := registry.entries.get(dataset)) is not None
                    and entry.presigns_from_cache
                ),
                on_whole=announcer.submit if announcer is not None else lambda record: None,
            )
            delivery = CacheDelivery(engine, settings.cache.read_ahead)
            if store_error:
                delivery.health.failed("opening the cache", Exception(store_error))
            app.state.delivery = assets.delivery = delivery
            assets.client = client
            if settings.auth.oidc_issuer is not None:
                assets.auth = Authenticator(settings.auth, client)
            await queue.start()
            policies.follow()
            tg.start_soon(publish_metrics)
            tg.start_soon(hub.tail)
            released = anyio.Event()
            tg.start_soon(leaseholders, client, released)
            tg.start_soon(watch_mirrors, lambda: registry.entries.values(), client)
            if settings.relay.directory is not None:
                relay = Relay(settings, registry, store, lambda: assets.active)
                tg.start_soon(relay.run, client)
            if store is not None:
                tg.start_soon(housekeeping, delivery)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    await released.wait()  # (before the log closes)
                await queue.close()
                await anyio.to_thread.run_sync(policies.close)
                await anyio.to_thread.run_sync(assets.deliveries.close)
                await delivery.fills.drain()
                if announcer is not None:
                    await anyio.to_thread.run_sync(announcer.close)
                feed_log.close()
                if store is not None:
                    store.close()
                pool.clear()
                registry.close()

    starlette = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/jobs/{job_id}", job_status),
            Route("/me/usage", my_usage),
            Route("/feed", feed),
            Route("/admin/objects/{dataset}/{path:path}", objects.put, methods=["PUT"]),
            Route("/me/deliveries", deliveries.deliveries),
            Route("/metrics", metrics),
            Route("/status", status.status_html),
            Route("/status.json", status.status_json),
            Route("/admin/qos", qos_counters),
            Route("/admin/qos/users/{subject:path}", user_usage),
            Route("/admin/qos/addresses/{address}", address_usage),
            *stac.routes,
            *relays.routes,
            *admin.routes,
        ],
        exception_handlers=exception_handlers(),
        lifespan=lifespan,
    )
    starlette.state.settings = settings
    starlette.state.registry = registry
    starlette.state.policies = policies
    starlette.state.store = store
    starlette.state.public_url = public_url
    starlette.state.feed = hub
    starlette.state.announcer = announcer
    starlette.state.publisher = publisher
    starlette.state.followers = followers
    starlette.state.harvester = harvester
    queue = make_queue(settings)
    starlette.state.queue = queue
    directory = starlette.state.relays = Directory(registry, settings.relays)
    starlette.state.live_figures = LiveFigures(
        store, queue.depth, queue.stats, lambda: mirror_sets(registry), directory.public
    )
    assets = Assets(registry, public_url, AccessLog(), server.name)
    starlette.state.assets = assets
    assets.relays = directory
    assets.deliveries = starlette.state.deliveries = delivery_log(settings)
    assets.queue = queue
    assets.limiter = Limiter(settings.qos, settings.queue.redis_url)
    assets.caps = Caps(lambda: registry.upstream_limits, settings.queue.redis_url, settings.qos)
    header = settings.server.trusted_proxy_header
    assets.trusted_proxy_header = header.lower().encode("latin-1") if header else None
    starlette.state.identify = assets.identify
    return App(starlette, assets)


def from_environment() -> App:
    """App factory for `fdp serve --workers N`: each worker reads $FDP_CONFIG itself."""
    settings = load_settings(None)
    return create_app(settings, os.environ.get("FDP_CONFIG", "the config"))
