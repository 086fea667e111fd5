"""One request to `/assets` as it moves through the pipeline, and the plan made for it.

Every stage reads and fills the same `Exchange`: the request, who asked, the dataset and
the object, the plan (decided before a byte is sent) and the outcome that `account` logs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

from starlette.types import Message, Scope, Send

from cache.store import ObjectRecord, object_key
from policies.qos import Applied, Standing
from proxy.auth import ANONYMOUS, Identity
from proxy.conditional import WHOLE, Selection
from proxy.problems import BadRequest
from upstreams.base import UpstreamObject
from upstreams.registry import Entry

#: Request headers the pipeline reads; all others are ignored (and never forwarded).
READ_HEADERS = {
    b"range": "range",
    b"if-range": "if_range",
    b"if-match": "if_match",
    b"if-none-match": "if_none_match",
    b"if-modified-since": "if_modified_since",
    b"if-unmodified-since": "if_unmodified_since",
    b"prefer": "prefer",
    b"authorization": "authorization",
    b"via": "via",
}


class Kind(StrEnum):
    """How a request is delivered."""

    HIT = "hit"  # every byte from the cache (or no body: HEAD, 304, 412)
    MISS = "miss"  # some blocks are filled from the upstream while they stream
    SLOW = "slow"  # an archive: a retrieval job, then the cache
    PRESIGN = "presign"  # 307 to a presigned object-store URL
    REDIRECT = "redirect"  # 307 to the provider's own href
    RELAY = "relay"  # 302 to a registered relay that holds it
    PASSTHROUGH = "pass-through"  # relayed from the upstream, nothing kept


#: The kinds that ask the upstream for bytes: they count against miss budgets.
MISSES = frozenset({Kind.MISS, Kind.SLOW, Kind.PASSTHROUGH})


@dataclass(slots=True)
class Plan:
    kind: Kind
    selection: Selection = WHOLE
    record: ObjectRecord | None = None
    location: str | None = None


@dataclass(slots=True, eq=False)
class Exchange:
    method: str
    path: str
    client: str | None
    started: float
    range: str | None = None
    if_range: str | None = None
    if_match: str | None = None
    if_none_match: str | None = None
    if_modified_since: str | None = None
    if_unmodified_since: str | None = None
    prefer: str | None = None
    authorization: str | None = None
    via: str | None = None  # the proxies (fdps) it came through
    conditional: bool = False  # any If-* header
    dataset: str = ""
    rel: str = ""
    who: Identity = ANONYMOUS
    entry: Entry | None = None
    obj: UpstreamObject | None = None
    plan: Plan | None = None
    applied: list[Applied] | None = None  # the QoS limits it falls under
    standing: Standing | None = None  # the tightest QoS budget it was admitted under
    status: int = 0
    sent: int = 0
    #: bytes fetched upstream for it, when not what it sent (a miss fetches whole blocks)
    fetched: int | None = None
    error: str | None = None
    #: a header every response to it carries (a mirror set's `Link: rel=duplicate`)
    link: tuple[bytes, bytes] | None = None

    @classmethod
    def start(cls, scope: Scope) -> Exchange:
        client = scope.get("client")
        return cls(scope["method"], scope["path"], client[0] if client else None, time.monotonic())

    def read_headers(self, scope: Scope) -> None:
        """Take the headers the pipeline needs; refuse what would break further on.

        Values are stripped of surrounding white space and must be ASCII (they may be
        forwarded upstream); a second Authorization header is refused, never guessed at.
        """
        for name, raw in scope["headers"]:
            field = READ_HEADERS.get(name)
            if field is None:
                continue
            if getattr(self, field) is not None:
                if field == "authorization":
                    raise BadRequest("more than one Authorization header")
                if field == "via" and raw.isascii():  # a list: every hop counts
                    self.via = f"{self.via}, {raw.decode('ascii').strip()}"
                continue  # the first one counts
            if not raw.isascii():
                raise BadRequest(f"the {name.decode()} header must be ASCII")
            setattr(self, field, raw.decode("ascii").strip())
            if field.startswith("if_"):
                self.conditional = True

    @property
    def cache_key(self) -> str:
        return object_key(self.dataset, self.rel)

    def tracking(self, send: Send) -> Send:
        """`send`, noting the status and counting the body bytes that went out."""

        async def tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
            else:
                self.sent += len(message.get("body", b""))
            await send(message)

        return tracked

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started
