"""Things that hang, for timeout tests: a server that never answers, a database held locked.

- `python -m tests.harness.stalls blackhole --port P`: accepts every TCP connection, reads
  and discards what is sent, never writes a byte. Stands in for a Redis, an S3 endpoint or
  any HTTP upstream that has stopped answering. Each accepted connection is logged, so a
  test can tell the stalled service was really asked.
- `python -m tests.harness.stalls lock-sqlite --db FILE --seconds N`: holds `BEGIN EXCLUSIVE`
  on a SQLite database for N seconds (another process: the lock is real), then commits.

Both run as `ServerProcess`es: started by pid, stopped by pid (`stop()`), logs in `log_dir`.
"""

from __future__ import annotations

import argparse
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the stalling processes start with the stdlib only
    from tests.harness.procs import ServerProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
LISTENING = "listening"
ACCEPTED = "accepted"
LOCKED = "locked"


# --- the processes' own side ----------------------------------------------------------------


def _blackhole(port: int) -> None:
    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    print(LISTENING, port, flush=True)
    held: list[socket.socket] = []  # keep every connection open for good

    def drain(conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass

    while True:
        conn, _ = listener.accept()
        held.append(conn)
        print(ACCEPTED, flush=True)
        threading.Thread(target=drain, args=(conn,), daemon=True).start()


def _lock_sqlite(db: Path, seconds: float) -> None:
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    print(LOCKED, flush=True)
    time.sleep(seconds)
    conn.execute("COMMIT")
    conn.close()
    print("released", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    hole = sub.add_parser("blackhole")
    hole.add_argument("--port", type=int, required=True)
    lock = sub.add_parser("lock-sqlite")
    lock.add_argument("--db", type=Path, required=True)
    lock.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(argv)
    if args.what == "blackhole":
        _blackhole(args.port)
    else:
        _lock_sqlite(args.db, args.seconds)


# --- the tests' side ------------------------------------------------------------------------


def _log_says(proc: ServerProcess, word: str) -> bool:
    return any(line.split(" ")[0] == word for line in proc.log_text().splitlines())


@dataclass
class Blackhole:
    """A running blackhole: point any client at `url` / `redis_url` and watch it hang."""

    port: int
    proc: ServerProcess

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def connections(self) -> int:
        """How many connections it has accepted so far."""
        return sum(line == ACCEPTED for line in self.proc.log_text().splitlines())

    def stop(self) -> None:
        self.proc.stop()


def start_blackhole(log_dir: Path) -> Blackhole:
    """Start a blackhole on a free loopback port; ready once it listens (no probe connects)."""
    from tests.harness.procs import ServerProcess
    from tests.harness.services import _start_with_retry, free_ports

    def make() -> tuple[ServerProcess, int]:
        (port,) = free_ports(1)
        argv = [sys.executable, "-m", "tests.harness.stalls", "blackhole", "--port", str(port)]
        holder: list[ServerProcess] = []
        proc = ServerProcess(
            f"blackhole-{port}-{time.monotonic_ns()}",
            argv,
            log_dir=log_dir,
            cwd=REPO_ROOT,
            ready=lambda: _log_says(holder[0], LISTENING),
            timeout=15,
            grace=2,
        )
        holder.append(proc)
        return proc, port

    proc, port = _start_with_retry(make)
    return Blackhole(port, proc)


def hold_sqlite_lock(db: Path, seconds: float, log_dir: Path) -> ServerProcess:
    """Lock `db` (BEGIN EXCLUSIVE) in another process for `seconds`; returns once it holds.

    `stop()` ends the process early (the lock goes with it); `proc.proc.wait()` waits for
    the natural release. Hold it for more than a few tenths of a second: a holder that is
    already gone when its readiness is first checked counts as failed to start.
    """
    from tests.harness.procs import ServerProcess

    holder: list[ServerProcess] = []
    argv = [
        sys.executable,
        "-m",
        "tests.harness.stalls",
        "lock-sqlite",
        "--db",
        str(db),
        "--seconds",
        str(seconds),
    ]
    proc = ServerProcess(
        f"sqlite-lock-{Path(db).name}-{time.monotonic_ns()}",
        argv,
        log_dir=log_dir,
        cwd=REPO_ROOT,
        ready=lambda: _log_says(holder[0], LOCKED),
        timeout=15,
        grace=2,
    )
    holder.append(proc)
    return proc.start()


if __name__ == "__main__":
    main()
