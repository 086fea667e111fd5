"""Benchmark the proxy against nginx and the upstream direct, all on 127.0.0.1.

One command: `.venv/bin/python bench/run.py [--size-mib 512] [--duration 10]
[--out bench/REPORT.md] [--keep]`. It installs nginx and wrk when missing (apt-get, as root),
writes random files into a work dir, starts nginx, the demo upstream and `fdp serve` on free
loopback ports, checks each answers correctly, then measures whole-file streaming (curl,
best of 3), 16 KiB random ranges at concurrency 32 (wrk) and the proxy's RSS while it
streams a 1 GiB file. Every server is stopped by its own pid at the end, also on Ctrl+C.

Exit status: 0 ran (targets met or not), 1 aborted (a probe failed, a tool is missing),
3 ran but some figure is untrustworthy (non-2xx responses, socket errors, ranges not
honoured, other processes keeping the CPUs busy before or during a run).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MIB = 1 << 20
RANGE_LEN = 16 * 1024
MEM_FILE_MIB = 1024
CONCURRENCY = 32
STREAM_TRIES = 3
BUSY_CPUS = 0.15  # flag a run when other processes kept more CPUs than this busy
FLAT_RSS_MIB = 64  # "memory flat": RSS growth below this while streaming the 1 GiB file
COLD_MIB = 256  # the cold object streamed through a cache miss
CAPPED_RATE = "50m"  # nginx limit_rate per connection, as remote providers do
COG_SIDE = 16384  # the COG: 16384² pixels, 4 bands of uint8 = 1 GiB, 512² tiles
PIXEL_TRIES = 7
TOUCH_MIB = 2048  # memory written and freed first: this VM's first touch of a page is slow
SERVERS = ("nginx", "proxy", "upstream")


class BenchError(Exception):
    """A setup step or probe failed: the figures would be meaningless."""


# --- small helpers ------------------------------------------------------------------------


def log(msg: str) -> None:
    """Progress line on stderr (the report goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:port."""
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def find_tool(name: str) -> str | None:
    """Path of a tool, also looking in the sbin folders a non-root PATH may lack."""
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/sbin") if (p := Path(d) / name).is_file()), None
    )


def ensure_tools() -> dict[str, str]:
    """nginx, wrk and curl paths; installs nginx/wrk with apt-get when missing (root only)."""
    if not (BIN / "fdp").is_file():
        raise BenchError(f"no fdp next to {sys.executable}: run .venv/bin/python bench/run.py")
    missing = [t for t in ("nginx", "wrk") if find_tool(t) is None]
    if missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise BenchError(
                f"{' and '.join(missing)} missing and this is not root with apt-get: install "
                "them first (Debian: sudo apt-get install -y nginx wrk), or run as root"
            )
        log(f"installing {' '.join(missing)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "nginx", "wrk"],
        ):
            r = subprocess.run(
                argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600
            )
            if r.returncode != 0:
                raise BenchError(f"{' '.join(argv)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    tools = {t: find_tool(t) for t in ("nginx", "wrk", "curl")}
    if tools["curl"] is None:
        raise BenchError("curl is missing (Debian: apt-get install -y curl)")
    return {k: v for k, v in tools.items() if v}


FIRST_PIXEL = """
import sys, time, rasterio
from rasterio.windows import Window
t = time.perf_counter()
env = rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR", VSI_CACHE="FALSE")
with env, rasterio.open(sys.argv[1]) as src:
    src.read(window=Window(8192, 8192, 512, 512))
print(time.perf_counter() - t)
"""


def write_cog(path: Path) -> None:
    """A 1 GiB tiled GeoTIFF of random pixels, written a row of tiles at a time."""
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    rng = np.random.default_rng(1)
    profile = {
        "driver": "GTiff",
        "width": COG_SIDE,
        "height": COG_SIDE,
        "count": 4,
        "dtype": "uint8",
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "BIGTIFF": "YES",
    }
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, COG_SIDE, 512):
            tile_row = rng.integers(0, 256, (4, 512, COG_SIDE), dtype=np.uint8)
            dst.write(tile_row, window=Window(0, row, COG_SIDE, 512))


def first_pixel(url: str) -> float:
    """Seconds from open to the first 512² window of the COG, in a fresh process."""
    r = subprocess.run(
        [str(BIN / "python"), "-c", FIRST_PIXEL, url], capture_output=True, text=True, timeout=120
    )
    if r.returncode != 0:
        raise BenchError(f"first pixel {url}: {r.stderr.strip()[-500:]}")
    return float(r.stdout.strip())


def fresh_write_gbps(path: Path, size: int) -> float:
    """GB/s of writing `size` bytes to a new file (page cache only, as a cache fill must)."""
    zeros = bytes(4 * MIB)
    t = time.perf_counter()
    with path.open("wb") as f:
        for _ in range(size // len(zeros)):
            f.write(zeros)
    seconds = time.perf_counter() - t
    path.unlink()
    return size / seconds / 1e9


def write_random(path: Path, size: int) -> None:
    """`size` random bytes into `path`, 4 MiB at a time (never the whole file in memory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        left = size
        while left:
            n = min(4 * MIB, left)
            f.write(os.urandom(n))
            left -= n


def read_at(path: Path, offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) of a file."""
    with path.open("rb") as f:
        return os.pread(f.fileno(), length, offset)


def _cpu_ticks() -> tuple[int, int, dict[int, tuple[str, int]]]:
    """(all ticks, idle ticks, {pid: (name, ticks)}) from /proc, right now."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    procs: dict[int, tuple[str, int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (d / "stat").read_text()
                name = stat[stat.index("(") + 1 : stat.rindex(")")]
                rest = stat[stat.rindex(")") + 2 :].split()
                procs[int(d.name)] = (name, int(rest[11]) + int(rest[12]))  # utime + stime
    return sum(fields), fields[3] + fields[4], procs


def _ours(pid: int, name: str, ours: set[int]) -> bool:
    """Whether a process is the benchmark's: us, our servers, or the kernel's softirq
    threads (on loopback they mostly carry our own traffic)."""
    return pid == os.getpid() or pid in ours or name.startswith("ksoftirqd/")


def _top(
    procs1: dict[int, tuple[str, int]],
    procs2: dict[int, tuple[str, int]],
    seconds: float,
    ours: set[int] | None = None,
) -> list[str]:
    """The three processes (other than ours) that used the most CPU between two snapshots."""
    hz = os.sysconf("SC_CLK_TCK")
    top = sorted(
        (
            (ticks - procs1[pid][1], pid, name)
            for pid, (name, ticks) in procs2.items()
            if pid in procs1 and not _ours(pid, name, ours or set())
        ),
        reverse=True,
    )[:3]
    return [f"{name} (pid {pid}) {d / hz / seconds:.0%}" for d, pid, name in top if d]


def background_load(seconds: float = 2.0) -> tuple[float, list[str]]:
    """CPUs kept busy by others over `seconds` (1.0 = one full CPU) and the top consumers."""
    total1, idle1, procs1 = _cpu_ticks()
    time.sleep(seconds)
    total2, idle2, procs2 = _cpu_ticks()
    busy = (1 - (idle2 - idle1) / max(1, total2 - total1)) * (os.cpu_count() or 1)
    return busy, _top(procs1, procs2, seconds)


def _busy_seconds() -> float:
    """Seconds all CPUs spent busy since boot (steal included: time the VM did not get)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_seconds(procs: dict[int, tuple[str, int]], ours: set[int]) -> float:
    """CPU seconds used by this process, its reaped children (curl, wrk), our servers and
    the softirq threads, given a `_cpu_ticks` snapshot of /proc."""
    t = os.times()  # this process itself is in `procs`
    ticks = sum(v for pid, (name, v) in procs.items() if _ours(pid, name, ours))
    return t.children_user + t.children_system + ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class Others:
    """CPUs kept busy by processes outside the benchmark during a phase, and the top ones."""

    cpus: float = 0.0
    seconds: float = 0.0
    top: list[str] = field(default_factory=list)


@contextlib.contextmanager
def others_cpu(pids: list[int]) -> Iterator[Others]:
    """Yield an `Others` that is filled in when the block ends (tick-based: trust it only
    over a second or more)."""
    out, ours = Others(), set(pids)
    procs0 = _cpu_ticks()[2]
    busy0, own0, t0 = _busy_seconds(), _own_seconds(procs0, ours), time.monotonic()
    try:
        yield out
    finally:
        procs1 = _cpu_ticks()[2]
        busy, own = _busy_seconds() - busy0, _own_seconds(procs1, ours) - own0
        out.seconds = max(1e-3, time.monotonic() - t0)
        out.cpus = max(0.0, busy - own) / out.seconds
        out.top = _top(procs0, procs1, out.seconds, ours)


def children(pid: int) -> list[int]:
    """A process's children and theirs (uvicorn's workers and their helpers)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                out += [int(child), *children(int(child))]
    return out


def rss_kib(pid: int) -> int | None:
    """VmRSS of a process in KiB, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmRSS:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None


# --- servers ------------------------------------------------------------------------------


@dataclass
class Server:
    """One server subprocess in its own session, stopped by its pid."""

    name: str
    argv: list[str]
    port: int
    url: str  # the big file's URL on this server
    log_path: Path
    cwd: Path  # the work dir, so nothing a server writes lands in the repo
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    capped_port: int | None = None  # nginx: a second server capped per connection

    def start(self, ready_path: str = "/", timeout: float = 60.0) -> None:
        """Start and wait (bounded) until it answers any HTTP status on `ready_path`."""
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                cwd=self.cwd,
                start_new_session=True,  # Ctrl+C hits us, and we stop it in `finally`
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            if port_open(self.port):
                with contextlib.suppress(OSError, http.client.HTTPException):
                    status, _, _ = http_get(self.port, ready_path, read=0)
                    if status:
                        return
            time.sleep(0.1)
        raise BenchError(f"{self.name} not ready after {timeout:.0f}s:\n{self.tail()}")

    def stop(self) -> None:
        """SIGTERM our pid, SIGKILL it after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(10)

    def tail(self) -> str:
        """The end of its log."""
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


def http_get(
    port: int, path: str, headers: dict[str, str] | None = None, read: int = 65536
) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, first `read` body bytes); closes without reading the rest."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
        body = resp.read(read) if read else b""
        return resp.status, hdrs, body
    finally:
        conn.close()


