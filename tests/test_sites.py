"""Site mode: a site fdp follows a central fdp's feed over a poor link (a TCP relay of ours
that throttles, cuts and corrupts) and keeps what it selects."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from typing import Any

import httpx
import yaml

from tests.conftest import fdp_serve
from tests.harness.link import Link
from tests.harness.mqtt import publish, start_mosquitto, wait_until
from tests.harness.procs import PYTHON, ServerProcess, free_port, http_ok
from tests.test_cache import cache_ls
from tests.test_feed import OBJECTS, events, feed, sha512, take

COD = {"method": "cod", "value": "sha512"}

CAP = 4_000_000  # bytes a second: the site's share of the link


def status(proxy: Any, token: str | None = None) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(f"{proxy.url}/status.json", headers=headers, timeout=10)
    return r.json()["subscriptions"][0]


def central_gets(central: Any, path: str) -> list[str]:
    """The central's access-log lines of GETs of `path` (a folder's: ending in `/`)."""
    end = "" if path.endswith("/") else " "
    return [line for line in central.proc.log_text().splitlines() if f"GET {path}{end}" in line]


def test_a_site_keeps_what_it_selected_over_a_poor_link(upstream, oidc, tmp_path):
    files = {"http": {"base_url": f"{upstream.url}/data/demo-cogs/"}}
    central = fdp_serve(
        {
            "cache": {"store": str(tmp_path / "central" / "cache")},
            "auth": {"oidc_issuer": oidc.issuer, "audience": "fdp"},
            "datasets": {
                "field": {"upstream": files, "access": {"public": True}, "owners": ["crew"]},
                "other": {"upstream": files, "access": {"public": True}},
            },
        },
        tmp_path / "central",
        name="central",
    )
    link = Link(int(central.url.rsplit(":", 1)[1]))
    config = yaml.safe_load(central.config.read_text())
    config["server"]["public_url"] = link.url  # the site knows the central by the link
    central.config.write_text(yaml.safe_dump(config))
    (tmp_path / "site-token").write_text(oidc.token(sub="site-ship", exp_in=3600))
    site_config = {
        "cache": {"store": str(tmp_path / "site" / "cache")},
        "datasets": {"field": {"upstream": {"fdp": {"base_url": link.url}}}},
        "subscriptions": [
            {
                "feed": f"{link.url}/feed",
                "token_file": str(tmp_path / "site-token"),
                "datasets": ["field"],
                "paths": ["scene-a/*", "scene-b/*", "copies/*"],
                "max_bytes_per_second": CAP,
                "retry_seconds": 0.2,
                "max_retry_seconds": 1,
            }
        ],
    }
    site = fdp_serve(site_config, tmp_path / "site", name="site")
    crew = {"authorization": f"Bearer {oidc.token(sub='olga', groups=['crew'])}"}

    def upload(name: str, body: bytes) -> None:
        r = httpx.put(f"{central.url}/admin/objects/field/{name}", content=body, headers=crew)
        assert r.status_code == 201, r.text

    def central_fill(dataset: str, path: str) -> None:
        assert httpx.get(f"{central.url}/assets/{dataset}/{path}", timeout=30).status_code == 200

    def transferred(n: int, what: str, **counts: int) -> None:
        wait_until(
            lambda: (
                status(site)["transferred"] >= n
                and all(status(site)[k] >= v for k, v in counts.items())
            ),
            60,
            what,
        )
        assert status(site)["transferred"] == n

    def served_by_site(path: str, body: bytes) -> None:
        r = httpx.get(f"{site.url}/assets/field/{path}", timeout=30)
        assert r.status_code == 200 and r.content == body

    try:
        with central.proc, site.proc:
            wait_until(lambda: status(site)["connected"], 30, "the site following the feed")
            central_fill("field", OBJECTS[0])
            transferred(1, "the first object")

            # a byte flipped on the link: that transfer is thrown away and done again
            link.corrupt_after(300_000)
            started = time.monotonic()
            central_fill("field", OBJECTS[1])  # 3.6 MB
            transferred(2, "the corrupted object, fetched again", corrupted=1)
            visual = upstream.file(f"demo-cogs/{OBJECTS[1]}")
            # twice 3.6 MB at the cap: the cap held (it cannot be faster than this)
            assert time.monotonic() - started >= 2 * len(visual) / CAP * 0.8

            # the link drops mid-transfer: it goes on from where it was, with Range
            link.cut_after(1_000_000)
            central_fill("field", OBJECTS[3])
            transferred(3, "the object cut mid-transfer")
            resumed = central_gets(central, f"/assets/field/{OBJECTS[3]}")
            assert any(" 206 " in line for line in resumed), resumed
            assert len(central_gets(central, f"/assets/field/{OBJECTS[0]}")) == 2  # 1 + site

            # one content under two names: one transfer, a twin at the site
            payload = b"water samples, station 7\n" * 40_000
            upload("copies/one.csv", payload)
            upload("copies/two.csv", payload)
            transferred(4, "one of the twins", twinned=1)
            fetched = central_gets(central, "/assets/field/copies/")
            assert len(fetched) == 1, fetched

            # what it did not select never crosses the link
            central_fill("field", OBJECTS[4])  # scene-c
            central_fill("other", OBJECTS[0])
            central_fill("field", OBJECTS[2])  # the sentinel: scene-b
            transferred(5, "the sentinel", skipped=2)
            assert len(central_gets(central, f"/assets/field/{OBJECTS[4]}")) == 1  # ours

            # hours offline, in short: announcements made meanwhile arrive once it is back
            link.drop()
            wait_until(lambda: not status(site)["connected"], 30, "the site noticing")
            upload("copies/three.csv", b"late news\n" * 1000)
            link.restore()
            transferred(6, "what was announced while the link was down")

            for path in (OBJECTS[0], OBJECTS[1], OBJECTS[3], OBJECTS[2]):
                served_by_site(path, upstream.file(f"demo-cogs/{path}"))
            served_by_site("copies/one.csv", payload)
            served_by_site("copies/two.csv", payload)

            # where did my data go: the dataset's owners see the site's fetches
            r = httpx.get(f"{central.url}/me/deliveries", params={"dataset": "field"}, headers=crew)
            users = {(d["path"], d["user"]) for d in r.json()["deliveries"]}
            assert {(OBJECTS[3], "site-ship"), ("copies/one.csv", "site-ship")} <= users

            # a restarted site goes on from its place: nothing is fetched again
            site.proc.stop()
            before = central.proc.log_text().count("GET /assets/field/")
            site.proc.start()
            # following at once: the stopped process released its lease (else 30 s)
            wait_until(lambda: status(site)["connected"], 10, "the restarted site following")
            upload("copies/four.csv", b"after the restart\n")
            transferred(1, "the first announcement after the restart")
            after = central.proc.log_text().count("GET /assets/field/")
            assert after == before + 1  # (the new one)
    finally:
        link.close()


def test_a_site_follows_a_broker_and_the_central_follows_the_site(upstream, oidc, tmp_path):
    """Both directions over links of their own: the site takes the central's MQTT
    announcements (a persistent session keeps them while it is away), the central takes the
    site's uploads from its `/feed` once the link is back; nothing goes round in a loop."""
    broker, port = start_mosquitto(tmp_path)
    files = {"http": {"base_url": f"{upstream.url}/data/demo-cogs/"}}
    (tmp_path / "site-token").write_text(oidc.token(sub="site-ship", exp_in=3600))
    (tmp_path / "central-token").write_text(oidc.token(sub="central", exp_in=3600))
    central = fdp_serve(
        {
            "cache": {"store": str(tmp_path / "central" / "cache")},
            "auth": {"oidc_issuer": oidc.issuer, "audience": "fdp"},
            "announce": {"broker": f"mqtt://127.0.0.1:{port}"},
            "datasets": {
                "field": {
                    "upstream": files,
                    "access": {"authenticated": True},
                    "owners": ["crew"],
                },
            },
        },
        tmp_path / "central",
        name="central",
    )
    to_central = Link(int(central.url.rsplit(":", 1)[1]))
    site = fdp_serve(
        {
            "cache": {"store": str(tmp_path / "site" / "cache")},
            "auth": {"oidc_issuer": oidc.issuer, "audience": "fdp"},
            "datasets": {
                "field": {
                    "upstream": {"fdp": {"base_url": to_central.url}},
                    "access": {"authenticated": True},
                    "owners": ["crew"],
                }
            },
            "subscriptions": [
                {
                    "broker": f"mqtt://127.0.0.1:{port}",
                    "fetch_from": [f"{to_central.url}/assets/"],
                    "token_file": str(tmp_path / "site-token"),
                    "datasets": ["field"],
                    "retry_seconds": 0.2,
                    "max_retry_seconds": 1,
                }
            ],
        },
        tmp_path / "site",
        name="site",
    )
    to_site = Link(int(site.url.rsplit(":", 1)[1]))
    config = yaml.safe_load(central.config.read_text())
    config["server"]["public_url"] = to_central.url  # its announcements name the link
    config["subscriptions"] = [
        {
            "feed": f"{to_site.url}/feed",
            "token_file": str(tmp_path / "central-token"),
            "retry_seconds": 0.2,
            "max_retry_seconds": 1,
        }
    ]
    central.config.write_text(yaml.safe_dump(config))
    crew = {"authorization": f"Bearer {oidc.token(sub='olga', groups=['crew'])}"}
    ops = oidc.token(sub="ops", groups=["fdp-admins"], exp_in=3600)

    def central_fill(path: str) -> None:
        r = httpx.get(f"{central.url}/assets/field/{path}", headers=crew, timeout=30)
        assert r.status_code == 200

    def site_serves(path: str, body: bytes) -> None:
        r = httpx.get(f"{site.url}/assets/field/{path}", headers=crew, timeout=30)
        assert r.status_code == 200 and r.content == body

    try:
        with broker, central.proc, site.proc:
            both = lambda: status(site, ops)["connected"] and status(central, ops)["connected"]  # noqa: E731
            wait_until(both, 30, "both following")
            central_fill(OBJECTS[0])
            wait_until(lambda: status(site, ops)["transferred"] == 1, 60, "the site taking it")
            site_serves(OBJECTS[0], upstream.file(f"demo-cogs/{OBJECTS[0]}"))

            # [fault: a lying message] another origin, or no message at all: never fetched
            lie = {
                "pubTime": "20261121T000000.000",
                "baseUrl": f"{upstream.url}/data/",
                "relPath": "field/stolen.bin",
                "identity": {"method": "sha512", "value": sha512(b"x")},
                "size": 1,
            }
            before = len(upstream.data_requests())
            lies = [
                lie,
                # a path below the allowed base (another dataset there), dots, a query
                {**lie, "baseUrl": f"{to_central.url}/assets/secret/", "identity": COD},
                {**lie, "baseUrl": f"{to_central.url}/assets/%2e%2e/", "identity": COD},
                {**lie, "baseUrl": f"{to_central.url}/assets/?", "identity": COD},
            ]
            for message in lies:
                publish(port, "xpublic/v03/field", json.dumps(message))
            publish(port, "xpublic/v03/field", "not json")
            publish(port, "xpublic/v03/field", "[" * 100_000)  # (too deep for a parser)
            removal = {**lie, "baseUrl": f"{to_central.url}/assets/", "fileOp": {"remove": ""}}
            publish(port, "xpublic/v03/field", json.dumps(removal))
            wait_until(lambda: status(site, ops)["failed"] == 6, 30, "every lie refused")
            wait_until(lambda: status(site, ops)["skipped"] == 1, 30, "a removal, not fetched")
            assert "stolen" not in central.proc.log_text()
            assert len(upstream.data_requests()) == before

            # the site is away: the broker keeps its messages (a persistent session)
            site.proc.stop()
            central_fill(OBJECTS[2])
            site.proc.start()
            wait_until(
                lambda: status(site, ops)["transferred"] == 1, 60, "what came while it was away"
            )
            site_serves(OBJECTS[2], upstream.file(f"demo-cogs/{OBJECTS[2]}"))
            assert len(central_gets(central, f"/assets/field/{OBJECTS[0]}")) == 2  # ours + 1

            # it stops mid-transfer: that message was not acknowledged, so it comes again,
            # and the transfer goes on from its partial file
            to_central.rate = 400_000
            started = status(site, ops)["bytes"]
            central_fill(OBJECTS[1])  # 3.6 MB: seconds over this link
            wait_until(lambda: status(site, ops)["bytes"] > started, 30, "the transfer begun")
            site.proc.stop()
            to_central.rate = None
            site.proc.start()
            wait_until(lambda: status(site, ops)["transferred"] == 1, 60, "the stopped one")
            site_serves(OBJECTS[1], upstream.file(f"demo-cogs/{OBJECTS[1]}"))
            resumed = central_gets(central, f"/assets/field/{OBJECTS[1]}")
            assert any(" 206 " in line for line in resumed), resumed

            # [fault: the site's token expired] refused, tried again, taken with a fresh one
            (tmp_path / "site-token").write_text(oidc.token(sub="site-ship", exp_in=-60))
            central_fill(OBJECTS[3])
            refused = f"GET /assets/field/{OBJECTS[3]} 401"
            wait_until(lambda: refused in central.proc.log_text(), 30, "a refusal")
            (tmp_path / "site-token").write_text(oidc.token(sub="site-ship", exp_in=3600))
            wait_until(lambda: status(site, ops)["transferred"] == 2, 60, "taken after all")
            site_serves(OBJECTS[3], upstream.file(f"demo-cogs/{OBJECTS[3]}"))

            # an upload at the site reaches the central when the link allows
            to_site.drop()
            wait_until(lambda: not status(central, ops)["connected"], 30, "the central noticing")
            log_book = b"day 1: calm seas\n" * 5000
            r = httpx.put(
                f"{site.url}/admin/objects/field/log/day-1.txt", content=log_book, headers=crew
            )
            assert r.status_code == 201, r.text
            to_site.restore()
            wait_until(
                lambda: status(central, ops)["transferred"] == 1, 60, "the upload at the central"
            )
            r = httpx.get(f"{central.url}/assets/field/log/day-1.txt", headers=crew, timeout=30)
            assert r.status_code == 200 and r.content == log_book
            site_gets = [
                line
                for line in site.proc.log_text().splitlines()
                if "GET /assets/field/log/day-1.txt " in line
            ]
            assert len(site_gets) == 1, site_gets

            # what each took from the other comes back announced, and is found present
            wait_until(
                lambda: status(central, ops)["present"] >= 2, 30, "the central seeing its own"
            )
            wait_until(lambda: status(site, ops)["present"] >= 1, 30, "the site seeing its upload")
            assert (
                status(site, ops)["transferred"] == 2 and status(central, ops)["transferred"] == 1
            )
    finally:
        to_central.close()
        to_site.close()


