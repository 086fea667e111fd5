"""`/status` (HTML for operators) and `/status.json` (the same figures for machines).

Upstream health, cache usage and hit ratio per dataset, queue depth and recent jobs,
recent QoS refusals, policy versions. Counts come from the metrics (every process's under
`--workers N`); the last answer of each upstream and the latest refusals are this
process's. Rendered on the server as one page with its own small style sheet: no build
step, no script, no CDN. Admin group only when an issuer is configured.
"""

from __future__ import annotations

import time
from collections import defaultdict
from html import escape
from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from proxy.auth import Forbidden, Unauthorized, identity
from proxy.exchange import MISSES, Kind
from proxy.metrics import registry
from upstreams.http import HEALTH
from upstreams.registry import mirror_sets

RECENT_JOBS = 20


def _samples() -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in registry().collect():
        for s in family.samples:
            if s.name.startswith("fdp_"):
                out[s.name].append((s.labels, s.value))
    return out


def _blocking(state: Any) -> dict[str, Any]:
    """The figures that take I/O: the metrics (files, under `--workers`), the cache index
    and the queue. Run in a thread; nothing here is shared with the event loop."""
    try:
        depth: int | None = state.queue.depth()
        jobs = [j.public() for j in state.queue.recent(RECENT_JOBS)]
    except Exception:  # (a silent Redis: the page still shows the rest)
        depth, jobs = None, []
    usage = state.live_figures.cache_usage()
    return {"samples": _samples(), "usage": usage, "depth": depth, "jobs": jobs}


async def gather(request: Request) -> dict[str, Any]:
    """Every figure of the page: this process's own read on the event loop (where they
    change), the rest in a thread."""
    state = request.app.state
    state.assets.metrics.publish()
    entries, applied = state.registry.entries, dict(state.policies.applied)
    health = {origin: h.public() for origin, h in list(HEALTH.items())}
    mirrors = {name: m.public() for name, m in sorted(mirror_sets(state.registry).items())}
    limiter = state.assets.limiter
    rejected, recent = dict(limiter.rejected), list(limiter.recent)
    slow = await anyio.to_thread.run_sync(_blocking, state)
    samples, usage = slow["samples"], slow["usage"]
    served: dict[str, dict[str, float]] = defaultdict(lambda: {"hits": 0.0, "misses": 0.0})
    for labels, v in samples["fdp_requests_total"]:
        if labels["dataset"] == "(none)" or labels["status_class"] not in ("2xx", "3xx"):
            continue  # (a refused or failed request delivered nothing)
        if labels["cache"] == Kind.HIT:
            served[labels["dataset"]]["hits"] += v
        elif labels["cache"] in MISSES:
            served[labels["dataset"]]["misses"] += v
    datasets = {}
    for name in sorted(set(entries) | set(usage)):
        hits, misses = served[name]["hits"], served[name]["misses"]
        size, count = usage.get(name, (0, 0))
        datasets[name] = {
            "serving": name in entries,
            "policy_version": applied.get(name),
            "cache_bytes": size,
            "cache_objects": count,
            "hits": int(hits),
            "misses": int(misses),
            "hit_ratio": round(hits / (hits + misses), 3) if hits + misses else None,
        }
    upstreams: dict[str, dict[str, Any]] = defaultdict(dict)
    for labels, v in samples["fdp_upstream_response_seconds_count"]:
        upstreams[labels["upstream"]]["requests"] = int(v)
    for labels, v in samples["fdp_upstream_response_seconds_sum"]:
        n = upstreams[labels["upstream"]].get("requests") or 0
        upstreams[labels["upstream"]]["mean_ms"] = round(1000 * v / n, 1) if n else None
    for labels, v in samples["fdp_upstream_errors_total"]:
        errors = upstreams[labels["upstream"]].setdefault("errors", {})
        errors[labels["kind"]] = errors.get(labels["kind"], 0) + int(v)
    for origin, public in health.items():
        upstreams[origin] |= public
    return {
        "time": time.time(),
        "upstreams": dict(sorted(upstreams.items())),
        "mirrors": mirrors,
        "relays": state.relays.public(),
        "announce": _announce(state),
        "subscriptions": [f.public() for f in state.followers],
        "responses_in_flight": state.assets.active,
        "datasets": datasets,
        "cache": {
            "bytes": sum(d["cache_bytes"] for d in datasets.values()),
            "max_bytes": int(state.settings.cache.max_bytes),
            "error": state.delivery.health.error if state.delivery is not None else None,
        },
        "queue": {"depth": slow["depth"], "recent_jobs": slow["jobs"]},
        "qos": {
            "rejected": {f"{d}/{k}": n for (d, k), n in sorted(rejected.items())},
            "recent_rejections": [
                {"time": t, "dataset": d, "kind": k, "scope": s, "who": w}
                for t, d, k, s, w in reversed(recent)
            ],
        },
    }


def _announce(state: Any) -> dict[str, Any]:
    """The feed's newest id, what this process announced, and the broker's publisher."""
    announcer, publisher = state.announcer, state.publisher
    return {
        "newest": state.feed.newest,
        "announced": announcer.announced if announcer is not None else 0,
        "dropped": announcer.dropped if announcer is not None else 0,
        **(publisher.public() if publisher is not None else {"broker": None}),
        "harvest": state.harvester.public() if state.harvester is not None else None,
    }


