"""A memo bounded by size and age, cheap enough for the cache-hit path.

cachetools' TTLCache does the same with more machinery (linked lists, a timer call and an
expiry sweep on every access): measured here it doubled the cost of a cache hit. This keeps
one dict of (deadline, value): a lookup is one `dict.get` and one clock read, and the
oldest entry goes when the memo is full.
"""

from __future__ import annotations

import time
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Memo(Generic[K, V]):
    def __init__(self, size: int, ttl: float) -> None:
        self.size = size
        self.ttl = ttl
        self._items: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] < time.monotonic():
            self._items.pop(key, None)
            return None
        return item[1]

    def __contains__(self, key: K) -> bool:
        return self.get(key) is not None

    def __setitem__(self, key: K, value: V) -> None:
        self.put(key, value)

    def put(self, key: K, value: V, ttl: float | None = None) -> None:
        """Keep `value` for `ttl` seconds (default: the memo's)."""
        items = self._items
        items.pop(key, None)
        if len(items) >= self.size:
            del items[next(iter(items))]  # the oldest insertion
        items[key] = (time.monotonic() + (self.ttl if ttl is None else ttl), value)

    def pop(self, key: K) -> None:
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)
