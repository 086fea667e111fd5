"""Search parameters, from a query string or a JSON body, checked: a bad one is a 400 naming it.

`bbox`, `intersects`, `datetime`, `ids`, `collections`, `limit`, `token` (our opaque paging
state) and `filter` (CQL2 text or JSON, applied by us to each provider page).
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import cql2
import shapely.errors
import shapely.geometry

from proxy.problems import ProxyError

MAX_LIMIT = 1000
#: paging state: position in the list of datasets (or ids), and a dataset's own cursor
Cursor = dict[str, Any]
#: RFC 3339 `date-time` (section 5.6): ISO 8601 without its looser forms
RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)
CRS84 = (
    "http://www.opengis.net/def/crs/OGC/1.3/CRS84",
    "http://www.opengis.net/def/crs/EPSG/0/4326",
)


class BadQuery(ProxyError):
    status, slug = 400, "bad-stac-query"


@dataclass
class Search:
    """One search, checked. `query` is what providers are asked (EODAG's keywords)."""

    limit: int = 10
    index: int = 0
    cursor: Cursor | None = None
    query: dict[str, Any] = field(default_factory=dict)
    ids: list[str] | None = None
    collections: list[str] | None = None
    filter: cql2.Expr | None = None

    @property
    def key(self) -> str:
        """What identifies a provider page of this search (for the search cache)."""
        shown = {k: getattr(v, "wkt", v) for k, v in self.query.items()}
        return json.dumps([self.limit, shown, self.cursor], sort_keys=True, default=str)


def parse(values: dict[str, Any], method: str) -> Search:
    """A search from request values (a query string's, or a POST body's)."""
    search = Search(query=_query(values, method))
    search.index, search.cursor, search.limit = page_params(values)
    search.ids = [item_id(i) for i in _names(values, "ids") or []] or None
    search.collections = _names(values, "collections")
    search.filter = _filter(values, method)
    return search


def encode(index: int, cursor: Cursor | None) -> str:
    raw = json.dumps({"i": index, "c": cursor}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def page_params(values: dict[str, Any]) -> tuple[int, Cursor | None, int]:
    """(dataset index, cursor within it, limit), from `limit` and an opaque `token`."""
    try:
        limit = min(int(values.get("limit") or 10), MAX_LIMIT)
        token = values.get("token")
        state = (
            json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            if token
            else {"i": 0, "c": None}
        )
        index, cursor = int(state["i"]), state["c"]
    except (TypeError, ValueError, KeyError, OverflowError, RecursionError):
        raise BadQuery("limit must be an integer, and token one given in a next link") from None
    if limit < 1 or index < 0 or not (cursor is None or isinstance(cursor, dict)):
        raise BadQuery("limit must be positive, and token one given in a next link")
    return index, cursor, limit


def item_id(iid: str) -> str:
    """An item id we can pass to a provider's search: printable, no quotes or backslashes."""
    if not iid or not iid.isprintable() or any(c in iid for c in '"\\'):
        raise BadQuery(f"invalid item id {iid[:60]!r}")
    return iid


def _instant(text: str) -> datetime:
    """An RFC 3339 date-time; else a 400 naming `datetime`."""
    try:
        if not RFC3339.fullmatch(text):
            raise ValueError(text)
        return datetime.fromisoformat(text.upper())
    except ValueError:
        raise BadQuery(f"datetime: {text[:40]!r} is not an RFC 3339 date-time") from None


def _bbox(bbox: Any, method: str) -> list[float]:
    """A 2-D or 3-D bbox (a list; in a query string, a comma list) as its 2-D extent."""
    if isinstance(bbox, str) and method == "POST":
        raise BadQuery("bbox: a JSON array of four or six numbers")
    try:
        box = [float(v) for v in (bbox.split(",") if isinstance(bbox, str) else bbox)]
    except (TypeError, ValueError):
        raise BadQuery("bbox: four or six numbers") from None
    if len(box) not in (4, 6) or not all(math.isfinite(v) for v in box):
        raise BadQuery("bbox: four or six finite numbers")
    box = box if len(box) == 4 else [box[0], box[1], box[3], box[4]]
    # west > east crosses the antimeridian; south > north is just wrong
    if box[1] > box[3] or not (-90 <= box[1] <= 90 and -90 <= box[3] <= 90):
        raise BadQuery("bbox: latitudes within -90..90, the southern one first")
    return box


def _geometry(value: Any) -> Any:
    """A GeoJSON geometry (`intersects`) as a shapely one, as EODAG takes it."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise BadQuery("intersects: a GeoJSON geometry") from None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise BadQuery("intersects: a GeoJSON geometry")
    try:
        geometry = shapely.geometry.shape(value)
    except (
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        RecursionError,
        shapely.errors.ShapelyError,
    ):
        raise BadQuery("intersects: not a valid GeoJSON geometry") from None
    bounds = geometry.bounds
    if geometry.is_empty or not all(math.isfinite(v) for v in bounds):
        raise BadQuery("intersects: an empty geometry or one with non-finite coordinates")
    return geometry


def _query(values: dict[str, Any], method: str) -> dict[str, Any]:
    """Translate STAC search parameters into EODAG's; a malformed one is a 400 naming it."""
    out: dict[str, Any] = {}
    if values.get("bbox") is not None and values.get("intersects") is not None:
        raise BadQuery("bbox and intersects: give one or the other")
    if values.get("bbox") is not None:
        out["geom"] = _bbox(values["bbox"], method)
    if values.get("intersects") is not None:
        out["geom"] = _geometry(values["intersects"])
    interval = values.get("datetime")
    if interval is not None:
        if not isinstance(interval, str) or not interval:
            raise BadQuery("datetime: an RFC 3339 date-time or interval (a string)")
        start, slash, end = interval.partition("/")
        if not slash:
            out["start"] = out["end"] = _instant(start)
        else:
            if start in ("", "..") and end in ("", ".."):
                raise BadQuery("datetime: an interval needs at least one end")
            if start not in ("", ".."):
                out["start"] = _instant(start)
            if end not in ("", ".."):
                out["end"] = _instant(end)
            if "start" in out and "end" in out and out["start"] > out["end"]:
                raise BadQuery("datetime: the interval ends before it starts")
        for key in ("start", "end"):  # as EODAG wants them: UTC, RFC 3339
            if key in out:
                out[key] = out[key].astimezone(UTC).isoformat().replace("+00:00", "Z")
    return out


def _names(values: dict[str, Any], key: str) -> list[str] | None:
    """`collections` or `ids`: a list of strings, or one comma-separated string."""
    value = values.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.split(",") if v]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadQuery(f"{key}: a list of strings (or one comma-separated string)")
    return value


#: the CQL2 operators cql2 can evaluate (basic CQL2, LIKE/BETWEEN/IN, spatial, temporal, array)
OPERATORS = frozenset(
    "and or not = <> < <= > >= isNull like between in casei accenti + - * / % div ^".split()
    + [
        f"s_{op}"
        for op in "intersects contains within disjoint equals touches overlaps crosses".split()
    ]
    + [
        f"t_{op}"
        for op in "after before contains disjoint during equals finishedBy finishes intersects "
        "meets metBy overlappedBy overlaps startedBy starts".split()
    ]
    + [f"a_{op}" for op in "equals contains containedBy overlaps".split()]
)


def _known_ops(node: Any) -> None:
    """Refuse operators that validate but cannot be evaluated (cql2 accepts any name)."""
    if isinstance(node, list):
        for part in node:
            _known_ops(part)
    elif isinstance(node, dict):
        if "op" in node and node["op"] not in OPERATORS:
            raise ValueError(f"unknown operator {str(node['op'])[:40]!r}")
        if "function" in node:
            raise ValueError("functions are not supported")
        for part in node.values():
            _known_ops(part)


def matches(expr: cql2.Expr, item: dict[str, Any]) -> bool:
    """Whether an item passes a filter; one it cannot be evaluated on (a property it lacks,
    no footprint) does not."""
    try:
        return bool(expr.matches(item))
    except Exception:  # cql2 raises a bare Exception when an expression does not reduce
        return False


def _filter(values: dict[str, Any], method: str) -> cql2.Expr | None:
    """`filter` in CQL2 text or JSON (`filter-lang`), checked; coordinates in CRS84 only."""
    text = values.get("filter")
    if text is None:
        return None
    lang = values.get("filter-lang") or ("cql2-json" if method == "POST" else "cql2-text")
    crs = values.get("filter-crs")
    if crs is not None and crs not in CRS84:
        raise BadQuery("filter-crs: only CRS84 (EPSG:4326) coordinates are supported")
    try:
        if lang == "cql2-text" and isinstance(text, str):
            expr = cql2.parse_text(text)
        elif lang == "cql2-json":
            expr = cql2.Expr(json.loads(text) if isinstance(text, str) else text)
        else:
            raise BadQuery("filter-lang: cql2-text (a string) or cql2-json")
        expr.validate()
        _known_ops(expr.to_json())
    except (cql2.ParseError, cql2.ValidationError, ValueError, TypeError, RecursionError) as e:
        reason = str(e).strip().splitlines()[-1][:160] if str(e).strip() else type(e).__name__
        raise BadQuery(f"filter: not valid {lang} ({reason})") from None
    return expr
