"""A recording TCP front: relays bytes to a server and keeps what clients sent.

Put in front of the object store so a test can prove what the store was sent (for
instance, never the user's Authorization header). Byte-level, so it changes nothing.
"""

from __future__ import annotations

import socket
import threading


class RecordingFront:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = bytearray()  # everything clients sent, all connections
        self.lock = threading.Lock()
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    with self.lock:
                        self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def requests(self) -> list[str]:
        """The request lines seen so far (method and target)."""
        with self.lock:
            text = self.sent.decode("latin-1")
        return [
            line
            for line in text.split("\r\n")
            if line.split(" ")[0] in ("GET", "HEAD", "PUT") and line.endswith("HTTP/1.1")
        ]

    def close(self) -> None:
        self.listener.close()
