"""QoS at the HTTP edge: whose address a request counts against, the `RateLimit` fields
(draft-ietf-httpapi-ratelimit-headers) on admitted answers, and paced bodies."""

from __future__ import annotations

import asyncio

from starlette.types import Message, Scope, Send

from policies.pacing import Pace
from policies.qos import Standing


def forwarded_client(scope: Scope, header: bytes) -> str | None:
    """The client's address as the trusted reverse proxy wrote it: the last entry of the
    header (what the proxy itself saw; anything before it the client may have forged)."""
    value = None
    for name, raw in scope["headers"]:
        if name == header:
            value = raw  # the last such header: the one the proxy appended
    if value is None:
        return None
    last = value.decode("latin-1").rsplit(",", 1)[-1].strip()
    return last or None


def with_ratelimit(send: Send, standing: Standing) -> Send:
    """`send`, adding `RateLimit-Policy` and `RateLimit` to the response's headers."""
    fields = [
        (b"ratelimit-policy", standing.policy_field().encode()),
        (b"ratelimit", standing.field().encode()),
    ]

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *fields]}
        await send(message)

    return sending


def paced(send: Send, flows: list[Pace]) -> Send:
    """`send`, holding the body to the rate of every flow it belongs to (its connection's,
    its caller's): each piece (a tenth of a second's worth) goes out when all of them have
    room for it. No thread, no buffer of its own."""
    piece = max(16 * 1024, int(min(f.rate for f in flows)) // 10)

    async def pacing(message: Message) -> None:
        if message["type"] != "http.response.body":
            await send(message)
            return
        body = memoryview(message.get("body", b""))
        more = message.get("more_body", False)
        while len(body) > piece:
            await _send_due(body[:piece], True)
            body = body[piece:]
        await _send_due(body, more)

    async def _send_due(data: memoryview, more: bool) -> None:
        wait = max(f.book(len(data)) for f in flows)
        if wait > 0:
            await asyncio.sleep(wait)
        await send({"type": "http.response.body", "body": bytes(data), "more_body": more})

    return pacing
