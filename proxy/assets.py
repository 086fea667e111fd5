"""`GET|HEAD /assets/{dataset}/{path}`: the request pipeline, its stages in one readable place.

authenticate → authorize → resolve → plan → admit → deliver, then account (always). Each
stage is a small method that reads and fills the request's `Exchange`. A raw ASGI endpoint,
not a Starlette route: a cache hit is a few dict lookups, a range check and one `os.pread`,
and the framework's per-request objects would cost more than all of that.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import httpx
from starlette.types import Receive, Scope, Send
from werkzeug.http import parse_content_range_header

from cache.fill import CacheWriteFailed
from policies.config import Dataset, QosService
from policies.pacing import Pace
from policies.qos import Limiter, applicable
from proxy.accesslog import AccessLog
from proxy.auth import ANONYMOUS, Authenticator, Identity, check
from proxy.conditional import range_parts, select
from proxy.deliveries import DeliveryLog
from proxy.delivery import CacheDelivery
from proxy.exchange import MISSES, Exchange, Kind, Plan
from proxy.metrics import RequestMetrics
from proxy.problems import MethodNotAllowed, error_response, slug_of
from proxy.ratelimit import forwarded_client, paced, with_ratelimit
from proxy.relays import Directory
from proxy.retrieval import Durations, hold, is_slow, not_ready, parse_prefer
from proxy.streams import until_disconnect
from upstreams.base import (
    LoopDetected,
    ObjectNotFound,
    Presigning,
    UpstreamError,
    UpstreamObject,
    UpstreamRefused,
    UpstreamUnavailable,
)
from upstreams.caps import Caps, Meter
from upstreams.http import Body, Meta, head, probe, stream
from upstreams.memo import Memo
from upstreams.mirrors import agree, attempts, first_answer, with_headers
from upstreams.registry import Entry, Registry
from workers.jobs import SUCCEEDED
from workers.queue import JobQueue

log = logging.getLogger("fdp.proxy")

#: How long an upstream HEAD (validators for a pass-through HEAD) and a provider's "yes,
#: this caller may read it" (forward_token) are reused; both memos are bounded.
HEAD_TTL = 30.0
RECHECK_TTL = 30.0
MEMO_SIZE = 8192
#: users whose latest groups are remembered, and for how long
SEEN_SIZE, SEEN_TTL = 65536, 86400.0
#: how long a caller's pace is kept after it was made (longer than any paced download)
FLOW_TTL = 6 * 3600.0


def caches(entry: Entry) -> bool:
    """`delivery: cache` keeps bytes unless its retention allows none (`lru`, `max_bytes: 0`);
    so does `presign` from the shared cache tier."""
    kept = entry.policy.delivery in ("cache", "relay") or entry.presigns_from_cache
    return kept and entry.policy.retention.max_bytes != 0


def cache_control(policy: Dataset) -> bytes:
    """Public data may sit in shared caches for `max_age`; anything else only in the user's."""
    return _cache_control(policy.access.public, policy.max_age)


@functools.lru_cache(maxsize=64)
def _cache_control(public: bool, max_age: int) -> bytes:
    return b"public, max-age=%d" % max_age if public else b"private"


def refused(x: Exchange, exc: Exception) -> Exception:
    """With `forward_token`, the provider's 401/403 is about the caller: a 403 for them."""
    if (
        isinstance(exc, UpstreamUnavailable)
        and exc.status in (401, 403)
        and x.entry is not None
        and x.entry.policy.forward_token
    ):
        return UpstreamRefused("the provider refused your credentials for this object")
    return exc


