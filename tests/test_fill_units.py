"""The fill engine's state machine in-process, against the real demo upstream and a real
store: claim, fetch, verify, commit, fail, release waiters, follow and take over a claim."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from cache.engine import FillEngine
from cache.fill import Fill, FillFailed
from cache.store import Store, object_key, version_tag
from upstreams.base import UpstreamObject
from upstreams.http import make_pool

BLOCK = 64 * 1024
B04 = "demo-cogs/scene-c/B04.tif"


def run(scenario: Callable[[FillEngine, Store], Awaitable[None]], root: Path) -> None:
    async def main() -> None:
        store = Store(root)
        async with httpx.AsyncClient() as client:
            engine = FillEngine(store, client, BLOCK, pool=make_pool())
            try:
                await scenario(engine, store)
            finally:
                await engine.fills.drain()
                store.close()

    asyncio.run(main())


async def read(fill: Fill, start: int = 0, end: int | None = None) -> bytes:
    out = bytearray()
    async for chunk in fill.follow(start, fill.size if end is None else end):
        out += chunk
    return bytes(out)


def gets(upstream) -> list[str | None]:
    return [e["range"] for e in upstream.data_requests() if e["method"] == "GET"]


@pytest.fixture
def obj(upstream) -> UpstreamObject:
    return UpstreamObject(href=f"{upstream.url}/data/{B04}")


def test_claim_fetch_commit_and_single_flight(upstream, obj, tmp_path):
    data = upstream.file(B04)

    async def scenario(engine: FillEngine, store: Store) -> None:
        record = await engine.create_record("d", object_key("d", "b04"), "b04", obj)
        first = engine.ensure(record, obj, 2)
        assert engine.ensure(record, obj, 2) is first  # claimed once
        got = await asyncio.gather(read(first), read(first, 100, 200))
        assert (
            got[0] == data[2 * BLOCK : 3 * BLOCK]
            and got[1] == data[2 * BLOCK + 100 : 2 * BLOCK + 200]
        )
        await engine.fills.settled(record.key)
        stored = store.refresh(record.key)
        assert stored is not None and stored.blocks == (2,)
        assert stored.block_sha256[2] == hashlib.sha256(data[2 * BLOCK : 3 * BLOCK]).hexdigest()
        assert list(store.tmp.iterdir()) == []  # the part file went into the store
        assert gets(upstream) == ["bytes=0-0", f"bytes={2 * BLOCK}-{3 * BLOCK - 1}"]

    run(scenario, tmp_path / "c")


def test_a_failing_upstream_fails_every_waiter_and_leaves_nothing(upstream, obj, tmp_path):
    async def scenario(engine: FillEngine, store: Store) -> None:
        record = await engine.create_record("d", object_key("d", "b04"), "b04", obj)
        upstream.fault("scene-c/B04", status=404, method="GET")
        fill = engine.ensure(record, obj, 0)
        with pytest.raises(FillFailed):
            await fill.started  # before any byte: the request can still answer a problem
        with pytest.raises(FillFailed):
            await read(fill)
        await engine.fills.settled(record.key)
        assert store.refresh(record.key) is None  # gone upstream: no record of it kept
        assert list(store.tmp.iterdir()) == []

    run(scenario, tmp_path / "c")


def test_a_single_block_that_fails_its_checksum_is_withheld_and_not_stored(upstream, obj, tmp_path):
    lying = replace(obj, checksum="1220" + hashlib.sha256(b"other bytes").hexdigest())

    async def scenario(engine: FillEngine, store: Store) -> None:
        engine.block_size = 4 << 20  # the whole object is one block
        record = await engine.create_record("d", object_key("d", "b04"), "b04", lying)
        fill = engine.ensure(record, lying, 0)
        with pytest.raises(FillFailed):
            await read(fill)  # every byte but the last came; the last never does
        await engine.fills.settled(record.key)
        assert store.refresh(record.key) is None
        assert engine.health.integrity_failures == 1

    run(scenario, tmp_path / "c")


def _claim(store: Store, record, index: int) -> tuple[Path, int]:
    """Claim a block as another process would: its part file, opened and locked."""
    tag = version_tag(record.size, record.etag, record.last_modified)
    path = store.tmp / f"{record.key}.{index}.{tag}.part"
    owner = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(owner, fcntl.LOCK_EX)
    return path, owner


def test_a_claim_held_elsewhere_is_followed_then_taken_over(upstream, obj, tmp_path):
    """Another owner (here: another open file description, as another process has) writes
    half the block and dies without committing; the follower streams what it wrote, then
    resumes from there with a Range."""
    data = upstream.file(B04)

    async def scenario(engine: FillEngine, store: Store) -> None:
        record = await engine.create_record("d", object_key("d", "b04"), "b04", obj)
        upstream.reset()
        _, owner = _claim(store, record, 1)
        os.pwrite(owner, data[BLOCK : BLOCK + 1000], 0)
        fill = engine.ensure(record, obj, 1)
        reader = asyncio.ensure_future(read(fill))
        await asyncio.wait_for(fill.started, 5)  # the owner's bytes reach our reader
        assert fill.written == 1000 and gets(upstream) == []
        os.close(owner)  # dies: the kernel drops its lock
        assert await asyncio.wait_for(reader, 10) == data[BLOCK : 2 * BLOCK]
        await engine.fills.settled(record.key)
        assert gets(upstream) == [f"bytes={BLOCK + 1000}-{2 * BLOCK - 1}"]
        stored = store.refresh(record.key)
        assert stored is not None and stored.blocks == (1,)
        assert stored.block_sha256[1] == hashlib.sha256(data[BLOCK : 2 * BLOCK]).hexdigest()

    run(scenario, tmp_path / "c")


def test_a_claim_held_elsewhere_and_committed_is_read_from_the_store(upstream, obj, tmp_path):
    data = upstream.file(B04)

    async def scenario(engine: FillEngine, store: Store) -> None:
        record = await engine.create_record("d", object_key("d", "b04"), "b04", obj)
        upstream.reset()
        path, owner = _claim(store, record, 0)
        fill = engine.ensure(record, obj, 0)
        reader = asyncio.ensure_future(read(fill))
        block = data[:BLOCK]
        os.pwrite(owner, block, 0)
        sha = hashlib.sha256(block).hexdigest()
        await asyncio.to_thread(store.commit_block, record, 0, path, sha)  # as the owner does
        fcntl.flock(owner, fcntl.LOCK_UN)
        os.close(owner)
        assert await asyncio.wait_for(reader, 10) == block
        assert gets(upstream) == []  # nothing fetched here

    run(scenario, tmp_path / "c")


def test_a_failed_owner_elsewhere_fails_its_followers(upstream, obj, tmp_path):
    async def scenario(engine: FillEngine, store: Store) -> None:
        record = await engine.create_record("d", object_key("d", "b04"), "b04", obj)
        path, owner = _claim(store, record, 0)
        fill = engine.ensure(record, obj, 0)
        reader = asyncio.ensure_future(read(fill))
        os.unlink(path)  # the owner's fetch failed: it removes its file, then lets go
        os.close(owner)
        with pytest.raises(FillFailed):
            await asyncio.wait_for(reader, 10)

    run(scenario, tmp_path / "c")