def nginx_conf(work: Path, port: int, capped_port: int | None = None) -> Path:
    """An nginx config of our own: one process, sendfile, no access log, serving work/data.

    `master_process off` keeps nginx in the one process we started (its pid is the server),
    and, started as root, it then never switches to `www-data` (the 403 trap in NOTES.md).
    """
    ng = work / "nginx"
    for sub in ("tmp", "logs"):
        (ng / sub).mkdir(parents=True, exist_ok=True)
    temp_paths = "\n".join(
        f"    {kind}_temp_path {ng}/tmp/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = ng / "nginx.conf"
    capped = (
        f"    server {{ listen 127.0.0.1:{capped_port}; root {work}/data; "
        f"limit_rate {CAPPED_RATE}; }}\n"
        if capped_port
        else ""
    )
    conf.write_text(
        f"""daemon off;
master_process off;
worker_processes 1;
pid {ng}/nginx.pid;
error_log {ng}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
{temp_paths}
    server {{
        listen 127.0.0.1:{port};
        root {work}/data;
    }}
{capped}}}
"""
    )
    return conf


def make_servers(work: Path, tools: dict[str, str]) -> dict[str, Server]:
    """nginx, the demo upstream and the proxy, configured but not started."""
    logs = work / "logs"
    ports = {name: free_port() for name in (*SERVERS, "lean", "capped", "proxy2")}
    conf = nginx_conf(work, ports["nginx"], ports["capped"])
    (work / "fdp.yaml").write_text(
        f"cache: {{store: {work}/cache, block_size: 4MiB}}\n"
        "datasets:\n"
        "  bench: {upstream: {http: {base_url: "
        f'"http://127.0.0.1:{ports["upstream"]}/data/big/"}}}}}}\n'
        "  nginx: {upstream: {http: {base_url: "
        f'"http://127.0.0.1:{ports["nginx"]}/big/"}}}}}}\n'
        "  capped: {upstream: {http: {base_url: "
        f'"http://127.0.0.1:{ports["capped"]}/big/"}}}}}}\n'
    )
    return {
        "nginx": Server(
            "nginx",
            [tools["nginx"], "-p", str(work / "nginx"), "-c", str(conf), "-e", "stderr"],
            ports["nginx"],
            "/big/big.bin",
            logs / "nginx.log",
            work,
            capped_port=ports["capped"],
        ),
        "upstream": Server(
            "upstream",
            [
                *(str(BIN / "python"), "-m", "upstreams.demo.server"),
                *("--data", str(work / "data"), "--port", str(ports["upstream"])),
            ],
            ports["upstream"],
            "/data/big/big.bin",
            logs / "upstream.log",
            work,
        ),
        "proxy": Server(
            "proxy",
            [
                *(str(BIN / "fdp"), "serve", "--config", str(work / "fdp.yaml")),
                *("--port", str(ports["proxy"])),
            ],
            ports["proxy"],
            "/assets/bench/big.bin",
            logs / "proxy.log",
            work,
            env={"FDP_LOG_LEVEL": "WARNING"},  # nginx runs with access_log off too
        ),
        "proxy2": Server(  # the same cache, two worker processes
            "proxy2",
            [
                *(str(BIN / "fdp"), "serve", "--config", str(work / "fdp.yaml")),
                *("--port", str(ports["proxy2"]), "--workers", "2"),
            ],
            ports["proxy2"],
            "/assets/bench/big.bin",
            logs / "proxy2.log",
            work,
            env={"FDP_LOG_LEVEL": "WARNING"},
        ),
        "lean": Server(
            "lean",
            [
                *(str(BIN / "uvicorn"), "bench.lean_asgi:app", "--no-access-log"),
                *("--log-level", "warning", "--port", str(ports["lean"])),
            ],
            ports["lean"],
            "/big/big.bin",
            logs / "lean.log",
            work,
            env={
                "FDP_LEAN_FILE": str(work / "data" / "big" / "big.bin"),
                "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
            },
        ),
    }


def probe(server: Server, big: Path, size: int) -> None:
    """Check a full GET (200, Content-Length, first bytes) and a Range GET (206, bytes)."""
    status, hdrs, body = http_get(server.port, server.url)
    if status != 200 or hdrs.get("content-length") != str(size):
        raise BenchError(
            f"{server.name} probe GET {server.url}: expected 200 with Content-Length {size}, "
            f"got {status} with Content-Length {hdrs.get('content-length')} "
            f"(a fast 403 from nginx means its worker cannot read the work dir)\n"
            f"body: {body[:300]!r}"
        )
    if body != read_at(big, 0, len(body)):
        raise BenchError(f"{server.name} probe GET: the body differs from the file")
    start = min(4 * MIB, size) - 5000 if size > 4 * MIB else 0  # crosses a 4 MiB block edge
    end = min(start + RANGE_LEN, size) - 1
    status, hdrs, body = http_get(
        server.port, server.url, {"Range": f"bytes={start}-{end}"}, read=RANGE_LEN + 1
    )
    want = read_at(big, start, end + 1 - start)
    if status != 206 or hdrs.get("content-range") != f"bytes {start}-{end}/{size}":
        raise BenchError(
            f"{server.name} probe Range bytes={start}-{end}: expected 206 with Content-Range "
            f"bytes {start}-{end}/{size}, got {status} {hdrs.get('content-range')}"
        )
    if body != want:
        raise BenchError(f"{server.name} probe Range: the bytes differ from the file")


# --- measurements -------------------------------------------------------------------------


@dataclass
class Curl:
    """One curl download."""

    status: int
    size: int
    seconds: float

    @property
    def gbps(self) -> float:
        """Throughput in GB/s (10^9 bytes)."""
        return self.size / self.seconds / 1e9 if self.seconds else 0.0


def curl_get(curl: str, url: str, timeout: float = 120.0) -> Curl:
    """Download `url` to /dev/null with curl."""
    r = subprocess.run(
        [
            *(curl, "-s", "-o", "/dev/null", "--max-time", str(int(timeout))),
            *("-w", "%{http_code} %{size_download} %{time_total}", url),
        ],
        capture_output=True,
        text=True,
        timeout=timeout + 10,
    )
    try:
        code, size, secs = r.stdout.split()
        return Curl(int(code), int(size), float(secs))
    except ValueError:
        raise BenchError(f"curl {url} failed (exit {r.returncode}): {r.stderr.strip()}") from None


def stream_best(curl: str, url: str, size: int) -> tuple[float, list[float]]:
    """Best and all GB/s of STREAM_TRIES whole-file downloads; each must be a full 200."""
    runs = []
    for _ in range(STREAM_TRIES):
        c = curl_get(curl, url)
        if c.status != 200 or c.size != size:
            raise BenchError(f"stream {url}: got {c.status} with {c.size} of {size} bytes")
        runs.append(c.gbps)
    return max(runs), runs


@dataclass
class Wrk:
    """What we keep from one wrk run."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    bytes_read: float
    non_2xx: int
    socket_errors: int
    raw: str

    @property
    def bytes_per_request(self) -> float:
        """Average bytes read per response (headers included): ~16.3 KiB when ranges work."""
        return self.bytes_read / self.requests if self.requests else 0.0


UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
UNITS_B = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unknown wrk duration {text!r}")
    return float(m.group(1)) * UNITS_S[m.group(2)] * 1e3


def parse_wrk(out: str) -> Wrk:
    """Requests/s, p50, p99, totals and error counts from `wrk --latency` output."""

    def find(pattern: str) -> re.Match[str]:
        m = re.search(pattern, out, re.M)
        if not m:
            raise BenchError(f"unexpected wrk output (no {pattern!r}):\n{out}")
        return m

    total = find(r"(\d+) requests in [\d.]+\w+, ([\d.]+)([KMGT]?B) read")
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return Wrk(
        rps=float(find(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=_ms(find(r"^\s+50%\s+(\S+)").group(1)),
        p99_ms=_ms(find(r"^\s+99%\s+(\S+)").group(1)),
        requests=int(total.group(1)),
        bytes_read=float(total.group(2)) * UNITS_B[total.group(3)],
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(x) for x in sock.groups()) if sock else 0,
        raw=out,
    )


def ranges_script(work: Path, size: int, aligned: bool) -> Path:
    """A wrk Lua script sending `Range: bytes=a-b` for a random 16 KiB span per request.

    The seed is fixed, so every server gets the same sequence of ranges.
    """
    script = work / "ranges.lua"
    pick = "math.random(0, math.floor(span / len)) * len" if aligned else "math.random(0, span)"
    script.write_text(
        f"""-- generated by bench/run.py
local len = {RANGE_LEN}
local span = {size} - len
math.randomseed(42)
request = function()
  local a = {pick}
  local h = {{["Range"] = string.format("bytes=%.0f-%.0f", a, a + len - 1)}}
  return wrk.format(nil, nil, h)
end
"""
    )
    return script


def run_wrk(wrk: str, url: str, script: Path, duration: int) -> Wrk:
    """wrk -t1 -c32 for `duration` seconds with the ranges script."""
    argv = [wrk, "-t1", f"-c{CONCURRENCY}", f"-d{duration}s", "--timeout", "5s", "--latency"]
    r = subprocess.run(
        [*argv, "-s", str(script), url], capture_output=True, text=True, timeout=duration + 60
    )
    if r.returncode != 0:
        raise BenchError(f"wrk {url} failed (exit {r.returncode}):\n{r.stdout}{r.stderr}")
    return parse_wrk(r.stdout)


@dataclass
class MemPass:
    """The proxy's RSS over one download of the 1 GiB file."""

    label: str
    start_kib: int
    max_kib: int
    end_kib: int
    gbps: float

    @property
    def growth_mib(self) -> float:
        """Max minus start, MiB."""
        return (self.max_kib - self.start_kib) / 1024


def memory_pass(curl: str, proxy: Server, url: str, size: int, label: str) -> MemPass:
    """Download `url` through the proxy while sampling its VmRSS every 0.1 s."""
    assert proxy.proc is not None
    pid = proxy.proc.pid
    start = rss_kib(pid)
    if start is None:
        raise BenchError("proxy process is gone")
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            if (v := rss_kib(pid)) is not None:
                peak[0] = max(peak[0], v)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        c = curl_get(curl, url, timeout=300)
    finally:
        done.set()
        sampler.join(5)
    end = rss_kib(pid) or 0
    peak[0] = max(peak[0], end)
    if c.status != 200 or c.size != size:
        raise BenchError(f"memory pass {label}: got {c.status} with {c.size} of {size} bytes")
    return MemPass(label, start, peak[0], end, c.gbps)


# --- report -------------------------------------------------------------------------------


def cmd_out(argv: list[str]) -> str:
    """First line of a command's stdout+stderr (version strings), '?' if it fails."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (r.stdout + r.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


def machine_info(tools: dict[str, str]) -> dict[str, str]:
    """Machine, versions and date for the report header."""
    cpu = "?"
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else platform.processor() or "?"
    mem = "?"
    with contextlib.suppress(OSError, AttributeError):
        kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kib / MIB:.1f} GiB"
    rev = cmd_out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = cmd_out(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs ({cpu}), {mem} RAM, Linux {platform.release()}",
        "nginx": cmd_out([tools["nginx"], "-v"]).removeprefix("nginx version: "),
        "wrk": "wrk " + cmd_out([tools["wrk"], "-v"]).split()[1].removeprefix("debian/"),
        "curl": " ".join(cmd_out([tools["curl"], "--version"]).split()[:2]),
        "python": platform.python_version(),
        "fdp": rev + (" + uncommitted changes" if dirty not in ("", "?") else ""),
    }


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def dir_size(path: Path) -> tuple[int, int]:
    """(files, bytes) under a folder; fills in progress may vanish while we count."""
    count = size = 0
    for p in path.rglob("*") if path.exists() else []:
        try:
            if p.is_file():
                size += p.stat().st_size
                count += 1
        except FileNotFoundError:
            continue
    return count, size


@dataclass
class Results:
    """Everything measured in one run."""

    size: int
    duration: int
    aligned: bool
    stream: dict[str, tuple[float, list[float]]] = field(default_factory=dict)
    ranges: dict[str, Wrk] = field(default_factory=dict)
    memory: list[MemPass] = field(default_factory=list)
    warm_gbps: float = 0.0
    #: cold object through a cache miss, GB/s: direct or through fdp, from nginx or capped nginx
    cold: dict[str, float] = field(default_factory=dict)
    #: seconds to the first window of a cold 1 GiB COG, per try: direct and through fdp
    pixel: dict[str, list[float]] = field(default_factory=dict)
    cache_after_warm: tuple[int, int] = (0, 0)
    background: tuple[float, list[str]] = (0.0, [])
    others: dict[str, Others] = field(default_factory=dict)  # phase -> CPU used by others
    flags: list[str] = field(default_factory=list)


def check_flags(res: Results) -> None:
    """Note every figure that should not be trusted."""
    for phase, o in res.others.items():
        if o.cpus > BUSY_CPUS and o.seconds >= 1.0:  # shorter: tick counts are too coarse
            res.flags.append(
                f"{phase}: other processes kept {o.cpus:.2f} CPUs busy meanwhile "
                f"(top: {', '.join(o.top) or 'exited before the end'})"
            )
    for name, w in res.ranges.items():
        if w.non_2xx:
            res.flags.append(f"{name}: {w.non_2xx} of {w.requests} range responses were non-2xx")
        if w.socket_errors:
            res.flags.append(f"{name}: {w.socket_errors} socket errors during the range run")
        if w.requests and not RANGE_LEN <= w.bytes_per_request <= 2 * RANGE_LEN:
            res.flags.append(
                f"{name}: {w.bytes_per_request:.0f} bytes per range response on average "
                f"(expected ~{RANGE_LEN} + headers): ranges not honoured?"
            )


def render(res: Results, info: dict[str, str], wall: float) -> str:
    """The markdown report."""
    s, r, m = res.stream, res.ranges, res.memory
    ng, px, up = "nginx", "proxy", "upstream"
    lines = [
        "# fdp benchmark",
        "",
        f"- date: {info['date']}; wall time {wall:.0f} s",
        f"- machine: {info['machine']}; others' CPU use before the run: "
        f"{res.background[0]:.2f} CPUs"
        + (f" (top: {', '.join(res.background[1])})" if res.background[1] else ""),
        f"- versions: {info['nginx']}, {info['wrk']}, {info['curl']}, "
        f"Python {info['python']}, fdp {info['fdp']}",
        f"- file: {res.size / MIB:.0f} MiB of random bytes in the page cache; proxy dataset "
        "`http` upstream → demo upstream, `cache.block_size` 4MiB, `FDP_LOG_LEVEL=WARNING` "
        "(nginx: 1 process, sendfile, access_log off)",
        f"- proxy warm-up GET of the whole file: {res.warm_gbps:.2f} GB/s; cache store after "
        f"it: {res.cache_after_warm[0]} files, {res.cache_after_warm[1] / MIB:.0f} MiB"
        + ("" if res.cache_after_warm[0] else " (no cache yet: the proxy streams pass-through)"),
        f"- ranges: {RANGE_LEN // 1024} KiB at random {'aligned' if res.aligned else 'unaligned'} "
        f"offsets, `wrk -t1 -c{CONCURRENCY} -d{res.duration}s --latency`, same seed for all",
        "",
        "## Figures",
        "",
        "| figure | nginx | proxy | upstream direct | proxy / nginx | proxy / upstream |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    if s:
        lines.append(
            f"| whole-file stream, GB/s (best of {STREAM_TRIES}) | {s[ng][0]:.2f} | "
            f"{s[px][0]:.2f} | {s[up][0]:.2f} | {_ratio(s[px][0], s[ng][0])} | "
            f"{_ratio(s[px][0], s[up][0])} |"
        )
    if r:
        for label, attr, fmt in (
            ("16 KiB ranges, req/s", "rps", "{:.0f}"),
            ("16 KiB ranges, p50 ms", "p50_ms", "{:.2f}"),
            ("16 KiB ranges, p99 ms", "p99_ms", "{:.2f}"),
        ):
            v = {k: getattr(w, attr) for k, w in r.items()}
            lines.append(
                f"| {label} | {fmt.format(v[ng])} | {fmt.format(v[px])} | {fmt.format(v[up])} "
                f"| {_ratio(v[px], v[ng])} | {_ratio(v[px], v[up])} |"
            )
        lines.append(
            "| 16 KiB ranges, non-2xx / socket errors | "
            + " | ".join(f"{r[k].non_2xx} / {r[k].socket_errors}" for k in (ng, px, up))
            + " | | |"
        )
        if "lean" in r:
            lean = r["lean"]
            lines += [
                "",
                f"Ceiling for Python here: a minimal ASGI file server on the same uvicorn "
                f"(`bench/lean_asgi.py`: held fd, `os.pread`, no framework) did "
                f"{lean.rps:.0f} req/s, p99 {lean.p99_ms:.2f} ms = "
                f"{_ratio(lean.rps, r[ng].rps)} nginx; the proxy reached "
                f"{_ratio(r[px].rps, lean.rps)} of it.",
            ]
        if "proxy2" in r:
            two = r["proxy2"]
            lines += [
                "",
                f"`fdp serve --workers 2` (same cache, both CPUs): {two.rps:.0f} req/s, p99 "
                f"{two.p99_ms:.2f} ms = {_ratio(two.rps, r[px].rps)} of `--workers 1`, "
                f"{_ratio(two.rps, r[ng].rps)} nginx.",
            ]
    if s:
        lines += [
            "",
            "Stream runs, GB/s: "
            + "; ".join(f"{k} {', '.join(f'{x:.2f}' for x in s[k][1])}" for k in (ng, px, up)),
        ]
    if res.others:
        lines += [
            "",
            f"CPUs kept busy by other processes during each run (flagged above {BUSY_CPUS}): "
            + ", ".join(f"{k} {v.cpus:.2f}" for k, v in res.others.items()),
        ]
    if m:
        lines += [
            "",
            f"## Proxy memory while streaming a {MEM_FILE_MIB} MiB file (VmRSS every 0.1 s)",
            "",
            "| pass | GB/s | start RSS MiB | max RSS MiB | growth MiB | end RSS MiB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {p.label} | {p.gbps:.2f} | {p.start_kib / 1024:.0f} | {p.max_kib / 1024:.0f} "
            f"| {p.growth_mib:.0f} | {p.end_kib / 1024:.0f} |"
            for p in m
        ]
    c = res.cold
    if c:
        lines += [
            "",
            f"## Cache miss: a cold {COLD_MIB} MiB object, curl as the client",
            "",
            f"Writing {COLD_MIB} MiB to a new file just before (what a fill must do at least, "
            f"page cache only): {c['fresh write']:.2f} GB/s.",
            "",
            "| upstream | direct GB/s | through fdp GB/s | fdp / direct |",
            "|---|---:|---:|---:|",
            f"| nginx | {c['nginx direct']:.2f} | {c['fdp from nginx']:.2f} | "
            f"{_ratio(c['fdp from nginx'], c['nginx direct'])} |",
            f"| nginx, `limit_rate {CAPPED_RATE}` | {c['capped direct']:.3f} | "
            f"{c['fdp from capped']:.3f} | {_ratio(c['fdp from capped'], c['capped direct'])} |",
        ]
    px_ = res.pixel
    if px_:
        d, f = sorted(px_["nginx direct"]), sorted(px_["fdp (cold)"])
        lines += [
            "",
            "## Time to first pixel: a 512² window of a cold 1 GiB COG (GDAL, fresh process)",
            "",
            "| | median ms | runs, ms |",
            "|---|---:|---|",
            f"| nginx direct | {d[len(d) // 2] * 1000:.0f} | "
            + ", ".join(f"{v * 1000:.0f}" for v in px_["nginx direct"])
            + " |",
            f"| through fdp, cold | {f[len(f) // 2] * 1000:.0f} | "
            + ", ".join(f"{v * 1000:.0f}" for v in px_["fdp (cold)"])
            + " |",
        ]
    lines += ["", "## Targets (from the online-cache and fill-engine issues)", ""]
    lines += ["| target | measured | |", "|---|---|---|"]
    if s:
        q = s[px][0] / s[ng][0]
        lines.append(f"| whole-file stream ≥ 1.0x nginx | {q:.2f}x | {_met(q >= 1.0)} |")
    if r:
        q = r[px].rps / r[ng].rps
        lines.append(f"| 16 KiB ranges ≥ 0.5x nginx req/s | {q:.2f}x | {_met(q >= 0.5)} |")
        p99 = r[px].p99_ms
        lines.append(f"| 16 KiB ranges p99 ≤ 5 ms | {p99:.2f} ms | {_met(p99 <= 5.0)} |")
    if r and "lean" in r:
        q = r[px].rps / r["lean"].rps
        lines.append(
            f"| 16 KiB ranges ≥ 0.8x the minimal ASGI server | {q:.2f}x | {_met(q >= 0.8)} |"
        )
    if c:
        q = c["fdp from nginx"] / c["nginx direct"]
        lines.append(f"| cold miss ≥ 0.5x nginx direct | {q:.2f}x | {_met(q >= 0.5)} |")
        q = c["fdp from capped"] / c["capped direct"]
        lines.append(f"| cold miss ≥ 3x a capped nginx direct | {q:.2f}x | {_met(q >= 3.0)} |")
    if px_:
        q = f[len(f) // 2] / d[len(d) // 2]
        lines.append(
            f"| first pixel of a cold COG ≤ 1.5x nginx direct | {q:.2f}x | {_met(q <= 1.5)} |"
        )
    if m:
        g = max(p.growth_mib for p in m)
        lines.append(
            f"| memory flat (RSS growth < {FLAT_RSS_MIB} MiB over a {MEM_FILE_MIB} MiB stream, "
            f"every pass) | max {g:.0f} MiB | {_met(g < FLAT_RSS_MIB)} |"
        )
    lines += ["", "## Flags", ""]
    lines += [f"- WARNING: {f}" for f in res.flags] or ["- none: every probe and run answered 2xx"]
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------------


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """The whole benchmark; returns the exit status."""
    t0 = time.monotonic()
    tools = ensure_tools()
    log("checking that nothing else keeps the CPUs busy (2 s)")
    res_background = background_load()
    size = args.size_mib * MIB
    if size < 2 * RANGE_LEN:
        raise BenchError("--size-mib must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="fdp-bench-", dir=args.workdir))
    servers: dict[str, Server] = {}
    res = Results(size=size, duration=args.duration, aligned=args.aligned)
    res.background = res_background
    if res_background[0] > BUSY_CPUS:
        res.flags.append(
            f"other processes kept {res_background[0]:.2f} CPUs busy before the run "
            f"(top still running: {', '.join(res_background[1]) or 'none'}): on a "
            f"{os.cpu_count()}-CPU machine every figure is lower than it should be"
        )
    try:
        # nginx's worker may run as another user: every folder on the way must be readable.
        work.chmod(0o755)
        (work / "logs").mkdir()
        data = work / "data"
        big, mem = data / "big" / "big.bin", data / "big" / "mem.bin"
        log(f"work dir {work}; writing {args.size_mib} MiB + {MEM_FILE_MIB} MiB of random data")
        touch = work / "touch.bin"
        log(f"touching {TOUCH_MIB} MiB of memory first (written and freed)")
        with touch.open("wb") as f:
            for _ in range(TOUCH_MIB // 4):
                f.write(bytes(4 * MIB))
        touch.unlink()
        write_random(big, size)
        write_random(mem, MEM_FILE_MIB * MIB)
        cold = data / "big" / "cold0.bin"
        write_random(cold, COLD_MIB * MIB)
        os.link(cold, data / "big" / "cold1.bin")
        cold.chmod(0o644)
        log("writing a 1 GiB COG")
        cog = data / "big" / "cog.tif"
        write_cog(cog)
        cog.chmod(0o644)
        for i in range(PIXEL_TRIES):
            os.link(cog, data / "big" / f"cog{i}.tif")  # a cold object each time
        (data / "catalog.json").write_text('{"collections": {}}\n')  # no demo COGs, please
        for p in (data, data / "big"):
            p.chmod(0o755)
        for p in (big, mem):
            p.chmod(0o644)

        servers = make_servers(work, tools)
        for name in ("nginx", "upstream", "proxy", "lean"):  # proxy2 starts when its turn comes
            ready = "/healthz" if name == "proxy" else "/"
            servers[name].start(ready)
            log(f"{name} on 127.0.0.1:{servers[name].port} (pid {servers[name].proc.pid})")
        for name in (*SERVERS, "lean"):
            probe(servers[name], big, size)
        log("probes ok: 200 + Content-Length + bytes, 206 + Content-Range + bytes, everywhere")

        def url(name: str, path: str | None = None) -> str:
            return f"http://127.0.0.1:{servers[name].port}{path or servers[name].url}"

        log("warm-up: the whole file through the proxy")
        warm = curl_get(tools["curl"], url("proxy"), timeout=300)
        if warm.status != 200 or warm.size != size:
            raise BenchError(f"warm-up GET: got {warm.status} with {warm.size} of {size} bytes")
        res.warm_gbps = warm.gbps
        time.sleep(2)  # let the last blocks' commits land before measuring
        res.cache_after_warm = dir_size(work / "cache")

        pids = [s.proc.pid for s in servers.values() if s.proc is not None]
        for name in SERVERS:
            log(f"stream {name}: {STREAM_TRIES} whole-file GETs")
            with others_cpu(pids) as others:
                res.stream[name] = stream_best(tools["curl"], url(name), size)
            res.others[f"stream {name}"] = others

        script = ranges_script(work, size, args.aligned)
        for name in (*SERVERS, "lean"):
            log(f"ranges {name}: wrk for {args.duration}s")
            with others_cpu(pids) as others:
                res.ranges[name] = run_wrk(tools["wrk"], url(name), script, args.duration)
            res.others[f"ranges {name}"] = others
            (work / "logs" / f"wrk-{name}.txt").write_text(res.ranges[name].raw)
        two = servers["proxy2"]
        log("ranges proxy --workers 2: start, a 3 s warm-up run, then wrk")
        two.start("/healthz")
        try:
            run_wrk(tools["wrk"], url("proxy2"), script, 3)  # each worker opens its blocks
            assert two.proc is not None
            family = [*pids, two.proc.pid, *children(two.proc.pid)]
            with others_cpu(family) as others:
                res.ranges["proxy2"] = run_wrk(tools["wrk"], url("proxy2"), script, args.duration)
            res.others["ranges proxy --workers 2"] = others
        finally:
            two.stop()

        log(f"cache miss: a cold {COLD_MIB} MiB object, nginx and capped nginx, direct and via fdp")
        cold_size = COLD_MIB * MIB
        res.cold["fresh write"] = fresh_write_gbps(work / "fresh.bin", cold_size)
        for label, got in (
            ("nginx direct", f"http://127.0.0.1:{servers['nginx'].port}/big/cold0.bin"),
            ("fdp from nginx", url("proxy", "/assets/nginx/cold0.bin")),
            ("capped direct", f"http://127.0.0.1:{servers['nginx'].capped_port}/big/cold0.bin"),
            ("fdp from capped", url("proxy", "/assets/capped/cold1.bin")),
        ):
            c = curl_get(tools["curl"], got, timeout=300)
            if c.status != 200 or c.size != cold_size:
                raise BenchError(f"cold {label}: got {c.status} with {c.size} of {cold_size} bytes")
            res.cold[label] = c.gbps

        log("time to first pixel: a 1 GiB COG, fresh process each, nginx direct and via fdp")
        nginx_cog = f"http://127.0.0.1:{servers['nginx'].port}/big/cog.tif"
        res.pixel["nginx direct"] = [first_pixel(nginx_cog) for _ in range(PIXEL_TRIES)]
        res.pixel["fdp (cold)"] = [
            first_pixel(url("proxy", f"/assets/nginx/cog{i}.tif")) for i in range(PIXEL_TRIES)
        ]

        mem_url = url("proxy", "/assets/bench/mem.bin")
        for label in ("1st (cache miss: from upstream)", "2nd (cache hit when cached)"):
            log(f"memory: {MEM_FILE_MIB} MiB through the proxy, {label}")
            res.memory.append(
                memory_pass(tools["curl"], servers["proxy"], mem_url, MEM_FILE_MIB * MIB, label)
            )
        check_flags(res)
    except BenchError:
        for s in servers.values():
            if s.proc is not None:
                log(f"--- {s.name} log tail ---\n{s.tail()}")
        raise
    finally:
        for s in reversed(list(servers.values())):
            s.stop()
        if args.keep:
            log(f"kept the work dir {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    report = render(res, machine_info(tools), time.monotonic() - t0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)
    log(f"report written to {out}")
    if res.flags:
        log("some figures are flagged as untrustworthy: see the Flags section")
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, map failures to exit statuses."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=512, help="size of the test file (512)")
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run (10)")
    p.add_argument("--out", default=str(REPO / "bench" / "REPORT.md"), help="report file")
    p.add_argument("--aligned", action="store_true", help="16 KiB-aligned range offsets")
    p.add_argument("--workdir", default=None, help="parent of the work dir (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, wrk output)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        return run(args)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; servers stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
