"""The MQTT publisher: the announcement log, as Sarracenia v03 messages on a broker.

One process publishes at a time (a lease in the log: replicas and `--workers` processes take
over from one that stops). It goes on from where the log says publishing got to, so a broker
that was down for hours gets every announcement still in the window, in order, when it is
back (at least once: a message may be sent twice around a crash, never skipped). Messages
carry MQTT v5's content type `application/json`, by which Sarracenia's subscribers know v03.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import ssl
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import anyio
import anyio.to_thread
import redis
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import Counter

from cache.feed import topic, v03
from policies.config import AnnounceConfig
from policies.model import SecretFileError
from proxy.feed import PAGE, Feed, FeedUnavailable, lease_owner, release

log = logging.getLogger("fdp.feed")

ROLE = "mqtt"
LEASE_SECONDS = 30.0
#: seconds a broker may take to accept a connection or acknowledge a message
BROKER_TIMEOUT = 10.0
MAX_BACKOFF = 60.0

PUBLISHED = Counter("fdp_announcements_published", "Announcements published to the MQTT broker")


class Publisher:
    def __init__(self, feed: Feed, config: AnnounceConfig, public_url: str) -> None:
        assert config.broker is not None
        self.feed, self.config, self.public_url = feed, config, public_url
        self.root = f"{config.exchange}/{config.topic_prefix}"
        self.owner = lease_owner()
        broker = urlsplit(config.broker)
        self.host, self.tls = broker.hostname or "", broker.scheme == "mqtts"
        self.port = broker.port or (8883 if self.tls else 1883)
        #: what `/status` shows
        self.connected = False
        self.leader = False
        self.error: str | None = None
        #: the last announcement the broker acknowledged
        self.mark: str | None = None
        #: when the lease was last taken or renewed (`anyio.current_time()`)
        self.renewed = 0.0

    def public(self) -> dict[str, Any]:
        return {
            "broker": self.config.broker,
            "publishing": self.leader,
            "connected": self.connected,
            "error": self.error,
            "published_up_to": self.mark,
        }

    async def _lease(self) -> bool:
        taken = anyio.current_time()
        self.leader = await anyio.to_thread.run_sync(
            self.feed.log.lease, ROLE, self.owner, LEASE_SECONDS
        )
        if self.leader:
            self.renewed = taken
        return self.leader

    async def _held(self) -> bool:
        """Renew the lease once a third of it has passed; False when another process holds
        it now. Checked after every message: a page may take longer than the lease."""
        if anyio.current_time() - self.renewed <= LEASE_SECONDS / 3:
            return True
        return await self._lease()

    async def _mark(self) -> str:
        """Where publishing got to; the log's end when this broker is new to it."""
        mark = await anyio.to_thread.run_sync(self.feed.log.mark, ROLE)
        if mark is not None:
            return mark
        mark = await anyio.to_thread.run_sync(self.feed.log.newest) or "0"
        await anyio.to_thread.run_sync(self.feed.log.mark, ROLE, mark)
        return mark

    def _client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.host,
            self.port,
            username=self.config.username,
            password=self.config.broker_password(),
            identifier=f"fdp-{self.owner}",
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=BROKER_TIMEOUT,
            tls_context=ssl.create_default_context() if self.tls else None,
        )

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            await release(self.feed.log, ROLE, self.owner)  # (only if it is this one's)

    async def _run(self) -> None:
        backoff = 1.0
        while True:
            try:
                if not await self._lease():
                    await anyio.sleep(LEASE_SECONDS / 3)
                    continue
                mark = await self._mark()
                async with self._client() as client:
                    self.connected, self.error, backoff = True, None, 1.0
                    log.info("publishing announcements to %s", self.config.broker)
                    await self._publish(client, mark)
            except (
                aiomqtt.MqttError,
                FeedUnavailable,
                OSError,
                SecretFileError,
                redis.RedisError,
                sqlite3.Error,
            ) as e:
                self.error = f"{type(e).__name__}: {e}"
                log.warning("announcements not published to %s: %s", self.config.broker, e)
            self.connected = False
            await anyio.sleep(backoff)
            backoff = min(MAX_BACKOFF, backoff * 2)

    async def _publish(self, client: aiomqtt.Client, mark: str) -> None:
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.ContentType = "application/json"
        while True:
            woken = self.feed.growth()
            page = await self.feed.read(mark)
            held = True
            for n in page:
                body = json.dumps(v03(n, self.public_url))
                await client.publish(
                    topic(n, self.root), body, qos=self.config.qos, properties=properties
                )
                PUBLISHED.inc()
                mark = n.id
                if not (held := await self._held()):
                    break
            if page:
                self.mark = mark
                if held:  # (else the holder's mark, perhaps ahead, stays)
                    await anyio.to_thread.run_sync(self.feed.log.mark, ROLE, mark)
            if not held or not await self._held():
                return  # another process publishes now
            if len(page) < PAGE:
                with anyio.move_on_after(LEASE_SECONDS / 3):
                    await woken.wait()