def _file_server(root: Any, log_dir: Any) -> tuple[ServerProcess, int]:
    """A plain autoindex server (Python's) over `root`, not started, and its port."""
    port = free_port()
    command = [PYTHON, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(root)]
    return ServerProcess(
        "http.server",
        [*command, str(port)],
        log_dir=log_dir,
        ready=http_ok(f"http://127.0.0.1:{port}/"),
    ), port


def test_a_harvest_announces_what_is_new_and_a_site_takes_it(tmp_path):
    """A look through a plain autoindex server's catalogue announces the objects that were
    not there at an earlier look (`cod`: nobody has read them, so no checksum yet); a site
    takes them, and the central's own fill then announces their sha-512."""
    root = tmp_path / "drops"
    (root / "old").mkdir(parents=True)
    (root / "old" / "before.bin").write_bytes(b"there before the first look\n")
    files, port = _file_server(root, tmp_path)
    central = fdp_serve(
        {
            "cache": {"store": str(tmp_path / "central" / "cache")},
            "announce": {"harvest": {"datasets": ["drops"], "every_seconds": 1}},
            "datasets": {
                "drops": {
                    "upstream": {"http": {"base_url": f"http://127.0.0.1:{port}/"}},
                    "access": {"public": True},
                }
            },
        },
        tmp_path / "central",
        name="central",
    )
    site = fdp_serve(
        {
            "cache": {"store": str(tmp_path / "site" / "cache")},
            "datasets": {"drops": {"upstream": {"fdp": {"base_url": central.url}}}},
            "subscriptions": [{"feed": f"{central.url}/feed", "retry_seconds": 0.2}],
        },
        tmp_path / "site",
        name="site",
    )

    def harvest() -> dict[str, Any]:
        return httpx.get(f"{central.url}/status.json").json()["announce"]["harvest"]

    def looked(n: int) -> None:
        start = harvest()["looks"]
        wait_until(lambda: harvest()["looks"] >= start + n, 30, f"{n} looks")

    new = {"new/one.bin": b"1" * 300_000, "new/deep/two.txt": b"second\n" * 1000}
    with files, central.proc, site.proc:
        looked(2)  # the first look only learns what is there
        assert harvest()["found"] == 0
        for rel, body in new.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(body)
        wait_until(lambda: harvest()["found"] == 2, 30, "the new objects found")
        with feed(central.url) as r:
            found = {m["relPath"]: m for _, m in take(events(r), 2)}
        assert found.keys() == {f"drops/{rel}" for rel in new}
        for rel in new:
            m = found[f"drops/{rel}"]
            assert m["identity"] == COD
            assert m["baseUrl"] == f"{central.url}/assets/"
            assert "size" not in m  # (a plain listing does not say: the site learns it)

        # the site takes each; the central's fills announce their sha-512, found present
        wait_until(lambda: status(site)["present"] == 2, 60, "the sha-512 announcements")
        assert status(site)["transferred"] == 2
        with feed(central.url) as r:
            messages = [m for _, m in take(events(r), 4)]
        digests = {m["relPath"]: m["identity"] for m in messages[2:]}
        assert digests == {
            f"drops/{rel}": {"method": "sha512", "value": sha512(body)} for rel, body in new.items()
        }
        for rel, body in new.items():
            assert httpx.get(f"{site.url}/assets/drops/{rel}").content == body
            assert len(central_gets(central, f"/assets/drops/{rel}")) == 1  # the site's

        # [fault: the provider is down for a look] nothing is taken for new when it is back
        files.stop()
        wait_until(lambda: harvest()["error"] is not None, 30, "the failed look")
        files.start()
        (root / "new" / "three.bin").write_bytes(b"3")
        wait_until(lambda: harvest()["found"] == 3, 30, "only the third")
        assert harvest()["error"] is None