async def _allowed(request: Request) -> None:
    if request.app.state.settings.auth.oidc_issuer is None:
        return
    who = await identity(request)
    if who.subject is None:
        raise Unauthorized("the status pages need a bearer token", invalid=False)
    if not who.admin:
        raise Forbidden("the status pages are for the admin group only")


async def status_json(request: Request) -> Response:
    await _allowed(request)
    return JSONResponse(await gather(request), headers={"cache-control": "no-store"})


async def status_html(request: Request) -> Response:
    await _allowed(request)
    return HTMLResponse(render(await gather(request)), headers={"cache-control": "no-store"})


# -- the page -----------------------------------------------------------------------------

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;min-width:40%}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37}.bad{color:#cf222e;font-weight:600}.muted{color:#888}
"""


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t)) if t else "-"


def _table(
    head: list[str], rows: list[list[str]], numeric: frozenset[int] | set[int] = frozenset()
) -> str:
    if not rows:
        return '<p class="muted">none</p>'
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{th}</tr>{body}</table>"


def render(f: dict[str, Any]) -> str:
    """The dashboard; every value from the figures is escaped."""
    e = lambda v: escape(str(v))  # noqa: E731
    ups = [
        [
            e(origin),
            '<span class="ok">ok</span>'
            if u.get("ok", True)
            else '<span class="bad">failing</span>',
            e(u.get("requests", 0)),
            e(u.get("mean_ms", "-")),
            e(", ".join(f"{k}: {n}" for k, n in sorted(u.get("errors", {}).items())) or "-"),
            e(_when(u.get("last_error"))),
        ]
        for origin, u in f["upstreams"].items()
    ]
    mirrors = [
        [
            e(name),
            e(m["mirror"]),
            e(f"{m['priority']} / {m['weight']}"),
            f'<span class="{"ok" if m["state"] == "up" else "bad"}">{e(m["state"])}</span>',
            e(m["latency_ms"] if m["latency_ms"] is not None else "-"),
            e(m["active"]),
            e(m["requests"]),
            e(m["errors"]),
            e(m["inconsistent"] or m["error"] or ""),
        ]
        for name, members in f["mirrors"].items()
        for m in members
    ]
    relays = [
        [
            e(r["url"]),
            e(", ".join(r["datasets"])),
            e(r["objects"]),
            e(_size(r["disk_bytes"])),
            e(r["load"]),
            e(r["clients_sent"]),
            e(r["seconds_since_heartbeat"]),
        ]
        for r in f["relays"]
    ]
    sets = [
        [
            e(name) + ("" if d["serving"] else ' <span class="muted">(deleted)</span>'),
            e(f"v{d['policy_version']}" if d["policy_version"] else "-"),
            e(_size(d["cache_bytes"])),
            e(d["cache_objects"]),
            e(d["hits"]),
            e(d["misses"]),
            e(f"{d['hit_ratio']:.0%}" if d["hit_ratio"] is not None else "-"),
        ]
        for name, d in f["datasets"].items()
    ]
    jobs = [
        [
            e(j["dataset"]),
            e(j["path"]),
            e(j["state"]),
            e(_size(j["bytes_done"])),
            e(j["attempts"]),
            e(_when(j["created"])),
            e(j.get("error") or ""),
        ]
        for j in f["queue"]["recent_jobs"]
    ]
    rejections = [
        [e(_when(r["time"])), e(r["dataset"]), e(r["kind"]), e(f"{r['scope']} {r['who']}")]
        for r in f["qos"]["recent_rejections"]
    ]
    cache = f["cache"]
    depth = f["queue"]["depth"]
    cache_line = f"{_size(cache['bytes'])} of {_size(cache['max_bytes'])}"
    queue_line = "unavailable" if depth is None else f"{depth} waiting"
    tables = {
        "Upstreams": _table(
            ["origin", "health", "requests", "mean ms", "errors", "last error"], ups, {2, 3}
        ),
        "Mirrors": _table(
            [
                *("dataset", "mirror", "priority / weight", "state", "latency ms"),
                *("fetching", "requests", "errors", "why"),
            ],
            mirrors,
            {4, 5, 6, 7},
        ),
        "Relays": _table(
            ["relay", "datasets", "objects", "disk", "load", "clients sent", "heartbeat s ago"],
            relays,
            {2, 3, 4, 5, 6},
        ),
        "Datasets": _table(
            ["dataset", "policy", "cached", "objects", "hits", "misses", "hit ratio"],
            sets,
            {2, 3, 4, 5, 6},
        ),
        "Recent jobs": _table(
            ["dataset", "path", "state", "bytes", "attempts", "created", "error"], jobs, {3, 4}
        ),
        "Recent QoS refusals": _table(["time", "dataset", "limit", "who"], rejections),
    }
    sections = "".join(f"<h2>{title}</h2>\n{table}\n" for title, table in tables.items())
    if cache["error"]:
        cache_line += f' <span class="bad">{e(cache["error"])}</span>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="15">
<title>fdp status</title><style>{STYLE}</style></head><body>
<h1>fdp status</h1><p class="muted">{e(_when(f["time"]))}</p>
<p>Cache: <b id="cache">{cache_line}</b> &middot; Queue: <b id="queue">{e(queue_line)}</b></p>
{sections}</body></html>
"""
