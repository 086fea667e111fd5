"""Announcements on an MQTT broker: a real mosquitto, a real `sr3 subscribe`, a poor link."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import fdp_serve
from tests.harness.link import Link
from tests.harness.mqtt import Listener, sr3_subscribe, start_mosquitto, wait_until
from tests.test_feed import OBJECTS, fill, sha512


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    proc, port = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    with proc:
        yield port


def announcing(upstream_url: str, broker_url: str, work: Path, **announce: object) -> object:
    files = {"http": {"base_url": f"{upstream_url}/data/demo-cogs/"}}
    return fdp_serve(
        {
            "cache": {"store": str(work / "cache")},
            "announce": {"broker": broker_url, **announce},
            "datasets": {"open": {"upstream": files}, "other": {"upstream": files}},
        },
        work,
    )


def status(proxy: object) -> dict:
    return httpx.get(f"{proxy.url}/status.json").json()["announce"]


def acknowledged(proxy: object) -> bool:
    """The broker acknowledged everything in the feed."""
    now = status(proxy)
    return now["newest"] is not None and now["published_up_to"] == now["newest"]


def test_sr3_subscribe_downloads_what_fdp_announces_and_verifies_it(broker, upstream, tmp_path):
    proxy = announcing(upstream.url, f"mqtt://127.0.0.1:{broker}", tmp_path / "fdp")
    listener = Listener(broker, "xpublic/v03/#")
    sr3 = sr3_subscribe(tmp_path / "sr3", broker, "open/#", tmp_path / "downloads")
    try:
        with proxy.proc, sr3:
            wait_until(
                lambda: "publishing announcements" in proxy.proc.log_text(), 30, "the publisher"
            )
            fill(proxy.url, "open", OBJECTS[0])
            fill(proxy.url, "other", OBJECTS[1])  # not selected by sr3's subtopic
            fill(proxy.url, "open", OBJECTS[3])
            messages = listener.wait(3)
            assert [topic for topic, _, _ in messages] == [
                "xpublic/v03/open/scene-a",
                "xpublic/v03/other/scene-a",
                "xpublic/v03/open/scene-b",
            ]
            assert all(content_type == "application/json" for _, _, content_type in messages)
            body = upstream.file(f"demo-cogs/{OBJECTS[0]}")
            assert messages[0][1]["identity"] == {"method": "sha512", "value": sha512(body)}

            wanted = [tmp_path / "downloads" / "open" / path for path in (OBJECTS[0], OBJECTS[3])]
            log = sr3.log_path
            wait_until(
                lambda: log.read_text().count("identity verified") == 2, 60, "sr3's downloads"
            )
            for path, name in zip(wanted, (OBJECTS[0], OBJECTS[3]), strict=True):
                assert path.read_bytes() == upstream.file(f"demo-cogs/{name}")
            assert "identity mismatch" not in log.read_text()
            assert not (tmp_path / "downloads" / "other").exists()
            # sr3 fetched through fdp (cache hits): the provider saw each object once
            assert len({r["path"] for r in upstream.data_requests()}) == 3
            access = proxy.proc.log_text()
            assert access.count(f"GET /assets/open/{OBJECTS[0]} 200") == 2
    finally:
        listener.close()


def test_a_broker_out_of_reach_gets_every_announcement_in_order_when_it_is_back(
    broker, upstream, blackhole, tmp_path
):
    link = Link(broker)
    proxy = announcing(upstream.url, f"mqtt://127.0.0.1:{link.port}", tmp_path / "fdp")
    listener = Listener(broker, "xpublic/v03/open/#")
    try:
        with proxy.proc:
            wait_until(lambda: link.connections == 1, 30, "the publisher's connection")
            fill(proxy.url, "open", OBJECTS[0])
            assert listener.wait(1)[0][1]["relPath"] == f"open/{OBJECTS[0]}"
            wait_until(lambda: acknowledged(proxy), 10, "the broker's ack")
            first = int(status(proxy)["published_up_to"])
            link.drop()  # the broker is out of reach (for as long as it takes)
            for name in OBJECTS[1:4]:
                fill(proxy.url, "open", name)  # served as ever
            wait_until(
                lambda: "announcements not published" in proxy.proc.log_text(), 30, "the drop"
            )
            assert status(proxy)["connected"] is False and status(proxy)["error"]
            link.restore()
            messages = listener.wait(4, timeout=60)
            assert [m["relPath"] for _, m, _ in messages] == [f"open/{n}" for n in OBJECTS[:4]]
            wait_until(lambda: acknowledged(proxy), 10, "the acks")
            assert int(status(proxy)["published_up_to"]) == first + 3
            assert len(listener.messages) == 4  # and none twice
    finally:
        listener.close()
        link.close()

    # a broker that accepts and never answers holds up no request
    stuck = announcing(upstream.url, blackhole.url.replace("http", "mqtt"), tmp_path / "stuck")
    with stuck.proc:
        started = time.monotonic()
        fill(stuck.url, "open", OBJECTS[5])
        with httpx.stream("GET", f"{stuck.url}/feed", params={"after": "0"}) as r:
            assert r.status_code == 200
            assert any(line.startswith("data:") for line in r.iter_lines())
        assert time.monotonic() - started < 10
        assert httpx.get(f"{stuck.url}/healthz").status_code == 200
