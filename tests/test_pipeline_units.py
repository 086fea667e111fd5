"""Pure logic of the request pipeline, in-process: preconditions and ranges, the error
table, request headers, and the access line."""

from __future__ import annotations

import json
import logging

import pytest

from proxy.accesslog import JsonFormatter, fields
from proxy.conditional import Selection, byte_ranges, select
from proxy.exchange import Exchange, Kind, Plan
from proxy.problems import (
    BadRequest,
    MalformedRange,
    PreconditionFailed,
    error_response,
    lookup,
    slug_of,
)
from upstreams.base import (
    ObjectNotFound,
    RangeNotSatisfiable,
    UpstreamError,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)

ETAG = '"abc"'
LM = "Sat, 21 Nov 2026 10:00:00 GMT"
EARLIER = "Fri, 20 Nov 2026 10:00:00 GMT"
LATER = "Sun, 22 Nov 2026 10:00:00 GMT"


def sel(size=1000, etag=ETAG, lm=LM, method="GET", **headers):
    return select(Exchange(method, "/assets/d/x", None, 0.0, **headers), size, etag, lm)


@pytest.mark.parametrize(
    ("spec", "size", "want"),
    [
        ("bytes=0-99", 1000, ((0, 100),)),
        ("bytes=990-", 1000, ((990, 1000),)),
        ("bytes=900-5000", 1000, ((900, 1000),)),
        ("bytes=-100", 1000, ((900, 1000),)),
        ("bytes=-5000", 1000, ((0, 1000),)),  # longer suffix: the whole object (RFC 9110)
        ("bytes=0-9,20-29", 1000, ((0, 10), (20, 30))),
        ("bytes=20-29,0-9", 1000, ((0, 10), (20, 30))),  # in order
        ("bytes=0-9,5-19", 1000, ((0, 20),)),  # overlaps merge
        ("bytes=0-9,2000-3000", 1000, ((0, 10),)),  # the unsatisfiable part is dropped
        ("bytes=0-9 ", 1000, ((0, 10),)),  # trailing white space
        ("items=0-9", 1000, None),  # another unit: ignored
    ],
)
def test_byte_ranges(spec, size, want):
    assert byte_ranges(spec, size) == want


@pytest.mark.parametrize("spec", ["bytes=zz", "bytes=5-1", "bytes=", "bytes=1-2-3"])
def test_malformed_ranges(spec):
    with pytest.raises(MalformedRange):
        byte_ranges(spec, 1000)


def test_unsatisfiable_range_names_the_size():
    with pytest.raises(RangeNotSatisfiable) as e:
        byte_ranges("bytes=1000-", 1000)
    assert e.value.size == 1000


def test_too_many_parts_send_it_all():
    spec = "bytes=" + ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(65))
    assert byte_ranges(spec, 10_000) is None


def test_preconditions_in_rfc_order():
    assert sel() == Selection(200)
    assert sel(range="bytes=0-9") == Selection(206, ((0, 10),))
    assert sel(method="HEAD", range="bytes=0-9") == Selection(200)  # Range is for GET only
    assert sel(if_none_match=ETAG).status == 304
    assert sel(if_none_match=f'"x", W/{ETAG}').status == 304  # weak comparison
    assert sel(if_none_match="*").status == 304
    assert sel(if_none_match='"other"') == Selection(200)
    assert sel(if_modified_since=LM).status == 304
    assert sel(if_modified_since=LATER).status == 304
    assert sel(if_modified_since=EARLIER) == Selection(200)
    # If-None-Match wins over If-Modified-Since
    assert sel(if_none_match='"other"', if_modified_since=LATER) == Selection(200)
    assert sel(if_match=ETAG) == Selection(200)
    assert sel(if_match="*") == Selection(200)
    for bad in ('"other"', f"W/{ETAG}"):  # If-Match compares strongly
        with pytest.raises(PreconditionFailed):
            sel(if_match=bad)
    with pytest.raises(PreconditionFailed):
        sel(etag=f"W/{ETAG}", if_match=ETAG)
    with pytest.raises(PreconditionFailed):
        sel(if_unmodified_since=EARLIER)
    assert sel(if_unmodified_since=LATER) == Selection(200)
    assert sel(lm=None, if_unmodified_since=EARLIER) == Selection(200)  # unknown: ignored


