"""The `fdp` command line."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import AnyHttpUrl

from cache.feed import announce_quietly, open_log
from cache.retention import sweep
from cache.store import CacheUnavailable, Store
from policies.config import Settings, Subscription
from policies.loader import ConfigError, load_settings
from proxy import harvest, policies_cli
from proxy.app import configure_logging, create_app, retention_rules
from upstreams.registry import Registry

log = logging.getLogger("fdp")

#: seconds uvicorn gives open requests to finish on SIGINT/SIGTERM: a deployment drains them;
#: the embedded default runs in someone's terminal, where Ctrl+C must stop it at once, even
#: while a request is held waiting for a retrieval
DEMO_GRACE = 2.0


def _embedded(var_dir: Path, upstream_url: str | None = None) -> Settings:
    """The embedded default config; without `upstream_url` it needs no running upstream."""
    from proxy.demo import OFFLINE_UPSTREAM, demo_config

    return load_settings(None, default=demo_config(var_dir, upstream_url or OFFLINE_UPSTREAM))


def _config_path(args: argparse.Namespace) -> str | None:
    return getattr(args, "config", None) or os.environ.get("FDP_CONFIG") or None


def _settings(args: argparse.Namespace, upstream_url: str | None = None) -> tuple[Settings, str]:
    """(settings with --host/--port applied, where they came from)."""
    path = _config_path(args)
    if path:
        settings, source = load_settings(path), path
    else:
        settings, source = _embedded(Path(args.var), upstream_url), "the embedded default config"
    server = settings.server
    update = {
        "host": args.host or server.host,
        "port": server.port if args.port is None else args.port,
    }
    if "public_url" not in server.model_fields_set:
        update["public_url"] = f"http://{update['host']}:{update['port']}"
    changes: dict[str, object] = {"server": server.model_copy(update=update)}
    if getattr(args, "relay_of", None):
        try:
            directory = AnyHttpUrl(args.relay_of)
        except ValueError:
            raise SystemExit(f"fdp: --relay-of {args.relay_of!r} is not an http(s) URL") from None
        relay = settings.relay.model_copy(update={"directory": directory})
        changes["relay"] = relay
    for url in getattr(args, "subscribe", None) or ():
        try:
            changes.setdefault("subscriptions", list(settings.subscriptions))
            changes["subscriptions"].append(Subscription(feed=AnyHttpUrl(url)))  # type: ignore[union-attr]
        except ValueError:
            raise SystemExit(
                f"fdp: --subscribe {url!r} is not an fdp feed's http(s) URL"
                " (a broker is followed from the config's subscriptions: block)"
            ) from None
    settings = settings.model_copy(update=changes)
    return settings, source


def _start_demo_upstream(args: argparse.Namespace) -> str:
    """Start the demo upstream (generating its data on first run) and point EODAG at it."""
    from proxy.demo import start_upstream, write_providers

    var_dir = Path(args.var)
    try:
        upstream_url = start_upstream(var_dir / "demo-data", port=args.upstream_port)
    except ImportError as e:
        raise SystemExit(
            f"fdp: the embedded default needs the demo data tools ({e.name} is missing): "
            "pip install 'federated-data-proxy[demo]', or pass --config FILE"
        ) from None
    write_providers(var_dir, upstream_url)
    return upstream_url


def check_port(host: str, port: int, demo: bool = False) -> None:
    """Fail in one line when the port is taken, before anything starts or is written.

    Binds the way uvicorn does (SO_REUSEADDR), so a port in TIME_WAIT is not "in use".
    """
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise SystemExit(f"fdp: cannot listen on {host}:{port}: {e.strerror}") from None
            raise SystemExit(
                f"fdp: port {port} is in use (another fdp{' demo' if demo else ''}?): "
                "choose another with --port N or FDP_SERVER__PORT=N"
            ) from None


def uvicorn_options(settings: Settings, grace: float | None = None) -> dict[str, Any]:
    return {
        "host": settings.server.host,
        "port": settings.server.port,
        "log_config": None,
        "access_log": False,  # fdp writes its own (`fdp.access`), without query strings
        "http": "proxy.server:LimitedProtocol",  # header size and header time limits
        "proxy_headers": False,
        "timeout_graceful_shutdown": settings.server.grace_seconds if grace is None else grace,
        "server_header": False,  # no "server: uvicorn" on every response
    }


class DrainingServer(uvicorn.Server):
    """uvicorn's server, stopping as Kubernetes expects: at the first SIGTERM (or SIGINT)
    `/readyz` turns 503 at once and requests are still served for `drain` seconds, then
    the listener closes and in-flight responses get the grace period to finish. A second
    signal skips the rest of the drain."""

    def __init__(self, config: uvicorn.Config, app: Any, drain: float) -> None:
        super().__init__(config)
        self.app, self.drain = app, drain
        self.loop: asyncio.AbstractEventLoop | None = None
        self._signalled = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.app.draining()
        if self._signalled or self.drain <= 0 or self.loop is None:
            super().handle_exit(sig, frame)
            return
        self._signalled = True
        log.info("draining: not ready, closing the listener in %g s", self.drain)
        self.loop.call_soon_threadsafe(self.loop.call_later, self.drain, self._close, sig)

    def _close(self, sig: int) -> None:
        super().handle_exit(sig, None)


def _serve(settings: Settings, source: str, banner: str | None, grace: float | None = None) -> None:
    """Run uvicorn on its preferred loop (uvloop when installed), then print the banner."""
    app = create_app(settings, source)
    config = uvicorn.Config(app, **uvicorn_options(settings, grace))
    server = DrainingServer(config, app, settings.server.drain_seconds)

    async def main() -> None:
        server.loop = asyncio.get_running_loop()
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():  # noqa: ASYNC110 (uvicorn: only a flag)
            await asyncio.sleep(0.05)
        if server.started:
            log.info("fdp listening on %s", settings.server.public_url)
            if banner:
                print(banner, flush=True)
        await task
        app.draining()  # (a server that could not start)

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(main())
    if not server.started:
        raise SystemExit(f"fdp: could not start on {settings.server.host}:{settings.server.port}")


def _serve_workers(settings: Settings, source: str, workers: int) -> None:
    """Several uvicorn worker processes, each building its app from the same file."""
    os.environ["FDP_CONFIG"] = str(Path(source).resolve())
    os.environ["FDP_SERVER__PUBLIC_URL"] = str(settings.server.public_url)
    Registry(settings, source).close()  # config errors surface here, once
    # /metrics adds up every worker's counters: prometheus-client's multiprocess mode
    with tempfile.TemporaryDirectory(prefix="fdp-metrics-") as folder:
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", folder)
        uvicorn.run(
            "proxy.app:from_environment",
            factory=True,
            workers=workers,
            **uvicorn_options(settings),
        )


def cmd_serve(args: argparse.Namespace, demo: bool = False) -> int:
    settings, source = _settings(args)
    embedded = _config_path(args) is None
    workers = getattr(args, "workers", 1)
    if workers > 1 and embedded:
        raise SystemExit("fdp: --workers needs a config file (--config or FDP_CONFIG)")
    # before the demo upstream starts or ./var is written: a second demo leaves the first alone
    check_port(settings.server.host, settings.server.port, demo)
    if workers > 1:
        _serve_workers(settings, source, workers)
        return 0
    if not embedded:
        _serve(settings, source, None)
        return 0
    upstream_url = _start_demo_upstream(args)
    settings, source = _settings(args, upstream_url)
    text = None
    if demo:
        from proxy.demo import banner

        text = banner(str(settings.server.public_url).rstrip("/"), upstream_url, Path(args.var))
    _serve(settings, source, text, grace=DEMO_GRACE)
    return 0


def _store(args: argparse.Namespace) -> tuple[Settings, Store]:
    """The cache of the config `fdp serve` would run: the file, else the embedded default."""
    path = _config_path(args)
    settings = load_settings(path) if path else _embedded(Path(args.var))
    try:
        return settings, Store(settings.cache.folder)
    except CacheUnavailable as e:
        raise SystemExit(f"fdp: {e}") from None


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def cmd_cache(args: argparse.Namespace) -> int:
    settings, store = _store(args)
    try:
        if args.cache_command == "ls":
            now = time.time()
            rows = [r for r in store.records() if args.dataset in (None, r.dataset)]
            print(
                f"{'DATASET':<20} {'PATH':<40} {'BYTES':>12} {'SIZE':>12} {'AGE':>7} "
                f"{'IDLE':>7} {'HITS':>6} SHA256"
            )
            for r in sorted(rows, key=lambda r: (r.dataset, r.path)):
                print(
                    f"{r.dataset:<20} {r.path:<40} {r.stored_bytes:>12} {r.size:>12} "
                    f"{_age(now - r.created):>7} {_age(now - r.accessed):>7} {r.hits:>6} "
                    f"{(r.sha256 or '-')[:16]}"
                )
            total = sum(r.stored_bytes for r in rows)
            print(f"{len(rows)} objects, {total} bytes")
            return 0
        if args.dataset not in settings.datasets:
            raise SystemExit(f"fdp: no dataset named {args.dataset!r} in the config")
        if args.cache_command == "put":
            source = Path(args.file)
            if not source.is_file():
                raise SystemExit(f"fdp: {source} is not a file")
            record = store.ingest(
                args.dataset, args.path, source, int(settings.cache.block_size), args.media_type
            )
            freed = sweep(
                store,
                retention_rules(settings.datasets),
                int(settings.cache.max_bytes),
                time.time(),
            )
            kept = store.record(record.key) is not None
            notice = None
            if kept:  # announced: `GET /feed` and the broker (by `fdp serve`)
                feed = open_log(settings)
                try:
                    notice = announce_quietly(store, feed, record)
                finally:
                    feed.close()
            print(
                f"put {args.dataset}/{args.path}: {record.size} bytes, sha256 {record.sha256}"
                + ("" if kept else " (evicted at once by the dataset's retention)")
                + (f"; retention freed {freed} bytes" if freed else "")
                + (f"; announced as {notice.id}" if notice is not None else "")
            )
            return 0
        victims = [
            r for r in store.records() if r.dataset == args.dataset and args.path in (None, r.path)
        ]
        freed = sum(store.evict(r.key) for r in victims)
        print(f"evicted {len(victims)} objects, {freed} bytes")
        return 0 if victims or args.path is None else 1
    finally:
        store.close()


def cmd_worker(args: argparse.Namespace) -> int:
    """An RQ worker for the proxy's retrieval queue; run any number, on any host."""
    from workers.queue import run_worker

    path = getattr(args, "config", None) or os.environ.get("FDP_CONFIG")
    settings = load_settings(path)
    if not settings.queue.redis_url:
        raise SystemExit(
            "fdp: fdp worker needs queue.redis_url (the embedded default runs "
            "retrievals inside fdp serve)"
        )
    if path:
        os.environ["FDP_CONFIG"] = str(Path(path).resolve())  # for the job function
    Registry(settings).close()  # config errors surface now, not in the first job
    run_worker(
        settings,
        burst=args.burst,
        on_start=lambda: log.info("fdp worker on %s", settings.queue.redis_url),
    )
    return 0