def test_a_harvest_after_longer_than_the_window_only_learns_again(tmp_path):
    """Names seen are kept for the window (`keep_hours`): a look after a longer absence
    cannot tell new from forgotten, so it announces nothing and learns again."""
    root = tmp_path / "drops"
    root.mkdir()
    (root / "before.bin").write_bytes(b"there before the first look\n")
    files, port = _file_server(root, tmp_path)
    window = 0.001 * 3600  # keep_hours 0.001: 3.6 s
    central = fdp_serve(
        {
            "cache": {"store": str(tmp_path / "central" / "cache")},
            "announce": {"keep_hours": 0.001, "harvest": {"datasets": ["d"], "every_seconds": 1}},
            "datasets": {"d": {"upstream": {"http": {"base_url": f"http://127.0.0.1:{port}/"}}}},
        },
        tmp_path / "central",
        name="central",
    )

    def harvest() -> dict[str, Any]:
        return httpx.get(f"{central.url}/status.json").json()["announce"]["harvest"]

    with files, central.proc:
        wait_until(lambda: harvest()["looks"] >= 1, 30, "the first look")
        central.proc.stop()
        time.sleep(window + 1)  # (the absence under test)
        central.proc.start()
        wait_until(lambda: harvest()["looks"] >= 2, 30, "two looks after the absence")
        assert harvest()["found"] == 0  # before.bin, forgotten, is not taken for new
        (root / "after.bin").write_bytes(b"new\n")
        wait_until(lambda: harvest()["found"] == 1, 30, "the new one")
        time.sleep(1.5)  # (a look or two more)
        assert harvest()["found"] == 1


