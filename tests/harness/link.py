"""A poor link: a TCP relay to a loopback port that a test can throttle, cut and restore.

`Link(target_port)` listens on a port of its own (threads of the test process: it has no
state worth a process, and a test steers it directly). `rate` caps bytes per second each
way; `drop()` cuts every connection and refuses new ones until `restore()`; `cut_after(n)`
cuts connections once `n` more bytes went towards the client; `corrupt_after(n)` flips the
byte after `n` more towards the client. `delivered` counts bytes relayed from the target.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

SLICE = 16 * 1024


class Link:
    def __init__(self, target_port: int, rate: float | None = None) -> None:
        self.target = ("127.0.0.1", target_port)
        self.rate = rate
        self.up = True
        self.delivered = 0
        self.connections = 0
        self._cut_at: int | None = None
        self._flip_at: int | None = None
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True, name="link").start()

    def drop(self) -> None:
        """Cut every connection, and refuse new ones until `restore()`."""
        self.up = False
        self._cut_all()

    def restore(self) -> None:
        self.up = True

    def cut_after(self, n: int) -> None:
        """Cut the connections once `n` more bytes have gone towards the client."""
        with self._lock:
            self._cut_at = self.delivered + n

    def corrupt_after(self, n: int) -> None:
        """Flip one byte: the one after `n` more bytes towards the client."""
        with self._lock:
            self._flip_at = self.delivered + n

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self._cut_all()

    def _cut_all(self) -> None:
        with self._lock:
            conns, self._open = list(self._open), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self.up:
                client.close()  # (the far side is unreachable)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._open |= {client, server}
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, towards_client: bool) -> None:
        try:
            while data := src.recv(SLICE if self.rate is None else max(1, int(self.rate / 20))):
                started = time.monotonic()
                if towards_client:
                    with self._lock:
                        if self._cut_at is not None and self.delivered + len(data) > self._cut_at:
                            data = data[: max(0, self._cut_at - self.delivered)]
                            self._cut_at = -1
                        flip = self._flip_at
                        if flip is not None and self.delivered <= flip < self.delivered + len(data):
                            at = flip - self.delivered
                            data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
                            self._flip_at = None
                        self.delivered += len(data)
                dst.sendall(data)
                if self._cut_at == -1:
                    self._cut_at = None
                    self._cut_all()
                    return
                if self.rate is not None:
                    time.sleep(max(0.0, len(data) / self.rate - (time.monotonic() - started)))
        except OSError:
            pass
        finally:
            for conn in (src, dst):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
