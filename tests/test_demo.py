"""The newcomer path: `fdp demo` / `make demo` as printed, and the embedded default's commands.

Every test runs the real `fdp` command in a fresh folder, as someone who just cloned would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import morecantile
import numpy as np
import pytest
import rasterio
from rasterio.warp import transform, transform_bounds
from rio_tiler.io import Reader, STACReader

from cache.store import RECHECK_SECONDS
from tests.harness.procs import BIN, ServerProcess, free_port, http_ok
from upstreams.demo.data import DATA_VERSION, ensure_demo_data

ROOT = Path(__file__).resolve().parents[1]
COG_ITEMS = ["scene-a", "scene-b", "scene-c"]


@dataclass
class Demo:
    url: str
    port: int
    cwd: Path
    proc: ServerProcess

    def banner(self) -> str:
        """The printed banner, once it is all there (it follows readiness by a moment)."""
        deadline = time.monotonic() + 10
        while "Press Ctrl+C" not in (log := self.proc.log_text()):
            assert time.monotonic() < deadline, log
            time.sleep(0.05)
        return log

    def upstream_url(self) -> str:
        return re.search(r"demo upstream .*?(http://\S+)", self.banner()).group(1)


def start_demo(work: Path, demo_data: Path, name: str = "fdp-demo") -> Demo:
    """`fdp demo --port P` in `work`, with the demo data it would generate already there."""
    shutil.copytree(demo_data, work / "var" / "demo-data")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = ServerProcess(
        name,
        [BIN / "fdp", "demo", "--port", str(port)],
        log_dir=work,
        cwd=work,
        ready=http_ok(f"{url}/readyz"),
        env={"FDP_CONFIG": ""},
    )
    return Demo(url, port, work, proc.start())


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, demo_data: Path):
    demo = start_demo(tmp_path_factory.mktemp("demo"), demo_data)
    yield demo
    demo.proc.stop()


def examples(banner: str) -> list[str]:
    """The commands after "Try ...:": one per indented line, heredocs up to their EOF."""
    lines = banner.split("\nTry ", 1)[1].split("\n")[1:]
    commands: list[str] = []
    heredoc: list[str] | None = None
    for line in lines:
        if heredoc is not None:
            heredoc.append(line)
            if line == "EOF":
                commands.append("\n".join(heredoc))
                heredoc = None
        elif line.startswith("Press Ctrl+C"):
            break
        elif line.startswith("  "):
            if line.endswith("<<'EOF'"):
                heredoc = [line.strip()]
            else:
                commands.append(line.strip())
    assert heredoc is None, "a heredoc without its EOF"
    return commands


def fresh_shell_env() -> dict[str, str]:
    """A new terminal's environment: no venv on PATH, so `python` is not the venv's."""
    path = [p for p in os.environ["PATH"].split(os.pathsep) if Path(p).resolve() != BIN.resolve()]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    return {**env, "PATH": os.pathsep.join(path or ["/usr/bin", "/bin"])}


def check_output(command: str, out: str, demo: Demo) -> None:
    """What each example should print when it worked."""
    asset = f"{demo.url}/assets/demo-cogs/scene-a/visual"
    if command.startswith("curl -I"):
        assert out.startswith("HTTP/1.1 200"), out
        assert re.search(r"(?im)^content-length: [1-9]\d*", out), out
    elif " info " in command:  # rio info
        info = json.loads(out)
        assert info["crs"] == "EPSG:32631" and info["width"] == 1024 and info["count"] == 3
    elif "gdalinfo" in command:
        assert "Driver: GTiff" in out and "Size is 1024, 1024" in out
    elif " cache ls" in command:
        assert re.search(r"^\d+ objects, \d+ bytes$", out.strip().splitlines()[-1]), out
    elif "import rasterio" in command:
        assert "'driver': 'GTiff'" in out and "'width': 1024" in out, out
        float(out.strip().splitlines()[-1])  # the window's mean
    elif "pystac_client" in command:
        rows = sorted(line.split() for line in out.strip().splitlines())
        assert rows == [[i, asset.replace("scene-a", i)] for i in COG_ITEMS], out
    else:
        pytest.fail(f"an example this test does not know how to check: {command}")


def test_every_banner_example_runs_verbatim_in_a_fresh_shell(demo, tmp_path):
    commands = examples(demo.banner())
    assert commands[0] == f"curl -I {demo.url}/assets/demo-cogs/scene-a/visual"
    assert any(re.search(r"\S+/rio info ", c) for c in commands), commands
    assert any("gdalinfo" in c for c in commands) == bool(shutil.which("gdalinfo"))
    scripts = [c for c in commands if "<<'EOF'" in c]
    assert len(scripts) == 2
    for script in scripts:  # the venv's interpreter, not whatever `python` a shell finds
        python = Path(script.split()[0])
        assert python.is_absolute() and python.parent == BIN, script
    for command in commands:
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=tmp_path,  # anywhere, not the clone
            env=fresh_shell_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        check_output(command, done.stdout, demo)


def test_second_demo_fails_in_one_line_and_leaves_the_first_alone(demo):
    var = demo.cwd / "var"
    watched = [var / "demo-providers.yml", *sorted((var / "demo-data").rglob("*"))]
    before = {p: p.stat().st_mtime_ns for p in watched}
    files_before = sorted(p for p in var.rglob("*") if "cache" not in p.parts)
    for extra_args, env in (
        (["--port", str(demo.port)], {}),
        ([], {"FDP_SERVER__PORT": str(demo.port)}),
    ):
        started = time.monotonic()
        done = subprocess.run(
            [BIN / "fdp", "demo", *extra_args],
            cwd=demo.cwd,
            env={**os.environ, "FDP_CONFIG": "", **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0
        lines = (done.stdout + done.stderr).strip().splitlines()
        assert len(lines) == 1, lines
        assert f"port {demo.port} is in use" in lines[0]
        assert "--port" in lines[0] and "FDP_SERVER__PORT" in lines[0]
        assert time.monotonic() - started < 20
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    assert sorted(p for p in var.rglob("*") if "cache" not in p.parts) == files_before
    assert httpx.get(f"{demo.url}/readyz").json()["status"] == "ready"
    r = httpx.get(f"{demo.url}/assets/demo-files/scene-c/B04.tif", headers={"Range": "bytes=0-9"})
    assert r.status_code == 206
    assert r.content == (var / "demo-data/demo-cogs/scene-c/B04.tif").read_bytes()[:10]


def test_items_bbox_and_geometry_are_their_rasters_footprints(demo_data):
    catalog = json.loads((demo_data / "catalog.json").read_text())
    for collection in catalog["collections"].values():
        for item in collection["items"].values():
            for asset in item["assets"].values():
                with rasterio.open(demo_data / asset["file"]) as src:
                    bounds = transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)
                    (x0, y0, x1, y1) = src.bounds
                    lons, lats = transform(src.crs, "EPSG:4326", [x0, x1, x1, x0], [y0, y0, y1, y1])
                np.testing.assert_allclose(item["bbox"], bounds, atol=1e-9)
                ring = item["geometry"]["coordinates"][0]
                np.testing.assert_allclose(ring[:4], list(zip(lons, lats, strict=True)), atol=1e-9)
                assert ring[0] == ring[-1]


def test_demo_data_from_an_older_fdp_is_regenerated(tmp_path):
    # a ./var/demo-data left by an fdp whose catalogue bboxes did not match the rasters
    (tmp_path / "catalog.json").write_text(json.dumps({"collections": {}}))
    manifest = ensure_demo_data(tmp_path)
    assert json.loads(manifest.read_text())["version"] == DATA_VERSION
    assert (tmp_path / "demo-cogs" / "scene-a" / "visual.tif").is_file()
    written = manifest.stat().st_mtime_ns
    assert ensure_demo_data(tmp_path).stat().st_mtime_ns == written  # current: kept as is


def test_rio_tiler_stac_reader_reads_demo_items_through_the_proxy(demo):
    tms = morecantile.tms.get("WebMercatorQuad")
    data = demo.cwd / "var" / "demo-data" / "demo-cogs"
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"):
        for iid in COG_ITEMS:
            url = f"{demo.url}/stac/collections/demo-cogs/items/{iid}"
            with STACReader(url) as stac:
                item = httpx.get(url).json()
                np.testing.assert_allclose(stac.bounds, item["bbox"])
                lon = (item["bbox"][0] + item["bbox"][2]) / 2
                lat = (item["bbox"][1] + item["bbox"][3]) / 2
                tile = tms.tile(lon, lat, 14)  # ~1.7 km: well inside the 10 km scene
                img = stac.tile(tile.x, tile.y, tile.z, assets=["B04", "visual"])
            with Reader(str(data / iid / "B04.tif")) as band:
                want = band.tile(tile.x, tile.y, tile.z)
            assert img.count == 4  # B04, then the three bands of visual
            assert img.mask.all(), "the tile should be fully inside the item's raster"
            np.testing.assert_array_equal(img.data[0], want.data[0])


def test_ctrl_c_stops_the_demo_within_5_s_during_a_retrieval(tmp_path, demo_data):
    demo = start_demo(tmp_path, demo_data, name="fdp-demo-sigint")
    upstream = demo.upstream_url()
    try:
        # the archive takes a minute to stage: the retrieval is still running at Ctrl+C
        fault = {"match": "^/data/demo-archive/", "method": "GET", "delay": 60}
        httpx.post(f"{upstream}/_faults", json=fault).raise_for_status()
        answers: list[httpx.Response] = []
        held = threading.Thread(
            target=lambda: answers.append(
                httpx.get(f"{demo.url}/assets/demo-archive/archived-a/B04", timeout=90)
            ),
            daemon=True,
        )
        held.start()
        deadline = time.monotonic() + 30
        while not any(
            e["method"] == "GET" and e["path"].startswith("/data/demo-archive/")
            for e in httpx.get(f"{upstream}/_log").json()
        ):
            assert time.monotonic() < deadline, demo.proc.log_text()
            time.sleep(0.05)
        started = time.monotonic()
        os.killpg(demo.proc.pid, signal.SIGINT)  # what Ctrl+C in its terminal sends
        try:
            demo.proc.proc.wait(15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"fdp demo still runs 15 s after SIGINT:\n{demo.proc.log_text()[-3000:]}")
        took = time.monotonic() - started
        assert took < 5, f"stopped after {took:.1f} s:\n{demo.proc.log_text()[-3000:]}"
        held.join(5)
        # the held request was told to come back, not cut off
        assert [r.status_code for r in answers] == [202]
        assert int(answers[0].headers["retry-after"]) > 0
        assert "Traceback" not in demo.proc.log_text()
    finally:
        demo.proc.stop()


def test_cache_commands_use_the_embedded_default_of_fdp_serve(tmp_path, demo_data):
    payload = b"bytes put in the cache by hand, not the upstream's\n" * 2000
    (tmp_path / "mine.tif").write_bytes(payload)
    env = {**os.environ, "FDP_CONFIG": ""}

    def fdp(*args: str) -> str:
        done = subprocess.run(
            [BIN / "fdp", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, f"fdp {args}: {done.stdout}{done.stderr}"
        return done.stdout

    out = fdp("cache", "put", "demo-files", "scene-a/B04.tif", "mine.tif")
    assert out.startswith(f"put demo-files/scene-a/B04.tif: {len(payload)} bytes")
    listing = fdp("cache", "ls")
    assert re.search(rf"demo-files\s+scene-a/B04\.tif\s+{len(payload)}\s", listing), listing
    assert fdp("cache", "ls", "demo-cogs").strip().endswith("0 objects, 0 bytes")
    # no demo upstream was started for that: nothing generated, no provider file written
    # (the put was announced: the announcement log lives beside the cache)
    assert sorted(p.name for p in (tmp_path / "var").iterdir()) == ["cache", "feed.sqlite"]

    shutil.copytree(demo_data, tmp_path / "var" / "demo-data")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with ServerProcess(
        "fdp-serve-default",
        [BIN / "fdp", "serve", "--port", str(port)],
        log_dir=tmp_path,
        cwd=tmp_path,
        ready=http_ok(f"{url}/readyz"),
        env={"FDP_CONFIG": ""},
    ):
        r = httpx.get(f"{url}/assets/demo-files/scene-a/B04.tif")
        assert r.status_code == 200 and r.content == payload
        assert fdp("cache", "evict", "demo-files", "scene-a/B04.tif").startswith(
            "evicted 1 objects"
        )
        # the running server notices within cache.store.RECHECK_SECONDS and fetches upstream
        upstream_bytes = (demo_data / "demo-cogs/scene-a/B04.tif").read_bytes()
        deadline = time.monotonic() + RECHECK_SECONDS + 10
        while httpx.get(f"{url}/assets/demo-files/scene-a/B04.tif").content != upstream_bytes:
            assert time.monotonic() < deadline, "still serving the evicted object"
            time.sleep(0.2)


def make_dry_run(*args: str) -> str:
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    done = subprocess.run(
        ["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_demo_passes_port_through():
    assert re.search(r"fdp demo --port 8099\s*$", make_dry_run("demo", "PORT=8099"), re.M)
    assert re.search(r"fdp demo\s*$", make_dry_run("demo"), re.M)


def test_make_test_checks_style_before_pytest():
    lines = make_dry_run("test").splitlines()
    order = [
        next(i for i, line in enumerate(lines) if re.search(pattern, line))
        for pattern in (r"ruff check \.", r"ruff format --check \.", r"-m pytest")
    ]
    assert order == sorted(order), lines
