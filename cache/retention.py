"""Which cached objects must go: per-dataset retention plus the global size cap.

A pure function of the records, the rules and the time, so tests give it a clock instead
of sleeping; `sweep` applies it to a store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter

from cache.store import ObjectRecord, Store

if TYPE_CHECKING:
    from cache.shared import SharedTier

EVICTIONS = Counter(
    "fdp_cache_evictions", "Objects retention evicted from the cache, by dataset", ["dataset"]
)

log = logging.getLogger("fdp.cache")
DAY = 86400.0


@dataclass(frozen=True)
class Rule:
    mode: str  # permanent | rolling | lru
    days: float | None = None
    max_bytes: int | None = None


def plan(
    records: Iterable[ObjectRecord],
    rules: Mapping[str, Rule],
    max_bytes: int | None,
    now: float,
) -> list[ObjectRecord]:
    """The records to evict, in order. Datasets no longer configured lose their entries."""
    keep: list[ObjectRecord] = []
    out: list[ObjectRecord] = []
    by_dataset: dict[str, list[ObjectRecord]] = {}
    for r in records:
        rule = rules.get(r.dataset)
        if rule is None:
            out.append(r)
        elif rule.mode == "rolling" and rule.days is not None and r.created < now - rule.days * DAY:
            out.append(r)
        else:
            by_dataset.setdefault(r.dataset, []).append(r)
    for dataset, entries in by_dataset.items():
        rule = rules[dataset]
        entries.sort(key=lambda r: r.accessed)  # least recently used first
        if rule.mode != "permanent" and rule.max_bytes is not None:
            total = sum(r.stored_bytes for r in entries)
            while entries and total > rule.max_bytes:
                victim = entries.pop(0)
                total -= victim.stored_bytes
                out.append(victim)
        keep.extend(entries)
    if max_bytes is not None:
        total = sum(r.stored_bytes for r in keep)
        # the global cap takes least recently used entries, permanent ones last
        keep.sort(key=lambda r: (rules[r.dataset].mode == "permanent", r.accessed))
        while keep and total > max_bytes:
            victim = keep.pop(0)
            total -= victim.stored_bytes
            out.append(victim)
    return out


def evict_planned(
    records: Iterable[ObjectRecord],
    rules: Mapping[str, Rule],
    max_bytes: int | None,
    now: float,
    evict: Callable[[ObjectRecord], int],
    where: str = "",
) -> int:
    """Evict (with `evict`, which returns the bytes it freed) what `plan` says; returns the
    bytes freed."""
    freed = 0
    for record in plan(records, rules, max_bytes, now):
        freed += evict(record)
        if record.dataset:  # (not blocks that no record named)
            EVICTIONS.labels(record.dataset if record.dataset in rules else "(deleted)").inc()
            size = record.stored_bytes
            log.info("%sevicted %s/%s (%d bytes)", where, record.dataset, record.path, size)
    return freed


def sweep(store: Store, rules: Mapping[str, Rule], max_bytes: int | None, now: float) -> int:
    """Evict what `plan` says; returns the bytes freed. Blocking: run it in a thread."""
    store.flush()
    store.clean_tmp()
    return evict_planned(store.records(), rules, max_bytes, now, lambda r: store.evict(r.key))


def retain(
    store: Store,
    shared: SharedTier | None,
    rules: Mapping[str, Rule],
    local_max: int,
    shared_max: int,
    lease: float,
    now: float,
) -> None:
    """One retention pass. Without a shared tier the store keeps by the rules; with one,
    the bucket does (swept by the replica that holds the lease) and the local tier keeps
    only what is hot. Blocking: run it in a thread."""
    if shared is None:
        sweep(store, rules, local_max, now)
        return
    sweep(store, {n: Rule("lru", None, None) for n in rules}, local_max, now)
    if shared.elected(lease):
        shared.sweep(rules, shared_max, now)
