"""Policy documents and the store in-process: merge patch (RFC 7396), masked secrets, the
audit's diff, and compare-and-set in the file and Redis stores."""

from __future__ import annotations

import threading

import pytest

from policies.config import Dataset, Settings
from policies.documents import (
    MASK,
    InvalidPolicy,
    checked,
    diff,
    keep_secrets,
    merge_patch,
    shown,
    stored,
)
from policies.store import FileBackend, PolicyStore, RedisBackend, Stale
from tests.test_queue import fresh_redis

S3 = {
    "upstream": {"s3": {"bucket": "b", "access_key_id": "AKID", "secret_access_key": "s3cr3t"}},
}


@pytest.mark.parametrize(
    ("target", "patch", "want"),
    [  # the examples of RFC 7396, appendix A
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"a": "foo"}, None, None),
        ({"a": "foo"}, "bar", "bar"),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_merge_patch_follows_rfc_7396(target, patch, want):
    assert merge_patch(target, patch) == want


def test_secrets_are_masked_when_shown_and_kept_when_sent_back():
    ds = Dataset.model_validate(S3)
    seen = shown(ds)
    assert seen["upstream"]["s3"]["secret_access_key"] == MASK
    assert stored(ds)["upstream"]["s3"]["secret_access_key"] == "s3cr3t"
    back = keep_secrets({**seen, "max_age": 5}, stored(ds))
    assert back["upstream"]["s3"]["secret_access_key"] == "s3cr3t" and back["max_age"] == 5
    rotated = keep_secrets(
        merge_patch(seen, {"upstream": {"s3": {"secret_access_key": "new"}}}), stored(ds)
    )
    assert rotated["upstream"]["s3"]["secret_access_key"] == "new"


def test_the_diff_names_each_changed_key():
    old = {"a": 1, "b": {"c": 2, "d": [1]}, "gone": True}
    new = {"a": 1, "b": {"c": 3, "d": [1, 2]}, "added": "x"}
    assert diff(old, new) == [
        {"path": "added", "new": "x"},
        {"path": "b.c", "old": 2, "new": 3},
        {"path": "b.d", "old": [1], "new": [1, 2]},
        {"path": "gone", "old": True},
    ]


def test_validation_lists_every_problem_by_key_path():
    doc = {**S3, "delivery": "nope", "retention": {"mode": "rolling"}, "extra": 1}
    with pytest.raises(InvalidPolicy) as e:
        checked(Settings(), "d", doc)
    problems = e.value.problems
    assert len(problems) == 3
    assert any(p.startswith("delivery:") for p in problems)
    assert any(p.startswith("extra: unknown key") for p in problems)
    assert "s3cr3t" not in str(problems)
    with pytest.raises(InvalidPolicy, match="invalid"):  # needs an issuer (a Settings rule)
        checked(Settings(), "d", {**S3, "access": {"authenticated": True}})


@pytest.fixture(params=["file", "redis"])
def store(request, tmp_path, redis_url):
    if request.param == "file":
        backend = FileBackend(tmp_path / "p" / "policies.json", keep=3)
    else:
        backend = RedisBackend(fresh_redis(redis_url), keep=3, timeout=2.0)
    s = PolicyStore(backend)
    yield s
    s.close()


def test_one_of_two_writes_from_the_same_version_wins(store):
    v1 = store.write("d", stored(Dataset.model_validate(S3)), "config", "config", 0)
    assert v1.version == 1
    results: list[object] = []

    def write(age: int) -> None:
        doc = {**v1.document, "max_age": age}
        try:
            results.append(store.write("d", doc, f"op{age}", "put", v1.version))
        except Stale as e:
            results.append(e)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(not isinstance(r, Stale) for r in results) == 1
    assert store.get("d").version == 2
    for n in range(3):
        store.write("d", {**v1.document, "max_age": 100 + n}, "op", "put")
    history = store.history("d")
    assert [v.version for v in history] == [5, 4, 3]  # keep=3, newest first
    assert history[0].changes == [{"path": "max_age", "old": 101, "new": 102}]
    assert "s3cr3t" not in str([v.changes for v in history])


def test_seeding_adds_new_datasets_and_lets_a_changed_file_win(store):
    doc = stored(Dataset.model_validate(S3))
    store.seed({"d": doc})
    store.seed({"d": doc})  # unchanged file: no new version
    assert store.get("d").version == 1
    store.write("d", {**doc, "max_age": 7}, "olga", "put")
    store.seed({"d": doc})  # the file did not change: the edit stays
    assert store.get("d").document["max_age"] == 7
    store.seed({"d": {**doc, "max_age": 9}})  # the file changed: it wins
    latest = store.get("d")
    assert latest.version == 3 and latest.by == "config" and latest.document["max_age"] == 9
