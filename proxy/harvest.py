"""`fdp harvest DATASET`: copy a dataset's items, hrefs pointing at fdp, out of a running proxy.

Into a file (`--out FILE.parquet`, stac-geoparquet; anything else NDJSON), or into another
STAC API that has the transactions extension (`--push URL`). Items come from the proxy's
`/stac/search` as the caller sees them (`$FDP_TOKEN`), a page at a time.

Resumable: after each page, the items are appended to a part file and synced, then a state
file records the part file's length and the next page. A re-run with the same query cuts the
part file back to that length (items of a page whose state was not recorded go) and goes on
from that page, so a harvest stopped at any point ends with every item exactly once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from tqdm import tqdm

from proxy.remote import Remote

PAGE = 100
TIMEOUT = 120.0


def add_parser(sub: Any) -> None:
    h = sub.add_parser("harvest", help="copy a dataset's items (STAC) to a file or a STAC API")
    h.add_argument("dataset")
    where = h.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="FILE.parquet (stac-geoparquet) or NDJSON")
    where.add_argument("--push", metavar="URL", help="a STAC API with transactions")
    h.add_argument("--since", help="items from this RFC 3339 date-time on")
    h.add_argument("--bbox", help="W,S,E,N: items that intersect it")
    h.add_argument("--limit", type=int, default=PAGE, help="items a page (default 100)")
    h.add_argument("--restart", action="store_true", help="start over, ignoring a stopped run")
    h.add_argument("--url", help="the proxy (default $FDP_URL, else http://127.0.0.1:8080)")


def _query(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"collections": [args.dataset], "limit": args.limit}
    if args.since:
        body["datetime"] = f"{args.since}/.."
    if args.bbox:
        try:
            body["bbox"] = [float(v) for v in args.bbox.split(",")]
        except ValueError:
            raise SystemExit("fdp: --bbox takes four numbers: W,S,E,N") from None
    return body


class Checkpoint:
    """The state file beside the output: the query, the part file's length, the next page."""

    def __init__(self, path: Path, query: dict[str, Any]) -> None:
        self.path, self.query = path, query

    def load(self, restart: bool) -> dict[str, Any] | None:
        if restart or not self.path.exists():
            return None
        state = json.loads(self.path.read_text())
        if state.get("query") != self.query:
            raise SystemExit(
                f"fdp: {self.path} is a stopped harvest of another query; "
                "run with --restart to start over"
            )
        return state

    def save(self, length: int, count: int, nxt: dict[str, Any] | None) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        state = {"query": self.query, "length": length, "count": count, "next": nxt}
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _pages(remote: Remote, query: dict[str, Any], state: dict[str, Any] | None) -> Any:
    """(items, next link) of each page: from the first, or after a stopped run's last."""
    if state is not None and state["next"] is None:
        return  # the stopped run had read every page
    body = state["next"]["body"] if state else query
    while True:
        page = remote.call("POST", "/stac/search", json=body).json()
        link = next((x for x in page.get("links", []) if x.get("rel") == "next"), None)
        if page.get("fdp:unavailable"):
            failed = ", ".join(u["collection"] for u in page["fdp:unavailable"])
            raise SystemExit(f"fdp: the provider of {failed} failed; run again to go on")
        yield page.get("features", []), link
        if link is None:
            return
        body = link["body"]


