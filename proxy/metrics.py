"""`/metrics`: Prometheus text (prometheus-client) for operators.

Counters and histograms live beside what they count: requests here (the `account`
stage), upstream answers in `upstreams.http`, refused fetches in `upstreams.caps`, QoS in
`policies.qos`, evictions in `cache.retention`. Figures that are a state rather than events
are read when scraped: cache bytes and objects per dataset (from the index, reused for
10 s), queue depth, and how jobs ended (counted by every worker, in Redis or here). Labels
are bounded: dataset names (an unknown one is `(none)`), methods, status classes, plans,
upstream origins, limit kinds; never an item, a user or a path. Under `fdp serve --workers
N` each process writes its own files in `PROMETHEUS_MULTIPROC_DIR` and a scrape adds them
up (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import anyio.to_thread
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from cache.store import Store
from proxy.exchange import Exchange
from upstreams.mirrors import MirrorSet
from workers.stats import JobStats, bucket_label

log = logging.getLogger("fdp.proxy")

REQUESTS = Counter(
    "fdp_requests",
    "Requests for data (/assets), by dataset, method, status class and delivery",
    ["dataset", "method", "status_class", "cache"],
)
SENT = Counter(
    "fdp_response_bytes",
    "Body bytes sent for data, by dataset and delivery (hit, miss, pass-through, ...)",
    ["dataset", "cache"],
)
#: how long the cache figures of a scrape are reused (they take a walk through the index)
CACHE_FIGURES_TTL = 10.0


class RequestMetrics:
    """The `account` stage's counts: added up in a plain dict on the request path (a cache
    hit pays a dict lookup), handed to the prometheus counters by `publish` (each second,
    and before a scrape)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, int, str], list[int]] = {}
        self._children: dict[tuple[str, str, int, str], tuple[Counter, Counter]] = {}

    def observe(self, x: Exchange) -> None:
        key = (
            x.dataset if x.entry is not None else "(none)",
            x.method,
            x.status,
            x.plan.kind.value if x.plan is not None else "none",
        )
        counts = self._counts.get(key)
        if counts is None:
            self._counts[key] = [1, x.sent]
        else:
            counts[0] += 1
            counts[1] += x.sent

    def publish(self) -> None:
        """Add what was counted since the last time to the prometheus counters."""
        counts, self._counts = self._counts, {}
        for key, (n, sent) in counts.items():
            children = self._children.get(key)
            if children is None:
                dataset, method, status, plan = key
                method = method if method in ("GET", "HEAD") else "other"
                status_class = f"{status // 100}xx" if status else "none"
                children = (
                    REQUESTS.labels(dataset, method, status_class, plan),
                    SENT.labels(dataset, plan),
                )
                if len(self._children) < 10_000:  # (bounded: the labels are)
                    self._children[key] = children
            children[0].inc(n)
            if sent:
                children[1].inc(sent)