def test_one_of_a_sites_worker_processes_follows_and_another_takes_over(upstream, tmp_path):
    """`fdp serve --workers 2` at a site: one process holds the subscription's lease and
    transfers each object once; when the lease goes elsewhere mid-transfer it stops
    following, and a process takes over from the place kept, the cut transfer included."""
    files = {"http": {"base_url": f"{upstream.url}/data/demo-cogs/"}}
    central = fdp_serve(
        {
            "cache": {"store": str(tmp_path / "central" / "cache")},
            "datasets": {"field": {"upstream": files}},
        },
        tmp_path / "central",
        name="central",
    )
    link = Link(int(central.url.rsplit(":", 1)[1]))
    feed_url = f"{link.url}/feed"
    site = fdp_serve(
        {
            "cache": {"store": str(tmp_path / "site" / "cache")},
            "datasets": {"field": {"upstream": {"fdp": {"base_url": link.url}}}},
            "subscriptions": [{"feed": feed_url, "retry_seconds": 0.2, "max_retry_seconds": 1}],
        },
        tmp_path / "site",
        "--workers",
        "2",
        name="site",
    )
    role = "subscription:" + hashlib.sha256(feed_url.encode()).hexdigest()[:16]

    def statuses() -> list[dict[str, Any]]:  # whichever process each request reaches
        return [status(site) for _ in range(12)]

    def lease(owner: str, until: float) -> None:
        with sqlite3.connect(tmp_path / "site" / "feed.sqlite") as db:
            db.execute("update marks set owner = ?, until = ? where role = ?", (owner, until, role))

    def fill(path: str) -> None:
        assert httpx.get(f"{central.url}/assets/field/{path}", timeout=30).status_code == 200

    try:
        with central.proc, site.proc:
            wait_until(lambda: any(s["connected"] for s in statuses()), 30, "a follower")
            for path in (OBJECTS[0], OBJECTS[4]):
                fill(path)
            wait_until(lambda: any(s["transferred"] == 2 for s in statuses()), 60, "both")
            seen = statuses()
            assert all(s["following"] == (s["transferred"] == 2) for s in seen), seen
            for path in (OBJECTS[0], OBJECTS[4]):
                assert len(central_gets(central, f"/assets/field/{path}")) == 2  # ours + site's

            link.rate = 250_000  # 3.6 MB: seconds, under way when the lease goes
            moved = max(s["bytes"] for s in seen)
            fill(OBJECTS[3])
            wait_until(lambda: any(s["bytes"] > moved for s in statuses()), 30, "under way")
            lease("another site process", time.time() + 3600)  # it went elsewhere
            lost = "the lease is lost; not following here"
            wait_until(lambda: lost in site.proc.log_text(), 30, "the follower stopping")
            assert not any(s["following"] or s["connected"] for s in statuses())
            link.rate = None
            fill(OBJECTS[2])
            time.sleep(1)  # (a follower would have begun: the feed wakes at once)
            assert len(central_gets(central, f"/assets/field/{OBJECTS[2]}")) == 1  # nobody

            lease("another site process", 0)  # that process died: its lease ran out
            wait_until(
                lambda: all(path in cache_ls(site) for path in OBJECTS[2:4]),
                60,
                "a takeover, the cut transfer taken up again",
            )
            for path in OBJECTS[2:4]:
                r = httpx.get(f"{site.url}/assets/field/{path}", timeout=30)
                assert r.status_code == 200 and r.content == upstream.file(f"demo-cogs/{path}")
            assert len(central_gets(central, f"/assets/field/{OBJECTS[2]}")) == 2  # once
            for earlier in (OBJECTS[0], OBJECTS[4]):  # the place was kept
                assert len(central_gets(central, f"/assets/field/{earlier}")) == 2
    finally:
        link.close()


