"""What the demo provider keeps: its catalogue, the requests it saw, the faults it is told
to inject, and the staging and orders under way."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Fault:
    """One injected misbehaviour for requests whose path matches `match` (a regex).

    The first fault that applies to a request is used (and its `times` counted down).
    """

    match: str
    method: str | None = None
    #: answer this status with `body` instead of the file (200 here makes a "successful"
    #: error page: a HEAD then says the error body's length, 26 bytes by default)
    status: int | None = None
    body: str = '{"error":"injected fault"}'
    delay: float = 0.0
    cut_after: int | None = None
    #: a 206 whose Content-Length and body are this many bytes short of its Content-Range
    short_by: int = 0
    corrupt: bool = False  # flip the first byte of every chunk sent
    chunk_delay: float = 0.0  # pause after every chunk (a slow link)
    ignore_range: bool = False  # answer a Range request with 200 and the whole body
    head_length: int | None = None  # a HEAD claims this Content-Length (a lying HEAD)
    #: answer 302 (or `status`, if a 3xx) to this URL; `{path}` is replaced by the request path
    redirect: str | None = None
    #: apply only to requests whose Authorization header is exactly this value ...
    authorization: str | None = None
    no_authorization: bool = False  # ... or only to requests that carry none
    #: the object changed upstream: another ETag and Last-Modified, every byte inverted
    changed: bool = False
    times: int | None = None

    def applies(self, method: str, path: str, authorization: str | None = None) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.method and self.method.upper() != method:
            return False
        if self.authorization is not None and authorization != self.authorization:
            return False
        if self.no_authorization and authorization is not None:
            return False
        return re.search(self.match, path) is not None


def changed_bytes(data: bytes) -> bytes:
    """What a `changed` fault serves instead of `data` (the same at every offset)."""
    return data.translate(_INVERT)


_INVERT = bytes(255 - i for i in range(256))


@dataclass
class State:
    root: Path
    catalog: dict[str, Any]
    log: list[dict[str, Any]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    staged_at: dict[str, float] = field(default_factory=dict)
    ordered_at: dict[str, float] = field(default_factory=dict)
    #: where asset hrefs point (another server's URL: a catalogue whose data lives elsewhere)
    asset_base: str | None = None

    def take_fault(self, method: str, path: str, authorization: str | None = None) -> Fault | None:
        for f in self.faults:
            if f.applies(method, path, authorization):
                if f.times is not None:
                    f.times -= 1
                return f
        return None


def order_status(state: State, cid: str, iid: str) -> str | None:
    """None for items that are always online, else orderable / ordered / succeeded."""
    delay = state.catalog["collections"][cid].get("order_delay")
    if delay is None:
        return None
    ordered = state.ordered_at.get(f"{cid}/{iid}")
    if ordered is None:
        return "orderable"
    return "succeeded" if time.monotonic() >= ordered + delay else "ordered"
