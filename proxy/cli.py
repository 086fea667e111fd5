"""The `fdp` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

import uvicorn

from policies.config import Settings
from policies.loader import ConfigError, load_settings

log = logging.getLogger("fdp")


def _setup_logging() -> None:
    level = os.environ.get("FDP_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("eodag", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _settings(args: argparse.Namespace, var_dir: Path) -> tuple[Settings, str, str | None]:
    """(settings, where they came from, demo upstream URL if the embedded default is used)."""
    path = getattr(args, "config", None) or os.environ.get("FDP_CONFIG")
    upstream_url = None
    if path:
        settings, source = load_settings(path), path
    else:
        from proxy.demo import demo_config, start_upstream

        try:
            upstream_url = start_upstream(var_dir / "demo-data", port=args.upstream_port)
        except ImportError as e:
            raise SystemExit(
                f"fdp: the embedded default needs the demo data tools ({e.name} is missing): "
                "pip install 'federated-data-proxy[demo]', or pass --config FILE"
            ) from None
        settings = load_settings(None, default=demo_config(upstream_url, var_dir))
        source = "the embedded default config"
    server = settings.server
    update = {
        "host": args.host or server.host,
        "port": server.port if args.port is None else args.port,
    }
    if "public_url" not in server.model_fields_set:
        update["public_url"] = f"http://{update['host']}:{update['port']}"
    settings = settings.model_copy(update={"server": server.model_copy(update=update)})
    return settings, source, upstream_url


async def _serve(settings: Settings, source: str, banner: str | None) -> None:
    from proxy.app import create_app

    app = create_app(settings, source)
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,
        proxy_headers=False,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():  # noqa: ASYNC110 (uvicorn has only a flag)
        await asyncio.sleep(0.05)
    if server.started:
        log.info("fdp listening on %s", settings.server.public_url)
        if banner:
            print(banner, flush=True)
    await task
    if not server.started:
        raise SystemExit(f"fdp: could not start on {settings.server.host}:{settings.server.port}")


def cmd_serve(args: argparse.Namespace, demo: bool = False) -> int:
    settings, source, upstream_url = _settings(args, Path(args.var))
    text = None
    if demo and upstream_url:
        from proxy.demo import banner

        text = banner(str(settings.server.public_url).rstrip("/"), upstream_url)
    asyncio.run(_serve(settings, source, text))
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
    pol = sub.add_parser("policies", help="policy documents")
    pol_sub = pol.add_subparsers(dest="policies_command", required=True)
    v = pol_sub.add_parser("validate", help="validate the config file and exit")
    v.add_argument("--config", default=argparse.SUPPRESS, help="config file (YAML)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    _setup_logging()
    try:
        if args.command == "serve":
            code = cmd_serve(args)
        elif args.command == "demo":
            code = cmd_serve(args, demo=True)
        else:
            code = cmd_validate(args)
    except ConfigError as e:
        print(f"fdp: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
