"""The fault-injecting upstream itself: the tests above rely on each of these behaviours."""

from __future__ import annotations

import time

import httpx


def test_request_log_and_one_shot_faults(upstream):
    url = f"{upstream.url}/data/demo-cogs/scene-a/B04.tif"
    upstream.fault("scene-a/B04", status=503, times=1)
    assert httpx.get(url).status_code == 503
    assert httpx.get(url, headers={"Range": "bytes=0-9"}).status_code == 206
    log = upstream.data_requests()
    assert [(e["method"], e["range"]) for e in log] == [("GET", None), ("GET", "bytes=0-9")]


def test_delay_fault(upstream):
    upstream.fault("scene-b/B04", delay=0.5)
    t = time.monotonic()
    assert httpx.head(f"{upstream.url}/data/demo-cogs/scene-b/B04.tif").status_code == 200
    assert time.monotonic() - t >= 0.5


def test_cut_off_body_is_detectable_by_a_client(upstream):
    upstream.fault("scene-a/visual", cut_after=1000)
    try:
        httpx.get(f"{upstream.url}/data/demo-cogs/scene-a/visual.tif")
    except httpx.RemoteProtocolError:
        pass
    else:
        raise AssertionError("a cut-off body was read as complete")


def test_orderable_item_lifecycle(upstream):
    item = httpx.get(f"{upstream.url}/collections/demo-orderable/items/offline-a").json()
    props = item["properties"]
    assert props["order:status"] == "orderable"
    data = item["assets"]["B04"]["href"]
    assert httpx.get(data).status_code == 409  # offline
    r = httpx.post(props["eodag:order_link"])
    assert r.status_code == 202 and r.json()["status"] == "ordered"
    status = httpx.get(props["eodag:status_link"])
    assert status.json()["status"] == "ordered" and int(status.headers["retry-after"]) >= 1
    deadline = time.monotonic() + 10
    while httpx.get(props["eodag:status_link"]).json()["status"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert httpx.get(data).content == upstream.file("demo-orderable/offline-a/B04.tif")
    again = httpx.get(f"{upstream.url}/collections/demo-orderable/items/offline-a").json()
    assert again["properties"]["order:status"] == "succeeded"


# --- faults the proxy's tests need ----------------------------------------------------------

B04 = "/data/demo-cogs/scene-a/B04.tif"


def test_ignore_range_answers_the_whole_body(upstream):
    upstream.fault("scene-a/B04", ignore_range=True, times=1)
    r = httpx.get(upstream.url + B04, headers={"Range": "bytes=0-9"})
    assert r.status_code == 200 and "content-range" not in r.headers
    assert r.content == upstream.file("demo-cogs/scene-a/B04.tif")
    assert httpx.get(upstream.url + B04, headers={"Range": "bytes=0-9"}).status_code == 206


def test_lying_heads(upstream):
    size = len(upstream.file("demo-cogs/scene-a/B04.tif"))
    upstream.fault("scene-a/B04", method="HEAD", head_length=size + 1000, times=1)
    assert int(httpx.head(upstream.url + B04).headers["content-length"]) == size + 1000
    # a HEAD that "succeeds" with a short error page: 200 and the page's own length
    upstream.fault("scene-a/B04", method="HEAD", status=200, times=1)
    r = httpx.head(upstream.url + B04)
    assert r.status_code == 200 and r.headers["content-length"] == "26"
    # GETs were never affected
    assert len(httpx.get(upstream.url + B04).content) == size


def test_redirect_to_another_origin(upstream):
    upstream.fault("scene-a/B04", redirect="http://127.0.0.2:9/elsewhere{path}", times=1)
    r = httpx.get(upstream.url + B04)
    assert r.status_code == 302
    assert r.headers["location"] == f"http://127.0.0.2:9/elsewhere{B04}"
    upstream.fault("scene-a/B04", redirect="http://127.0.0.2:9/x", status=307, times=1)
    assert httpx.get(upstream.url + B04).status_code == 307


def test_per_user_403(upstream):
    upstream.fault("scene-a/B04", status=403, authorization="Bearer bob")
    assert httpx.get(upstream.url + B04, headers={"Authorization": "Bearer bob"}).status_code == 403
    assert httpx.get(upstream.url + B04, headers={"Authorization": "Bearer ann"}).status_code == 200
    assert httpx.get(upstream.url + B04).status_code == 200
    upstream.reset()
    upstream.fault("scene-a/B04", status=403, no_authorization=True)
    assert httpx.get(upstream.url + B04).status_code == 403
    assert httpx.get(upstream.url + B04, headers={"Authorization": "Bearer ann"}).status_code == 200
    log = upstream.data_requests()
    assert [e["authorization"] for e in log] == [False, True]  # since reset()


def test_changed_object_has_another_etag_and_other_bytes(upstream):
    from upstreams.demo.state import changed_bytes

    original = httpx.get(upstream.url + B04)
    upstream.fault("scene-a/B04", changed=True)
    whole = httpx.get(upstream.url + B04)
    part = httpx.get(upstream.url + B04, headers={"Range": "bytes=100-199"})
    assert whole.headers["etag"] != original.headers["etag"]
    assert whole.headers["last-modified"] != original.headers["last-modified"]
    assert whole.content == changed_bytes(original.content) != original.content
    assert part.status_code == 206 and part.content == whole.content[100:200]
    assert part.headers["etag"] == whole.headers["etag"]


# --- things that hang -----------------------------------------------------------------------


def test_blackhole_accepts_and_never_answers(blackhole):
    import redis

    before = blackhole.connections()
    t = time.monotonic()
    try:
        httpx.get(blackhole.url, timeout=httpx.Timeout(0.5, connect=2))
    except httpx.ReadTimeout:
        pass
    else:
        raise AssertionError("the blackhole answered")
    assert 0.5 <= time.monotonic() - t < 2
    client = redis.Redis.from_url(blackhole.redis_url, socket_timeout=0.3)
    try:
        client.ping()
    except redis.TimeoutError:
        pass
    else:
        raise AssertionError("the blackhole answered a PING")
    finally:
        client.close()
    deadline = time.monotonic() + 5
    while blackhole.connections() < before + 2:  # the log line lands just after accept()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_blackhole_stops_by_pid(tmp_path):
    from tests.harness.stalls import start_blackhole

    hole = start_blackhole(tmp_path)
    assert hole.proc.pid > 0
    hole.stop()
    try:
        httpx.get(hole.url, timeout=1)
    except httpx.ConnectError:
        pass
    else:
        raise AssertionError("still listening after stop()")


def test_sqlite_held_locked_by_another_process(tmp_path):
    import sqlite3

    from tests.harness.stalls import hold_sqlite_lock

    db = tmp_path / "held.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    holder = hold_sqlite_lock(db, 30, tmp_path)
    try:
        other = sqlite3.connect(db, timeout=0.2)
        try:
            other.execute("SELECT * FROM t").fetchall()
        except sqlite3.OperationalError as e:
            assert "locked" in str(e)
        else:
            raise AssertionError("read through an exclusive lock")
        finally:
            other.close()
    finally:
        holder.stop()  # by its pid: the lock goes with the process
    with sqlite3.connect(db, timeout=0.2) as conn:
        conn.execute("INSERT INTO t VALUES (1)")
    conn.close()


def test_sqlite_lock_ends_by_itself(tmp_path):
    import sqlite3

    from tests.harness.stalls import hold_sqlite_lock

    db = tmp_path / "brief.db"
    holder = hold_sqlite_lock(db, 0.5, tmp_path)
    assert holder.proc is not None
    assert holder.proc.wait(10) == 0
    with sqlite3.connect(db, timeout=0.2) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()


def test_slow_oidc_issuer(slow_oidc):
    slow_oidc.set_delay(0.6)
    t = time.monotonic()
    assert httpx.get(slow_oidc.discovery_url, timeout=5).status_code == 200
    assert httpx.get(slow_oidc.jwks_uri, timeout=5).json()["keys"]
    assert time.monotonic() - t >= 1.2
    try:
        httpx.get(slow_oidc.jwks_uri, timeout=0.2)
    except httpx.ReadTimeout:
        pass
    else:
        raise AssertionError("a slow issuer answered within 0.2 s")
    slow_oidc.set_delay(0)
    t = time.monotonic()
    assert httpx.get(slow_oidc.discovery_url, timeout=5).status_code == 200
    assert time.monotonic() - t < 0.5
