"""QoS usage: `GET /me/usage` shows callers their own budgets, dataset by dataset (nobody
else's); `GET /admin/qos/users/{subject}` and `/admin/qos/addresses/{address}` show an
operator anyone's (`fdp qos show`)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from policies.qos import KINDS, Limiter, applicable
from proxy.auth import Identity, allowed, identity
from proxy.ratelimit import forwarded_client
from upstreams.registry import Registry


async def usage_of(
    registry: Registry, limiter: Limiter, who: Identity, address: str | None
) -> dict[str, Any]:
    """Limits and what is left of them, for every dataset `who` may read (nothing counted)."""
    datasets = {}
    for name, entry in sorted(registry.entries.items()):
        if not allowed(entry.policy.access, who):
            continue
        applied = applicable(
            name, entry.policy.qos, registry.qos_defaults, KINDS, who.subject, who.groups, address
        )
        standings = await limiter.usage(applied) if applied else []
        datasets[name] = [s.public() for s in standings]
    caller = {"subject": who.subject} if who.subject else {"address": address}
    return {"caller": caller, "datasets": datasets}


def _answer(body: dict[str, Any]) -> Response:
    return JSONResponse(body, headers={"cache-control": "no-store"})


async def my_usage(request: Request) -> Response:
    assets = request.app.state.assets
    who = await identity(request)
    client = request.client.host if request.client else None
    if assets.trusted_proxy_header is not None:
        client = forwarded_client(request.scope, assets.trusted_proxy_header) or client
    return _answer(await usage_of(request.app.state.registry, assets.limiter, who, client))


async def user_usage(request: Request) -> Response:
    """A user's budgets, with the groups and scopes of their latest token here (or the
    `group` parameters given, for a user this proxy has not seen yet)."""
    assets = request.app.state.assets
    subject = request.path_params["subject"]
    groups = request.query_params.getlist("group")
    seen = assets.seen.get(subject)
    if groups or seen is None:
        who = Identity(subject, frozenset(groups))
    else:
        who = seen
    body = await usage_of(request.app.state.registry, assets.limiter, who, None)
    body["caller"]["groups"] = sorted(who.groups)
    body["caller"]["seen"] = seen is not None
    return _answer(body)


async def address_usage(request: Request) -> Response:
    """An anonymous address's budgets."""
    assets = request.app.state.assets
    address = request.path_params["address"]
    return _answer(await usage_of(request.app.state.registry, assets.limiter, Identity(), address))


async def counters(request: Request) -> Response:
    """What admission has done since start (this process): admitted by dataset, refused by
    dataset and limit kind, counter errors, fetches refused by upstream caps by origin."""
    assets = request.app.state.assets
    limiter, caps = assets.limiter, assets.caps
    rejected: dict[str, dict[str, int]] = {}
    for (dataset, kind), n in sorted(limiter.rejected.items()):
        rejected.setdefault(dataset, {})[kind] = n
    return _answer(
        {
            "admitted": dict(sorted(limiter.admitted.items())),
            "rejected": rejected,
            "errors": limiter.errors,
            "upstreams": {
                "busy": dict(sorted(caps.busy.items())),
                "errors": caps.errors,
            },
        }
    )