class Assets:
    def __init__(
        self, registry: Registry, public_url: str, access_log: AccessLog, name: str | None = None
    ) -> None:
        self.registry = registry
        self.public_url = public_url.rstrip("/")
        #: what this fdp calls itself in `Via` (`server.name`)
        self.name = name or urlsplit(self.public_url).netloc
        self.access_log = access_log
        # set at startup
        self.delivery: CacheDelivery | None = None
        self.client: httpx.AsyncClient | None = None
        self.queue: JobQueue | None = None
        self.auth: Authenticator | None = None
        self.durations = Durations()
        self.metrics = RequestMetrics()
        self.deliveries: DeliveryLog | None = None
        self.limiter: Limiter | None = None
        #: the relay directory (`delivery: relay` datasets)
        self.relays: Directory | None = None
        #: responses under way (a relay's load, told to its directory)
        self.active = 0
        #: per-origin caps on fetches (pass-through reads here; the fill engine its own)
        self.caps = Caps(dict, None, QosService())
        #: the header a trusted reverse proxy writes the client's address in, if any
        self.trusted_proxy_header: bytes | None = None
        #: set when the server begins to stop: held requests answer "come back later" now
        self.stopping = asyncio.Event()
        self._heads: Memo[str, Meta] = Memo(MEMO_SIZE, HEAD_TTL)
        self._allowed: Memo[tuple[str, str], bool] = Memo(MEMO_SIZE, RECHECK_TTL)
        #: the identity each user last came with (bounded)
        self.seen: Memo[str, Identity] = Memo(SEEN_SIZE, SEEN_TTL)
        #: each caller's shared pace, per dataset (`max_bytes_per_second_per_user`)
        self._flows: Memo[tuple[str, str], Pace] = Memo(MEMO_SIZE, FLOW_TTL)

    async def identify(self, authorization: str | None) -> Identity:
        if self.auth is None:  # no issuer: every dataset is public, tokens are ignored
            return ANONYMOUS
        return await self.auth.identify(authorization)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        x = Exchange.start(scope)
        tracked = x.tracking(send)  # cache hits and misses track what they send themselves
        self.active += 1
        try:
            x.read_headers(scope)
            if x.via is not None:
                check_via(x.via, self.name)
            if self.trusted_proxy_header is not None:
                x.client = forwarded_client(scope, self.trusted_proxy_header) or x.client
            if x.method not in ("GET", "HEAD"):
                raise MethodNotAllowed("use GET or HEAD", headers={"allow": "GET, HEAD"})
            await self.authenticate(x)
            self.authorize(x)
            await self.resolve(x)
            await self.plan(x)
            await self.admit(x)
            send = self.shaped(x, send)
            tracked = x.tracking(send)
            await self.deliver(x, receive, send, tracked)
        except Exception as exc:  # mapped in one table; unknown errors are logged there
            exc = refused(x, exc)
            x.error = slug_of(exc)
            if x.status:  # too late for a problem: leave the response incomplete
                log.warning("%s: %s after the response started; aborted", x.path, exc)
            else:
                await error_response(exc, x.path)(scope, receive, tracked)
        finally:
            self.active -= 1
            if x.applied and self.limiter is not None:  # account: the bytes that went out
                await self.limiter.spend(x.applied, x.sent, x.fetched)
            self.metrics.observe(x)
            if self.deliveries is not None:
                self.deliveries.add(x)
            self.access_log.write(x)

    # -- the stages, in order --------------------------------------------------------------

    async def authenticate(self, x: Exchange) -> None:
        if self.auth is not None and x.authorization is not None:  # else: anonymous
            x.who = await self.auth.identify(x.authorization)
            if x.who.subject is not None:  # for `fdp qos show USER`: groups as last seen
                self.seen[x.who.subject] = x.who

    def authorize(self, x: Exchange) -> None:
        x.dataset, _, x.rel = x.path[len("/assets/") :].partition("/")
        x.entry = self.registry.get(x.dataset)
        check(x.entry.policy.access, x.who)

    async def resolve(self, x: Exchange) -> None:
        """The upstream object; a path naming a folder (GDAL's probe) is a fast 404."""
        assert x.entry is not None
        if not x.rel or x.rel.endswith("/"):
            raise ObjectNotFound("not an object (folders are not listed here)")
        obj = await x.entry.resolver.resolve(x.rel)
        extra = {}
        if x.entry.policy.forward_token and x.authorization:  # the provider trusts our IdP
            extra["authorization"] = x.authorization
        if x.entry.tiered:  # another fdp: the hops so far and us, so it can see a loop
            extra["via"] = f"{x.via}, 1.1 {self.name}" if x.via else f"1.1 {self.name}"
        x.obj = with_headers(obj, extra) if extra else obj
        if obj.mirrors is not None and x.entry.policy.access.public:
            x.link = (b"link", obj.mirrors.duplicates().encode("latin-1"))

    async def plan(self, x: Exchange) -> None:
        """Decide how to deliver, sending nothing: admission needs to know hit from miss."""
        assert x.entry is not None and x.obj is not None
        policy, resolver = x.entry.policy, x.entry.resolver
        delivery = self.delivery
        url = None
        if x.method == "GET" and policy.delivery == "presign":
            if isinstance(resolver, Presigning):
                url = resolver.presign(x.rel, "GET", policy.presign_expires)
            elif delivery is not None and delivery.usable:  # from the shared cache tier
                with contextlib.suppress(CacheWriteFailed):
                    url = await delivery.presigned(x, policy.presign_expires)
        if url is not None:
            x.plan = Plan(Kind.PRESIGN, location=url)
        elif x.method == "GET" and policy.delivery == "redirect":  # to the best mirror now
            x.plan = Plan(Kind.REDIRECT, location=attempts(x.obj)[0][1].href)
        elif policy.delivery == "relay" and (url := self.to_relay(x)) is not None:
            x.plan = Plan(Kind.RELAY, location=url)
        elif delivery is None or not delivery.usable:
            x.plan = Plan(Kind.PASSTHROUGH)
        else:
            try:
                if self.queue is not None and is_slow(policy, x.obj):
                    x.plan = await delivery.plan(x, create=False) or Plan(Kind.SLOW)
                elif caches(x.entry):  # not cached yet: its record after admission
                    x.plan = await delivery.plan(x, create=False, whole=False) or Plan(Kind.MISS)
                else:
                    x.plan = Plan(Kind.PASSTHROUGH)
            except CacheWriteFailed:  # the cache cannot be used right now: go around it
                x.plan = Plan(Kind.PASSTHROUGH)
        if policy.forward_token and x.plan.kind in (Kind.HIT, Kind.MISS):
            await self.recheck(x)

    async def admit(self, x: Exchange) -> None:
        """QoS: may this plan go ahead? Misses count against miss budgets, hits do not."""
        assert x.entry is not None and x.plan is not None
        defaults, qos = self.registry.qos_defaults, x.entry.policy.qos
        if self.limiter is None or not (qos.limited or defaults.limited):
            return
        miss = x.plan.kind in MISSES
        kinds = ("requests", "bytes", *(("miss_requests", "miss_bytes") if miss else ()))
        who = x.who
        x.applied = applicable(x.dataset, qos, defaults, kinds, who.subject, who.groups, x.client)
        x.standing = await self.limiter.admit(x.applied)

    def shaped(self, x: Exchange, send: Send) -> Send:
        """`send` with the QoS fields of the budget it was admitted under, paced if the
        dataset shapes its responses."""
        if x.standing is not None:
            send = with_ratelimit(send, x.standing)
        if x.entry is None:
            return send
        qos, defaults = x.entry.policy.qos, self.registry.qos_defaults
        flows = []
        if rate := qos.max_bytes_per_second or defaults.max_bytes_per_second:
            flows.append(Pace(rate))
        if rate := qos.max_bytes_per_second_per_user or defaults.max_bytes_per_second_per_user:
            flows.append(self._user_flow(x, rate))
        return paced(send, flows) if flows else send

    def _user_flow(self, x: Exchange, rate: int) -> Pace:
        """The flow all of one caller's responses of a dataset share (in this process)."""
        key = (x.dataset, x.who.subject or f"address {x.client}")
        flow = self._flows.get(key)
        if flow is None or flow.rate != rate:
            flow = self._flows[key] = Pace(rate)
        return flow

    async def deliver(self, x: Exchange, receive: Receive, raw: Send, send: Send) -> None:
        """Send the planned response; `send` notes status and bytes in `x`, `raw` does not
        (the cache notes them itself, to keep a hit short)."""
        assert x.entry is not None and x.plan is not None and x.obj is not None
        plan = x.plan
        if plan.record is None and x.range is not None:
            range_parts(x.range)  # malformed: a 400 before anyone is asked for the size
        if plan.kind in (Kind.HIT, Kind.MISS):
            assert self.delivery is not None
            if plan.record is None:  # admitted: now the upstream may be asked for its size
                try:
                    x.plan = plan = await self.delivery.plan(x) or plan
                except CacheWriteFailed:  # the index cannot take it now: go around the cache
                    x.plan = Plan(Kind.PASSTHROUGH)
                    await self.passthrough(x, receive, send)
                    return
            await self.delivery.send(x, plan, cache_control(x.entry.policy), receive, raw)
        elif plan.kind in (Kind.PRESIGN, Kind.REDIRECT, Kind.RELAY):
            assert plan.location is not None
            status = 302 if plan.kind == Kind.RELAY else 307
            await redirect(send, plan.location, x.link, status)
        elif plan.kind == Kind.SLOW:
            await self.slow(x, receive, send)
        else:
            await self.passthrough(x, receive, send)

    # -- helpers of the stages ---------------------------------------------------------------

    def to_relay(self, x: Exchange) -> str | None:
        """Where a relay dataset's GET goes: a relay that holds the object, for public data
        and direct clients (a relay or another fdp asking is served here); counted, so
        relays are told what to prefetch."""
        assert x.entry is not None and x.obj is not None
        if (
            x.method != "GET"
            or self.relays is None
            or not x.entry.policy.access.public
            or x.via is not None  # a relay's (or another fdp's) own fetch: not demand
        ):
            return None
        size = x.obj.size
        if size is None and self.delivery is not None and self.delivery.store is not None:
            record = self.delivery.store.peek(x.cache_key)[0]
            size = record.size if record is not None else None
        self.relays.requested(x.dataset, x.rel, size)
        return self.relays.choose(x.dataset, x.rel)

    async def recheck(self, x: Exchange) -> None:
        """Cached bytes go only to callers the provider itself would serve (a HEAD with
        their token), so the cache never widens a `forward_token` dataset's access."""
        assert self.client is not None and x.obj is not None
        if x.authorization is None:
            raise UpstreamRefused("this dataset's provider needs your own token")
        memo = (hashlib.sha256(x.authorization.encode()).hexdigest(), x.obj.href)
        if memo in self._allowed:
            return
        await head(self.client, x.obj)  # a 401/403 raises: refused() makes it a 403
        self._allowed[memo] = True

    async def slow(self, x: Exchange, receive: Receive, send: Send) -> None:
        """Queue the retrieval and hold, or say when to come back; HEAD answers at once."""
        delivery, queue, entry, obj = self.delivery, self.queue, x.entry, x.obj
        assert delivery is not None and queue is not None and entry is not None and obj is not None
        policy = entry.policy
        if x.method == "HEAD":  # at once, with the catalogue's size where there is one
            await self.head_response(x, send)
            return
        if obj.size is None:  # enqueue only what exists: a 404 here costs no job
            await self.upstream_meta(obj, archive=True)
        info = await queue.submit(entry.name, x.rel, x.who.owner, policy.async_.max_attempts)
        respond_async, wait = parse_prefer(x.prefer)
        if not respond_async:
            seconds = policy.async_.hold_seconds
            seconds = seconds if wait is None else min(wait, seconds)
            info = await hold(queue, self.durations, info, seconds, self.stopping)
            if info.state == SUCCEEDED:
                assert delivery.store is not None
                await delivery.engine.io(delivery.store.refresh, x.cache_key)
                x.plan = await delivery.plan(x, create=False)
                if x.plan is not None:
                    if policy.forward_token:
                        await self.recheck(x)
                    await delivery.send(x, x.plan, cache_control(policy), receive, send)
                    return
        status = 202 if respond_async else policy.async_.not_ready_status
        retry_after = self.durations.retry_after(info, policy)
        await not_ready(send, status, info, retry_after, self.public_url, respond_async)

    async def upstream_meta(self, obj: UpstreamObject, archive: bool = False) -> Meta:
        """The provider's size and validators, reused for a little while: as its GETs tell
        them (a 1-byte GET), or by HEAD for an archive, where a GET may start a staging."""
        assert self.client is not None
        client = self.client
        meta = self._heads.get(obj.href)
        if meta is None:
            ask = head if archive else probe
            meta = self._heads[obj.href] = await agree(obj, lambda o: ask(client, o))
        return meta

    async def head_response(self, x: Exchange, send: Send) -> None:
        """HEAD with the provider's validators, so HEAD and GET agree; the catalogue's size
        wins, and if the provider cannot say, the catalogue's answer still goes out."""
        assert x.obj is not None and x.entry is not None
        obj = x.obj
        try:
            archive = x.plan is not None and x.plan.kind == Kind.SLOW
            meta: Meta | None = await self.upstream_meta(obj, archive)
        except UpstreamUnavailable:
            if obj.size is None:
                raise
            meta = None  # GDAL remembers a failed HEAD for good: answer what we know
        size = obj.size if obj.size is not None else meta.size if meta else 0
        headers = {"accept-ranges": "bytes", "content-length": str(size)}
        fields = {
            "content-type": obj.media_type or (meta.media_type if meta else None),
            "etag": meta.etag if meta else None,
            "last-modified": meta.last_modified if meta else None,
        }
        headers |= {k: v for k, v in fields.items() if v}
        selection = select(x, size, headers.get("etag"), headers.get("last-modified"))
        raw = [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]
        raw.append((b"cache-control", cache_control(x.entry.policy)))
        if x.link is not None:
            raw.append(x.link)
        status = 304 if selection.status == 304 else 200
        if status == 304:
            raw = [h for h in raw if h[0] != b"content-length"]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": b""})

    async def passthrough(self, x: Exchange, receive: Receive, send: Send) -> None:
        assert self.client is not None and x.obj is not None and x.entry is not None
        if x.method == "HEAD":
            await self.head_response(x, send)
            return
        ranges: tuple[tuple[int, int], ...] = ()
        etag = None
        if x.range is not None or x.conditional or x.obj.mirrors is not None:
            # decided here, on the provider's validators, so every provider behaves per RFC
            # (a mirrored object: every mirror's, so one can go on where another stopped)
            meta = await self.upstream_meta(x.obj)
            size = x.obj.size if x.obj.size is not None else meta.size
            selection = select(x, size, meta.etag, meta.last_modified)
            if selection.status == 304:
                await self.head_response(x, send)
                return
            ranges, etag = selection.ranges, meta.etag
        obj, caps, client = x.obj, self.caps, self.client
        first = ranges[0][0] if ranges else 0  # where the response begins in the object
        #: each answer opened, with what holds it open (its origin's slot, its body)
        reading: list[tuple[UpstreamObject, contextlib.AsyncExitStack]] = []

        async def open_at(candidate: UpstreamObject, asked: dict[str, str]) -> tuple[Body, Meter]:
            stack = contextlib.AsyncExitStack()
            try:
                meter = await stack.enter_async_context(caps.aslot(candidate.href))
                body = await stack.enter_async_context(stream(client, candidate, asked))
            except BaseException:
                await stack.aclose()
                raise
            reading.append((candidate, stack))
            return body, meter

        def validator(candidate: UpstreamObject) -> str | None:
            """The ETag to tie a read to: a mirror's own (mirrors' ETags differ)."""
            return etag if obj.mirrors is None else obj.mirrors.set.validator(candidate.href)

        async def resume(done: int, expected: int) -> tuple[Body, Meter]:
            """The rest from the next mirror: the failed one is let go and marked down; the
            next must send exactly the rest of an object of the same size."""
            assert obj.mirrors is not None
            failed, held = reading[-1]
            await held.aclose()
            for member, candidate in obj.mirrors.choices:
                if candidate is failed:
                    member.failed("cut off mid-body")
            start, end = first + done, first + expected
            want = f"bytes {start}-{end - 1}/{size}"

            async def reopen(candidate: UpstreamObject) -> tuple[Body, Meter]:
                answer = await open_at(candidate, forwarded(((start, end),), validator(candidate)))
                if answer[0].status != 206 or answer[0].headers.get("content-range") != want:
                    got = answer[0].headers.get("content-range", answer[0].status)
                    raise UpstreamUnavailable(f"a mirror sent {got} where {want} was asked", 502)
                return answer

            return await first_answer(obj, reopen)

        body, meter = await first_answer(obj, lambda c: open_at(c, forwarded(ranges, validator(c))))
        total = body.headers.get("content-range", "").rpartition("/")[2]
        size = total if total.isdigit() else body.headers.get("content-length")
        mirrored = obj.mirrors is not None and len(ranges) <= 1 and body.status in (200, 206)
        try:
            policy = cache_control(x.entry.policy)
            await relay(body, x, policy, receive, send, meter, resume if mirrored else None)
        finally:
            for _, held in reading:
                await held.aclose()


