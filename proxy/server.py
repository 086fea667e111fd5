"""uvicorn's httptools protocol with the two limits it lacks: header size and header time.

httptools buffers a header of any size, and uvicorn waits for headers for as long as a
client dribbles them. Both let one client hold memory or connections: a request whose
headers exceed `server.max_header_bytes` gets 431 and is closed, and one that has not sent
its headers within `server.request_timeout` (or pauses that long inside a body) is closed.
The deadlines cost a clock read per request: one sweep a second closes the late ones.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class LimitedProtocol(HttpToolsProtocol):
    """uvicorn's `http="proxy.server:LimitedProtocol"`; `limit()` sets the numbers (in
    every worker process, where the app factory runs)."""

    max_header_bytes = 64 * 1024
    timeout = 10.0
    _sweepers: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}

    @classmethod
    def limit(cls, max_header_bytes: int, timeout: float) -> None:
        cls.max_header_bytes, cls.timeout = max_header_bytes, timeout

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_headers = True
        self._header_bytes = 0
        self._tail = b""  # the last bytes read while in headers (a split `\r\n\r\n`)
        #: when the request being read last made progress; None between requests
        self._since: float | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._since = self.loop.time()  # a connection that never sends a byte times out too
        if self.loop not in self._sweepers:
            self._sweepers[self.loop] = self.loop.create_task(self._sweep(self.connections))

    def data_received(self, data: bytes) -> None:
        if self._in_headers:
            # only the bytes up to the end of the headers count (a body may come along)
            end = (self._tail + data).find(b"\r\n\r\n")
            self._header_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._tail))
            self._tail = (self._tail + data)[-3:]
            if self._header_bytes > self.max_header_bytes:
                self._refuse()
                return
            if self._since is None:
                self._since = self.loop.time()  # the next request on a kept-alive connection
        elif self._since is not None:
            self._since = self.loop.time()  # a body may take long, but not pause for long
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._in_headers, self._header_bytes, self._tail = False, 0, b""
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._since = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._in_headers = True

    def _refuse(self) -> None:
        body = b"request headers too large"
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()

    @classmethod
    async def _sweep(cls, connections: set[Any]) -> None:
        """Close connections whose request has made no progress within `timeout`."""
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                await asyncio.sleep(min(1.0, cls.timeout / 2))
                now = asyncio.get_running_loop().time()
                for conn in list(connections):
                    since = getattr(conn, "_since", None)
                    if since is not None and now - since > cls.timeout:
                        conn._since = None
                        if not conn.transport.is_closing():
                            conn.transport.close()
