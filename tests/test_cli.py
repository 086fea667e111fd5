"""The `fdp` command as a user runs it: serve with a config file, and the demo default."""

from __future__ import annotations

import shutil
import signal
import time

import httpx
import numpy as np
import rasterio
from pystac_client import Client
from rasterio.windows import Window

from tests.conftest import fdp_serve, standard_config
from tests.harness.procs import BIN, ServerProcess, free_port, http_ok


def test_serve_with_config_then_stop_cleanly(tmp_path, upstream):
    config = standard_config(upstream.url, tmp_path)
    served = fdp_serve(config, tmp_path, name="fdp-serve", set_public_url=False)
    proc, url = served.proc, served.url
    with proc:
        assert httpx.get(f"{url}/readyz").json()["status"] == "ready"
        r = httpx.get(f"{url}/assets/scenes/scene-a/B04", headers={"Range": "bytes=0-1023"})
        assert r.status_code == 206
        assert r.content == upstream.file("demo-cogs/scene-a/B04.tif")[:1024]
        # links use the public URL the CLI derived from --port
        landing = httpx.get(f"{url}/stac").json()
        assert landing["links"][0]["href"] == f"{url}/stac"
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(15) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    log = proc.log_text()
    assert "Application shutdown complete" in log  # graceful, not killed
    assert "Traceback" not in log
    assert "fdp listening on" in log


def test_demo_runs_the_embedded_default_end_to_end(tmp_path, demo_data):
    # pre-seed the demo data the command would otherwise generate on first run
    shutil.copytree(demo_data, tmp_path / "var" / "demo-data")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = ServerProcess(
        "fdp-demo",
        [BIN / "fdp", "demo", "--port", str(port)],
        log_dir=tmp_path,
        cwd=tmp_path,
        ready=http_ok(f"{url}/readyz"),
        env={"FDP_CONFIG": ""},
    )
    with proc:
        ready = httpx.get(f"{url}/readyz").json()
        assert ready["checks"]["datasets"]["count"] == 3
        assert (tmp_path / "var" / "cache").is_dir()  # the embedded default's local cache
        deadline = time.monotonic() + 10  # the banner follows readiness by a moment
        while "Press Ctrl+C" not in (banner := proc.log_text()):
            assert time.monotonic() < deadline, banner
            time.sleep(0.05)
        asset = f"{url}/assets/demo-cogs/scene-a/visual"
        assert f"{BIN / 'rio'} info {asset}" in banner
        assert (f"gdalinfo /vsicurl/{asset}" in banner) == bool(shutil.which("gdalinfo"))
        assert f'Client.open("{url}/stac")' in banner

        with (
            rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"),
            rasterio.open(f"{url}/assets/demo-cogs/scene-a/visual") as remote,
        ):
            got = remote.read(2, window=Window(512, 512, 128, 128))
        with rasterio.open(demo_data / "demo-cogs/scene-a/visual.tif") as src:
            np.testing.assert_array_equal(got, src.read(2, window=Window(512, 512, 128, 128)))

        items = list(Client.open(f"{url}/stac").search(collections=["demo-cogs"]).items())
        assert sorted(i.id for i in items) == ["scene-a", "scene-b", "scene-c"]
        r = httpx.get(f"{url}/assets/demo-files/scene-b/B04.tif")
        assert r.content == (demo_data / "demo-cogs/scene-b/B04.tif").read_bytes()
        head = httpx.head(f"{url}/assets/demo-archive/archived-a/visual", timeout=2)
        size = (demo_data / "demo-archive/archived-a/visual.tif").stat().st_size
        assert head.status_code == 200 and int(head.headers["content-length"]) == size