class LiveFigures(Collector):
    """What a scrape reads now: cache contents, queue depth, how jobs ended. `collect`
    blocks (a walk through the cache index, Redis calls): run it in a thread."""

    def __init__(
        self,
        store: Store | None,
        queue_depth: Callable[[], int],
        jobs: JobStats,
        mirror_sets: Callable[[], dict[str, MirrorSet]] = dict,
        relays: Callable[[], list[dict[str, Any]]] = list,
    ) -> None:
        self.relays = relays
        self.store = store
        self.queue_depth = queue_depth
        self.jobs = jobs
        self.mirror_sets = mirror_sets
        self._usage: tuple[float, dict[str, tuple[int, int]]] = (-CACHE_FIGURES_TTL, {})

    def collect(self) -> list[Metric]:
        figures = []
        parts = (self._cache_figures, self._job_figures, self._mirror_figures, self._relay_figures)
        for part in parts:
            try:
                figures += part()
            except Exception as e:  # (a locked index, a silent Redis: left out, not a 500)
                log.warning("/metrics: %s left out (%s)", part.__name__, type(e).__name__)
        return figures

    def cache_usage(self) -> dict[str, tuple[int, int]]:
        """(bytes, objects) per dataset, from the index (reused for a few seconds)."""
        at, usage = self._usage
        if self.store is None or time.monotonic() - at < CACHE_FIGURES_TTL:
            return usage
        size: dict[str, int] = defaultdict(int)
        count: dict[str, int] = defaultdict(int)
        for r in self.store.records():
            size[r.dataset] += r.stored_bytes
            count[r.dataset] += 1
        self._usage = (time.monotonic(), {d: (size[d], count[d]) for d in sorted(size)})
        return self._usage[1]

    def _cache_figures(self) -> list[Metric]:
        stored = GaugeMetricFamily("fdp_cache_bytes", "Cached bytes", labels=["dataset"])
        objects = GaugeMetricFamily("fdp_cache_objects", "Cached objects", labels=["dataset"])
        for dataset, (size, count) in self.cache_usage().items():
            stored.add_metric([dataset], size)
            objects.add_metric([dataset], count)
        return [stored, objects]

    def _mirror_figures(self) -> list[Metric]:
        """Each mirror as this process sees it (its own requests; health by its answers)."""
        labels = ["dataset", "mirror"]
        up = GaugeMetricFamily(
            "fdp_mirror_up", "1 while a mirror is used (not down)", labels=labels
        )
        consistent = GaugeMetricFamily(
            "fdp_mirror_consistent", "0 while a mirror is left out as inconsistent", labels=labels
        )
        active = GaugeMetricFamily("fdp_mirror_active_fetches", "Fetches under way", labels=labels)
        requests = CounterMetricFamily(
            "fdp_mirror_requests", "Requests to a mirror (answers and failures)", labels=labels
        )
        errors = CounterMetricFamily(
            "fdp_mirror_errors", "Failed or too slow answers of a mirror", labels=labels
        )
        for dataset, mirrors in self.mirror_sets().items():
            for m in mirrors.members:
                state, key = m.state(), [dataset, m.name]
                up.add_metric(key, 0 if state in ("down", "inconsistent") else 1)
                consistent.add_metric(key, 0 if state == "inconsistent" else 1)
                active.add_metric(key, m.active)
                requests.add_metric(key, m.requests)
                errors.add_metric(key, m.errors)
        return [up, consistent, active, requests, errors]

    def _relay_figures(self) -> list[Metric]:
        """The live relays of this directory: their load, holdings and clients sent."""
        load = GaugeMetricFamily(
            "fdp_relay_load", "Responses a relay reported sending", labels=["relay"]
        )
        objects = GaugeMetricFamily("fdp_relay_objects", "Objects a relay holds", labels=["relay"])
        sent = CounterMetricFamily(
            "fdp_relay_clients_sent", "Clients sent to a relay", labels=["relay"]
        )
        for r in self.relays():
            load.add_metric([r["url"]], r["load"])
            objects.add_metric([r["url"]], r["objects"])
            sent.add_metric([r["url"]], r["clients_sent"])
        return [load, objects, sent]

    def _job_figures(self) -> list[Metric]:
        queued = GaugeMetricFamily("fdp_jobs_queued", "Retrieval jobs waiting to run")
        queued.add_metric([], self.queue_depth())
        outcomes, buckets, total = self.jobs.snapshot()
        ended = CounterMetricFamily(
            "fdp_job_attempts", "Retrieval attempts ended, by outcome", labels=["outcome"]
        )
        for outcome, n in outcomes.items():
            ended.add_metric([outcome], n)
        took = HistogramMetricFamily("fdp_job_duration_seconds", "How long attempts ran")
        took.add_metric([], [(bucket_label(le), n) for le, n in buckets], total)
        return [queued, ended, took]


def registry() -> CollectorRegistry:
    """This process's metrics, or every process's in multiprocess mode."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return REGISTRY
    combined = CollectorRegistry()
    MultiProcessCollector(combined)
    return combined


async def metrics(request: Request) -> Response:
    request.app.state.assets.metrics.publish()
    live = CollectorRegistry(auto_describe=False)
    live.register(request.app.state.live_figures)
    body = await anyio.to_thread.run_sync(
        lambda: generate_latest(registry()) + generate_latest(live)
    )
    return Response(body, media_type=CONTENT_TYPE_LATEST)
