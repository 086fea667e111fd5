"""Single flight across processes: `fdp serve --workers 4` fetches each block once, and a
fill whose owner is killed is taken over, so no reader hangs or gets a wrong byte."""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import fdp_serve

VISUAL = "demo-cogs/scene-c/visual.tif"


def _gets(upstream, path: str) -> list[dict]:
    return [
        e
        for e in upstream.data_requests()
        if e["method"] == "GET" and path in e["path"] and e.get("range") != "bytes=0-0"
    ]


def _serve(upstream_server, tmp_path: Path, block_size: str):
    files = {"http": {"base_url": f"{upstream_server.url}/data/demo-cogs/"}}
    config = {
        "cache": {"store": str(tmp_path / "cache"), "block_size": block_size},
        "datasets": {"files": {"upstream": files}},
    }
    return fdp_serve(config, tmp_path, "--workers", "4")


def _get_all(url: str, n: int, headers: dict[str, str] | None = None) -> list[object]:
    """n concurrent GETs, each on its own connection; a result is bytes or the exception."""
    results: list[object] = [None] * n
    start = threading.Barrier(n)

    def one(i: int) -> None:
        start.wait()
        try:
            with httpx.Client(timeout=60) as c:
                r = c.get(url, headers=headers)
                results[i] = r.content if r.status_code in (200, 206) else r.status_code
        except httpx.HTTPError as e:
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
        assert not t.is_alive(), "a reader hangs"
    return results


def test_twenty_identical_misses_over_four_workers_fetch_each_block_once(upstream_server, tmp_path):
    upstream = upstream_server
    upstream.reset()
    upstream.fault("scene-c/visual", method="GET", chunk_delay=0.05)  # fills overlap
    proxy = _serve(upstream, tmp_path, "256KiB")
    with proxy.proc:
        results = _get_all(f"{proxy.url}/assets/files/scene-c/visual.tif", 20)
    want = upstream.file(VISUAL)
    assert all(r == want for r in results), [type(r).__name__ for r in results]
    per_range = collections.Counter(e["range"] for e in _gets(upstream, "scene-c/visual"))
    blocks = -(-len(want) // (256 * 1024))
    assert len(per_range) == blocks, sorted(per_range)
    assert set(per_range.values()) == {1}, per_range  # not one block fetched twice


def _locker_of(path: Path) -> int | None:
    """The pid holding the flock on this file (from /proc/locks)."""
    ino = path.stat().st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()
        if "FLOCK" in parts and parts[-3].endswith(f":{ino}"):
            return int(parts[-4])
    return None


def _openers(path: Path) -> set[int]:
    """The pids that have this file open (a fill's owner and its followers)."""
    pids = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == str(path) for fd in fd_dir.iterdir()):
                pids.add(int(fd_dir.parent.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs /proc/locks")
def test_a_fill_owner_killed_mid_block_is_taken_over(upstream_server, tmp_path):
    upstream = upstream_server
    upstream.reset()
    # one 1 MiB block arrives as four 256 KiB chunks, 0.6 s apart
    upstream.fault("scene-c/visual", method="GET", chunk_delay=0.6)
    proxy = _serve(upstream, tmp_path, "1MiB")
    want = upstream.file(VISUAL)[: 1 << 20]
    url = f"{proxy.url}/assets/files/scene-c/visual.tif"
    results: list[object] = []

    def read() -> None:
        try:
            r = httpx.get(url, headers={"range": "bytes=0-1048575"}, timeout=60)
            results.append(r.content if r.status_code == 206 else r.status_code)
        except httpx.HTTPError as e:
            results.append(e)

    with proxy.proc:
        readers = [threading.Thread(target=read)]
        readers[0].start()
        tmp = tmp_path / "cache" / "tmp"
        deadline = time.monotonic() + 20
        owner, part = None, None
        while owner is None:  # the first reader's process claims the block
            assert time.monotonic() < deadline, "no fill started"
            parts = list(tmp.glob("*.0.*.part"))
            if parts:
                part, owner = parts[0], _locker_of(parts[0])
            time.sleep(0.02)
        assert part is not None and owner != proxy.proc.pid  # a worker, not the supervisor
        while not _openers(part) - {owner}:  # until a reader waits in another process
            assert time.monotonic() < deadline and len(readers) < 40, "no follower elsewhere"
            readers.append(threading.Thread(target=read))
            readers[-1].start()
            time.sleep(0.05)
        while part.stat().st_size < 256 * 1024:  # the owner is mid-block
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(owner, signal.SIGKILL)
        for t in readers:
            t.join(90)
            assert not t.is_alive(), "a reader hangs"
        served = [r for r in results if isinstance(r, bytes)]
        assert served, (results, proxy.proc.log_text()[-3000:])  # followers elsewhere were
        assert all(r == want for r in served)  # every one of them complete and correct
        assert all(isinstance(r, bytes | httpx.HTTPError) for r in results), results
        gets = _gets(upstream, "scene-c/visual")
        # the dead owner's fetch, then one that resumes where it stopped (not from 0 again)
        assert len(gets) == 2, [(e["range"], e["bytes"]) for e in gets]
        resumed = gets[1]["range"]
        assert resumed.startswith("bytes=") and not resumed.startswith("bytes=0-"), resumed
        # the block is in the cache: another read asks the upstream nothing
        assert httpx.get(url, headers={"range": "bytes=0-1048575"}).content == want
        assert len(_gets(upstream, "scene-c/visual")) == 2
