"""RFC 9110 preconditions and ranges: one function decides 200, 206, 304, 412 or 416.

werkzeug parses the headers; the evaluation order is RFC 9110 section 13.2.2. If-Range
honours strong validators only (a weak ETag or a date that cannot be compared exactly
means "send it all"), and a suffix range longer than the object selects the whole object.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from werkzeug.http import parse_date, parse_etags, parse_range_header

from proxy.problems import MalformedRange, PreconditionFailed
from upstreams.base import RangeNotSatisfiable

#: More parts than this in one Range header: send the whole object (RFC 9110 14.2 allows it).
MAX_PARTS = 64


class Conditions(Protocol):
    """The request headers that decide the status (the pipeline's `Exchange` has them)."""

    method: str
    range: str | None
    if_range: str | None
    if_match: str | None
    if_none_match: str | None
    if_modified_since: str | None
    if_unmodified_since: str | None


@dataclass(frozen=True, slots=True)
class Selection:
    """The decided status and, for 206, the byte ranges `[start, end)` to send."""

    status: int
    ranges: tuple[tuple[int, int], ...] = ()


WHOLE = Selection(200)
NOT_MODIFIED = Selection(304)


def _strong(etag: str | None) -> str | None:
    """The opaque tag of a strong ETag (None for weak or missing ones)."""
    if not etag or etag.startswith("W/"):
        return None
    return etag.strip('"')


def _weak(etag: str | None) -> str | None:
    return etag.removeprefix("W/").strip('"') if etag else None


def _date(value: str | None) -> datetime | None:
    return parse_date(value) if value else None


def _not_after(last_modified: str | None, limit: datetime | None) -> bool | None:
    """Whether the representation was last modified at or before `limit` (None: unknown)."""
    modified = _date(last_modified)
    if modified is None or limit is None:
        return None
    return modified.replace(microsecond=0) <= limit


def _if_range_holds(header: str, etag: str | None, last_modified: str | None) -> bool:
    header = header.strip()
    if header.startswith(('"', "W/")):
        tag = _strong(etag)
        return tag is not None and not header.startswith("W/") and header.strip('"') == tag
    wanted, modified = _date(header), _date(last_modified)
    return wanted is not None and modified is not None and wanted == modified


def range_parts(spec: str) -> list[tuple[int, int | None]] | None:
    """The parts of a bytes Range, as werkzeug parses them one by one (it refuses unordered
    or overlapping sets); None for another unit or too many parts (send it all). Raises
    MalformedRange: that needs no size, so it can be said before anyone is asked for one."""
    unit, _, ranges = spec.partition("=")
    parts = ranges.split(",")
    if unit.strip().lower() != "bytes" or len(parts) > MAX_PARTS:
        return None
    wanted: list[tuple[int, int | None]] = []
    for part in parts:
        parsed = parse_range_header(f"bytes={part.strip()}")
        if parsed is None:
            raise MalformedRange(f"malformed Range header {spec!r}; expected e.g. bytes=0-1023")
        wanted += parsed.ranges
    return wanted


def byte_ranges(spec: str, size: int) -> tuple[tuple[int, int], ...] | None:
    """Satisfiable ranges of `spec` for an object of `size` bytes, merged and in order.

    None: not a bytes range we use (another unit, or too many parts): send it all.
    Raises MalformedRange for a malformed header and RangeNotSatisfiable when no part fits.
    """
    wanted = range_parts(spec)
    if wanted is None:
        return None
    found: list[tuple[int, int]] = []
    for start, stop in wanted:
        if start < 0:  # suffix: the last -start bytes, all of them if the object is shorter
            if size > 0:
                found.append((max(0, size + start), size))
        elif start < size:
            found.append((start, size if stop is None else min(stop, size)))
    if not found:
        raise RangeNotSatisfiable(size)
    found.sort()
    merged = [found[0]]
    for start, end in found[1:]:
        if start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return tuple(merged)


def select(asked: Conditions, size: int, etag: str | None, last_modified: str | None) -> Selection:
    """What to answer for a representation with these validators (RFC 9110 13.2.2)."""
    if asked.if_match is not None:
        tags = parse_etags(asked.if_match)
        tag = _strong(etag)
        if not (tags.star_tag or (tag is not None and tags.contains(tag))):
            raise PreconditionFailed("If-Match does not match the current ETag")
    elif asked.if_unmodified_since is not None:
        if _not_after(last_modified, _date(asked.if_unmodified_since)) is False:
            raise PreconditionFailed("the object was modified after If-Unmodified-Since")
    if asked.if_none_match is not None:
        tags = parse_etags(asked.if_none_match)
        tag = _weak(etag)
        if tags.star_tag or (tag is not None and tags.contains_weak(tag)):
            return NOT_MODIFIED
    elif asked.if_modified_since is not None:
        if _not_after(last_modified, _date(asked.if_modified_since)):
            return NOT_MODIFIED
    if asked.method != "GET" or asked.range is None:
        return WHOLE
    if asked.if_range is not None and not _if_range_holds(asked.if_range, etag, last_modified):
        return WHOLE
    ranges = byte_ranges(asked.range, size)
    return WHOLE if ranges is None else Selection(206, ranges)
