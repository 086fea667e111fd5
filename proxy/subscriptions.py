"""Site mode: follow another fdp's `/feed` (or a broker's Sarracenia messages) and keep what
is announced here, over a poor link.

For each selected announcement: nothing to do when this name already holds this content;
a hard-linked twin when another name here does (content addressing: one transfer, one copy
on disk); else a transfer from the announcing fdp, paced to the subscription's share of the
link, resumed with `Range` after a drop, and checked against the announced sha-512 before it
is stored (a corrupted transfer is thrown away and tried again, never served). Then it is
announced here too, so the site's own subscribers see it.

The place in a feed (the last event whose object is settled, in feed order) is kept in the
local announcement log; a broker keeps it in a persistent MQTT session (messages are
acknowledged in order once settled, so a crash gets them again). Either way a restart or
hours offline resume where they were. One process follows each subscription (a lease in the
log, released when it stops): `--workers` and replicas transfer each object once.
Reconnections back off from `retry_seconds` to `max_retry_seconds`. Transfers go only to the
feed's origin, or the `fetch_from` URLs of a broker subscription: an announcement cannot
send this fdp, and its token, elsewhere.

An announcement whose identity is `cod` (calculate on download: a harvest found the object
and nobody has read it yet) is transferred when this name is not here, and its sha-512
computed here; the sha-512 announcement that follows the central's own fill then finds it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import ssl
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiomqtt
import anyio
import anyio.to_thread
import httpx
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cache.feed import Announcer, Log, announce_quietly, topic_level
from cache.store import ObjectRecord, Store, object_key
from policies.config import Settings, Subscription
from policies.pacing import Pace
from proxy.feed import lease_owner, release
from proxy.setaside import SetAsideList
from upstreams.base import BadPath, safe_key
from upstreams.registry import Registry

log = logging.getLogger("fdp.sites")

CHUNK = 256 * 1024
#: the feed pings every 15 s: a silent minute is a dead link
READ_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0
#: one process follows a subscription; another takes over this long after it stops renewing
LEASE_SECONDS = 30.0


@dataclass
class Progress:
    """What a transfer learned so far: the version its first answer named (`If-Range` for
    resumes), and the bytes received (a failure after some is not a stall)."""

    validator: str | None = None
    received: int = 0


class TransferFailed(Exception):
    """This object cannot be had now (gone there, refused, or corrupted every time)."""


class Stalled(Exception):
    """The other side has failed this transfer for longer than the patience given it."""


async def _events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(id, message) of each Server-Sent Event; pings and id-less events are skipped."""
    event_id, data = None, []
    async for line in lines:
        if line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            if event_id is not None:
                yield event_id, json.loads("\n".join(data))
            event_id, data = None, []


