"""Running as a relay of another fdp (`fdp serve --relay-of URL`).

The relay heartbeats to the directory's `POST /admin/relays` with what it holds, its disk
budget (`cache.max_bytes`) and bandwidth; the directory answers with the datasets it is to
carry and the objects to prefetch. Carried datasets are served from this fdp's cache with
the directory as their upstream (`fdp` kind, so `Via` keeps the directory from sending the
relay's own fetches back to it). The cache's LRU under `cache.max_bytes` drops the least
used objects, and its scrub expunges any whose blocks no longer match their sha-256; the
next heartbeat no longer lists them, so the directory stops sending clients for them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import httpx

from cache.store import Store
from policies.config import Access, Dataset, Settings
from policies.upstream import FdpUpstream, Upstream
from proxy.relays import MAX_HELD
from upstreams.base import quote_key
from upstreams.registry import Entry, Registry

log = logging.getLogger("fdp.relay")

#: seconds between heartbeats until the directory says otherwise; between failure logs
FIRST_HEARTBEAT, LOG_INTERVAL = 5.0, 60.0


def held_objects(store: Store | None) -> list[dict[str, Any]]:
    """The complete objects in the cache (blocking: run it in a thread)."""
    if store is None:
        return []
    out = []
    for record in store.records():
        if record.complete:
            out.append({"dataset": record.dataset, "path": record.path, "size": record.size})
            if len(out) >= MAX_HELD:
                break
    return out


class Relay:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        store: Store | None,
        load: Callable[[], int],
    ) -> None:
        assert settings.relay.directory is not None
        self.settings = settings
        self.directory = str(settings.relay.directory).rstrip("/")
        self.own = str(settings.server.public_url).rstrip("/")
        self.registry = registry
        self.store = store
        #: how many responses this fdp is sending now
        self.load = load
        #: the datasets it carries, each with the entry it made (a policy may replace one)
        self.carried: dict[str, Entry] = {}
        self.prefetching: set[tuple[str, str]] = set()
        self._logged = 0.0

    def carry(self, datasets: list[str]) -> None:
        """Serve the datasets the directory assigns (from it), stop serving the others."""
        upstream = Upstream(fdp=FdpUpstream(base_url=self.directory))  # type: ignore[arg-type]
        for name in datasets:
            if name not in self.carried and name not in self.registry.entries:
                ds = Dataset(upstream=upstream, access=Access(public=True))
                self.carried[name] = self.registry.build(name, ds)
                self.registry.apply(name, ds, self.carried[name])
                log.info("relay: carrying %s", name)
        for name in set(self.carried) - set(datasets):
            if self.registry.entries.get(name) is self.carried.pop(name):  # still ours
                self.registry.apply(name, None)
            log.info("relay: no longer carrying %s", name)

    async def beat(self, client: httpx.AsyncClient) -> dict[str, Any] | None:
        """One heartbeat; the directory's answer, or None when it could not be had."""
        relay = self.settings.relay
        body = {
            "url": self.own,
            "disk_bytes": int(self.settings.cache.max_bytes),
            "bandwidth_bytes_per_second": relay.bandwidth_bytes_per_second,
            "load": self.load(),
            "held": await anyio.to_thread.run_sync(held_objects, self.store),
        }
        token = relay.bearer()
        headers = {"authorization": f"Bearer {token}"} if token else {}
        try:
            r = await client.post(f"{self.directory}/admin/relays", json=body, headers=headers)
            if r.status_code == 200:
                return r.json()  # type: ignore[no-any-return]
            problem = f"answered {r.status_code}"
        except (httpx.HTTPError, ValueError) as e:
            problem = type(e).__name__
        if time.monotonic() - self._logged > LOG_INTERVAL:
            self._logged = time.monotonic()
            log.warning("relay: heartbeat to %s failed: %s", self.directory, problem)
        return None

    async def prefetch(self, client: httpx.AsyncClient, item: dict[str, Any]) -> None:
        """Fetch one object through this fdp, so it lands in the cache."""
        key = (item["dataset"], item["path"])
        try:
            url = f"{self.own}/assets/{item['dataset']}/{quote_key(item['path'])}"
            async with client.stream("GET", url) as r:
                async for _ in r.aiter_raw():
                    pass
        except httpx.HTTPError as e:
            log.warning("relay: prefetch of %s/%s failed: %s", *key, type(e).__name__)
        finally:
            self.prefetching.discard(key)

    async def run(self, client: httpx.AsyncClient) -> None:
        """Heartbeat for as long as the server runs, prefetching what the directory asks."""
        every = FIRST_HEARTBEAT
        limiter = anyio.CapacityLimiter(self.settings.relay.prefetch_concurrency)

        async def bounded(item: dict[str, Any]) -> None:
            async with limiter:
                await self.prefetch(client, item)

        async with anyio.create_task_group() as tg:
            while True:
                answer = await self.beat(client)
                if answer is not None:
                    every = float(answer.get("heartbeat_seconds", every))
                    self.carry(list(answer.get("datasets", [])))
                    for item in answer.get("prefetch", []):
                        key = (item["dataset"], item["path"])
                        served = item["dataset"] in self.registry.entries
                        if served and key not in self.prefetching:
                            self.prefetching.add(key)
                            tg.start_soon(bounded, item)
                await anyio.sleep(every)
