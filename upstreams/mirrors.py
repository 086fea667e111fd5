"""Mirror sets: one dataset whose objects several upstreams hold, each watched for health.

Every fetch of a mirrored object walks `ordered()`: healthy mirrors first (lower priority
first, then weighted at random among equals), down ones last, inconsistent ones never. What
each attempt meets is fed back to its `Member`:

- passive health: an error or an answer slower than `slow_seconds` marks it down, for a
  back-off that doubles with each failure in a row (what Mirrorbits' users asked for);
- consistency: a mirror whose size disagrees with the others' (compared when an object is
  first sized, `agree`), whose bytes fail the catalogue checksum, or whose probe object
  differs from the other mirrors' is inconsistent, and skipped;
- active probes (`probe_all`, with `health.probe`) bring mirrors back, or find them out.

Mirrors' ETags differ (each server makes its own), so each mirror's validator is kept per
object (`validators`): a resumed read on another mirror is tied to *that* mirror's ETag.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

import anyio
import httpx

from upstreams.base import (
    BadPath,
    ObjectNotFound,
    Origins,
    Resolver,
    UpstreamError,
    UpstreamObject,
    UpstreamUnavailable,
)
from upstreams.caps import UpstreamBusy
from upstreams.http import stream
from upstreams.memo import Memo

log = logging.getLogger("fdp.upstreams")

T = TypeVar("T")

#: resolutions kept per set (all members answered), and when some did not
MEMO_SIZE, MEMO_TTL, PARTIAL_TTL = 4096, 300.0, 10.0
#: a mirror's ETag of each object, as last seen (bounded)
VALIDATORS = 65536
#: once one mirror has sized an object, how long the others may take to agree or not
AGREE_GRACE = 2.0


@dataclass(frozen=True)
class Rules:
    """The set's health settings (`upstream.health`), as numbers."""

    probe: str | None = None
    interval: float = 60.0
    timeout: float = 10.0
    probe_max_bytes: int = 16 * 2**20
    slow: float = 10.0
    backoff: float = 5.0
    max_backoff: float = 300.0
    inconsistent_for: float = 3600.0


class Member:
    """One mirror of a set and what this process has seen of it (threads update it too)."""

    def __init__(
        self, name: str, resolver: Resolver, priority: int, weight: int, rules: Rules
    ) -> None:
        #: how /status and metrics name it: a base URL, bucket or provider, no credentials
        self.name = name
        self.resolver = resolver
        self.priority = priority
        self.weight = weight
        self.rules = rules
        self._lock = threading.Lock()
        self.failures = 0  # in a row
        self.down_until = 0.0  # monotonic
        self.error: str | None = None
        self.last_ok: float | None = None
        self.last_error: float | None = None
        self.inconsistent: str | None = None
        self.inconsistent_until = 0.0
        self.latency: float | None = None  # seconds to an answer's headers, smoothed
        self.active = 0  # fetches under way
        self.requests = 0
        self.errors = 0
        self.probed: float | None = None  # wall time of the last active probe

    def state(self, now: float | None = None) -> str:
        """`inconsistent`, `down`, `up`, or `unknown` (probes are on and none has answered)."""
        now = time.monotonic() if now is None else now
        if self.inconsistent is not None and now < self.inconsistent_until:
            return "inconsistent"
        if now < self.down_until:
            return "down"
        if self.rules.probe and self.last_ok is None and self.probed is None:
            return "unknown"
        return "up"

    def answered(self, seconds: float) -> None:
        """It answered, in `seconds` to the headers; too slow counts as a failure."""
        with self._lock:
            self.requests += 1
            self.latency = seconds if self.latency is None else 0.8 * self.latency + 0.2 * seconds
            if seconds > self.rules.slow:
                self._down(f"slow ({seconds:.1f} s to answer)")
                return
            self.failures, self.down_until, self.error = 0, 0.0, None
            self.last_ok = time.time()

    def failed(self, error: str) -> None:
        with self._lock:
            self.requests += 1
            self._down(error)

    def _down(self, error: str) -> None:
        self.errors += 1
        self.failures += 1
        backoff = min(self.rules.backoff * 2 ** min(self.failures - 1, 30), self.rules.max_backoff)
        self.down_until = time.monotonic() + backoff
        self.error, self.last_error = error, time.time()
        log.warning("mirror %s is down for %.0f s: %s", self.name, backoff, error)

    def disagrees(self, reason: str) -> None:
        """Its bytes are not the others': it is left out for `inconsistent_for`."""
        with self._lock:
            if self.inconsistent is None:
                log.error("mirror %s is inconsistent: %s", self.name, reason)
            self.inconsistent = reason
            self.inconsistent_until = time.monotonic() + self.rules.inconsistent_for

    def agrees(self) -> None:
        with self._lock:
            if self.inconsistent is not None:
                log.info("mirror %s is consistent again", self.name)
            self.inconsistent = None

    @contextlib.contextmanager
    def fetching(self) -> Iterator[None]:
        """One fetch under way from it (its load)."""
        with self._lock:
            self.active += 1
        try:
            yield
        finally:
            with self._lock:
                self.active -= 1

    def public(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "mirror": self.name,
            "priority": self.priority,
            "weight": self.weight,
            "state": self.state(now),
            "down_for_seconds": round(max(0.0, self.down_until - now), 1),
            "failures_in_a_row": self.failures,
            "error": self.error,
            "inconsistent": self.inconsistent if self.state(now) == "inconsistent" else None,
            "latency_ms": None if self.latency is None else round(self.latency * 1000, 1),
            "active": self.active,
            "requests": self.requests,
            "errors": self.errors,
            "last_ok": self.last_ok,
            "last_error": self.last_error,
            "last_probe": self.probed,
        }


