"""One slow or stuck neighbour must not stall the rest: a locked cache index, a slow identity
provider, clients that send huge or never-ending headers. Measured as a client sees it."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import NO_CACHE
from tests.harness.stalls import hold_sqlite_lock

P99_LIMIT = 0.1  # seconds


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Prober:
    """Requests in a loop on a thread until stopped; keeps each one's latency and status."""

    def __init__(self, urls: list[str], headers: dict[str, str] | None = None) -> None:
        self.urls = urls
        self.headers = headers or {}
        self.times: list[float] = []
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30, headers=self.headers) as client:
            while not self._stop.is_set():
                for u in self.urls:
                    t = time.monotonic()
                    r = client.get(u, headers={"range": "bytes=0-99"})
                    self.times.append(time.monotonic() - t)
                    self.statuses.append(r.status_code)
                time.sleep(0.01)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    @property
    def p99(self) -> float:
        ordered = sorted(self.times)
        return ordered[int(len(ordered) * 0.99) - 1]


@pytest.fixture(scope="module")
def dproxy(start_proxy, upstream_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("dependable")
    files = {"http": {"base_url": f"{upstream_server.url}/data/demo-cogs/"}}
    proxy = start_proxy(
        {
            "cache": {"store": str(work / "cache")},
            "server": {"request_timeout": 1.0, "max_header_bytes": "64KiB"},
            "datasets": {
                "hot": {"upstream": files},
                "cold": {"upstream": files},
                "through": {"upstream": files, "retention": NO_CACHE},
            },
        }
    )
    proxy.store = work / "cache"
    return proxy


def test_a_locked_cache_index_stalls_neither_hits_nor_health(dproxy, upstream, tmp_path):
    hot = f"{dproxy.url}/assets/hot/scene-a/B04.tif"
    assert httpx.get(hot).status_code == 200  # cached, blocks held open
    lock = hold_sqlite_lock(dproxy.store / "objects" / "cache.db", 10, tmp_path)
    try:
        started = time.monotonic()
        with Prober([hot, f"{dproxy.url}/healthz"]) as probe:
            # a miss on another dataset meanwhile: it waits for the index or goes around
            # the cache, but is answered correctly either way
            miss = httpx.get(f"{dproxy.url}/assets/cold/scene-b/B04.tif", timeout=30)
            while lock.proc.poll() is None and time.monotonic() - started < 15:
                time.sleep(0.2)
        assert miss.status_code == 200
        assert miss.content == upstream.file("demo-cogs/scene-b/B04.tif")
    finally:
        lock.stop()
    assert time.monotonic() - started >= 9, "the lock was not held for the whole period"
    assert set(probe.statuses) <= {200, 206} and len(probe.times) > 100
    assert probe.p99 < P99_LIMIT, f"p99 {probe.p99 * 1000:.0f} ms"
    after = httpx.get(f"{dproxy.url}/assets/cold/scene-c/B04.tif")  # the cache works again
    assert after.status_code == 200


def test_huge_headers_are_refused_and_leave_no_memory_behind(dproxy):
    pid = dproxy.proc.pid
    httpx.get(f"{dproxy.url}/healthz")
    before = rss_kib(pid)
    host, port = dproxy.url.removeprefix("http://").split(":")
    chunk = b"x" * (1 << 20)
    for _ in range(4):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
            answer = b""
            with contextlib.suppress(OSError):
                for _ in range(64):  # 64 MiB of one header value
                    s.sendall(chunk)
            with contextlib.suppress(OSError):
                answer = s.recv(4096)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 431")
    assert httpx.get(f"{dproxy.url}/healthz").status_code == 200
    assert rss_kib(pid) - before < 8 * 1024, "RSS grew"


def test_idle_and_half_sent_requests_are_closed(dproxy):
    host, port = dproxy.url.removeprefix("http://").split(":")
    for opening in (b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(opening)
            started = time.monotonic()
            try:
                while s.recv(4096):  # dribble nothing more: the server must hang up
                    pass
            except OSError:
                pass
            took = time.monotonic() - started
        assert took < 5, f"still open after {took:.1f} s"


def pipelined_heads(url: str, paths: list[str], batch: int = 100) -> list[int]:
    """HEAD each path over one keep-alive connection, `batch` requests in flight at a time
    (HTTP/1.1 pipelining: the client costs next to nothing); returns the statuses."""
    host, _, port = url.split("//", 1)[1].partition(":")
    statuses: list[int] = []
    with socket.create_connection((host, int(port)), timeout=30) as s:
        for at in range(0, len(paths), batch):
            part = paths[at : at + batch]
            s.sendall(b"".join(b"HEAD %s HTTP/1.1\r\nhost: x\r\n\r\n" % p.encode() for p in part))
            data = b""
            while data.count(b"\r\n\r\n") < len(part):  # HEAD answers have no body
                chunk = s.recv(1 << 16)
                assert chunk, "connection closed"
                data += chunk
            statuses += [int(head[9:12]) for head in data.split(b"\r\n\r\n")[:-1]]
    return statuses


def test_many_unknown_keys_leave_memory_bounded(dproxy, upstream):
    """Every path asks the upstream once and is remembered nowhere for long: once the
    memos are full (8,192 entries), 9,000 more unknown keys leave the RSS where it was
    (remembering each would take about 1 KiB: 9 MiB)."""
    pid = dproxy.proc.pid
    keys = [f"/assets/through/nope/{i:06d}-{'k' * 60}.tif" for i in range(18_000)]
    threads = 2

    def head_all(part: list[str]) -> None:
        with ThreadPoolExecutor(threads) as pool:
            answers = pool.map(lambda k: pipelined_heads(dproxy.url, part[k::threads]), (0, 1))
            assert all(set(statuses) == {404} for statuses in answers)

    head_all(keys[:9000])  # fills every memo, warms the allocator and the pools
    before = rss_kib(pid)
    head_all(keys[9000:])
    grown = (rss_kib(pid) - before) / 1024
    assert grown < 4, f"RSS grew {grown:.0f} MiB over 9,000 more unknown keys"


def test_a_redis_that_never_answers_stalls_neither_hits_nor_health(
    start_proxy, upstream_server, blackhole, tmp_path
):
    """Redis accepts connections and never answers: slow data is a quick 503, the rest flows."""
    files = {"http": {"base_url": f"{upstream_server.url}/data/demo-cogs/"}}
    proxy = start_proxy(
        {
            "cache": {"store": str(tmp_path / "cache")},
            "queue": {"redis_url": blackhole.redis_url, "timeout_seconds": 1},
            "datasets": {
                "hot": {"upstream": files},
                "vault": {"upstream": {**files}, "archive": True},
            },
        }
    )
    hot = f"{proxy.url}/assets/hot/scene-a/B04.tif"
    assert httpx.get(hot).status_code == 200  # cached
    with Prober([hot, f"{proxy.url}/healthz"]) as probe:
        started = time.monotonic()
        threads = []
        answers: list[httpx.Response] = []
        for i in range(10):
            u = f"{proxy.url}/assets/vault/scene-{'abc'[i % 3]}/visual.tif"
            t = threading.Thread(target=lambda u=u: answers.append(httpx.get(u, timeout=30)))
            t.start()
            threads.append(t)
        for t in threads:
            t.join(30)
        ready = httpx.get(f"{proxy.url}/readyz", timeout=10)
        while time.monotonic() - started < 5:  # keep probing for a while
            time.sleep(0.2)
    assert len(answers) == 10
    for r in answers:
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0, r.text
    assert ready.json()["checks"]["queue"]["ok"] is False
    assert ready.elapsed.total_seconds() < 3
    assert blackhole.connections() >= 1  # it really was asked
    assert set(probe.statuses) == {200, 206} and len(probe.times) > 50
    assert probe.p99 < P99_LIMIT, f"p99 {probe.p99 * 1000:.0f} ms"
