"""Mirror sets against three real fault-injecting upstreams, each over its own copy of the
files (their ETags differ, as real mirrors' do)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import NO_CACHE, Upstream, demo_upstream, fdp_serve
from upstreams.base import UpstreamObject
from upstreams.http import HttpResolver
from upstreams.mirrors import Alternates, Member, MirrorSet, Rules

MiB = 2**20
BIG = 9 * MiB + 12345  # ten blocks of 1 MiB, the last one short


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_copy(demo_data: Path, root: Path, age: int) -> Path:
    """A mirror's folder: the demo catalogue (the server wants it) and `m/` with two files,
    the same bytes for every mirror, written at a different time (so another ETag)."""
    root.mkdir()
    shutil.copy(demo_data / "catalog.json", root / "catalog.json")
    (root / "m").mkdir()
    rng = __import__("random").Random(7)
    (root / "m" / "big.bin").write_bytes(rng.randbytes(BIG))
    (root / "m" / "small.bin").write_bytes(rng.randbytes(100_000))
    for f in (root / "m").iterdir():
        os.utime(f, (time.time() - age, time.time() - age))
    return root


@pytest.fixture
def mirrors(demo_data: Path, tmp_path: Path) -> Iterator[list[Upstream]]:
    """Three upstreams, A, B and C, holding the same files; each stopped by its pid."""
    ups = [
        demo_upstream(make_copy(demo_data, tmp_path / name, 100 * n), tmp_path, name)
        for n, name in enumerate("abc")
    ]
    try:
        for u in ups:
            u.proc.start()
        yield ups
    finally:
        for u in ups:
            u.proc.stop()


def mirror_config(
    work: Path,
    ups: list[Upstream],
    priorities: tuple[int, ...] = (1, 2, 3),
    redirect: bool = False,
    passthrough: bool = False,
    **health: Any,
) -> dict[str, Any]:
    mirrors = [
        {"http": {"base_url": f"{u.url}/data/m/"}, "priority": p}
        for u, p in zip(ups, priorities, strict=True)
    ]
    rules = {"backoff_seconds": 0.2, "max_backoff_seconds": 1, **health}
    datasets: dict[str, Any] = {"m": {"upstream": {"mirrors": mirrors, "health": rules}}}
    if redirect:  # redirects: only probes can tell it about its mirrors
        datasets["r"] = {
            "upstream": {"mirrors": mirrors, "health": {**rules, **REDIRECT_PROBES}},
            "delivery": "redirect",
        }
    if passthrough:  # nothing kept: every byte relayed as it comes
        datasets["p"] = {"upstream": {"mirrors": mirrors}, "retention": NO_CACHE}
    return {
        "cache": {"store": str(work / "cache"), "block_size": "1MiB"},
        "upstream_defaults": {"connect_timeout": 2, "read_timeout": 5},
        "datasets": datasets,
    }


REDIRECT_PROBES = {"probe": "small.bin", "interval_seconds": 1, "timeout_seconds": 2}


def status(proxy_url: str, dataset: str = "m") -> dict[str, dict[str, Any]]:
    """The mirrors of a dataset as /status.json shows them, by base URL."""
    figures = httpx.get(f"{proxy_url}/status.json", timeout=10).json()
    return {m["mirror"]: m for m in figures["mirrors"][dataset]}


def wait_for(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def named(u: Upstream) -> str:
    return f"{u.url}/data/m/"


def data_log(u: Upstream, name: str) -> list[dict[str, Any]]:
    return [e for e in u.log(f"/data/m/{name}")]


def test_a_mirror_killed_mid_download_leaves_the_body_whole(mirrors, tmp_path):
    a, b, c = mirrors
    want = a.file("m/big.bin")
    a.fault(r"^/data/m/big\.bin$", method="GET", chunk_delay=0.05)  # the preferred one, slow
    proxy = fdp_serve(mirror_config(tmp_path, mirrors), tmp_path)
    with proxy.proc:
        got = bytearray()
        with httpx.stream("GET", f"{proxy.url}/assets/m/big.bin", timeout=30) as r:
            assert r.status_code == 200
            assert r.headers["content-length"] == str(BIG)
            chunks = r.iter_raw()
            for chunk in chunks:
                got += chunk
                if len(got) >= 1.5 * MiB:
                    break
            a.proc._signal(signal.SIGKILL)  # A dies mid-download
            for chunk in chunks:
                got += chunk
        assert len(got) == BIG and sha(bytes(got)) == sha(want)
        # B went on from where A stopped, tied to B's own version of the file
        b_etag = httpx.head(f"{b.url}/data/m/big.bin").headers["etag"]
        resumed = [e for e in data_log(b, "big.bin") if e["if_range"] is not None]
        assert resumed and all(e["if_range"] == b_etag for e in resumed)
        assert any(
            not e["range"].startswith(f"bytes={i * MiB}-") for i in range(10) for e in resumed
        )
        shown = status(proxy.url)
        assert shown[named(a)]["state"] == "down" and shown[named(a)]["errors"] >= 1
        assert shown[named(b)]["state"] == "up"
        # a second read comes from the cache: nobody is asked
        counts = [len(u.data_requests()) for u in (b, c)]
        again = httpx.get(f"{proxy.url}/assets/m/big.bin", timeout=30)
        assert sha(again.content) == sha(want)
        assert [len(u.data_requests()) for u in (b, c)] == counts
        digest = base64.b64encode(bytes.fromhex(sha(want))).decode()
        assert again.headers["repr-digest"] == f"sha-256=:{digest}:"


def test_a_pass_through_goes_on_from_the_next_mirror_when_one_dies(mirrors, tmp_path):
    a, b, _c = mirrors
    want = a.file("m/big.bin")
    b_etag = httpx.head(f"{b.url}/data/m/big.bin").headers["etag"]
    proxy = fdp_serve(mirror_config(tmp_path, mirrors, passthrough=True), tmp_path)
    with proxy.proc:
        for asked, expect in ((None, want), ("bytes=1000-8000999", want[1000:8001000])):
            a.fault(r"^/data/m/big\.bin$", method="GET", chunk_delay=0.05)  # slow, preferred
            b.reset()
            got = bytearray()
            headers = {"range": asked} if asked else {}
            with httpx.stream("GET", f"{proxy.url}/assets/p/big.bin", headers=headers) as r:
                assert r.status_code == (206 if asked else 200)
                chunks = r.iter_raw()
                for chunk in chunks:
                    got += chunk
                    if len(got) >= MiB:
                        break
                a.proc._signal(signal.SIGKILL)  # A dies mid-body
                for chunk in chunks:
                    got += chunk
            assert len(got) == len(expect) and sha(bytes(got)) == sha(expect)
            resumed = [e for e in data_log(b, "big.bin") if e["range"] != "bytes=0-0"]
            assert [e["if_range"] for e in resumed] == [b_etag]
            a.proc.start()  # A comes back, and is preferred again once its back-off ends
            wait_for(lambda: status(proxy.url, "p")[named(a)]["state"] == "up")


def test_a_mirror_with_another_size_is_outvoted_and_left_out(mirrors, tmp_path):
    a, _b, c = mirrors
    (c.data / "m" / "small.bin").write_bytes(b"stale copy" * 100)  # C is behind
    # C is the preferred mirror: the majority still decides what the object is
    proxy = fdp_serve(mirror_config(tmp_path, mirrors, (2, 3, 1)), tmp_path)
    with proxy.proc:
        r = httpx.get(f"{proxy.url}/assets/m/small.bin", timeout=30)
        assert r.status_code == 200 and r.content == a.file("m/small.bin")
        shown = status(proxy.url)
        assert shown[named(c)]["state"] == "inconsistent"
        assert "bytes where the other mirrors have 100000" in shown[named(c)]["inconsistent"]
        # left out of everything after that, though it is the preferred one
        c.reset()
        r = httpx.get(f"{proxy.url}/assets/m/big.bin", timeout=30)
        assert sha(r.content) == sha(a.file("m/big.bin"))
        assert c.data_requests() == []
        assert f"{c.url}/data/m/big.bin" not in r.headers["link"]
        metrics = httpx.get(f"{proxy.url}/metrics").text
        assert f'fdp_mirror_consistent{{dataset="m",mirror="{named(c)}"}} 0.0' in metrics
        assert f'fdp_mirror_consistent{{dataset="m",mirror="{named(a)}"}} 1.0' in metrics


def test_a_mirror_with_other_bytes_is_found_by_the_probe_and_never_served(mirrors, tmp_path):
    a, _b, c = mirrors
    other = bytearray(c.file("m/big.bin"))
    other[5 * MiB] ^= 0xFF  # the same size, one byte different
    (c.data / "m" / "big.bin").write_bytes(bytes(other))
    config = mirror_config(tmp_path, mirrors, (2, 3, 1), probe="big.bin", interval_seconds=3600)
    proxy = fdp_serve(config, tmp_path)
    with proxy.proc:
        wait_for(lambda: status(proxy.url)[named(c)]["state"] == "inconsistent")
        assert "differs from the other mirrors'" in status(proxy.url)[named(c)]["inconsistent"]
        assert status(proxy.url)[named(a)]["state"] == "up"
        c.reset()
        for name in ("big.bin", "small.bin"):
            r = httpx.get(f"{proxy.url}/assets/m/{name}", timeout=30)
            assert r.status_code == 200 and r.content == a.file(f"m/{name}")
        assert c.data_requests() == []


def test_every_mirror_down_is_a_problem_until_one_comes_back(mirrors, tmp_path):
    _a, b, _c = mirrors
    proxy = fdp_serve(mirror_config(tmp_path, mirrors), tmp_path)
    with proxy.proc:
        for u in mirrors:
            u.proc.stop()
        r = httpx.get(f"{proxy.url}/assets/m/small.bin", timeout=30)
        assert r.status_code == 502
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["status"] == 502
        assert {m["state"] for m in status(proxy.url).values()} == {"down"}
        b.proc.start()  # B comes back, on its old port
        r = httpx.get(f"{proxy.url}/assets/m/small.bin", timeout=30)
        assert r.status_code == 200 and r.content == b.file("m/small.bin")
        assert status(proxy.url)[named(b)]["state"] == "up"


def test_a_slow_mirror_is_passed_over_until_its_back_off_ends(mirrors, tmp_path):
    a, b, _c = mirrors
    a.fault(r"^/data/m/", delay=1.0, times=1)  # A answers, but too slowly
    config = mirror_config(tmp_path, mirrors, slow_seconds=0.5, backoff_seconds=30)
    proxy = fdp_serve(config, tmp_path)
    with proxy.proc:
        r = httpx.get(f"{proxy.url}/assets/m/small.bin", timeout=30)
        assert r.status_code == 200 and r.content == a.file("m/small.bin")
        shown = status(proxy.url)[named(a)]
        assert shown["state"] == "down" and shown["error"].startswith("slow")
        asked = len(a.data_requests())
        r = httpx.get(f"{proxy.url}/assets/m/big.bin", timeout=30)
        assert sha(r.content) == sha(a.file("m/big.bin"))
        assert len(a.data_requests()) == asked  # down: not asked while B answers
        assert len(data_log(b, "big.bin")) > 0


def test_active_probes_see_a_mirror_go_and_come_back(mirrors, tmp_path):
    a, _b, _c = mirrors
    config = mirror_config(
        tmp_path, mirrors, probe="small.bin", interval_seconds=1, timeout_seconds=2
    )
    proxy = fdp_serve(config, tmp_path)
    with proxy.proc:
        wait_for(lambda: all(m["state"] == "up" for m in status(proxy.url).values()))
        a.proc.stop()
        wait_for(lambda: status(proxy.url)[named(a)]["state"] == "down")
        a.proc.start()
        wait_for(lambda: status(proxy.url)[named(a)]["state"] == "up")
        assert status(proxy.url)[named(a)]["last_probe"] is not None
        page = httpx.get(f"{proxy.url}/status").text
        assert "Mirrors" in page and named(a) in page


def test_alternates_are_listed_and_redirects_go_to_the_best_mirror(mirrors, tmp_path):
    a, b, _c = mirrors
    proxy = fdp_serve(mirror_config(tmp_path, mirrors, redirect=True), tmp_path)
    with proxy.proc:
        r = httpx.get(f"{proxy.url}/assets/m/small.bin", timeout=30)
        assert r.headers["link"] == ", ".join(
            f"<{u.url}/data/m/small.bin>; rel=duplicate; pri={p}"
            for u, p in zip(mirrors, (1, 2, 3), strict=True)
        )
        r = httpx.get(f"{proxy.url}/assets/r/small.bin", timeout=30)
        assert r.status_code == 307
        assert r.headers["location"] == f"{a.url}/data/m/small.bin"
        assert "rel=duplicate" in r.headers["link"]
        a.proc.stop()  # A fails: reads go on from B, and once a probe of r has seen it,
        r = httpx.get(f"{proxy.url}/assets/m/big.bin", timeout=30)  # so do redirects
        assert sha(r.content) == sha(b.file("m/big.bin"))
        wait_for(lambda: status(proxy.url, "r")[named(a)]["state"] == "down")
        r = httpx.get(f"{proxy.url}/assets/r/small.bin", timeout=30)
        assert r.headers["location"] == f"{b.url}/data/m/small.bin"


# -- the order of mirrors, as a unit -----------------------------------------------------


def member(name: str, priority: int, weight: int = 1) -> Member:
    rules = Rules(backoff=60.0, max_backoff=600.0)
    return Member(name, HttpResolver(f"http://{name}.test/"), priority, weight, rules)


def choices(*members: Member) -> tuple[tuple[Member, UpstreamObject], ...]:
    return tuple((m, UpstreamObject(f"http://{m.name}.test/x")) for m in members)


def test_order_by_priority_then_weight_down_last_inconsistent_never():
    a, b, c, d = member("a", 1), member("b", 2, 3), member("c", 2, 1), member("d", 3)
    mirror_set = MirrorSet([a, b, c, d], Rules())
    picks = {"b": 0, "c": 0}
    for _ in range(2000):
        order = [m.name for m, _ in mirror_set.order(choices(a, b, c, d))]
        assert order[0] == "a" and order[3] == "d"
        picks[order[1]] += 1
    assert 0.68 < picks["b"] / 2000 < 0.82  # weight 3 against 1: about 3 in 4
    a.failed("refused")
    c.disagrees("other bytes")
    order = [m.name for m, _ in mirror_set.order(choices(a, b, c, d))]
    assert order == ["b", "d", "a"]
    assert Alternates(mirror_set, choices(a, b, c, d)).duplicates() == (
        "<http://b.test/x>; rel=duplicate; pri=2, <http://d.test/x>; rel=duplicate; pri=3, "
        "<http://a.test/x>; rel=duplicate; pri=1"
    )


def test_back_off_doubles_and_an_answer_resets_it():
    m = member("a", 1)
    for n in range(1, 5):
        m.failed("refused")
        assert m.state() == "down"
        assert m.down_until - time.monotonic() == pytest.approx(min(60 * 2 ** (n - 1), 600), abs=1)
    m.answered(0.01)
    assert m.state() == "up" and m.failures == 0


def test_signed_or_credentialed_hrefs_are_not_listed_as_alternates():
    a, b, c = member("a", 1), member("b", 2), member("c", 3)
    mirror_set = MirrorSet([a, b, c], Rules())
    objs = (
        (a, UpstreamObject("http://a.test/x?X-Amz-Signature=s3cr3t")),
        (b, UpstreamObject("http://user:pw@b.test/x")),
        (c, UpstreamObject("http://c.test/x", headers={"authorization": "Bearer t"})),
    )
    assert Alternates(mirror_set, objs).duplicates() == ""
    assert json.dumps([m.public() for m in (a, b, c)])  # (what /status.json shows)