#: more fdps than this in one request's `Via` is taken for a loop
MAX_HOPS = 16


def check_via(via: str, name: str) -> None:
    """Refuse a request that has already been through this fdp (tiers in a circle)."""
    hops = [hop.split()[1] if len(hop.split()) > 1 else "" for hop in via.split(",")]
    if name in hops or len(hops) > MAX_HOPS:
        raise LoopDetected(f"this request has already been through {name} (Via: a loop of fdps)")


def forwarded(ranges: tuple[tuple[int, int], ...], etag: str | None) -> dict[str, str]:
    """What a provider is asked for: the decided ranges of the version we decided on
    (`If-Range`: if it changed meanwhile, the whole new one), never the caller's headers."""
    if not ranges:
        return {}
    out = {"range": "bytes=" + ",".join(f"{a}-{b - 1}" for a, b in ranges)}
    if etag and not etag.startswith("W/"):
        out["if-range"] = etag
    return out


async def redirect(
    send: Send, location: str, link: tuple[bytes, bytes] | None = None, status: int = 307
) -> None:
    """307 (method and Range kept), or 302; never cached, as the target may expire."""
    headers = [
        (b"location", location.encode("latin-1")),
        (b"cache-control", b"no-store"),
        (b"content-length", b"0"),
    ]
    if link is not None:
        headers.append(link)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def expected_length(body: Body) -> int | None:
    """How many bytes the upstream promised; a 206 must agree with its own Content-Range."""
    length = body.headers.get("content-length")
    promised = int(length) if length is not None and length.isdigit() else None
    if body.status != 206:
        return promised
    parsed = parse_content_range_header(body.headers.get("content-range"))
    if parsed is None or parsed.start is None or parsed.stop is None:
        raise UpstreamUnavailable("upstream sent a 206 without a usable Content-Range", 206)
    span = parsed.stop - parsed.start
    if promised is not None and promised != span:
        raise UpstreamUnavailable("upstream's 206 is shorter than its Content-Range", 206)
    return span


