"""`fdp harvest`: items out of a running proxy into stac-geoparquet, NDJSON or a STAC API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import httpx
import pyarrow.parquet as pq
import pystac
import pytest
import stac_geoparquet.arrow as sga

from proxy.demo import providers_yaml
from tests.harness.procs import BIN, PYTHON, ServerProcess, free_port, http_ok


@pytest.fixture(scope="module")
def harvested(start_proxy, upstream_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("harvest")
    (work / "providers.yml").write_text(providers_yaml(upstream_server.url))
    up = upstream_server.url
    return start_proxy(
        {
            "cache": {"store": str(work / "cache")},
            "eodag": {"providers_file": str(work / "providers.yml")},
            "stac": {"cache_seconds": 0},
            "datasets": {
                "scenes": {
                    "upstream": {"eodag": {"provider": "fdp_demo", "collection": "demo-cogs"}}
                },
                "cogs": {"upstream": {"http": {"base_url": f"{up}/data/demo-cogs/"}}},
            },
        }
    )


def _harvest(proxy, *args, cwd):
    return [str(BIN / "fdp"), "harvest", *args, "--url", proxy.url]


def _searched(proxy, dataset):
    r = httpx.post(f"{proxy.url}/stac/search", json={"collections": [dataset], "limit": 100})
    return {f["id"]: f for f in r.json()["features"]}


def _normal(item):
    """An item as pystac writes it: datetimes and numbers in one form."""
    return pystac.Item.from_dict(item).to_dict(include_self_link=False, transform_hrefs=False)


def test_an_interrupted_parquet_harvest_resumes_without_duplicates(harvested, upstream, tmp_path):
    out = tmp_path / "scenes.parquet"
    state = tmp_path / "scenes.parquet.harvest.json"
    upstream.fault("^/search$", times=1)  # the first page is answered at once...
    upstream.fault("^/search$", delay=30)  # ... the next one hangs
    cmd = _harvest(harvested, "scenes", "--out", str(out), "--limit", "1", cwd=tmp_path)
    first = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (state.exists() and json.loads(state.read_text())["count"] == 1):
            assert first.poll() is None and time.monotonic() < deadline, "no first page"
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # stopped hard, in the middle of page two
        first.wait()
    upstream.reset()
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "resuming after 1 items" in again.stderr
    assert not state.exists() and not (tmp_path / "scenes.parquet.part").exists()
    back = list(sga.stac_table_to_items(pq.read_table(out)))
    assert sorted(i["id"] for i in back) == ["scene-a", "scene-b", "scene-c"]  # each once
    expected = _searched(harvested, "scenes")
    for item in back:
        assert _normal(item) == _normal(expected[item["id"]])
        assert item["assets"]["B04"]["href"].startswith(f"{harvested.url}/assets/scenes/")


def test_ndjson_keeps_items_without_footprints_and_parquet_says_why_not(harvested, tmp_path):
    out = tmp_path / "cogs.ndjson"
    run = subprocess.run(
        _harvest(harvested, "cogs", "--out", str(out), "--limit", "4", cwd=tmp_path),
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    items = [json.loads(line) for line in out.read_text().splitlines()]
    listed = _searched(harvested, "cogs")
    assert {i["id"]: i for i in items} == listed and len(items) == len(listed) >= 6
    run = subprocess.run(
        _harvest(harvested, "cogs", "--out", str(tmp_path / "cogs.parquet"), cwd=tmp_path),
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1 and f"{len(items)} items without a footprint" in run.stderr
    run = subprocess.run(
        _harvest(harvested, "cogs", "--out", str(out), "--since", "yesterday", cwd=tmp_path),
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode != 0 and "datetime" in run.stderr  # the proxy's 400, named


@pytest.fixture
def stac_store(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = ServerProcess(
        "stac-store",
        [PYTHON, "-m", "tests.harness.stac_store", "--port", str(port)],
        log_dir=tmp_path,
        ready=http_ok(f"{url}/_log"),
    )
    with proc:
        yield url


def test_push_into_a_stac_api_with_transactions(harvested, stac_store, tmp_path):
    cmd = _harvest(harvested, "scenes", "--push", stac_store, "--limit", "2", cwd=tmp_path)
    for _ in range(2):  # the second run replaces what the first wrote
        run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
    stored = httpx.get(f"{stac_store}/collections/scenes/items").json()["features"]
    assert {i["id"]: i for i in stored} == _searched(harvested, "scenes")
    writes = httpx.get(f"{stac_store}/_log").json()
    assert writes.count(["POST", "/collections"]) == 1
    assert sum(1 for w in writes if w[0] == "PUT") == 3  # each item replaced once
    assert httpx.get(f"{stac_store}/collections/scenes").json()["id"] == "scenes"
