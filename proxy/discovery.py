"""Harvest announcements: look through datasets' catalogues now and then, and announce what
is new there.

An object is new when its name was not in the dataset's catalogue at an earlier look (the
first look only learns what is there, and so does a look after more than the announcement
window without one: the names kept have expired). One process looks at a time (a lease).

A new object is announced with Sarracenia's `cod` identity (calculate on download,
sha-512): nobody has read it yet, so its checksum is unknown here; the fill that follows a
first read announces it again with its sha-512. The names seen are kept in the announcement
log, each for the announcement window after it was last seen.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import unquote

import anyio
import anyio.to_thread

from cache.feed import Notice
from policies.config import HarvestConfig
from proxy.feed import Feed, lease_owner, release
from proxy.stac.catalog import Catalog
from proxy.stac.query import Search
from upstreams.registry import Entry, Registry

log = logging.getLogger("fdp.feed")

PAGE = 100
ROLE = "harvest"


class Harvester:
    def __init__(
        self,
        config: HarvestConfig,
        registry: Registry,
        feed: Feed,
        public_url: str,
        timeout: float,
        keep_seconds: float,
    ) -> None:
        self.config, self.registry, self.feed = config, registry, feed
        self.keep_seconds = keep_seconds
        self.owner = lease_owner()
        self.public_url = public_url
        #: a listing is read once a look, not once a page
        memo = min(60.0, config.every_seconds / 2)
        self.catalog = Catalog(f"{public_url}/stac", public_url, memo, timeout)
        #: what `/status` shows
        self.looks = self.found = 0
        self.error: str | None = None

    def public(self) -> dict[str, Any]:
        return {
            "datasets": self.config.datasets,
            "looks": self.looks,
            "found": self.found,
            "error": self.error,
        }

    async def run(self) -> None:
        try:
            while True:
                await self._round()
        finally:
            await release(self.feed.log, ROLE, self.owner)  # (only if it is this one's)

    async def _round(self) -> None:
        """One look at every dataset, if this process holds the lease."""
        errors = []
        try:
            lease = self.config.every_seconds * 3
            held = await anyio.to_thread.run_sync(self.feed.log.lease, ROLE, self.owner, lease)
        except Exception as e:  # the log: the next round tries again
            held, errors = False, [f"{type(e).__name__}: {e}"]
        for name in self.config.datasets if held else ():  # (else another process looks)
            entry = self.registry.entries.get(name)
            if entry is None:
                continue
            try:
                self.found += await self.look(entry)
            except Exception as e:  # the provider, the log: the next look tries again
                errors.append(f"{name}: {type(e).__name__}: {e}")
                log.warning("harvest: %s", errors[-1])
        self.error = "; ".join(errors) or None
        self.looks += held
        await anyio.sleep(self.config.every_seconds)

    async def look(self, entry: Entry) -> int:
        """Read the catalogue (up to `max_items` objects) and announce the names new there;
        returns how many were announced."""
        found: dict[str, Notice] = {}
        cursor = None
        now = time.time()
        while len(found) < self.config.max_items:
            items, cursor, failed = await self.catalog.page(entry, Search(limit=PAGE), cursor)
            if failed:
                raise failed[0][1]  # (a partial catalogue would make its missing part new)
            for item in items:
                for asset in item.get("assets", {}).values():
                    notice = self._notice(entry.name, item, asset, now)
                    if notice is not None:
                        found[notice.path] = notice
            if cursor is None:
                break
        role = f"{ROLE}:{entry.name}"
        last = await anyio.to_thread.run_sync(self.feed.log.mark, role)
        new = await anyio.to_thread.run_sync(self.feed.log.known, entry.name, list(found))
        await anyio.to_thread.run_sync(self.feed.log.mark, role, str(now))
        if last is None or float(last) < now - self.keep_seconds:
            return 0  # a first look: it only learns what is there
        announced = 0
        for path in new:
            entry_id = await anyio.to_thread.run_sync(self.feed.log.append, found[path])
            if entry_id is not None:
                announced += 1
                self.feed.announced(found[path])
        if announced:
            log.info("harvest of %s: %d new objects announced", entry.name, announced)
        return announced

    def _notice(self, dataset: str, item: dict, asset: Any, now: float) -> Notice | None:
        """An asset of ours as a `cod` notice (size -1: unknown)."""
        prefix = f"{self.public_url}/assets/{dataset}/"
        href = asset.get("href") if isinstance(asset, dict) else None
        if not isinstance(href, str) or not href.startswith(prefix):
            return None
        size = asset.get("file:size")
        media = asset.get("type")
        return Notice(
            dataset,
            unquote(href[len(prefix) :]),
            size if isinstance(size, int) and size >= 0 else -1,
            "",
            now,
            now,
            media if isinstance(media, str) else None,
        )
