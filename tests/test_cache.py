"""The online cache through a real proxy: blocks, hits, single flight, integrity, restarts."""

from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import rasterio
import yaml
from rasterio.windows import Window

from proxy.demo import providers_yaml
from tests.conftest import fdp_serve
from tests.harness.procs import BIN

MiB = 1 << 20
BLOCK = 4 * MiB
BIG = "big/big.bin"
BIG_SIZE = 256 * MiB


@pytest.fixture(scope="session")
def big(demo_data):
    """A 256 MiB object at the upstream (random, so a wrong block can never match)."""
    path = demo_data / BIG
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        rng = np.random.default_rng(7)
        with path.open("wb") as f:
            for _ in range(BIG_SIZE // (16 * MiB)):
                f.write(rng.integers(0, 256, 16 * MiB, dtype=np.uint8).tobytes())
    return path


def cache_config(upstream_url, work, **cache):
    (work / "providers.yml").write_text(providers_yaml(upstream_url))
    return {
        "cache": {"store": str(work / "cache"), **cache},
        "eodag": {"providers_file": str(work / "providers.yml")},
        "datasets": {
            "cached": {"upstream": {"http": {"base_url": f"{upstream_url}/data/"}}},
            "scenes": {"upstream": {"eodag": {"provider": "fdp_demo", "collection": "demo-cogs"}}},
        },
    }


@pytest.fixture(scope="module")
def cproxy(start_proxy, upstream_server, big, tmp_path_factory):
    """A caching proxy with the default 4 MiB blocks."""
    work = tmp_path_factory.mktemp("cache")
    return start_proxy(cache_config(upstream_server.url, work))


@pytest.fixture(scope="module")
def small_blocks(start_proxy, upstream_server, tmp_path_factory):
    """A caching proxy with 256 KiB blocks: the demo COGs span many blocks."""
    work = tmp_path_factory.mktemp("cache-small")
    return start_proxy(cache_config(upstream_server.url, work, block_size="256KiB"))


def data_gets(upstream):
    """The block fetches (not the 1-byte probes that learn an object's size and validators)."""
    return [e for e in upstream.data_requests() if e["method"] == "GET" and not probe(e)]


def probe(entry) -> bool:
    return entry["method"] == "GET" and entry["range"] == "bytes=0-0"


def cache_ls(proxy, *args):
    r = subprocess.run(
        [BIN / "fdp", "cache", "ls", *args, "--config", proxy.config],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_small_range_of_a_large_object_fetches_one_block_then_hits(cproxy, upstream, big):
    data = big.read_bytes()
    url = f"{cproxy.url}/assets/cached/{BIG}"
    start = 100 * MiB + 12345
    r = httpx.get(url, headers={"Range": f"bytes={start}-{start + 16383}"})
    assert r.status_code == 206
    assert r.content == data[start : start + 16384]
    assert r.headers["content-range"] == f"bytes {start}-{start + 16383}/{BIG_SIZE}"
    block = start // BLOCK
    gets = data_gets(upstream)
    assert [e["range"] for e in gets] == [f"bytes={block * BLOCK}-{(block + 1) * BLOCK - 1}"]
    assert sum(e["bytes"] for e in gets) == BLOCK  # the upstream sent one block, no more

    upstream.reset()
    again = httpx.get(url, headers={"Range": f"bytes={start}-{start + 16383}"})
    assert again.content == r.content
    assert upstream.data_requests() == []  # a hit: not even a HEAD

    # a range straddling into the next block fetches only that block
    edge = (block + 1) * BLOCK - 100
    r = httpx.get(url, headers={"Range": f"bytes={edge}-{edge + 199}"})
    assert r.content == data[edge : edge + 200]
    assert [e["range"] for e in data_gets(upstream)] == [
        f"bytes={(block + 1) * BLOCK}-{(block + 2) * BLOCK - 1}"
    ]


def test_hit_headers_and_conditional_requests(cproxy, upstream):
    url = f"{cproxy.url}/assets/cached/demo-cogs/scene-a/B04.tif"
    data = upstream.file("demo-cogs/scene-a/B04.tif")
    first = httpx.get(url)
    assert first.status_code == 200 and first.content == data
    upstream.reset()
    hit = httpx.get(url)
    assert hit.content == data and upstream.data_requests() == []
    etag = hit.headers["etag"]
    assert hit.headers["accept-ranges"] == "bytes" and hit.headers["last-modified"]
    assert int(hit.headers["content-length"]) == len(data)

    not_modified = httpx.get(url, headers={"If-None-Match": etag})
    assert not_modified.status_code == 304 and not_modified.content == b""
    same = httpx.get(url, headers={"Range": "bytes=0-9", "If-Range": etag})
    assert same.status_code == 206 and same.content == data[:10]
    stale = httpx.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == data
    r = httpx.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
    assert r.headers["content-type"] == "application/problem+json"
    assert httpx.get(url, headers={"Range": "bytes=x-y"}).status_code == 400
    head = httpx.head(url)
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)
    assert upstream.data_requests() == []


def test_concurrent_clients_cause_one_fetch_per_block(cproxy, upstream, big):
    data = big.read_bytes()
    url = f"{cproxy.url}/assets/cached/{BIG}"
    base = 200 * MiB  # blocks 50 and 51, not fetched before

    def read(n):
        a = base + (n * 349_519) % (2 * BLOCK - 70000)
        with httpx.Client(timeout=60) as c:
            r = c.get(url, headers={"Range": f"bytes={a}-{a + 65535}"})
        return a, r

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(read, range(24)))
    for a, r in results:
        assert r.status_code == 206 and r.content == data[a : a + 65536]
    ranges = sorted(e["range"] for e in data_gets(upstream))
    assert ranges == [f"bytes={b * BLOCK}-{(b + 1) * BLOCK - 1}" for b in (50, 51)]