def _broker_site(upstream: Any, port: int, tmp_path: Any, **subscription: Any) -> Any:
    """A site following the broker's `demo-cogs` messages, fetching from the demo upstream
    (a source with faults of its own), not started."""
    base = f"{upstream.url}/data/"
    return fdp_serve(
        {
            "cache": {"store": str(tmp_path / "site" / "cache")},
            "datasets": {"demo-cogs": {"upstream": {"http": {"base_url": f"{base}demo-cogs/"}}}},
            "subscriptions": [
                {
                    "broker": f"mqtt://127.0.0.1:{port}",
                    "fetch_from": [base],
                    "retry_seconds": 0.2,
                    "max_retry_seconds": 0.5,
                    **subscription,
                }
            ],
        },
        tmp_path / "site",
        name="site",
    )


def _announce(upstream: Any, port: int, path: str, identity: str | None) -> None:
    """A v03 message for a demo object at the upstream: its sha-512, or `cod` (None)."""
    body = upstream.file(f"demo-cogs/{path}")
    message = {
        "pubTime": "20261122T000000.000",
        "baseUrl": f"{upstream.url}/data/",
        "relPath": f"demo-cogs/{path}",
        "identity": {"method": "sha512", "value": identity} if identity else COD,
        "size": len(body),
    }
    publish(port, f"xpublic/v03/demo-cogs/{path.rsplit('/', 1)[0]}", json.dumps(message))


