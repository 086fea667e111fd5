"""The fill path against a lying and slow upstream: what it fetches, what it keeps."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

VISUAL = "demo-cogs/scene-c/visual.tif"
BLOCK = 64 * 1024


@pytest.fixture(scope="module")
def fproxy(start_proxy, upstream_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("fills")
    files = {"http": {"base_url": f"{upstream_server.url}/data/demo-cogs/"}}
    return start_proxy(
        {
            "cache": {"store": str(work / "cache"), "block_size": "64KiB", "read_ahead": 2},
            "datasets": {"files": {"upstream": files}},
        }
    )


def upstream_gets(upstream, path):
    return [e for e in upstream.data_requests() if e["method"] == "GET" and path in e["path"]]


def test_a_client_that_leaves_stops_the_fetching(fproxy, upstream):
    size = len(upstream.file(VISUAL))
    assert size > 40 * BLOCK
    upstream.fault("scene-c/visual", method="GET", chunk_delay=0.2)
    with httpx.stream("GET", f"{fproxy.url}/assets/files/scene-c/visual.tif") as r:
        got = 0
        for chunk in r.iter_raw():
            got += len(chunk)
            if got >= 100_000:
                break  # and hang up
    deadline = time.monotonic() + 15
    while True:  # until every fetch that was started has ended
        gets = upstream_gets(upstream, "scene-c/visual")
        lengths = [
            int(e["range"].split("-")[1]) - int(e["range"].split("=")[1].split("-")[0]) + 1
            for e in gets
        ]
        if all(e["bytes"] >= n for e, n in zip(gets, lengths, strict=True)):
            break
        assert time.monotonic() < deadline, gets
        time.sleep(0.1)
    time.sleep(0.5)  # nothing new may start once the client has gone
    gets = upstream_gets(upstream, "scene-c/visual")
    fetched = sum(e["bytes"] for e in gets)
    # the blocks sent before the hang-up was seen (socket buffers take some), plus read-ahead
    assert len(gets) <= 8, [(e["range"], e["bytes"]) for e in gets]
    assert fetched <= 8 * BLOCK < size / 4


def test_a_lying_head_does_not_set_the_size(fproxy, upstream):
    """A HEAD that answers 200 with a 26-byte error page: the size comes from the GETs."""
    data = upstream.file("demo-cogs/scene-a/visual.tif")
    upstream.fault("scene-a/visual", method="HEAD", status=200)
    r = httpx.head(f"{fproxy.url}/assets/files/scene-a/visual.tif")
    assert int(r.headers["content-length"]) == len(data)
    got = httpx.get(f"{fproxy.url}/assets/files/scene-a/visual.tif")
    assert got.status_code == 200 and got.content == data


def test_an_upstream_that_ignores_range_still_fills_the_right_block(fproxy, upstream):
    data = upstream.file("demo-cogs/scene-b/visual.tif")
    upstream.fault("scene-b/visual", method="GET", ignore_range=True)
    want = (5 * BLOCK + 100, 5 * BLOCK + 199)
    url = f"{fproxy.url}/assets/files/scene-b/visual.tif"
    r = httpx.get(url, headers={"range": f"bytes={want[0]}-{want[1]}"})
    assert r.status_code == 206 and r.content == data[want[0] : want[1] + 1]
    upstream.reset()
    again = httpx.get(url, headers={"range": f"bytes={5 * BLOCK}-{6 * BLOCK - 1}"})
    assert again.content == data[5 * BLOCK : 6 * BLOCK]
    assert upstream_gets(upstream, "scene-b/visual") == []  # the block was cached, and right


def test_an_object_replaced_upstream_is_never_mixed_with_its_old_blocks(fproxy, upstream):
    from upstreams.demo.state import changed_bytes

    data = upstream.file("demo-cogs/scene-a/B04.tif")
    url = f"{fproxy.url}/assets/files/scene-a/B04.tif"
    first = httpx.get(url, headers={"range": "bytes=0-99"})  # block 0 of the old version
    assert first.content == data[:100]
    upstream.fault("scene-a/B04", changed=True)  # a new version: new ETag, other bytes
    later = httpx.get(url, headers={"range": f"bytes={2 * BLOCK}-{2 * BLOCK + 99}"})
    assert later.status_code == 502  # the fill saw the new version: nothing mixed is served
    new = changed_bytes(data)
    whole = httpx.get(url)  # a new record of the new version, whole and consistent
    assert whole.status_code == 200 and whole.content == new


def test_a_block_corrupted_on_disk_is_never_served(fproxy, upstream, tmp_path):
    import yaml

    from cache.store import Store, object_key
    from tests.conftest import fdp_serve

    data = upstream.file("demo-cogs/scene-c/B04.tif")
    url = "/assets/files/scene-c/B04.tif"
    assert httpx.get(fproxy.url + url).content == data  # every block cached
    store = Path(yaml.safe_load(fproxy.config.read_text())["cache"]["store"])
    opened = Store(store)  # as the proxies open it (its settings are shared)
    try:
        key = object_key("files", "scene-c/B04.tif")
        deadline = time.monotonic() + 10
        while not ((r := opened.refresh(key)) and r.complete and r.sha256):
            assert time.monotonic() < deadline  # the serving proxy is done with the object
            time.sleep(0.05)
        f = opened.blocks.get((key, 3), read=True)
        path = f.name
        f.close()
    finally:
        opened.close()
    raw = bytearray(Path(path).read_bytes())
    raw[100] ^= 0xFF  # one flipped bit of rust
    Path(path).write_bytes(bytes(raw))
    upstream.reset()
    # a process that has never held the block open (as after a restart)
    config = yaml.safe_load(fproxy.config.read_text())
    fresh = fdp_serve(config, tmp_path, name="fdp-fresh")
    with fresh.proc:
        r = httpx.get(fresh.url + url, headers={"range": f"bytes={3 * BLOCK}-{3 * BLOCK + 999}"})
        assert r.status_code == 206 and r.content == data[3 * BLOCK : 3 * BLOCK + 1000]
        assert upstream_gets(upstream, "scene-c/B04"), "the corrupt block was not fetched again"
        checks = httpx.get(f"{fresh.url}/readyz").json()["checks"]["cache"]
        assert checks["integrity_failures"] >= 1


def test_a_fill_that_dies_of_any_error_releases_its_waiters(tmp_path):
    """In-process: the fill's task raises something unexpected after bytes began to flow;
    every reader gets FillFailed at once (no hang), and the fill is forgotten."""
    import asyncio
    import os

    from cache.fill import Fill, FillFailed, Fills

    async def scenario() -> None:
        fills = Fills()
        gate = asyncio.Event()

        async def run(fill: Fill) -> None:
            fill.begin()
            os.pwrite(fill.fd, b"x" * 10, 0)
            fill.grew(10)
            await gate.wait()
            raise RuntimeError("a bug, not an upstream error")

        fill = fills.start("k", 0, Fill(tmp_path / "f.part", 100), run)
        await fill.started

        async def read() -> bytes:
            out = b""
            async for chunk in fill.follow(0, 100):
                out += chunk
            return out

        readers = [asyncio.ensure_future(read()) for _ in range(3)]
        await asyncio.sleep(0)
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*readers, return_exceptions=True), 5)
        assert all(isinstance(r, FillFailed) for r in results), results
        assert fills.get("k", 0) is None  # a new request starts a new fill
        late = await asyncio.wait_for(asyncio.gather(read(), return_exceptions=True), 5)
        assert isinstance(late[0], FillFailed)

    asyncio.run(scenario())


def test_the_scrub_finds_a_block_rotting_on_disk(start_proxy, upstream, tmp_path):
    """A block whose file changes on disk while the proxy holds it is found by the
    background scrub, its object evicted and counted, and fetched again on the next read."""
    from cache.store import Store, object_key

    files = {"http": {"base_url": f"{upstream.url}/data/demo-cogs/"}}
    proxy = start_proxy(
        {
            "cache": {"store": str(tmp_path / "c"), "block_size": "64KiB", "sweep_seconds": 0.3},
            "datasets": {"files": {"upstream": files}},
        }
    )
    data = upstream.file("demo-cogs/scene-c/B04.tif")
    url = f"{proxy.url}/assets/files/scene-c/B04.tif"
    assert httpx.get(url).content == data
    opened = Store(tmp_path / "c")
    try:
        key = object_key("files", "scene-c/B04.tif")
        deadline = time.monotonic() + 10
        while not ((r := opened.refresh(key)) and r.complete and r.sha256):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        f = opened.blocks.get((key, 3), read=True)
        path = Path(f.name)
        f.close()
        with path.open("r+b") as rot:  # the same file the proxy holds open
            rot.seek(100)
            byte = rot.read(1)
            rot.seek(100)
            rot.write(bytes([byte[0] ^ 0xFF]))
        upstream.reset()
        deadline = time.monotonic() + 10
        while httpx.get(f"{proxy.url}/readyz").json()["checks"]["cache"]["integrity_failures"] < 1:
            assert time.monotonic() < deadline, "the scrub did not find the rotten block"
            time.sleep(0.1)
        assert opened.refresh(key) is None  # evicted
    finally:
        opened.close()
    r = httpx.get(url, headers={"range": f"bytes={3 * BLOCK}-{3 * BLOCK + 999}"})
    assert r.status_code == 206 and r.content == data[3 * BLOCK : 3 * BLOCK + 1000]
    assert upstream_gets(upstream, "scene-c/B04"), "the rotten block was not fetched again"


def test_a_corrupt_multi_block_object_is_found_by_background_verification(
    start_proxy, upstream, tmp_path
):
    """A ranged read of one block of an object with a catalogue checksum starts its
    completion; the whole does not match, so every block goes and later reads fetch again."""
    from proxy.demo import providers_yaml

    (tmp_path / "providers.yml").write_text(providers_yaml(upstream.url))
    proxy = start_proxy(
        {
            "cache": {"store": str(tmp_path / "c"), "block_size": "256KiB"},
            "eodag": {"providers_file": str(tmp_path / "providers.yml")},
            "datasets": {
                "scenes": {
                    "upstream": {"eodag": {"provider": "fdp_demo", "collection": "demo-cogs"}}
                }
            },
        }
    )
    url = f"{proxy.url}/assets/scenes/scene-a/visual"
    want = upstream.file("demo-cogs/scene-a/visual.tif")
    upstream.fault("scene-a/visual", method="GET", corrupt=True)
    r = httpx.get(url, headers={"range": "bytes=1000-1999"})
    assert r.status_code == 206  # served as a pass-through would serve it
    deadline = time.monotonic() + 15
    while httpx.get(f"{proxy.url}/readyz").json()["checks"]["cache"]["integrity_failures"] < 1:
        assert time.monotonic() < deadline, "the background verification did not run"
        time.sleep(0.1)
    gets = upstream_gets(upstream, "scene-a/visual")
    assert len({e["range"] for e in gets if e["range"] != "bytes=0-0"}) == -(
        -len(want) // (1 << 18)
    )
    upstream.reset()
    r = httpx.get(url, headers={"range": "bytes=1000-1999"})
    assert r.content == want[1000:2000]
    assert upstream_gets(upstream, "scene-a/visual"), "the corrupt block was served from cache"


def test_a_background_verification_cut_by_a_restart_is_finished_after_it(upstream, tmp_path):
    """Stopped half-way through completing a checksummed object, the next process finishes
    the job when the object is next read: only the missing blocks, then the whole verified."""
    import yaml

    from cache.store import Store, object_key
    from proxy.demo import providers_yaml
    from tests.conftest import fdp_serve

    (tmp_path / "providers.yml").write_text(providers_yaml(upstream.url))
    config = {
        "cache": {"store": str(tmp_path / "c"), "block_size": "256KiB", "read_ahead": 1},
        "eodag": {"providers_file": str(tmp_path / "providers.yml")},
        "datasets": {
            "scenes": {"upstream": {"eodag": {"provider": "fdp_demo", "collection": "demo-cogs"}}}
        },
    }
    want = upstream.file("demo-cogs/scene-a/visual.tif")
    key = object_key("scenes", "scene-a/visual")
    upstream.fault("scene-a/visual", method="GET", chunk_delay=0.3)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first = fdp_serve(yaml.safe_load(yaml.safe_dump(config)), tmp_path / "a")
    store = Store(tmp_path / "c")
    try:
        with first.proc:
            r = httpx.get(
                f"{first.url}/assets/scenes/scene-a/visual", headers={"range": "bytes=0-999"}
            )
            assert r.content == want[:1000]
            deadline = time.monotonic() + 20
            while len((store.refresh(key) or ObjectRecordStub).blocks) < 3:
                assert time.monotonic() < deadline, "the background completion did not start"
                time.sleep(0.05)
        cut = store.refresh(key)
        assert cut is not None and not cut.complete and not cut.verified
        upstream.reset()
        second = fdp_serve(config, tmp_path / "b")
        with second.proc:
            r = httpx.get(
                f"{second.url}/assets/scenes/scene-a/visual", headers={"range": "bytes=0-999"}
            )
            assert r.content == want[:1000]
            deadline = time.monotonic() + 20
            while not (store.refresh(key) or ObjectRecordStub).verified:
                assert time.monotonic() < deadline, "the verification was not finished"
                time.sleep(0.05)
            fetched = {e["range"] for e in upstream_gets(upstream, "scene-a/visual")}
            had = {f"bytes={i * (1 << 18)}-" for i in cut.blocks}
            assert not {f for f in fetched if any(f.startswith(h) for h in had)}, fetched
            assert httpx.get(f"{second.url}/assets/scenes/scene-a/visual").content == want
    finally:
        store.close()


class ObjectRecordStub:
    """What a missing record looks like to the polling loops above."""

    blocks: tuple[int, ...] = ()
    verified = False


def test_an_empty_object_is_cached_and_served_as_empty(fproxy, upstream):
    """A zero-byte object (a `_SUCCESS` marker, say): 200 with no body, HEAD says 0, any
    range is a 416 with `bytes */0`, and the second read asks the upstream nothing."""
    (upstream.data / "demo-cogs" / "scene-c" / "_SUCCESS").write_bytes(b"")
    url = f"{fproxy.url}/assets/files/scene-c/_SUCCESS"
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == "0"
    h = httpx.head(url)
    assert h.status_code == 200 and h.headers["content-length"] == "0"
    ranged = httpx.get(url, headers={"range": "bytes=0-"})
    assert ranged.status_code == 416 and ranged.headers["content-range"] == "bytes */0"
    upstream.reset()
    assert httpx.get(url).content == b""
    assert upstream_gets(upstream, "_SUCCESS") == []
