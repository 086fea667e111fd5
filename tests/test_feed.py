"""Announcements at `GET /feed` (Server-Sent Events of Sarracenia v03 messages) and uploads.

Real fdp processes, a real OIDC issuer and our fault-injecting upstream; objects become
available by fills, `fdp cache put`, uploads and retrieval jobs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import BIN, fdp_serve
from tests.harness.procs import worker_process
from tests.test_queue import fresh_redis

OBJECTS = [f"scene-{s}/{band}.tif" for s in "abc" for band in ("B04", "visual")]


def sha512(data: bytes) -> str:
    return base64.b64encode(hashlib.sha512(data).digest()).decode()


def events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """The (id, v03 message) events of an open `/feed` response; pings are skipped."""
    event_id, data = None, []
    for line in response.iter_lines():
        if line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            assert event_id is not None
            yield event_id, json.loads("\n".join(data))
            event_id, data = None, []


def take(stream: Iterator[tuple[str, dict[str, Any]]], n: int) -> list[tuple[str, dict]]:
    return [next(stream) for _ in range(n)]


def feed(url: str, token: str | None = None, **params: str) -> Any:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    if "last_event_id" in params:
        headers["last-event-id"] = params.pop("last_event_id")
    # read: a bound on waiting for the next event (pings come every 15 s)
    timeout = httpx.Timeout(10, read=30)
    return httpx.stream("GET", f"{url}/feed", headers=headers, params=params, timeout=timeout)


def fill(url: str, dataset: str, path: str, token: str | None = None) -> bytes:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(f"{url}/assets/{dataset}/{path}", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.content


@pytest.fixture
def announcing(upstream, oidc, tmp_path):
    files = {"http": {"base_url": f"{upstream.url}/data/demo-cogs/"}}
    proxy = fdp_serve(
        {
            "cache": {"store": str(tmp_path / "cache")},
            "auth": {"oidc_issuer": oidc.issuer, "audience": "fdp"},
            "datasets": {
                "open": {"upstream": files, "access": {"public": True}, "owners": ["uploaders"]},
                "closed": {"upstream": files, "access": {"groups": ["partners"]}},
            },
        },
        tmp_path,
    )
    with proxy.proc:
        yield proxy


def test_each_reader_sees_only_what_it_may_read_and_resumes_with_no_gap_or_duplicate(
    announcing, oidc, upstream
):
    url, partner = announcing.url, oidc.token(sub="pat", groups=["partners"])
    fill(url, "open", OBJECTS[0])
    fill(url, "closed", OBJECTS[0], partner)
    fill(url, "open", OBJECTS[1])
    fill(url, "open", OBJECTS[2])

    with feed(url, partner) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        seen = take(events(r), 4)
    assert [(m["relPath"]) for _, m in seen] == [
        f"open/{OBJECTS[0]}",
        f"closed/{OBJECTS[0]}",
        f"open/{OBJECTS[1]}",
        f"open/{OBJECTS[2]}",
    ]
    for _, m in seen:  # the v03 message: fdp's URL, and the identity of the bytes it serves
        body = upstream.file(f"demo-cogs/{m['relPath'].split('/', 1)[1]}")
        assert m["baseUrl"] == f"{url}/assets/" and m["size"] == len(body)
        assert m["identity"] == {"method": "sha512", "value": sha512(body)}
        assert len(m["pubTime"]) == 19 and m["pubTime"][8] == "T" and m["mtime"][8] == "T"
        got = httpx.get(m["baseUrl"] + m["relPath"], headers={"authorization": f"Bearer {partner}"})
        assert got.content == body

    ids = [i for i, _ in seen]
    with feed(url) as r:  # anonymous: the closed dataset's object is not even hinted at
        anonymous = events(r)
        assert [i for i, _ in take(anonymous, 3)] == [ids[0], ids[2], ids[3]]
        fill(url, "closed", OBJECTS[3], partner)  # live, while the stream is open
        fill(url, "open", OBJECTS[3])
        event_id, message = next(anonymous)
        assert message["relPath"] == f"open/{OBJECTS[3]}"
    last = event_id

    # resumed after the first: exactly the rest, in order (the next one is the live sentinel)
    with feed(url, partner, last_event_id=ids[0]) as r:
        resumed = take(events(r), 5)
    assert [i for i, _ in resumed[:3]] == ids[1:]
    assert [m["relPath"] for _, m in resumed[3:]] == [f"closed/{OBJECTS[3]}", f"open/{OBJECTS[3]}"]
    assert resumed[4][0] == last

    # selection by dataset and path prefix; `?after=` for clients that cannot set headers
    fill(url, "open", OBJECTS[4])
    with feed(url, partner, dataset="open", path="scene-c/", after=ids[0]) as r:
        selected = take(events(r), 1)
    assert selected[0][1]["relPath"] == f"open/{OBJECTS[4]}"
    r = httpx.get(f"{url}/feed", headers={"last-event-id": "yesterday"})
    assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json"


def test_puts_and_uploads_are_served_at_once_and_announced_once(announcing, oidc, upstream):
    url, config = announcing.url, ["--config", str(announcing.config)]
    owner = oidc.token(sub="olga", groups=["uploaders"])
    payload = b"field notes\n" * 100_000
    put = httpx.put(
        f"{url}/admin/objects/open/ship/day 1.csv",
        content=payload,
        headers={"authorization": f"Bearer {owner}", "content-type": "text/csv"},
    )
    assert put.status_code == 201, put.text
    assert put.headers["location"] == f"{url}/assets/open/ship/day%201.csv"
    got = httpx.get(put.headers["location"])
    assert got.content == payload and got.headers["content-type"].startswith("text/csv")
    assert upstream.data_requests() == []  # the upstream does not have it, and is not asked

    with feed(url, last_event_id="0") as r:
        stream = events(r)
        event_id, message = next(stream)
        assert event_id == put.json()["announced"]
        assert message["relPath"] == "open/ship/day 1.csv"
        assert message["identity"]["value"] == sha512(payload)
        assert message["contentType"] == "text/csv"

        # `fdp cache put` announces too
        local = announcing.config.parent / "harvested.bin"
        local.write_bytes(b"\x01" * 5_000_000)
        done = subprocess.run(
            [BIN / "fdp", "cache", "put", "open", "harvest/h.bin", local, *config],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0 and "announced as" in done.stdout, done.stderr
        assert next(stream)[1]["relPath"] == "open/harvest/h.bin"

        # the same content under the same name, filled again, is not announced again
        fill(url, "open", OBJECTS[0])
        assert next(stream)[1]["relPath"] == f"open/{OBJECTS[0]}"
        evicted = subprocess.run(
            [BIN / "fdp", "cache", "evict", "open", OBJECTS[0], *config],
            capture_output=True,
            timeout=60,
        )
        assert evicted.returncode == 0
        fetched = len(upstream.data_requests())
        deadline = time.monotonic() + 15  # the proxy re-reads its index within seconds
        while len(upstream.data_requests()) == fetched:  # until it is fetched again
            assert time.monotonic() < deadline, "the evicted object was never fetched again"
            fill(url, "open", OBJECTS[0])
        fill(url, "open", OBJECTS[1])
        assert next(stream)[1]["relPath"] == f"open/{OBJECTS[1]}"

    # who may upload: an admin or an owner; a body that is not what was sent is not kept
    other = oidc.token(sub="eve", groups=["partners"])
    for token, status in ((None, 401), (other, 403)):
        headers = {"authorization": f"Bearer {token}"} if token else {}
        r = httpx.put(f"{url}/admin/objects/open/x.bin", content=b"x", headers=headers)
        assert r.status_code == status and r.headers["content-type"] == "application/problem+json"
    other_digest = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    lying = {"authorization": f"Bearer {owner}", "content-digest": f"sha-256=:{other_digest}:"}
    r = httpx.put(f"{url}/admin/objects/open/x.bin", content=b"corrupted", headers=lying)
    assert r.status_code == 400 and "Content-Digest" in r.json()["detail"]
    assert httpx.get(f"{url}/assets/open/x.bin").status_code != 200
    r = httpx.put(f"{url}/admin/objects/open/a/%2E%2E/x.bin", content=b"x", headers=lying)
    assert r.status_code == 400
    r = httpx.put(f"{url}/admin/objects/nope/x.bin", content=b"x", headers=lying)
    assert r.status_code == 404


def test_workers_announce_through_redis_and_a_dead_log_is_a_problem_not_a_hang(
    upstream, redis_url, blackhole, tmp_path
):
    """Retrieval jobs run in `fdp worker`: their objects reach every replica's feed."""
    redis = fresh_redis(redis_url)
    config = {
        "cache": {"store": str(tmp_path / "cache")},
        "queue": {"redis_url": redis},
        "datasets": {
            "vault": {
                "upstream": {"http": {"base_url": f"{upstream.url}/data/demo-archive/"}},
                "archive": True,
                "async": {"hold_seconds": 30},
            }
        },
    }
    proxy = fdp_serve(config, tmp_path)
    worker = worker_process(proxy.config, tmp_path)
    with proxy.proc, worker:
        with feed(proxy.url) as r:
            stream = events(r)
            got = fill(proxy.url, "vault", "archived-a/B04.tif")  # held while the job runs
            event_id, message = next(stream)
        assert "-" in event_id  # a Redis stream id
        assert message["relPath"] == "vault/archived-a/B04.tif"
        assert message["identity"]["value"] == sha512(got)
        assert "announced vault/archived-a/B04.tif" in worker.log_text()

    config["queue"]["redis_url"] = blackhole.redis_url  # a Redis that never answers
    slow = fdp_serve(config, tmp_path / "hung")
    with slow.proc:
        started = time.monotonic()
        r = httpx.get(f"{slow.url}/feed", timeout=30)
        assert r.status_code == 503 and r.json()["type"].endswith("/feed-unavailable")
        assert time.monotonic() - started < 10