def test_an_object_the_other_side_keeps_failing_is_set_aside_not_in_the_way(upstream, tmp_path):
    """[fault: the source answers 503 for one object, for as long as it likes] With one
    transfer slot and in-order acknowledgements, that object would stop the whole feed; set
    aside after `set_aside_seconds`, it lets the rest through, outlives a restart (its
    message was acknowledged: the broker will not send it again) and is taken once the
    source serves it."""
    broker, port = start_mosquitto(tmp_path)
    site = _broker_site(upstream, port, tmp_path, concurrency=1, set_aside_seconds=1)
    stuck, others = OBJECTS[0], [OBJECTS[2], OBJECTS[4]]

    def announce(path: str) -> None:
        _announce(upstream, port, path, sha512(upstream.file(f"demo-cogs/{path}")))

    def asked(path: str) -> list[dict[str, Any]]:
        return upstream.log(f"/data/demo-cogs/{path}")

    with broker, site.proc:
        wait_until(lambda: status(site)["connected"], 30, "the site following the broker")
        upstream.reset()
        upstream.fault(f"^/data/demo-cogs/{stuck}", status=503)
        for path in [stuck, *others]:
            announce(path)
        wait_until(
            lambda: status(site)["transferred"] == 2 and status(site)["set_aside"] == 1,
            30,
            "the others taken, the failing one set aside",
        )
        assert [len(asked(p)) for p in others] == [1, 1]
        assert len(asked(stuck)) >= 2  # tried, refused, tried again

        assert len(list((tmp_path / "site" / "cache" / "set-aside").rglob("*.json"))) == 1
        site.proc.stop()  # the list is kept on disk; the broker has nothing to send again
        site.proc.start()
        wait_until(lambda: status(site)["set_aside"] == 1, 30, "the list after the restart")
        upstream.heal()  # the source serves it again
        wait_until(lambda: status(site)["set_aside"] == 0, 30, "the set-aside object taken")
        s = status(site)
        assert (s["transferred"], s["failed"]) == (1, 0), s
        r = httpx.get(f"{site.url}/assets/demo-cogs/{stuck}", timeout=30)
        assert r.status_code == 200 and r.content == upstream.file(f"demo-cogs/{stuck}")
        sent = [e["bytes"] for e in asked(stuck) if e["bytes"]]  # (not the 503s)
        assert sent == [len(upstream.file(f"demo-cogs/{stuck}"))]  # once, whole
        assert [len(asked(p)) for p in others] == [1, 1]  # not again after the restart


