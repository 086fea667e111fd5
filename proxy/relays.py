"""The relay directory: relays register and heartbeat here; `delivery: relay` datasets send
clients (302) to a live relay that holds the object, and serve it themselves otherwise.

Kept in this process's memory, bounded (`relays.max_relays`, and what each relay reports),
dropped when heartbeats stop. A relay is told which of its datasets it carries and which
objects to prefetch: the most requested ones here that fit its disk budget.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from policies.config import RelaysConfig
from proxy.auth import Forbidden, Unauthorized, identity
from proxy.problems import BadRequest
from upstreams.base import quote_key
from upstreams.registry import Registry

#: objects a relay may report holding, and requested objects remembered for prefetching
MAX_HELD, MAX_POPULAR = 100_000, 10_000


class Held(BaseModel):
    model_config = ConfigDict(extra="ignore")
    dataset: str
    path: str
    size: int = Field(ge=0)


class Heartbeat(BaseModel):
    """What a relay says of itself at each heartbeat."""

    model_config = ConfigDict(extra="forbid")
    url: AnyHttpUrl
    datasets: list[str] | None = None  # the ones it will carry (None: any)
    disk_bytes: int = Field(ge=0)
    bandwidth_bytes_per_second: int | None = Field(None, ge=0)
    load: int = Field(0, ge=0)  # responses it is sending now
    held: list[Held] = Field([], max_length=MAX_HELD)


@dataclass
class Relay:
    url: str
    subject: str
    disk_bytes: int
    bandwidth: int | None
    load: int
    held: set[tuple[str, str]]
    seen: float  # monotonic
    assigned: list[str] = field(default_factory=list)
    sent: int = 0  # clients sent to it

    def public(self, now: float) -> dict[str, Any]:
        return {
            "url": self.url,
            "subject": self.subject,
            "datasets": self.assigned,
            "disk_bytes": self.disk_bytes,
            "bandwidth_bytes_per_second": self.bandwidth,
            "load": self.load,
            "objects": len(self.held),
            "seconds_since_heartbeat": round(now - self.seen, 1),
            "clients_sent": self.sent,
        }


class Directory:
    def __init__(self, registry: Registry, settings: RelaysConfig) -> None:
        self.registry = registry
        self.settings = settings
        self.relays: dict[str, Relay] = {}
        #: (dataset, path) -> [requests, size]
        self.popular: dict[tuple[str, str], list[int]] = {}

    def live(self) -> list[Relay]:
        """Relays heard from lately; the others are dropped."""
        now = time.monotonic()
        for url in [
            u for u, r in self.relays.items() if now - r.seen > self.settings.expire_seconds
        ]:
            del self.relays[url]
        return list(self.relays.values())

    def relay_datasets(self) -> list[str]:
        return [n for n, e in self.registry.entries.items() if e.policy.delivery == "relay"]

    def heartbeat(self, subject: str, beat: Heartbeat) -> dict[str, Any]:
        """Register or refresh a relay; what it should carry and prefetch."""
        url = str(beat.url).rstrip("/")
        self.live()
        if url not in self.relays and len(self.relays) >= self.settings.max_relays:
            raise BadRequest("the relay directory is full")
        offered = beat.datasets
        # public relay datasets only: a relay does not check callers' tokens
        mine = [
            n
            for n in self.relay_datasets()
            if self.registry.entries[n].policy.access.public and (offered is None or n in offered)
        ]
        relay = Relay(
            url,
            subject,
            beat.disk_bytes,
            beat.bandwidth_bytes_per_second,
            beat.load,
            {(h.dataset, h.path) for h in beat.held if h.dataset in mine},
            time.monotonic(),
        )
        old = self.relays.get(url)
        relay.sent = old.sent if old else 0
        relay.assigned = mine
        self.relays[url] = relay
        return {
            "url": url,
            "heartbeat_seconds": self.settings.heartbeat_seconds,
            "expire_seconds": self.settings.expire_seconds,
            "datasets": mine,
            "prefetch": self._prefetch(relay),
        }

    def _prefetch(self, relay: Relay) -> list[dict[str, Any]]:
        """The most requested objects of its datasets it does not hold, within its disk."""
        room = relay.disk_bytes
        out = []
        ranked = sorted(self.popular.items(), key=lambda kv: -kv[1][0])
        for (dataset, path), (_, size) in ranked:
            if len(out) >= self.settings.prefetch_objects:
                break
            if dataset not in relay.assigned or (dataset, path) in relay.held or size > room:
                continue
            room -= size
            out.append({"dataset": dataset, "path": path, "size": size})
        return out

    def requested(self, dataset: str, path: str, size: int | None) -> None:
        """Count a request of a relay dataset's object (bounded: the rarest go first)."""
        key = (dataset, path)
        seen = self.popular.get(key)
        if seen is None:
            if len(self.popular) >= MAX_POPULAR:
                keep = sorted(self.popular.items(), key=lambda kv: -kv[1][0])[: MAX_POPULAR // 2]
                self.popular = dict(keep)
            seen = self.popular[key] = [0, 0]
        seen[0] += 1
        if size is not None:
            seen[1] = size

    def choose(self, dataset: str, path: str) -> str | None:
        """The URL of the object at the least loaded live relay that holds it (load per
        declared bandwidth), or None: serve it here."""
        found = [r for r in self.live() if dataset in r.assigned and (dataset, path) in r.held]
        if not found:
            return None
        random.shuffle(found)  # equals share
        best = min(found, key=lambda r: (r.load + 1) / (r.bandwidth or 1))
        best.sent += 1
        best.load += 1  # until its next heartbeat says how busy it is
        return f"{best.url}/assets/{dataset}/{quote_key(path)}"

    def public(self) -> list[dict[str, Any]]:
        """The live relays (read only: metrics call it from a thread)."""
        now = time.monotonic()
        relays = list(self.relays.values())
        return [r.public(now) for r in relays if now - r.seen <= self.settings.expire_seconds]


async def relay_heartbeat(request: Request) -> Response:
    """`POST /admin/relays`: a relay-scoped token (or an admin's) registers a relay."""
    directory: Directory = request.app.state.relays
    who = await identity(request)
    settings = request.app.state.settings
    if who.subject is None:
        raise Unauthorized("relays register with a bearer token", invalid=False)
    if settings.auth.relay_scope not in who.scopes and not who.admin:
        raise Forbidden(f"registering a relay needs the {settings.auth.relay_scope!r} scope")
    try:
        beat = Heartbeat.model_validate_json(await request.body())
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the body"
        raise BadRequest(f"{where}: {first['msg']}") from None
    return JSONResponse(
        directory.heartbeat(who.subject, beat), headers={"cache-control": "no-store"}
    )


async def list_relays(request: Request) -> Response:
    """`GET /admin/relays` (admins): the live relays."""
    return JSONResponse({"relays": request.app.state.relays.public()})


routes = [
    Route("/admin/relays", relay_heartbeat, methods=["POST"]),
    Route("/admin/relays", list_relays, methods=["GET"]),
]
