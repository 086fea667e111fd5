"""uvicorn's httptools protocol with the two limits it lacks: header size and header time.

httptools buffers a header of any size, and uvicorn waits for headers for as long as a
client dribbles them. Both let one client hold memory or connections: a request whose
headers exceed `server.max_header_bytes` gets 431 and is closed, and one that has not sent
its headers within `server.request_timeout` (or pauses that long inside a body) is closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class LimitedProtocol(HttpToolsProtocol):
    """uvicorn's `http="proxy.server:LimitedProtocol"`; `limit()` sets the numbers (in
    every worker process, where the app factory runs)."""

    max_header_bytes = 64 * 1024
    timeout = 10.0

    @classmethod
    def limit(cls, max_header_bytes: int, timeout: float) -> None:
        cls.max_header_bytes, cls.timeout = max_header_bytes, timeout

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_headers = True
        self._header_bytes = 0
        self._reading = False
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._reading_headers:
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                self._refuse()
                return
        elif self._reading:
            self._arm()  # a body may take long, but not pause for long
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_headers, self._reading = True, True
        if self._deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._reading_headers, self._header_bytes = False, 0
        super().on_headers_complete()  # the deadline armed at the start still runs

    def on_message_complete(self) -> None:
        self._reading = False
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._reading_headers, self._header_bytes = True, 0

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if (self._reading_headers or self._reading) and not self.transport.is_closing():
            self.transport.close()

    def _refuse(self) -> None:
        self._disarm()
        body = b"request headers too large"
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()