def test_a_miss_streams_before_the_fill_completes(cproxy, upstream, big):
    upstream.fault("big/big.bin", chunk_delay=0.1, times=1)  # 16 chunks: ~1.6 s per block
    url = f"{cproxy.url}/assets/cached/{BIG}"
    start = 60 * BLOCK
    t0 = time.monotonic()
    with httpx.stream("GET", url, headers={"Range": f"bytes={start}-{start + BLOCK - 1}"}) as r:
        received, t_first = 0, None
        for chunk in r.iter_raw():
            received += len(chunk)
            t_first = t_first or time.monotonic() - t0
    total = time.monotonic() - t0
    assert received == BLOCK
    assert t_first < 0.6 < total  # the first bytes did not wait for the whole block


def test_cut_off_upstream_aborts_the_response_and_caches_nothing(cproxy, upstream, big):
    data = big.read_bytes()
    url = f"{cproxy.url}/assets/cached/{BIG}"
    start = 30 * BLOCK + 5
    upstream.fault("big/big.bin", cut_after=MiB, times=1)
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(url, headers={"Range": f"bytes={start}-{start + 2 * MiB}"})
    r = httpx.get(url, headers={"Range": f"bytes={start}-{start + 2 * MiB}"})
    assert r.status_code == 206 and r.content == data[start : start + 2 * MiB + 1]
    assert len(data_gets(upstream)) == 2  # the cut-off block was fetched again, not served


def test_checksum_mismatch_is_never_served_nor_cached(cproxy, upstream):
    url = f"{cproxy.url}/assets/scenes/scene-b/B04"  # one block, catalogue has file:checksum
    upstream.fault("scene-b/B04", method="GET", corrupt=True, times=2)  # the probe, the block
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(url)  # the last byte is withheld until verified: the client sees a cut
    ready = httpx.get(f"{cproxy.url}/readyz").json()["checks"]["cache"]
    assert ready["integrity_failures"] >= 1
    assert "scene-b/B04" not in cache_ls(cproxy, "scenes")
    good = httpx.get(url)
    assert good.content == upstream.file("demo-cogs/scene-b/B04.tif")
    assert len(data_gets(upstream)) == 2
    listing = cache_ls(cproxy, "scenes")
    line = next(row for row in listing.splitlines() if "scene-b/B04" in row)
    import hashlib

    assert hashlib.sha256(good.content).hexdigest()[:16] in line  # sha256 recorded