def blames(error: BaseException) -> bool:
    """Whether a failed call counts against the mirror: not when our own cap on its origin
    was full, nor when it refused this request (a 4xx: another mirror would too)."""
    if isinstance(error, UpstreamBusy) or not isinstance(error, UpstreamUnavailable):
        return False
    return error.status is None or error.status >= 500 or error.status in (408, 429)


def _weighted_order(members: list[tuple[Member, T]]) -> list[tuple[Member, T]]:
    """A random order where heavier members tend to come first (Efraimidis-Spirakis)."""
    return sorted(members, key=lambda m: random.random() ** (1.0 / m[0].weight), reverse=True)  # noqa: S311 (load spreading, not secrecy)


class MirrorSet:
    """A resolver over several members that hold the same objects under the same paths."""

    def __init__(self, members: list[Member], rules: Rules) -> None:
        self.members = members
        self.rules = rules
        self.origins = Origins()
        for m in members:
            self.origins = self.origins | m.resolver.origins
        #: each mirror's ETag of an object (by the object's href there), as last seen
        self._validators: Memo[str, str] = Memo(VALIDATORS, 86400.0)
        self._lock = threading.Lock()
        self._resolved: Memo[str, UpstreamObject] = Memo(MEMO_SIZE, MEMO_TTL)
        self._next_probe = 0.0
        #: background checks still running (a reference keeps each task alive)
        self._tasks: set[asyncio.Task[Any]] = set()

    def order(self, choices: tuple[tuple[Member, T], ...]) -> list[tuple[Member, T]]:
        """Healthy mirrors (by priority, weighted among equals), then the down ones (the
        soonest back first); never the inconsistent ones."""
        now = time.monotonic()
        ready: dict[tuple[bool, int], list[tuple[Member, T]]] = {}
        down = []
        for choice in choices:
            state = choice[0].state(now)
            if state == "inconsistent":
                continue
            if state == "down":
                down.append(choice)
            else:
                ready.setdefault((state != "up", choice[0].priority), []).append(choice)
        out = [c for k in sorted(ready) for c in _weighted_order(ready[k])]
        return out + sorted(down, key=lambda c: c[0].down_until)

    async def resolve(self, path: str) -> UpstreamObject:
        """The object at every member that has it; the catalogue's facts from the first
        that knows them. Raises as the members do when none has it."""
        obj = self._resolved.get(path)
        if obj is not None:
            return obj
        results = await asyncio.gather(
            *(m.resolver.resolve(path) for m in self.members), return_exceptions=True
        )
        choices: list[tuple[Member, UpstreamObject]] = []
        errors: list[BaseException] = []
        for member, result in zip(self.members, results, strict=True):
            if isinstance(result, UpstreamObject):
                choices.append((member, result))
            elif isinstance(result, UpstreamError):
                errors.append(result)
                if blames(result):
                    member.failed(f"resolving: {result}")
            elif isinstance(result, BaseException):
                raise result
        if not choices:
            for kind in (BadPath, UpstreamUnavailable):
                if found := [e for e in errors if isinstance(e, kind)]:
                    raise found[0]
            raise errors[0] if errors else ObjectNotFound(f"no mirror has {path!r}")

        def first(field: str) -> Any:
            return next((getattr(o, field) for _, o in choices if getattr(o, field)), None)

        alternates = Alternates(self, tuple(choices))
        best = (self.order(alternates.choices) or choices)[0][1]
        obj = replace(
            best,
            size=first("size"),
            checksum=first("checksum"),
            media_type=first("media_type"),
            online=all(o.online for _, o in choices),
            mirrors=alternates,
        )
        self._resolved.put(path, obj, MEMO_TTL if not errors else PARTIAL_TTL)
        return obj

    def validator(self, href: str) -> str | None:
        """The ETag the mirror at `href` gave this object (None: not seen, or it gives none)."""
        with self._lock:
            return self._validators.get(href)

    def note_validator(self, href: str, etag: str | None) -> None:
        with self._lock:
            if etag:
                self._validators[href] = etag
            else:
                self._validators.pop(href)

    def public(self) -> list[dict[str, Any]]:
        return [m.public() for m in self.members]

    def spawn(self, work: Awaitable[Any]) -> None:
        """Run `work` in the background (kept referenced until it ends)."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- active probes -----------------------------------------------------------------

    def probe_due(self, now: float) -> bool:
        if self.rules.probe is None or now < self._next_probe:
            return False
        self._next_probe = now + self.rules.interval
        return True

    async def probe_all(self, client: httpx.AsyncClient) -> None:
        """Ask every mirror for the probe object: up or down by its answer, consistent or not
        by its size and sha-256 against the other mirrors' (the catalogue's, if it has one)."""
        assert self.rules.probe is not None
        results = await asyncio.gather(
            *(self._probe(client, m) for m in self.members), return_exceptions=True
        )
        seen = {m: r for m, r in zip(self.members, results, strict=True) if isinstance(r, tuple)}
        checksums = [r[2] for r in seen.values() if r[2]]
        if not seen:
            return
        if checksums:  # the catalogue says which bytes are right
            reference = next((r for r in seen.values() if r[2] and r[1] == r[2]), None)
            if reference is None:
                for m in seen:
                    m.disagrees("the probe object does not match the catalogue checksum")
                return
        else:
            votes: dict[tuple[int, str], list[Member]] = {}
            for m, r in seen.items():
                votes.setdefault(r[:2], []).append(m)
            # the most mirrors agree; a tie goes to the most preferred mirror's answer
            reference = max(
                votes, key=lambda v: (len(votes[v]), -min(m.priority for m in votes[v]))
            )
        for m, r in seen.items():
            if r[:2] == reference[:2]:
                m.agrees()
            else:
                m.disagrees(
                    f"its probe object ({r[0]} bytes, sha-256 {r[1][:12]}) differs from the "
                    f"other mirrors' ({reference[0]} bytes, sha-256 {reference[1][:12]})"
                )

    async def _probe(self, client: httpx.AsyncClient, member: Member) -> tuple[int, str, str]:
        """(size, sha-256, catalogue sha-256 or "") of the probe object at one mirror."""
        assert self.rules.probe is not None
        started = time.monotonic()
        try:
            with anyio.fail_after(self.rules.timeout):
                obj = await member.resolver.resolve(self.rules.probe)
                h, size = hashlib.sha256(), 0
                async with stream(client, obj, {}) as body:
                    member.answered(time.monotonic() - started)
                    async for chunk in body.chunks():
                        size += len(chunk)
                        if size > self.rules.probe_max_bytes:
                            break
                        h.update(chunk)
        except (UpstreamError, TimeoutError) as e:
            member.failed(f"probe: {e or 'timed out'}")
            raise
        finally:
            member.probed = time.time()
        digest = h.hexdigest() if size <= self.rules.probe_max_bytes else ""
        wanted = _sha256_of(obj.checksum)
        return size, digest, wanted


def _sha256_of(checksum: str | None) -> str:
    """The sha-256 in a multihash `file:checksum` (hex), or "" for any other kind."""
    if checksum and checksum.startswith("1220") and len(checksum) == 68:
        return checksum[4:].lower()
    return ""


@dataclass(frozen=True, eq=False)
class Alternates:
    """The mirrors that hold one object, each with its own href and credentials."""

    set: MirrorSet
    choices: tuple[tuple[Member, UpstreamObject], ...]
    #: the `Link` value and when it was made (remade at most once a second: hits read it)
    _link: list[Any] = field(default_factory=lambda: [-1.0, ""], repr=False)

    def ordered(self) -> list[tuple[Member, UpstreamObject]]:
        """Where to try, in order; raises when every mirror is inconsistent."""
        out = self.set.order(self.choices)
        if not out:
            raise UpstreamUnavailable("every mirror of the object is inconsistent", 503)
        return out

    def with_headers(self, extra: dict[str, str]) -> Alternates:
        return Alternates(
            self.set,
            tuple((m, replace(o, headers={**o.headers, **extra})) for m, o in self.choices),
        )

    def duplicates(self) -> str:
        """RFC 6249 `Link` alternates: the usable mirrors' plain URLs (presigned or signed
        hrefs are credentials, and stay out)."""
        made, link = self._link
        if time.monotonic() - made < 1.0:
            return link  # type: ignore[no-any-return]
        links = []
        for member, obj in self.set.order(self.choices):
            if "?" in obj.href or "@" in obj.href.split("/", 3)[2] or obj.headers:
                continue
            links.append(f"<{obj.href}>; rel=duplicate; pri={member.priority}")
        self._link[:] = [time.monotonic(), ", ".join(links)]
        return self._link[1]  # type: ignore[no-any-return]


def with_headers(obj: UpstreamObject, extra: dict[str, str]) -> UpstreamObject:
    """The object fetched with these request headers too, at whichever mirror."""
    mirrors = obj.mirrors.with_headers(extra) if obj.mirrors is not None else None
    return replace(obj, headers={**obj.headers, **extra}, mirrors=mirrors)


def attempts(obj: UpstreamObject) -> list[tuple[Member | None, UpstreamObject]]:
    """Where a fetch of `obj` goes, in order: its mirrors, or just itself."""
    if obj.mirrors is None:
        return [(None, obj)]
    return list(obj.mirrors.ordered())


async def first_answer(obj: UpstreamObject, call: Callable[[UpstreamObject], Awaitable[T]]) -> T:
    """`call` on each mirror in turn until one answers (errors other than a missing object
    mark the mirror down); the last error when none does."""
    error: UpstreamError | None = None
    for member, candidate in attempts(obj):
        if member is None:
            return await call(candidate)
        started = time.monotonic()
        try:
            with member.fetching():
                result = await call(candidate)
        except ObjectNotFound as e:
            error = error or e
            continue
        except UpstreamUnavailable as e:
            if not blames(e):
                raise  # our cap is full, or the request was refused: another will be too
            member.failed(str(e))
            error = e
            continue
        member.answered(time.monotonic() - started)
        return result
    raise error or UpstreamUnavailable("no mirror answered")


async def agree(obj: UpstreamObject, probe: Callable[[UpstreamObject], Awaitable[Any]]) -> Any:
    """The size and validators of a new object (`probe` returns a `Meta`), from every
    usable mirror at once: the size most of them report wins (a tie goes to the most
    preferred), mirrors reporting another are inconsistent, and each one's ETag is noted.
    The answer comes once the first mirror has answered and the others had `AGREE_GRACE`
    more; later answers are still checked when they come."""
    if obj.mirrors is None:
        return await probe(obj)
    mirrors = obj.mirrors
    order = mirrors.ordered()
    now = time.monotonic()
    order = [c for c in order if c[0].state(now) != "down"] or order  # (back-offs hold)
    rank = {id(m): i for i, (m, _) in enumerate(order)}

    async def one(member: Member, candidate: UpstreamObject) -> Any:
        started = time.monotonic()
        try:
            with member.fetching():
                meta = await probe(candidate)
        except UpstreamUnavailable as e:
            if blames(e):
                member.failed(str(e))
            raise
        member.answered(time.monotonic() - started)
        return meta

    tasks = {asyncio.ensure_future(one(m, c)): (m, c) for m, c in order}
    pending: set[asyncio.Future[Any]] = set(tasks)
    answers: list[tuple[Member, UpstreamObject, Any]] = []
    deadline: float | None = None
    try:
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = await asyncio.wait(
                pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                break
            for task in done:
                if not task.cancelled() and task.exception() is None:
                    answers.append((*tasks[task], task.result()))
            if answers and deadline is None:
                deadline = time.monotonic() + AGREE_GRACE
    except BaseException:
        for task in pending:
            task.cancel()
        raise
    if not answers:
        errors = [t.exception() for t in tasks if t.done() and not t.cancelled()]
        found = [e for e in errors if isinstance(e, UpstreamUnavailable)]
        raise (found or errors or [UpstreamUnavailable("no mirror answered")])[0]  # type: ignore[misc]
    sizes: dict[int, list[tuple[Member, UpstreamObject, Any]]] = {}
    for answer in answers:
        sizes.setdefault(answer[2].size, []).append(answer)
    size = max(sizes, key=lambda s: (len(sizes[s]), -min(rank[id(a[0])] for a in sizes[s])))

    def judge(member: Member, candidate: UpstreamObject, meta: Any) -> None:
        if meta.size == size:
            mirrors.set.note_validator(candidate.href, meta.etag)
        else:
            member.disagrees(f"{meta.size} bytes where the other mirrors have {size}")

    for answer in answers:
        judge(*answer)
    for task in pending:  # the slow ones are judged when they answer

        def late(t: asyncio.Future[Any], who: tuple[Member, UpstreamObject] = tasks[task]) -> None:
            if not t.cancelled() and t.exception() is None:
                judge(*who, t.result())

        task.add_done_callback(late)
        mirrors.set.spawn(task)
    best = min(sizes[size], key=lambda a: rank[id(a[0])])
    return best[2]


class _HasResolver(Protocol):
    resolver: Resolver


async def watch(entries: Callable[[], Iterable[_HasResolver]], client: httpx.AsyncClient) -> None:
    """Probe each mirror set that has a probe object, every `interval` (a set edited in or
    out of the policies is picked up at the next tick); probes of one set run at once."""
    while True:
        now = time.monotonic()
        for entry in list(entries()):
            resolver = entry.resolver
            if isinstance(resolver, MirrorSet) and resolver.probe_due(now):
                resolver.spawn(_probe_quietly(resolver, client))
        await asyncio.sleep(1.0)


async def _probe_quietly(mirrors: MirrorSet, client: httpx.AsyncClient) -> None:
    try:
        await mirrors.probe_all(client)
    except Exception:  # a probe must never end the watch
        log.exception("probing mirrors failed")