def test_a_cod_and_a_checksummed_announcement_of_one_object_transfer_it_once(upstream, tmp_path):
    """A harvest's `cod` announcement and the fill's sha-512 one of the same object arrive
    together: the second waits for the first's transfer (one per name at a time), then
    finds the object present: one transfer."""
    broker, port = start_mosquitto(tmp_path)
    site = _broker_site(upstream, port, tmp_path, concurrency=2)
    path = OBJECTS[1]  # 3.6 MB, slowed to seconds: the second arrives mid-transfer
    body = upstream.file(f"demo-cogs/{path}")
    with broker, site.proc:
        wait_until(lambda: status(site)["connected"], 30, "the site following the broker")
        upstream.reset()
        upstream.fault(f"^/data/demo-cogs/{path}", chunk_delay=0.1)
        _announce(upstream, port, path, None)
        wait_until(lambda: status(site)["bytes"] > 0, 30, "the cod transfer under way")
        _announce(upstream, port, path, sha512(body))
        wait_until(lambda: status(site)["present"] == 1, 60, "the second finding it present")
        assert status(site)["transferred"] == 1
        assert len(upstream.log(f"/data/demo-cogs/{path}")) == 1
        r = httpx.get(f"{site.url}/assets/demo-cogs/{path}", timeout=30)
        assert r.status_code == 200 and r.content == body
