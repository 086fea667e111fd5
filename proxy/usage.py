"""`GET /me/usage`: the caller's own QoS budgets, dataset by dataset (nobody else's)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from policies.qos import KINDS, applicable
from proxy.auth import allowed, identity
from proxy.ratelimit import forwarded_client


async def my_usage(request: Request) -> Response:
    """Limits and what is left of them, for every dataset the caller may read."""
    assets = request.app.state.assets
    registry = request.app.state.registry
    who = await identity(request)
    client = request.client.host if request.client else None
    if assets.trusted_proxy_header is not None:
        client = forwarded_client(request.scope, assets.trusted_proxy_header) or client
    datasets = {}
    for name, entry in sorted(registry.entries.items()):
        if not allowed(entry.policy.access, who):
            continue
        applied = applicable(
            name, entry.policy.qos, registry.qos_defaults, KINDS, who.subject, who.groups, client
        )
        standings = await assets.limiter.usage(applied) if applied else []
        datasets[name] = [s.public() for s in standings]
    caller = {"subject": who.subject} if who.subject else {"address": client}
    return JSONResponse(
        {"caller": caller, "datasets": datasets}, headers={"cache-control": "no-store"}
    )