class Follower:
    """One subscription, run by `fdp serve`."""

    def __init__(
        self,
        sub: Subscription,
        settings: Settings,
        store: Store,
        feed: Log,
        registry: Registry,
        announcer: Announcer | None,
    ) -> None:
        self.sub, self.store, self.feed, self.registry = sub, store, feed, registry
        self.announcer = announcer
        self.block_size = int(settings.cache.block_size)
        self.url = sub.source
        self.origin = urlsplit(self.url)
        self.role = "subscription:" + hashlib.sha256(self.url.encode()).hexdigest()[:16]
        #: the only `baseUrl`s a broker's message may give
        self.bases = {str(u) if str(u).endswith("/") else f"{u}/" for u in sub.fetch_from}
        rate = sub.max_bytes_per_second
        self.pace = Pace(float(rate), burst=0.05) if rate else None
        self.slots = anyio.Semaphore(sub.concurrency)
        #: events in feed order and whether their object is settled (the place is the last
        #: settled one with none unsettled before it)
        self._pending: OrderedDict[str, bool] = OrderedDict()
        #: transfers under way by content: a second name of it waits, then twins
        self._content: dict[str, asyncio.Event] = {}
        self.owner = lease_owner()
        self.leader = self.connected = False
        self.error: str | None = None
        self.counts = dict.fromkeys(
            ("transferred", "twinned", "present", "skipped", "corrupted", "failed"), 0
        )
        self.set_aside = SetAsideList(store.root / "set-aside" / self.role.partition(":")[2])
        #: objects in that list now (shown in status), and a wake-up when one is added
        self.waiting = 0
        self._put_aside = asyncio.Event()
        self.bytes = 0

    def public(self) -> dict[str, Any]:
        return {
            "feed": self.url,
            "following": self.leader,
            "connected": self.connected,
            "error": self.error,
            "bytes": self.bytes,
            **self.counts,
            "set_aside": self.waiting,
        }

    # -- following --------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        token = self.sub.bearer()
        return {"authorization": f"Bearer {token}"} if token else {}

    async def run(self, client: httpx.AsyncClient) -> None:
        """Follow while this process holds the subscription's lease: one follower among the
        `--workers` processes (and replicas) that share the announcement log."""
        try:
            while True:
                try:
                    held = await self._lease()
                except Exception as e:  # the log: tried again
                    held, self.error = False, f"{type(e).__name__}: {e}"
                if held:
                    # (what was under way when the lease was last lost comes again from the
                    # place kept: nothing of it is pending any more)
                    self._pending.clear()
                    async with anyio.create_task_group() as following:
                        following.start_soon(self._keep_lease, following.cancel_scope)
                        following.start_soon(self._retry_set_aside, client)
                        await self._follow_on(client)
                await anyio.sleep(LEASE_SECONDS / 3)
        finally:
            await release(self.feed, self.role, self.owner)  # (only if it is this one's)

    async def _lease(self) -> bool:
        """Take or renew the lease; False when another process holds it."""
        self.leader = await self._io(self.feed.lease, self.role, self.owner, LEASE_SECONDS)
        return self.leader

    async def _keep_lease(self, following: anyio.CancelScope) -> None:
        """Renew the lease; stop following when another process took it (this one was
        frozen for longer than the lease), or when the log failed every renewal for most
        of it: the place kept is where the next follower goes on."""
        renewed = anyio.current_time()
        while True:
            await anyio.sleep(LEASE_SECONDS / 3)
            try:
                if not await self._lease():
                    break
                renewed = anyio.current_time()
            except Exception as e:  # the log, for a moment: the lease runs a while yet
                self.error = f"{type(e).__name__}: {e}"
                if anyio.current_time() - renewed > LEASE_SECONDS * 2 / 3:
                    self.leader = False
                    break
        log.warning("%s: the lease is lost; not following here", self.url)
        self.connected = False
        following.cancel()

    async def _follow_on(self, client: httpx.AsyncClient) -> None:
        backoff = self.sub.retry_seconds
        async with anyio.create_task_group() as transfers:
            while True:
                try:
                    if self.sub.broker is not None:
                        await self._listen(client)
                    else:
                        await self._follow(client, transfers)
                except Exception as e:  # the feed, the link, the local log: try again later
                    self.error = f"{type(e).__name__}: {e}"
                    log.warning("%s: %s; again in %.0f s", self.url, self.error, backoff)
                else:
                    backoff = self.sub.retry_seconds
                self.connected = False
                await anyio.sleep(backoff)
                backoff = min(self.sub.max_retry_seconds, backoff * 2)

    async def _follow(self, client: httpx.AsyncClient, transfers: anyio.abc.TaskGroup) -> None:
        place = await anyio.to_thread.run_sync(self.feed.mark, self.role)
        headers = self._headers() | ({"last-event-id": place} if place else {})
        timeout = httpx.Timeout(CONNECT_TIMEOUT, read=READ_TIMEOUT)
        async with client.stream("GET", self.url, headers=headers, timeout=timeout) as r:
            if r.status_code != 200:
                raise TransferFailed(f"the feed answered {r.status_code}")
            self.connected, self.error = True, None
            log.info("following %s from %s", self.url, place or "its start")
            async for event_id, message in _events(r.aiter_lines()):
                if event_id in self._pending:
                    continue  # (still under way from before the reconnection)
                await self.slots.acquire()  # the feed waits while every slot is busy
                self._pending[event_id] = False
                transfers.start_soon(self._settle, client, event_id, message)

    async def _settle(self, client: httpx.AsyncClient, event_id: str, message: dict) -> None:
        await self._try(client, message)
        self._pending[event_id] = True
        place = None
        while self._pending and next(iter(self._pending.values())):
            place, _ = self._pending.popitem(last=False)
        if place is not None:
            try:
                await anyio.to_thread.run_sync(self.feed.mark, self.role, place)
            except Exception as e:  # the log: a later settle keeps the place
                self.error = f"{type(e).__name__}: {e}"

    async def _try(self, client: httpx.AsyncClient, message: dict) -> None:
        try:
            await self._take(client, message, self.sub.set_aside_seconds)
        except Stalled as e:  # (its slot and the feed's place go on without it)
            log.warning("%s: %s; set aside, tried again later", message.get("relPath"), e)
            try:
                await self._io(self.set_aside.put, message)
            except OSError as e:  # (a full disk: it is lost to this site)
                self.counts["failed"] += 1
                log.error("%s: not set aside: %s", message.get("relPath"), e)
            self._put_aside.set()
        except Exception as e:  # one object's trouble never stops the subscription
            self.counts["failed"] += 1
            log.warning("%s: %s: %s", message.get("relPath"), type(e).__name__, e)
        finally:
            self.slots.release()

    async def _retry_set_aside(self, client: httpx.AsyncClient) -> None:
        """Try the set-aside objects again, one at a time (one slot), each on its own
        back-off; one set aside longer than `session_hours` is given up."""
        due: dict[Path, tuple[float, float]] = {}  # file: (when next, the wait after that)
        first = self.sub.retry_seconds
        while True:
            try:
                entries = await self._io(self.set_aside.entries)
            except OSError as e:
                entries, self.error = [], f"the set-aside list: {e}"
            self.waiting = len(entries)
            now = anyio.current_time()
            due = {e.file: due.get(e.file, (now + first, first)) for e in entries}
            ready = [e for e in entries if due[e.file][0] <= now]
            if not ready:  # (until the soonest is due, or another is set aside)
                wake = min((when for when, _ in due.values()), default=math.inf)
                with anyio.move_on_after(wake - now):
                    await self._put_aside.wait()
                self._put_aside.clear()
                continue
            for entry in ready:
                wait = due[entry.file][1]
                due[entry.file] = (now + wait, min(self.sub.max_retry_seconds, wait * 2))
                async with self.slots:
                    try:
                        if time.time() - entry.since > self.sub.session_hours * 3600:
                            raise TransferFailed("set aside too long: given up")
                        await self._take(client, entry.message, 0.0)
                    except Stalled:
                        continue  # (kept for later)
                    except Exception as e:
                        self.counts["failed"] += 1
                        log.warning("%s: %s", entry.message.get("relPath"), e)
                    try:
                        await self._io(self.set_aside.remove, entry)
                    except OSError as e:
                        self.error = f"the set-aside list: {e}"

    def _client_id(self) -> str:
        """A broker knows this site by a name made once and kept in the local log: it
        outlives restarts (the session's), and no other site has it."""
        role = f"{self.role}:client-id"
        name = self.feed.mark(role)
        if name is None:
            name = self.feed.mark(role, f"fdp-site-{uuid.uuid4().hex[:20]}")
        return name  # type: ignore[return-value]

    def _mqtt(self, client_id: str) -> aiomqtt.Client:
        broker = urlsplit(self.url)
        tls = broker.scheme == "mqtts"
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = int(self.sub.session_hours * 3600)
        return aiomqtt.Client(
            broker.hostname or "",
            broker.port or (8883 if tls else 1883),
            username=self.sub.username,
            password=self.sub.broker_password(),
            identifier=client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,  # the broker keeps what came while this site was away
            properties=properties,
            timeout=CONNECT_TIMEOUT,
            tls_context=ssl.create_default_context() if tls else None,
        )

    async def _listen(self, client: httpx.AsyncClient) -> None:
        """Follow the broker: each message is acknowledged, in arrival order, once its object
        is settled, so what was under way when the link or this process died comes again."""
        mqtt = self._mqtt(await self._io(self._client_id))
        paho = mqtt._client  # (aiomqtt acknowledges on arrival; this acks once settled)
        paho.manual_ack_set(True)
        root = f"{self.sub.exchange}/{self.sub.topic_prefix}"
        topics = [f"{root}/{topic_level(d)}/#" for d in self.sub.datasets or []] or [f"{root}/#"]
        #: arrivals in order: (message id, QoS, settled)
        unacked: OrderedDict[int, tuple[int, int, bool]] = OrderedDict()
        arrivals = itertools.count()

        async def settle(n: int, message: dict) -> None:
            await self._try(client, message)
            unacked[n] = (*unacked[n][:2], True)
            while unacked and next(iter(unacked.values()))[2]:
                _, (mid, qos, _) = unacked.popitem(last=False)
                if qos:
                    paho.ack(mid, qos)

        async with mqtt, anyio.create_task_group() as transfers:
            for name in topics:
                await mqtt.subscribe(name, qos=1)
            self.connected, self.error = True, None
            log.info("following %s (%s)", self.url, ", ".join(topics))
            async for m in mqtt.messages:
                try:
                    message = json.loads(m.payload)  # type: ignore[arg-type]
                    if not isinstance(message, dict):
                        raise ValueError(message)
                except Exception:  # (not a message: acknowledged, counted as failed)
                    message = {}
                await self.slots.acquire()
                n = next(arrivals)
                unacked[n] = (m.mid, m.qos, False)
                transfers.start_soon(settle, n, message)

    # -- one announcement -------------------------------------------------------------------

    def _selected(self, dataset: str, path: str) -> bool:
        if self.sub.datasets is not None and dataset not in self.sub.datasets:
            return False
        if dataset not in self.registry.entries:
            return False
        return any(fnmatch.fnmatchcase(path, pattern) for pattern in self.sub.paths)

    def _source(self, dataset: str, path: str, message: dict) -> str:
        """The object's URL: at the feed's own fdp (never the message's `baseUrl`), or at the
        message's `baseUrl` when it is one of `fetch_from` (an announcement cannot send this
        fdp, and its token, anywhere else)."""
        name = f"{quote(dataset, safe='')}/{quote(path)}"
        if self.sub.broker is None:
            return f"{self.origin.scheme}://{self.origin.netloc}/assets/{name}"
        base = str(message.get("baseUrl", ""))
        base = base if base.endswith("/") else base + "/"
        if base in self.bases:  # exactly: a path below one could name another dataset
            return base + name
        raise TransferFailed(f"baseUrl {base!r} is not one of fetch_from")

    async def _take(self, client: httpx.AsyncClient, message: dict, patience: float) -> None:
        """Settle one announcement: present, twinned, transferred or skipped; Stalled when
        the other side keeps failing it for `patience` seconds."""
        try:
            dataset, _, path = message["relPath"].partition("/")
            identity = message.get("identity") or {}
            method = identity.get("method")
            size = int(message["size"]) if message.get("size") is not None else None
            content = identity["value"] if method == "sha512" else None
            if content is not None and len(base64.b64decode(content, validate=True)) != 64:
                raise ValueError(content)
            path = safe_key(path)
        except (KeyError, TypeError, ValueError, BadPath, AttributeError):
            raise TransferFailed("not a v03 message") from None
        if (
            "fileOp" in message  # (a removal, rename or link: nothing to fetch)
            or (content is None and method != "cod")
            or (size is not None and size < 0)
            or not self._selected(dataset, path)
        ):
            self.counts["skipped"] += 1
            return
        # one transfer at a time per name (a cod and a sha-512 announcement of one object)
        # and per content (the same content under another name: after it, a twin)
        done, held = asyncio.Event(), []
        try:
            for guard in [f"name:{dataset}/{path}", *([content] if content else [])]:
                while (busy := self._content.get(guard)) is not None:
                    await busy.wait()
                self._content[guard] = done  # (no await since the check)
                held.append(guard)
            here = await self._io(self.store.record, object_key(dataset, path))
            if here is not None and here.complete and (content is None or here.sha512 == content):
                self.counts["present"] += 1
                return
            if content is not None and await self._twin(content, dataset, path):
                return
            url = self._source(dataset, path, message)
            part, sha512 = await self._transfer(client, url, size, content, patience)
            try:
                ingest = functools.partial(
                    self.store.ingest, media_type=message.get("contentType"), sha512=sha512
                )
                record = await self._io(ingest, dataset, path, part, self.block_size)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(part)
            self.counts["transferred"] += 1
            await self._announce(record)
        finally:
            for guard in held:
                del self._content[guard]
            done.set()

    async def _twin(self, content: str, dataset: str, path: str) -> bool:
        """Link another name's copy of this content, if there is one here."""
        for other_dataset, other_path in await self._io(self.feed.named, content):
            if (other_dataset, other_path) == (dataset, path):
                continue
            source = await self._io(self.store.record, object_key(other_dataset, other_path))
            if source is None or not source.complete or source.sha512 != content:
                continue
            record = await self._io(self.store.twin, source, dataset, path)
            if record is not None:
                self.counts["twinned"] += 1
                await self._announce(record)
                return True
        return False

    async def _announce(self, record: ObjectRecord) -> None:
        notice = await self._io(announce_quietly, self.store, self.feed, record)
        if notice is not None and self.announcer is not None:
            self.announcer.on_notice(notice)

    async def _io(self, fn: Any, *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args)

    # -- one transfer -----------------------------------------------------------------------

    async def _transfer(
        self,
        client: httpx.AsyncClient,
        url: str,
        size: int | None,
        content: str | None,
        patience: float,
    ) -> tuple[Path, str]:
        """The object in a file beside the cache and its sha-512 (base64), checked against
        the announced one; resumed across drops (the partial file is named by what is
        announced), fetched anew when corrupted. Stalled after `patience` seconds of
        failures with no byte gained."""
        what = f"{content}" if content else f"{url}|{size}"
        part = self.store.tmp / f"site-{hashlib.sha256(what.encode()).hexdigest()[:32]}.part"
        if size == 0 or content is None:
            # (bytes of unknown identity from before: perhaps another version; start over)
            await self._io(part.write_bytes, b"")
        for _ in range(self.sub.attempts):
            backoff = self.sub.retry_seconds
            total, progress = size, Progress()
            have = await self._io(_size, part)
            failing = None  # since when, with no byte gained
            while total is None or have < total:
                received = progress.received
                try:
                    total = await self._fetch(client, url, part, have, total, progress)
                    backoff, self.error = self.sub.retry_seconds, None
                except httpx.TransportError as e:  # the link dropped: go on from here
                    self.error = f"{url}: {e}"
                    if progress.received > received:
                        failing = None
                    failing = anyio.current_time() if failing is None else failing
                    if anyio.current_time() - failing >= patience:
                        raise Stalled(str(e)) from None
                    log.info("%s: %s; resuming", url, e)
                    await anyio.sleep(backoff)
                    backoff = min(self.sub.max_retry_seconds, backoff * 2)
                have = await self._io(_size, part)
            digest = base64.b64encode(await self._io(_sha512, part)).decode("ascii")
            if have == total and (content is None or digest == content):
                return part, digest
            self.counts["corrupted"] += 1
            log.warning("%s: the bytes do not match the announced sha-512; fetched again", url)
            await self._io(_remove, part)
        raise TransferFailed(f"corrupted {self.sub.attempts} times: given up")

    async def _fetch(
        self,
        client: httpx.AsyncClient,
        url: str,
        part: Path,
        have: int,
        size: int | None,
        progress: Progress,
    ) -> int:
        """Append what the other end sends from `have` on; returns the object's size (as
        announced, else as the answer says, else as read to its end). A resume is asked
        `If-Range` the version first sent, so a changed object starts over, never spliced."""
        headers = self._headers() | ({"range": f"bytes={have}-"} if have else {})
        if have and progress.validator:
            headers["if-range"] = progress.validator
        timeout = httpx.Timeout(CONNECT_TIMEOUT, read=READ_TIMEOUT)
        async with client.stream("GET", url, headers=headers, timeout=timeout) as r:
            if r.status_code in (401, 408, 429) or r.status_code >= 500:
                # (later: a 401 passes once the token file holds a fresh token)
                raise httpx.RemoteProtocolError(f"answered {r.status_code}")
            if r.status_code not in (200, 206):  # gone, refused, sent elsewhere
                raise TransferFailed(f"{url}: the announcing side answered {r.status_code}")
            total = size
            if r.status_code == 200:
                have = 0  # (it sent the whole: start over)
                progress.validator = r.headers.get("etag") or r.headers.get("last-modified")
                if total is None and r.headers.get("content-length", "").isdigit():
                    total = int(r.headers["content-length"])
            else:
                given = r.headers.get("content-range", "")
                if not given.startswith(f"bytes {have}-"):
                    raise httpx.RemoteProtocolError(f"answered {r.status_code} to a resume")
                if total is None and given.rpartition("/")[2].isdigit():
                    total = int(given.rpartition("/")[2])
            with open(part, "r+b" if have else "wb") as f:  # noqa: ASYNC230 (seek only)
                f.seek(have)
                f.truncate()
                async for chunk in r.aiter_bytes(CHUNK):
                    if self.pace is not None:
                        await anyio.sleep(self.pace.book(len(chunk)))
                    await anyio.to_thread.run_sync(f.write, chunk)
                    self.bytes += len(chunk)
                    progress.received += len(chunk)
                    if total is not None and f.tell() > total:
                        raise TransferFailed(f"{url}: longer than announced")
                return f.tell() if total is None else total


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _sha512(path: Path) -> bytes:
    digest = hashlib.sha512()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.digest()


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
