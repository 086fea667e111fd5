"""Start real servers on free loopback ports and stop them by their own pid."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

PYTHON = sys.executable
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=1.0).status_code < 500
        except httpx.HTTPError:
            return False

    return check


class ServerProcess:
    """One server subprocess: its own process group, a log file, a readiness probe.

    `stop()` signals the process group of the pid we started (SIGTERM, then SIGKILL after
    `grace`): the server and its own children (uvicorn workers), nothing else. Servers are
    started through `setpriv --pdeathsig KILL` from the main thread, so they die with the
    test process even when pytest itself is killed and no finaliser runs.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_dir: Path,
        ready: Callable[[], bool],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = 30.0,
        grace: float = 5.0,
        stop_signal: int = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            self.argv = [setpriv, "--pdeathsig", "KILL", "--", *self.argv]
        self.log_path = Path(log_dir) / f"{name}.log"
        self.ready = ready
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.timeout = timeout
        self.grace = grace
        self.stop_signal = stop_signal
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}"
                )
            if self.ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"{self.name} not ready after {self.timeout}s:\n{self.log_text()[-4000:]}"
        )

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # its own session: the group id is its pid

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self._signal(self.stop_signal)
        try:
            code = self.proc.wait(self.grace)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            code = self.proc.wait(self.grace)
        self._signal(signal.SIGKILL)  # children that outlived their parent
        return code

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> ServerProcess:
        if self.proc is not None and self.proc.poll() is None:
            return self  # (started already, by a helper that retries a taken port)
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def worker_process(
    config: str | os.PathLike[str], log_dir: Path, name: str = "worker"
) -> ServerProcess:
    """`fdp worker --config FILE`, not started (it listens on no port: ready at once)."""
    return ServerProcess(
        name, [BIN / "fdp", "worker", "--config", config], log_dir=log_dir, ready=lambda: True
    )
