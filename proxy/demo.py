"""The embedded default: a demo upstream in a thread, and the config that points fdp at it."""

from __future__ import annotations

import shlex
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
import yaml

DEMO_PROVIDER = "fdp_demo"  # EODAG spells provider names with underscores
#: the demo upstream's URL for commands that never fetch (`fdp cache ...`): nothing listens
#: there (port 9 is "discard"), so a stray fetch fails at once instead of hanging
OFFLINE_UPSTREAM = "http://127.0.0.1:9"
READDIR = "GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR"


def providers_yaml(upstream_url: str) -> str:
    """A standard EODAG provider file for a STAC API (the pattern in NOTES.md)."""
    conf = {
        DEMO_PROVIDER: {
            "priority": 1,
            "description": "fdp demo upstream",
            "url": f"{upstream_url}/",
            "search": {
                "type": "StacSearch",
                "api_endpoint": f"{upstream_url}/search",
                "need_auth": False,
                "asset_key_from_href": False,
                "discover_collections": {"fetch_url": None},
                "discover_queryables": {"fetch_url": None, "collection_fetch_url": None},
                # keep the provider's order state (EODAG's STAC mapping says "succeeded")
                "metadata_mapping": {
                    "order:status": '{$.properties."order:status"#replace_str('
                    '"Not Available","succeeded")}',
                    "eodag:order_link": '$.properties."eodag:order_link"',
                    "eodag:status_link": '$.properties."eodag:status_link"',
                },
            },
            "products": {"GENERIC_COLLECTION": {"_collection": "{collection}"}},
            "download": {
                "type": "HTTPDownload",
                "order_enabled": True,
                "order_method": "POST",
                "order_status": {
                    "request": {"method": "GET"},
                    "metadata_mapping": {
                        "eodag:order_status": "$.json.status",
                        "eodag:order_id": "$.json.id",
                        "eodag:retry_after": '$.headers."Retry-After"',
                    },
                    "success": {"eodag:order_status": "succeeded"},
                    "error": {"eodag:order_status": "failed"},
                },
            },
        }
    }
    return yaml.safe_dump(conf, sort_keys=False)


def providers_path(var_dir: Path) -> Path:
    return var_dir / "demo-providers.yml"


def write_providers(var_dir: Path, upstream_url: str) -> Path:
    """Point the demo's EODAG provider file at a running demo upstream.

    Only `fdp serve` calls this, once its port is known to be free: the file belongs to the
    demo that runs, so no other command may rewrite it.
    """
    var_dir.mkdir(parents=True, exist_ok=True)
    providers = providers_path(var_dir)
    providers.write_text(providers_yaml(upstream_url))
    return providers


def demo_config(var_dir: Path, upstream_url: str = OFFLINE_UPSTREAM) -> dict[str, Any]:
    """The embedded default config: local cache under `var_dir`, no Redis, three datasets.

    Writes nothing and needs no running upstream, so every command can use it (`fdp cache`
    with the placeholder URL); `fdp serve` calls `write_providers` once its upstream listens.
    """
    return {
        "cache": {"store": str(var_dir / "cache")},
        "eodag": {"providers_file": str(providers_path(var_dir))},
        "datasets": {
            "demo-cogs": {
                "title": "Demo scenes (EODAG, online)",
                "upstream": {"eodag": {"provider": DEMO_PROVIDER, "collection": "demo-cogs"}},
            },
            "demo-archive": {
                "title": "Demo scenes in a slow archive (EODAG)",
                "upstream": {"eodag": {"provider": DEMO_PROVIDER, "collection": "demo-archive"}},
                "archive": True,
            },
            "demo-files": {
                "title": "Demo files (plain HTTP)",
                # listed from the upstream's autoindex pages (nginx style)
                "upstream": {"http": {"base_url": f"{upstream_url}/data/demo-cogs/"}},
            },
        },
    }


def start_upstream(data_dir: Path, host: str = "127.0.0.1", port: int = 0) -> str:
    """Run the demo upstream in a daemon thread; return its base URL once it listens."""
    from upstreams.demo.server import create_app

    app = create_app(data_dir)  # generates the COGs on first run
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="demo-upstream", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the demo upstream did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return f"http://{host}:{bound}"


def _tools(public_url: str, var_dir: Path) -> list[str]:
    """One-line examples: the venv's tools by absolute path, `gdalinfo` only when installed."""
    bindir = Path(sys.executable).parent
    asset = f"{public_url}/assets/demo-cogs/scene-a/visual"
    lines = [f"curl -I {asset}"]
    if (bindir / "rio").exists():  # rasterio's CLI, from the demo extra
        lines.append(f"{READDIR} {shlex.quote(str(bindir / 'rio'))} info {asset}")
    if shutil.which("gdalinfo"):
        lines.append(f"{READDIR} gdalinfo /vsicurl/{asset}")
    if (bindir / "fdp").exists():
        var = shlex.quote(str(var_dir.resolve()))
        lines.append(f"{shlex.quote(str(bindir / 'fdp'))} cache ls --var {var}")
    return lines


def _scripts(public_url: str) -> list[str]:
    """Python examples run by the venv's interpreter: a fresh shell's `python` is not it."""
    python = shlex.quote(sys.executable)
    asset = f"{public_url}/assets/demo-cogs/scene-a/visual"
    rasterio_script = f"""import rasterio
from rasterio.windows import Window
with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"):
    with rasterio.open("{asset}") as src:
        print(src.profile)
        print(src.read(1, window=Window(0, 0, 256, 256)).mean())"""
    stac_script = f"""from pystac_client import Client
cat = Client.open("{public_url}/stac")
for item in cat.search(collections=["demo-cogs"], bbox=[3, 44.9, 4, 45.2]).items():
    print(item.id, item.assets["visual"].href)"""
    return [f"{python} - <<'EOF'\n{s}\nEOF" for s in (rasterio_script, stac_script)]


def banner(public_url: str, upstream_url: str, var_dir: Path) -> str:
    """What `fdp demo` prints: where things are, and examples that run verbatim anywhere."""
    tools, scripts = _tools(public_url, var_dir), _scripts(public_url)
    text = "\n".join(f"  {line}" for line in tools)
    text += "".join(f"\n\n  {script}" for script in scripts)
    return f"""
fdp is running with the embedded default config and demo data.

  proxy        {public_url}
  STAC API     {public_url}/stac
  health       {public_url}/readyz
  demo upstream (stands in for a provider)  {upstream_url}

Datasets: demo-cogs (EODAG, online), demo-archive (EODAG, slow archive: the first read of a
file waits ~5 s for it to be staged), demo-files (plain HTTP).

Try (GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR spares GDAL a directory listing):

{text}

Press Ctrl+C to stop.
"""
