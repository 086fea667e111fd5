"""Pages of one dataset's items: from its provider's search, or generated from a listing.

A provider's answer to one page is reused for `stac.cache_seconds` (searches are slow and
clients page back and forth), and each call is bounded by `stac.timeout_seconds`. A CQL2
`filter` is applied here to each page, so a page may hold fewer items than `limit`.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field, replace
from typing import Any

import anyio

from proxy.stac import documents
from proxy.stac.query import Cursor, Search, matches
from upstreams.base import Listed, Listing, Searchable, UpstreamError, UpstreamTimeout
from upstreams.eodag import EodagResolver, FederatedResolver
from upstreams.memo import Memo
from upstreams.registry import Entry

#: provider pages (and listings) kept at most, and the largest page kept (so at most 64 MiB)
MEMO_SIZE, MEMO_PAGE_BYTES = 256, 256 << 10
#: provider pages one filtered page may read while looking for a match
FILTER_PAGES = 10


@dataclass
class Trace:
    """What happened while one page was made: who failed, and whether anyone answered."""

    failed: list[tuple[str, UpstreamError]] = field(default_factory=list)
    answered: bool = False


class Catalog:
    def __init__(self, root: str, public: str, cache_seconds: float, timeout: float) -> None:
        self.root, self.public, self.timeout = root, public, timeout
        self._pages: Memo[tuple[str, str], Any] = Memo(MEMO_SIZE, max(cache_seconds, 1e-3))
        self.caching = cache_seconds > 0
        self._locks: dict[str, asyncio.Lock] = {}

    async def page(
        self, entry: Entry, search: Search, cursor: Cursor | None
    ) -> tuple[list[dict[str, Any]], Cursor | None, list[tuple[str, UpstreamError]]]:
        """A page of items matching `search` from `cursor`, the next cursor (None: the end),
        and the providers of a federated dataset that failed (and were passed over).

        Raises UpstreamTimeout or UpstreamUnavailable when no provider answered.
        """
        deadline = time.monotonic() + self.timeout
        trace = Trace()
        for _ in range(FILTER_PAGES):
            items, nxt = await self._page(entry, replace(search, cursor=cursor), deadline, trace)
            if search.filter is not None:
                items = [i for i in items if matches(search.filter, i)]
            if items or nxt is None:
                break
            cursor = nxt
        else:
            items, nxt = [], cursor  # nothing matched yet: the next page goes on from here
        if not items and trace.failed and not trace.answered:
            raise trace.failed[-1][1]
        return items, nxt, trace.failed

    async def _page(
        self, entry: Entry, search: Search, deadline: float, trace: Trace
    ) -> tuple[list[dict[str, Any]], Cursor | None]:
        resolver = entry.resolver
        if isinstance(resolver, FederatedResolver):
            return await self._federated(entry, resolver.members, search, deadline, trace)
        if isinstance(resolver, Searchable):
            try:
                found = await self._provider_page(entry, 0, resolver, search, deadline)
            except UpstreamError as e:
                trace.failed.append((entry.name, e))
                return [], None
            trace.answered = True
            return found
        if not isinstance(resolver, Listing):
            return [], None
        query = search.query
        if query.get("geom") or query.get("start") or query.get("end"):
            return [], None  # generated items carry no footprint or time
        try:
            objects = await self._listing(entry, resolver, deadline)
        except UpstreamError as e:
            trace.failed.append((entry.name, e))
            return [], None
        trace.answered = True
        if "id" in query:
            objects = [o for o in objects if documents.object_id(o.key) == query["id"]]
        start = int((search.cursor or {}).get("o", 0))
        end = start + search.limit
        page = [documents.object_item(self.root, self.public, entry, o) for o in objects[start:end]]
        return page, ({"o": end} if end < len(objects) else None)

    async def _federated(
        self,
        entry: Entry,
        members: list[EodagResolver],
        search: Search,
        deadline: float,
        trace: Trace,
    ) -> tuple[list[dict[str, Any]], Cursor | None]:
        """Provider after provider (cursor: which one, and its own cursor); an id is looked
        up at each until one has it. A provider that fails is named and passed over."""
        if "id" in search.query:
            for n, member in enumerate(members):
                try:
                    items, _ = await self._provider_page(entry, n, member, search, deadline)
                except UpstreamError as e:
                    trace.failed.append((member.provider, e))
                    continue
                trace.answered = True
                if items:
                    return items, None
            return [], None
        n = int((search.cursor or {}).get("p", 0))
        if not 0 <= n < len(members):
            return [], None
        inner = (search.cursor or {}).get("c")
        try:
            items, after = await self._provider_page(
                entry, n, members[n], replace(search, cursor=inner), deadline
            )
            trace.answered = True
        except UpstreamError as e:
            trace.failed.append((members[n].provider, e))
            items, after = [], None
        if after is not None:
            return items, {"p": n, "c": after}
        return items, ({"p": n + 1, "c": None} if n + 1 < len(members) else None)

    async def _provider_page(
        self, entry: Entry, n: int, provider: Searchable, search: Search, deadline: float
    ) -> tuple[list[dict[str, Any]], Cursor | None]:
        """One page of one provider's search, from the memo if it was asked lately."""
        key = (entry.name, f"{n} {search.key}")
        answer = self._pages.get(key)
        if answer is None:
            answer = await self._bounded(
                deadline, provider.search, search.limit, search.query, search.cursor
            )
            answer = (json.dumps(answer[0], default=str), answer[1])
            if self.caching and len(answer[0]) <= MEMO_PAGE_BYTES:
                self._pages[key] = answer
        found = json.loads(answer[0])  # a copy of its own for each answer
        items = [documents.provider_item(self.root, self.public, entry, f) for f in found]
        return items, answer[1]

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
