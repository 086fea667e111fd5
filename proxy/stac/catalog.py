"""Pages of one dataset's items: from its provider's search, or generated from a listing.

A provider's answer to one page is reused for `stac.cache_seconds` (searches are slow and
clients page back and forth), and each call is bounded by `stac.timeout_seconds`. A CQL2
`filter` is applied here to each page, so a page may hold fewer items than `limit`.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import Any

import anyio

from proxy.stac import documents
from proxy.stac.query import Cursor, Search, matches
from upstreams.base import Listed, Listing, Searchable, UpstreamTimeout
from upstreams.memo import Memo
from upstreams.registry import Entry

#: provider pages (and listings) kept at most, and the largest page kept (so at most 64 MiB)
MEMO_SIZE, MEMO_PAGE_BYTES = 256, 256 << 10
#: provider pages one filtered page may read while looking for a match
FILTER_PAGES = 10


class Catalog:
    def __init__(self, root: str, public: str, cache_seconds: float, timeout: float) -> None:
        self.root, self.public, self.timeout = root, public, timeout
        self._pages: Memo[tuple[str, str], Any] = Memo(MEMO_SIZE, max(cache_seconds, 1e-3))
        self.caching = cache_seconds > 0
        self._locks: dict[str, asyncio.Lock] = {}

    async def page(
        self, entry: Entry, search: Search, cursor: Cursor | None
    ) -> tuple[list[dict[str, Any]], Cursor | None]:
        """A page of items matching `search` from `cursor`, and the next cursor (None: the end).

        Raises UpstreamTimeout or UpstreamUnavailable when the provider fails.
        """
        deadline = time.monotonic() + self.timeout
        for _ in range(FILTER_PAGES):
            items, nxt = await self._page(entry, replace(search, cursor=cursor), deadline)
            if search.filter is not None:
                items = [i for i in items if matches(search.filter, i)]
            if items or nxt is None:
                return items, nxt
            cursor = nxt
        return [], cursor  # nothing matched yet: the client's next page goes on from here

    async def _page(
        self, entry: Entry, search: Search, deadline: float
    ) -> tuple[list[dict[str, Any]], Cursor | None]:
        resolver = entry.resolver
        if isinstance(resolver, Searchable):
            key = (entry.name, search.key)
            answer = self._pages.get(key)
            if answer is None:
                answer = await self._bounded(
                    deadline, resolver.search, search.limit, search.query, search.cursor
                )
                answer = (json.dumps(answer[0], default=str), answer[1])
                if self.caching and len(answer[0]) <= MEMO_PAGE_BYTES:
                    self._pages[key] = answer
            found = json.loads(answer[0])  # a copy of its own for each answer
            items = [documents.provider_item(self.root, self.public, entry, f) for f in found]
            return items, answer[1]
        if not isinstance(resolver, Listing):
            return [], None
        query = search.query
        if query.get("geom") or query.get("start") or query.get("end"):
            return [], None  # generated items carry no footprint or time
        objects = await self._listing(entry, resolver, deadline)
        if "id" in query:
            objects = [o for o in objects if documents.object_id(o.key) == query["id"]]
        start = int((search.cursor or {}).get("o", 0))
        end = start + search.limit
        page = [documents.object_item(self.root, self.public, entry, o) for o in objects[start:end]]
        return page, ({"o": end} if end < len(objects) else None)

    async def _listing(self, entry: Entry, resolver: Listing, deadline: float) -> list[Listed]:
        """The dataset's listing: made by one request at a time, the others wait for it."""
        key = (entry.name, "")
        lock = self._locks.setdefault(entry.name, asyncio.Lock())  # one per dataset name
        async with lock:
            objects = self._pages.get(key)
            if objects is None:
                objects = await self._bounded(deadline, resolver.listing)
                if self.caching:
                    self._pages[key] = objects
        return objects

    async def _bounded(self, deadline: float, fn: Any, *args: Any) -> Any:
        try:
            with anyio.fail_after(max(deadline - time.monotonic(), 0)):
                return await fn(*args)
        except TimeoutError:
            raise UpstreamTimeout(
                f"the provider did not answer within {self.timeout:g} s"
            ) from None
