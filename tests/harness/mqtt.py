"""Announcement peers: a real mosquitto broker, an MQTT v5 listener, a real `sr3 subscribe`."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from tests.harness.procs import ServerProcess, port_open
from tests.harness.services import LOOPBACK, GroupServerProcess, _start_with_retry, free_ports

MOSQUITTO = Path("/usr/sbin/mosquitto")
#: a message as a listener got it: topic, JSON body, MQTT v5 content type
Message = tuple[str, dict[str, Any], str | None]


def start_mosquitto(log_dir: Path, port: int | None = None) -> tuple[ServerProcess, int]:
    """An anonymous mosquitto on a loopback port, keeping nothing on disk."""
    if not MOSQUITTO.exists():
        raise RuntimeError(f"{MOSQUITTO} not found: run `make test` (it installs mosquitto)")

    def make() -> tuple[ServerProcess, int]:
        chosen = port or free_ports(1)[0]
        conf = log_dir / f"mosquitto-{chosen}.conf"
        conf.write_text(f"listener {chosen} {LOOPBACK}\nallow_anonymous true\npersistence false\n")
        proc = GroupServerProcess(
            "mosquitto",
            [str(MOSQUITTO), "-c", str(conf)],
            log_dir=log_dir,
            ready=lambda: port_open(chosen),
            timeout=15,
        )
        return proc, chosen

    return _start_with_retry(make)


class Listener:
    """An MQTT v5 client that keeps every message under `topic_filter`, in arrival order."""

    def __init__(self, port: int, topic_filter: str) -> None:
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic_filter, qos=1)
        self.client.connect(LOOPBACK, port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("the listener could not subscribe")

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        content_type = getattr(message.properties, "ContentType", None)
        with self._cond:
            self.messages.append((message.topic, json.loads(message.payload), content_type))
            self._cond.notify_all()

    def wait(self, count: int, timeout: float = 30.0) -> list[Message]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= count, timeout):
                raise AssertionError(f"{len(self.messages)} of {count} messages: {self.messages}")
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish(port: int, topic: str, payload: str) -> None:
    """One message at QoS 1, as any publisher on the broker could send it."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(LOOPBACK, port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


#: sr3 3.3.1 computes a download's checksum (`onfly_checksum`, by the announced method) but
#: never compares it with the announced identity: this plugin does, and rejects a mismatch.
VERIFY_PLUGIN = """
import logging, os
from sarracenia.flowcb import FlowCB
logger = logging.getLogger(__name__)

class VerifyIdentity(FlowCB):
    def after_work(self, worklist):
        keep = []
        for msg in worklist.ok:
            want, got = msg.get("identity"), msg.get("onfly_checksum")
            path = os.path.join(msg["new_dir"], msg["new_file"])
            if want and got and got == want:
                logger.info(f"identity verified: {path} {want['method']} {want['value']}")
                keep.append(msg)
                continue
            logger.error(f"identity mismatch: {path} announced {want} downloaded {got}")
            os.unlink(path)
            msg.setReport(422, "identity mismatch")
            worklist.rejected.append(msg)
        worklist.ok = keep
"""


def sr3_subscribe(work: Path, broker_port: int, subtopic: str, directory: Path) -> ServerProcess:
    """A real `sr3 subscribe` (its instance, in the foreground: `sr3 foreground` loops on
    MQTT in 3.3.1), with a home of its own under `work`; ready once it has subscribed."""
    home = work / "home"
    config = home / ".config" / "sr3"
    (config / "subscribe").mkdir(parents=True, exist_ok=True)
    (config / "plugins").mkdir(exist_ok=True)
    (home / ".cache" / "sr3" / "subscribe" / "fdp").mkdir(parents=True, exist_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    # sr3 insists on a user and password for mqtt://; mosquitto lets anyone in
    (config / "credentials.conf").write_text(f"mqtt://sr3:sr3@{LOOPBACK}:{broker_port}\n")
    (config / "plugins" / "verify_identity.py").write_text(VERIFY_PLUGIN)
    (config / "subscribe" / "fdp.conf").write_text(
        f"broker mqtt://sr3@{LOOPBACK}:{broker_port}\n"
        "exchange xpublic\ntopicPrefix v03\nqueueName q_fdp\nexpire 600\n"
        f"subtopic {subtopic}\ndirectory {directory}\nmirror on\naccept .*\n"
        "flowcb_prepend verify_identity.VerifyIdentity\nlogStdout on\n"
    )
    spec = importlib.util.find_spec("sarracenia")
    assert spec is not None and spec.submodule_search_locations
    instance = Path(spec.submodule_search_locations[0]) / "instance.py"
    log = work / "sr3.log"
    env = {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "USER": "fdp-test",
    }
    return ServerProcess(
        "sr3",
        [sys.executable, instance, "--no", "1", "foreground", "subscribe/fdp"],
        log_dir=work,
        env=env,
        cwd=work,
        ready=lambda: log.exists() and "subscribe completed" in log.read_text(errors="replace"),
        timeout=60,
        grace=15,
    )


def wait_until(check: Any, timeout: float, what: str) -> None:
    """Poll `check` (an observation of another process: a file, a log) until it holds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)