def test_multi_block_checksum_mismatch_evicts_the_object(small_blocks, upstream):
    url = f"{small_blocks.url}/assets/scenes/scene-c/visual"
    upstream.fault("scene-c/visual", corrupt=True)
    # every block corrupt; only the whole-object hash can tell, so the last byte waits for it
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(url)
    deadline = time.monotonic() + 10
    while (
        httpx.get(f"{small_blocks.url}/readyz").json()["checks"]["cache"]["integrity_failures"] < 1
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    upstream.reset()
    r = httpx.get(url, headers={"Range": "bytes=0-99"})
    want = upstream.file("demo-cogs/scene-c/visual.tif")
    assert r.content == want[:100]  # evicted: fetched again
    # and completed in the background so the whole can be verified: each block once
    blocks = -(-len(want) // (256 * 1024))
    deadline = time.monotonic() + 10
    while len(data_gets(upstream)) < blocks:
        assert time.monotonic() < deadline, data_gets(upstream)
        time.sleep(0.05)
    assert len({e["range"] for e in data_gets(upstream)}) == blocks
    assert httpx.get(url).content == want  # verified: the whole answer is not held back
    assert len(data_gets(upstream)) == blocks


def test_gdal_reads_a_multi_block_cog_then_only_the_cache(small_blocks, upstream):
    url = f"{small_blocks.url}/assets/scenes/scene-a/visual"
    window = Window(100, 700, 300, 250)
    with rasterio.open(upstream.data / "demo-cogs/scene-a/visual.tif") as src:
        want = src.read(window=window)
    env = {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "VSI_CACHE": "FALSE",
        "CPL_VSIL_CURL_NON_CACHED": f"/vsicurl/{url}",
    }
    fetched = []
    for _ in range(2):
        upstream.reset()
        with rasterio.Env(**env), rasterio.open(url) as remote:
            got = remote.read(window=window)
        np.testing.assert_array_equal(got, want)
        fetched.append({e["range"] for e in data_gets(upstream)})
    assert len(fetched[0]) >= 2  # several blocks of a 14-block object
    # second read: no block twice. (GDAL hangs up once it has its bytes, and fdp then stops
    # fetching the rest of that range, so a block or two past the cut may come now.)
    assert not fetched[0] & fetched[1]
    assert len(fetched[1]) < len(fetched[0])


def test_cache_survives_a_restart(start_proxy, upstream, tmp_path):
    config = cache_config(upstream.url, tmp_path)
    first = start_proxy(yaml.safe_load(yaml.safe_dump(config)))
    url = "/assets/scenes/scene-a/B04"
    data = httpx.get(first.url + url).content
    assert data == upstream.file("demo-cogs/scene-a/B04.tif")
    first.proc.stop()
    upstream.reset()
    second = start_proxy(config)
    assert httpx.get(second.url + url).content == data
    assert upstream.data_requests() == []


def test_operator_commands_put_ls_evict(cproxy, upstream, tmp_path):
    harvested = tmp_path / "h.bin"
    payload = os.urandom(5 * MiB + 3)
    harvested.write_bytes(payload)
    fdp = [BIN / "fdp", "cache"]
    cfg = ["--config", cproxy.config]
    r = subprocess.run(
        [*fdp, "put", "cached", "harvest/h.bin", harvested, *cfg],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    # the upstream does not even have this object: it is served from the cache alone
    got = httpx.get(f"{cproxy.url}/assets/cached/harvest/h.bin", headers={"Range": "bytes=-7"})
    assert got.status_code == 206 and got.content == payload[-7:]
    assert upstream.data_requests() == []
    assert "harvest/h.bin" in cache_ls(cproxy, "cached")
    r = subprocess.run(
        [*fdp, "evict", "cached", "harvest/h.bin", *cfg], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "evicted 1 objects" in r.stdout
    time.sleep(5.5)  # the proxy re-reads the index after RECHECK_SECONDS
    assert httpx.get(f"{cproxy.url}/assets/cached/harvest/h.bin").status_code == 404
    r = subprocess.run(
        [*fdp, "put", "nope", "x", harvested, *cfg], capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "no dataset named 'nope'" in r.stderr


def test_lru_retention_through_the_proxy(start_proxy, upstream, tmp_path):
    config = cache_config(upstream.url, tmp_path, sweep_seconds=0.5)
    config["datasets"]["cached"]["retention"] = {"mode": "lru", "max_bytes": "8MiB"}
    p = start_proxy(config)
    urls = [f"{p.url}/assets/cached/demo-cogs/scene-{s}/visual.tif" for s in "abc"]
    for url in urls:  # ~3.5 MiB each: two fit under 8 MiB
        assert httpx.get(url).status_code == 200
        time.sleep(0.6)  # distinct access times, a sweep in between
    time.sleep(1.0)
    upstream.reset()
    for url in urls[1:]:  # the two most recently used objects stay
        assert httpx.get(url, headers={"Range": "bytes=0-9"}).status_code == 206
    assert data_gets(upstream) == []
    httpx.get(urls[0], headers={"Range": "bytes=0-9"})
    assert len(data_gets(upstream)) == 1  # the least recently used one was evicted


def test_unusable_cache_folder_degrades_to_pass_through(start_proxy, upstream, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    config = cache_config(upstream.url, tmp_path)
    config["cache"]["store"] = str(blocker / "cache")
    p = start_proxy(config)
    r = httpx.get(f"{p.url}/assets/scenes/scene-a/B04", headers={"Range": "bytes=0-99"})
    assert r.status_code == 206
    assert r.content == upstream.file("demo-cogs/scene-a/B04.tif")[:100]
    cache = httpx.get(f"{p.url}/readyz").json()["checks"]["cache"]
    assert cache["ok"] is False and "not-a-dir" in cache["error"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs: a real full disk (ENOSPC), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mnt], check=True)
    yield mnt
    subprocess.run(["umount", "-l", mnt], check=False)


def test_full_disk_keeps_serving_by_pass_through(start_proxy, upstream, tiny_disk, tmp_path):
    config = cache_config(upstream.url, tmp_path, block_size="1MiB")
    config["cache"]["store"] = str(tiny_disk / "cache")
    p = start_proxy(config)
    for scene in "abc":  # ~10 MiB through a 2 MiB disk
        want = upstream.file(f"demo-cogs/scene-{scene}/visual.tif")
        r = httpx.get(f"{p.url}/assets/cached/demo-cogs/scene-{scene}/visual.tif")
        assert r.status_code == 200 and r.content == want
    cache = httpx.get(f"{p.url}/readyz").json()["checks"]["cache"]
    assert cache["ok"] is False  # the file or the SQLite index, whichever fills up first
    assert "No space left" in cache["error"] or "disk is full" in cache["error"]
    log = p.proc.log_text()
    assert log.count("cache unavailable, serving pass-through") == 1  # once per interval
    assert "Traceback" not in log


def test_worker_processes_share_the_cache(upstream, big, tmp_path):
    served = fdp_serve(cache_config(upstream.url, tmp_path), tmp_path, "--workers", "2")
    proc, url = served.proc, served.url
    data = big.read_bytes()
    blocks = (10, 11, 12, 13)

    def read(n):
        a = blocks[n % 4] * BLOCK + (n * 7919) % (BLOCK - 20000)
        with httpx.Client(timeout=60) as c:  # a new connection each: both workers serve
            r = c.get(f"{url}/assets/cached/{BIG}", headers={"Range": f"bytes={a}-{a + 16383}"})
        return a, r

    with proc:
        with ThreadPoolExecutor(16) as pool:
            for a, r in pool.map(read, range(64)):
                assert r.status_code == 206 and r.content == data[a : a + 16384]
        fetched = [e["range"] for e in data_gets(upstream)]
        assert len(set(fetched)) == 4 and len(fetched) <= 8  # at most once per worker
        upstream.reset()
        time.sleep(0.2)
        with ThreadPoolExecutor(16) as pool:
            for a, r in pool.map(read, range(64, 128)):
                assert r.status_code == 206 and r.content == data[a : a + 16384]
        assert upstream.data_requests() == []  # every worker now serves every block
    assert "Traceback" not in proc.log_text()