def test_if_range_honours_strong_validators_only():
    ranged = {"range": "bytes=0-9"}
    assert sel(if_range=ETAG, **ranged).status == 206
    assert sel(if_range='"old"', **ranged) == Selection(200)
    assert sel(if_range=f"W/{ETAG}", **ranged) == Selection(200)
    assert sel(etag=f"W/{ETAG}", if_range=f"W/{ETAG}", **ranged) == Selection(200)
    assert sel(if_range=LM, **ranged).status == 206
    assert sel(if_range=EARLIER, **ranged) == Selection(200)
    assert sel(lm=None, if_range=LM, **ranged) == Selection(200)


@pytest.mark.parametrize(
    ("exc", "status", "slug"),
    [
        (ObjectNotFound("x"), 404, "not-found"),
        (UpstreamTimeout("x"), 504, "upstream-timeout"),
        (UpstreamUnavailable("x", 500), 502, "upstream-failed"),
        (UpstreamRefused("x"), 403, "upstream-refused"),
        (UpstreamError("x"), 502, "upstream-failed"),
        (RangeNotSatisfiable(10), 416, "range-not-satisfiable"),
        (BadRequest("x"), 400, "bad-request"),
        (PreconditionFailed("x"), 412, "precondition-failed"),
    ],
)
def test_error_table_is_walked_by_type(exc, status, slug):
    r = error_response(exc, "/assets/d/x")
    body = json.loads(r.body)
    assert r.status_code == body["status"] == status
    assert body["type"].endswith("/" + slug) and slug_of(exc) == slug
    assert r.headers["content-type"] == "application/problem+json"


def test_subclasses_take_their_nearest_ancestors_rule():
    class Odd(UpstreamTimeout):
        pass

    assert lookup(Odd("x")) is lookup(UpstreamTimeout("x"))
    assert lookup(ValueError("x")) is None


def test_unmapped_errors_are_a_500_problem_without_internals(caplog):
    r = error_response(ValueError("secret detail"), "/x")
    assert r.status_code == 500
    assert b"secret detail" not in r.body
    assert json.loads(r.body)["status"] == 500


def scope(*headers: tuple[bytes, bytes]) -> dict:
    return {"method": "GET", "path": "/assets/d/x", "client": ("127.0.0.1", 1), "headers": headers}


def test_request_headers_are_stripped_ascii_and_single_authorization():
    x = Exchange.start(scope())
    x.read_headers(scope((b"range", b"bytes=0-9  "), (b"authorization", b"Bearer t")))
    assert (x.range, x.authorization) == ("bytes=0-9", "Bearer t")
    with pytest.raises(BadRequest):
        Exchange.start(scope()).read_headers(
            scope((b"authorization", b"Bearer a"), (b"authorization", b"Bearer b"))
        )
    with pytest.raises(BadRequest):
        Exchange.start(scope()).read_headers(scope((b"if-none-match", '"é"'.encode())))


def test_access_line_has_no_credentials():
    x = Exchange.start(scope())
    x.read_headers(scope((b"authorization", b"Bearer very-secret"), (b"range", b"bytes=0-9")))
    x.dataset, x.status, x.sent, x.plan = "d", 206, 10, Plan(Kind.HIT)
    line = fields(x)
    assert line["plan"] == "hit" and line["status"] == 206 and line["bytes"] == 10
    assert "very-secret" not in json.dumps(line)
    record = logging.LogRecord("fdp.access", logging.INFO, "", 0, "m", (), None)
    record.fields = line
    out = json.loads(JsonFormatter().format(record))
    assert out["dataset"] == "d" and out["logger"] == "fdp.access"