#: how a pass-through goes on after its upstream failed: given the bytes sent and the
#: length promised, another answer with the rest and its origin's meter (raises when none)
Resume = Callable[[int, int], Awaitable[tuple[Body, Meter]]]


async def relay(
    body: Body,
    x: Exchange,
    cache_control_: bytes,
    receive: Receive,
    send: Send,
    meter: Meter | None = None,
    resume: Resume | None = None,
) -> None:
    """Relay an upstream body as it arrives (keeping to the origin's rate with `meter`).

    A body that fails or ends short of what was promised goes on from `resume` (another
    mirror) if there is one, else is left incomplete, so the client sees an error, never a
    short body presented as whole. A client that goes away stops the fetch.
    """
    expected = expected_length(body)
    raw = [(k.encode(), v.encode("latin-1")) for k, v in body.headers.items()]
    raw.append((b"cache-control", cache_control_))
    if x.link is not None:
        raw.append(x.link)
    sent = 0

    async def stream_body() -> None:
        nonlocal sent, meter
        await send({"type": "http.response.start", "status": body.status, "headers": raw})
        current = body
        while True:
            try:
                async for chunk in current.chunks():
                    sent += len(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if meter is not None and meter.add(len(chunk)):
                        await meter.caps.settle(meter)
                if expected is None or sent == expected:
                    break
                x.error = "upstream-short-body"
                raise UpstreamUnavailable(f"upstream sent {sent} of {expected} bytes")
            except UpstreamError as e:
                if resume is None or expected is None:
                    log.warning("%s: %s after %d bytes; response aborted", x.path, e, sent)
                    return
                log.warning("%s: %s after %d bytes; going on from another mirror", x.path, e, sent)
                try:
                    current, meter = await resume(sent, expected)
                except UpstreamError as e:
                    log.warning("%s: %s; response aborted after %d bytes", x.path, e, sent)
                    return
                x.error = None
        await send({"type": "http.response.body", "body": b""})

    await until_disconnect(receive, stream_body)
