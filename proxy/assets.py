"""`GET|HEAD /assets/{dataset}/{path}`: resolve, then deliver (pass-through streaming for now).

The pipeline's stages are plain awaits in one function so that authentication, QoS, the
cache and async retrieval slot in as further stages.
"""

from __future__ import annotations

import logging

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from werkzeug.http import parse_range_header

from proxy.problems import MalformedRange
from proxy.registry import Registry
from upstreams.base import UpstreamObject, UpstreamUnavailable
from upstreams.http import FORWARD_HEADERS, Body, head, open_body

log = logging.getLogger("fdp.proxy")


def forward_headers(request: Request) -> dict[str, str]:
    """The client headers we pass to the provider; a Range we cannot parse is refused here."""
    out = {k: v for k in FORWARD_HEADERS if (v := request.headers.get(k)) is not None}
    rng = out.get("range")
    if rng is not None:
        unit = rng.partition("=")[0].strip().lower()
        if unit != "bytes":
            del out["range"]  # RFC 9110 14.2: ignore a range unit we do not support
        elif parse_range_header(rng) is None:
            raise MalformedRange(f"malformed Range header {rng!r}; expected e.g. bytes=0-1023")
    return out


async def asset(request: Request) -> Response:
    registry: Registry = request.app.state.registry
    client: httpx.AsyncClient = request.app.state.http
    entry = registry.get(request.path_params["dataset"])
    obj = await entry.resolver.resolve(request.path_params["path"])
    if request.method == "HEAD":
        return await head_response(client, obj)
    body = await open_body(client, obj, forward_headers(request))
    return UpstreamStream(body, request.url.path)


async def head_response(client: httpx.AsyncClient, obj: UpstreamObject) -> Response:
    """HEAD must answer at once with the true size: the catalogue's, else the provider's."""
    headers = {"accept-ranges": "bytes"}
    if obj.size is not None:
        headers["content-length"] = str(obj.size)
        if obj.media_type:
            headers["content-type"] = obj.media_type
    else:
        meta = await head(client, obj)
        headers["content-length"] = str(meta.size)
        for name, value in (
            ("content-type", obj.media_type or meta.media_type),
            ("etag", meta.etag),
            ("last-modified", meta.last_modified),
        ):
            if value:
                headers[name] = value
    return Response(b"", headers=headers)


class UpstreamStream(Response):
    """Relay an upstream body as it arrives.

    If the upstream cuts off, the client's response is left incomplete so the client sees
    an error, never a short body presented as whole. A client that goes away stops the fetch.
    """

    def __init__(self, body: Body, path: str) -> None:
        self.body_source = body
        self.path = path
        self.status_code = body.status
        self.raw_headers = [(k.encode(), v.encode("latin-1")) for k, v in body.headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self.body_source
        sent = 0
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    nonlocal sent
                    await send(
                        {
                            "type": "http.response.start",
                            "status": self.status_code,
                            "headers": self.raw_headers,
                        }
                    )
                    try:
                        async for chunk in body.chunks():
                            sent += len(chunk)
                            await send(
                                {"type": "http.response.body", "body": chunk, "more_body": True}
                            )
                    except UpstreamUnavailable as e:
                        log.warning("%s: %s after %d bytes; response aborted", self.path, e, sent)
                    else:
                        await send({"type": "http.response.body", "body": b""})
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()
        finally:
            await body.aclose()