def cmd_qos(args: argparse.Namespace) -> int:
    """A user's (or an address's) QoS budgets, dataset by dataset, from a running proxy."""
    from urllib.parse import quote

    from proxy.remote import Remote

    kind = "addresses" if args.address else "users"
    params = {"group": args.group} if args.group else None
    body = Remote(args.url).json(f"/admin/qos/{kind}/{quote(args.who, safe='')}", params)
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    caller = body["caller"]
    if "groups" in caller:
        seen = "" if caller["seen"] else " (not seen by this proxy yet)"
        print(f"user {caller['subject']}, groups: {', '.join(caller['groups']) or '-'}{seen}")
    else:
        print(f"address {caller['address']}")
    print(
        f"{'DATASET':<20} {'KIND':<14} {'SCOPE':<16} {'LIMIT':>12} {'PER':>6} "
        f"{'REMAINING':>12} {'RESET':>6}"
    )
    for name, standings in body["datasets"].items():
        for u in standings:
            scope = u["scope"] + (f" {u['group']}" if "group" in u else "")
            print(
                f"{name:<20} {u['kind']:<14} {scope:<16} {u['limit']:>12} "
                f"{_age(u['per_seconds']):>6} {u['remaining']:>12} {_age(u['reset_seconds']):>6}"
            )
        if not standings:
            print(f"{name:<20} (no limits)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    print(f"ok: {len(settings.datasets)} datasets")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fdp", description="Federated Data Proxy")
    p.add_argument(
        "--config",
        help="config file (YAML); default $FDP_CONFIG, else the embedded default with demo data",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "run the proxy"),
        ("demo", "run the proxy on the embedded default with a demo upstream and print examples"),
    ):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("--config", default=argparse.SUPPRESS, help="config file (YAML)")
        s.add_argument("--host", default=None)
        s.add_argument("--port", type=int, default=None)
        s.add_argument(
            "--upstream-port",
            type=int,
            default=0,
            help="demo upstream port (embedded default only; 0 = any free port)",
        )
        s.add_argument("--var", default="./var", help="state folder for the embedded default")
        s.add_argument(
            "--relay-of",
            metavar="URL",
            default=None,
            help="run as a relay of the fdp at URL: register there, serve what it assigns",
        )
        s.add_argument(
            "--subscribe",
            metavar="URL",
            action="append",
            help="site mode: keep here what the fdp feed at URL announces (repeatable)",
        )
        s.add_argument(
            "--workers",
            type=int,
            default=1,
            help="worker processes sharing the port and the cache (needs a config)",
        )
    w = sub.add_parser("worker", help="run retrieval jobs from the Redis queue")
    w.add_argument("--config", default=argparse.SUPPRESS, help="config file (YAML)")
    w.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    cache = sub.add_parser("cache", help="look into and manage the online cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    ls = cache_sub.add_parser("ls", help="cached objects: sizes, ages, hits")
    ls.add_argument("dataset", nargs="?")
    put = cache_sub.add_parser("put", help="inject a local file (subject to retention)")
    put.add_argument("dataset")
    put.add_argument("path", help="the object's path in the dataset, as in /assets/DATASET/PATH")
    put.add_argument("file")
    put.add_argument("--media-type", default=None)
    ev = cache_sub.add_parser("evict", help="remove a dataset's objects, or one of them")
    ev.add_argument("dataset")
    ev.add_argument("path", nargs="?")
    for p_ in (ls, put, ev):
        p_.add_argument("--config", default=argparse.SUPPRESS, help="config file (YAML)")
        p_.add_argument("--var", default="./var", help="state folder for the embedded default")
    qos = sub.add_parser("qos", help="QoS budgets, from a running proxy (admin token)")
    qos_sub = qos.add_subparsers(dest="qos_command", required=True)
    show = qos_sub.add_parser("show", help="a user's limits and what is left of them")
    show.add_argument("who", metavar="USER", help="the user's token subject (or an address)")
    show.add_argument("--address", action="store_true", help="USER is an anonymous address")
    show.add_argument(
        "--group", action="append", help="count USER in this group (default: as last seen)"
    )
    show.add_argument("--url", help="the proxy (default $FDP_URL, else http://127.0.0.1:8080)")
    show.add_argument("--json", action="store_true", help="the JSON document as served")
    policies_cli.add_parsers(sub)
    harvest.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    configure_logging()
    try:
        if args.command == "serve":
            code = cmd_serve(args)
        elif args.command == "demo":
            code = cmd_serve(args, demo=True)
        elif args.command == "cache":
            code = cmd_cache(args)
        elif args.command == "worker":
            code = cmd_worker(args)
        elif args.command == "qos":
            code = cmd_qos(args)
        elif args.command == "harvest":
            code = harvest.run(args)
        elif args.policies_command == "validate" and args.file is None:
            code = cmd_validate(args)
        else:
            code = policies_cli.run(args)
    except ConfigError as e:
        print(f"fdp: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