def run(args: argparse.Namespace) -> int:
    remote = Remote(args.url)
    query = _query(args)
    if args.push:
        return _push(args, remote, query)
    out: Path = args.out
    parquet = out.suffix == ".parquet"
    if parquet:
        try:
            import stac_geoparquet.arrow  # noqa: F401
        except ImportError:
            raise SystemExit(
                "fdp: .parquet needs stac-geoparquet: pip install 'federated-data-proxy[harvest]'"
            ) from None
    part = out.with_name(out.name + ".part")
    checkpoint = Checkpoint(out.with_name(out.name + ".harvest.json"), query)
    state = checkpoint.load(args.restart)
    count = state["count"] if state else 0
    with part.open("r+b" if state and part.exists() else "wb") as f:
        if state:
            f.truncate(state["length"])  # items past the last checkpoint come again
            f.seek(0, os.SEEK_END)
            print(f"fdp: resuming after {count} items", file=sys.stderr)
        with tqdm(desc=args.dataset, unit=" items", initial=count, file=sys.stderr) as bar:
            for items, link in _pages(remote, query, state):
                for item in items:
                    f.write(json.dumps(item, separators=(",", ":")).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
                count += len(items)
                checkpoint.save(f.tell(), count, link)
                bar.update(len(items))
    if parquet:
        skipped = _to_parquet(part, out)
        if skipped:
            print(
                f"fdp: {skipped} items without a footprint are not in {out} "
                "(stac-geoparquet needs a geometry; harvest to .ndjson to keep them)",
                file=sys.stderr,
            )
        if skipped == count:
            return 1  # nothing to write: the part file and state stay for an NDJSON run
        part.unlink()
    else:
        os.replace(part, out)
    checkpoint.clear()
    print(f"fdp: {count} items in {out}", file=sys.stderr)
    return 0


def _to_parquet(part: Path, out: Path) -> int:
    """The NDJSON part file as stac-geoparquet; returns how many items had no geometry."""
    import stac_geoparquet.arrow as sga

    located = part.with_name(part.name + ".located")
    skipped = 0
    with part.open("rb") as src, located.open("wb") as dst:
        for line in src:
            if json.loads(line).get("geometry") is None:
                skipped += 1
            else:
                dst.write(line)
    tmp = out.with_name(out.name + ".tmp")
    if located.stat().st_size:
        sga.parse_stac_ndjson_to_parquet(located, tmp)
        os.replace(tmp, out)
    located.unlink()
    return skipped


def _push(args: argparse.Namespace, remote: Remote, query: dict[str, Any]) -> int:
    """Each item into `{URL}/collections/{dataset}/items` (the collection made if missing);
    an item already there is replaced. Resumable like a file harvest."""
    target = args.push.rstrip("/")
    token = os.environ.get("FDP_PUSH_TOKEN")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    digest = hashlib.sha256(f"{target} {args.dataset}".encode()).hexdigest()[:16]
    checkpoint = Checkpoint(Path(f".fdp-harvest-{digest}.json"), query)
    state = checkpoint.load(args.restart)
    try:
        count = _push_pages(args, remote, query, target, headers, checkpoint, state)
    except httpx.HTTPError as e:
        raise SystemExit(f"fdp: cannot reach {target}: {type(e).__name__}") from None
    checkpoint.clear()
    print(f"fdp: {count} items pushed to {target}", file=sys.stderr)
    return 0


def _push_pages(
    args: argparse.Namespace,
    remote: Remote,
    query: dict[str, Any],
    target: str,
    headers: dict[str, str],
    checkpoint: Checkpoint,
    state: dict[str, Any] | None,
) -> int:
    count = state["count"] if state else 0
    cid = quote(args.dataset, safe="")
    with httpx.Client(headers=headers, timeout=TIMEOUT) as client:
        if client.get(f"{target}/collections/{cid}").status_code == 404:
            collection = remote.json(f"/stac/collections/{cid}")
            collection["links"] = []
            _check(client.post(f"{target}/collections", json=collection), "the collection")
        with tqdm(desc=args.dataset, unit=" items", initial=count, file=sys.stderr) as bar:
            for items, link in _pages(remote, query, state):
                for item in items:
                    r = client.post(f"{target}/collections/{cid}/items", json=item)
                    if r.status_code == 409:  # already there: replace it
                        iid = quote(item["id"], safe="")
                        r = client.put(f"{target}/collections/{cid}/items/{iid}", json=item)
                    _check(r, f"item {item['id']}")
                count += len(items)
                checkpoint.save(0, count, link)
                bar.update(len(items))
    return count


def _check(r: httpx.Response, what: str) -> None:
    if r.status_code >= 300:
        raise SystemExit(f"fdp: the STAC API refused {what}: {r.status_code} {r.text[:200]}")
