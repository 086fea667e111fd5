"""QoS at the HTTP edge: whose address a request counts against, and the `RateLimit`
fields (draft-ietf-httpapi-ratelimit-headers) on admitted answers."""

from __future__ import annotations

from starlette.types import Message, Scope, Send

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
