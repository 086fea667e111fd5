"""`GET|HEAD /assets/{dataset}/{path}`: resolve, then deliver from the cache or pass-through.

A raw ASGI endpoint, not a Starlette route: a cache hit is a dict lookup, a range parse and
`os.pread`, and the framework's per-request objects would cost more than all of that. The
pipeline's stages are plain awaits, so authentication and QoS slot in before delivery.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import anyio
import httpx
from starlette.types import Message, Receive, Scope, Send
from werkzeug.http import parse_range_header

from cache.fill import CacheWriteFailed
from cache.store import object_key
from proxy.auth import ANONYMOUS, Authenticator, Identity, check
from proxy.delivery import Asked, CacheDelivery
from proxy.problems import MalformedRange, ProxyError, error_response
from proxy.retrieval import Durations, hold, is_slow, not_ready, parse_prefer
from upstreams.base import UpstreamObject, UpstreamUnavailable
from upstreams.http import FORWARD_HEADERS, Body, head, open_body
from upstreams.registry import Entry, Registry
from upstreams.s3 import S3Resolver
from workers.jobs import SUCCEEDED
from workers.queue import JobQueue

log = logging.getLogger("fdp.proxy")

_WANTED = {
    b"range",
    b"if-none-match",
    b"if-range",
    b"if-modified-since",
    b"prefer",
    b"authorization",
}


class MethodNotAllowed(ProxyError):
    status, slug = 405, "method-not-allowed"


def caches(entry: Entry) -> bool:
    """`delivery: cache` keeps bytes unless its retention allows none (`lru`, `max_bytes: 0`)."""
    policy = entry.policy
    return policy.delivery == "cache" and policy.retention.max_bytes != 0


class Assets:
    def __init__(self, registry: Registry, public_url: str) -> None:
        self.registry = registry
        self.public_url = public_url.rstrip("/")
        # set at startup
        self.delivery: CacheDelivery | None = None
        self.client: httpx.AsyncClient | None = None
        self.queue: JobQueue | None = None
        self.auth: Authenticator | None = None
        self.durations = Durations()

    async def identify(self, authorization: str | None) -> Identity:
        if self.auth is None:  # no issuer: every dataset is public, tokens are ignored
            return ANONYMOUS
        return await self.auth.identify(authorization)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            if scope["method"] not in ("GET", "HEAD"):
                raise MethodNotAllowed("use GET or HEAD", headers={"allow": "GET, HEAD"})
            dataset, _, rel = path[len("/assets/") :].partition("/")
            entry = self.registry.get(dataset)
            headers = {
                k.decode("latin-1"): v.decode("latin-1")
                for k, v in scope["headers"]
                if k in _WANTED
            }
            authorization = headers.pop("authorization", None)
            who = await self.identify(authorization)
            check(entry.policy.access, who)
            policy = entry.policy
            if (
                isinstance(entry.resolver, S3Resolver)
                and policy.delivery != "cache"
                and scope["method"] == "GET"
            ):
                # straight to the store with a URL signed for this object. HEAD is answered
                # here instead: a GET signature refuses HEAD, and GDAL would keep a
                # HEAD-signed target for its range GETs (then return here without its token)
                url = entry.resolver.presign(rel, "GET", policy.presign_expires)
                await redirect(tracked, url)
                return
            obj = await entry.resolver.resolve(rel)
            if policy.delivery == "redirect" and scope["method"] == "GET":
                await redirect(tracked, obj.href)
                return
            if policy.forward_token and authorization:  # the provider trusts our IdP
                obj = replace(obj, headers={**obj.headers, "authorization": authorization})
            asked = Asked(
                scope["method"],
                path,
                headers.get("range"),
                headers.get("if-none-match"),
                headers.get("if-range"),
            )
            delivery = self.delivery
            if (
                self.queue is not None
                and delivery is not None
                and delivery.usable
                and is_slow(entry.policy, obj)
            ):
                await self.slow(asked, headers.get("prefer"), entry, rel, obj, who, tracked)
                return
            if delivery is not None and delivery.usable and caches(entry):
                try:
                    await delivery.serve(asked, dataset, rel, obj, tracked)
                    return
                except CacheWriteFailed:
                    pass  # nothing sent yet: pass-through below
            await self.passthrough(asked, headers, obj, path, receive, tracked)
        except Exception as exc:  # mapped in one place; unknown errors are logged there
            if started:  # too late for a problem: leave the response incomplete
                log.error(
                    "%s: %s after the response started; aborted",
                    path,
                    exc,
                    exc_info=not isinstance(exc, ProxyError | UpstreamUnavailable),
                )
                return
            await error_response(exc, path)(scope, receive, send)

    async def slow(
        self,
        asked: Asked,
        prefer: str | None,
        entry: Entry,
        rel: str,
        obj: UpstreamObject,
        who: Identity,
        send: Send,
    ) -> None:
        """Serve what is cached; otherwise queue the retrieval and hold, or say when to retry."""
        delivery, queue = self.delivery, self.queue
        assert delivery is not None and delivery.store is not None and queue is not None
        policy = entry.policy
        key = object_key(entry.name, rel)
        record = delivery.store.record(key)
        if record is not None and record.complete:
            await delivery.serve(asked, entry.name, rel, obj, send)
            return
        if asked.method == "HEAD":  # at once, with the catalogue's size where there is one
            assert self.client is not None
            await head_response(self.client, obj, send)
            return
        info = queue.submit(entry.name, rel, who.owner, policy.async_.max_attempts)
        respond_async, wait = parse_prefer(prefer)
        if not respond_async:
            seconds = (
                policy.async_.hold_seconds
                if wait is None
                else min(wait, policy.async_.hold_seconds)
            )
            info = await hold(queue, self.durations, info, seconds)
            if info.state == SUCCEEDED:
                delivery.store.refresh(key)
                await delivery.serve(asked, entry.name, rel, obj, send)
                return
        status = 202 if respond_async else policy.async_.not_ready_status
        retry_after = self.durations.retry_after(info, policy)
        await not_ready(send, status, info, retry_after, self.public_url, respond_async)

    async def passthrough(
        self,
        asked: Asked,
        headers: dict[str, str],
        obj: UpstreamObject,
        path: str,
        receive: Receive,
        send: Send,
    ) -> None:
        assert self.client is not None
        if asked.method == "HEAD":
            await head_response(self.client, obj, send)
            return
        forward = {k: v for k in FORWARD_HEADERS if (v := headers.get(k)) is not None}
        check_range(forward)
        body = await open_body(self.client, obj, forward)
        await relay(body, path, receive, send)


async def redirect(send: Send, location: str) -> None:
    """307 (method and Range kept); never cached, as the target may expire."""
    headers = [
        (b"location", location.encode("latin-1")),
        (b"cache-control", b"no-store"),
        (b"content-length", b"0"),
    ]
    await send({"type": "http.response.start", "status": 307, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def check_range(forward: dict[str, str]) -> None:
    """Refuse a Range we cannot parse; drop one in a unit we do not know (RFC 9110 14.2)."""
    rng = forward.get("range")
    if rng is None:
        return
    if rng.partition("=")[0].strip().lower() != "bytes":
        del forward["range"]
    elif parse_range_header(rng) is None:
        raise MalformedRange(f"malformed Range header {rng!r}; expected e.g. bytes=0-1023")


async def head_response(client: httpx.AsyncClient, obj: UpstreamObject, send: Send) -> None:
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
    raw = [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": 200, "headers": raw})
    await send({"type": "http.response.body", "body": b""})


async def relay(body: Body, path: str, receive: Receive, send: Send) -> None:
    """Relay an upstream body as it arrives.

    If the upstream cuts off, the client's response is left incomplete so the client sees
    an error, never a short body presented as whole. A client that goes away stops the fetch.
    """
    sent = 0
    raw = [(k.encode(), v.encode("latin-1")) for k, v in body.headers.items()]
    try:
        async with anyio.create_task_group() as tg:

            async def stream() -> None:
                nonlocal sent
                await send({"type": "http.response.start", "status": body.status, "headers": raw})
                try:
                    async for chunk in body.chunks():
                        sent += len(chunk)
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except UpstreamUnavailable as e:
                    log.warning("%s: %s after %d bytes; response aborted", path, e, sent)
                else:
                    await send({"type": "http.response.body", "body": b""})
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            while (await receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()
    finally:
        await body.aclose()
