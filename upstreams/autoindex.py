"""A web server's directory listing (autoindex) read as object keys, folder by folder.

Understands the HTML of nginx `autoindex`, Apache `mod_autoindex` (plain and fancy) and
Python's `http.server`, and nginx's `autoindex_format json`. Only links to a page's own
children count (not sort links, parents or other sites); sizes are taken only where a
listing states them in bytes (nginx's default; Apache states small files exactly).
"""

from __future__ import annotations

import json
import re
import time
from collections import deque
from html.parser import HTMLParser
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from upstreams.base import Listed, Origins, UpstreamTimeout, UpstreamUnavailable, quote_key

#: how far and how much one crawl may go: listings are for catalogues, not mirroring
MAX_DEPTH, MAX_PAGES, MAX_PAGE_BYTES = 16, 2000, 8 << 20
#: the last word of the text after a link: nginx's size column, or Apache's
_SIZE = re.compile(r"(\d+)\s*$")


class _Links(HTMLParser):
    """Each `<a href>` and the text that follows it up to the next link."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[list[str]] = []  # [href, text after]
        self._in_link = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            self._in_link = href is not None
            if href is not None:
                self.links.append([href, ""])

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self._in_link = False

    def handle_data(self, data: str) -> None:
        if self.links and not self._in_link:
            self.links[-1][1] += data


def _child(page: str, href: str) -> str | None:
    """The child name (`name` or `name/`) an href names, or None if it is not a child."""
    url = urljoin(page, href)
    parts = urlsplit(url)
    if parts.query or parts.fragment or not url.startswith(page) or url == page:
        return None
    name = unquote(url[len(page) :])
    folder = name.endswith("/")
    bare = name.rstrip("/") if folder else name
    if not bare or "/" in bare or bare in (".", "..") or not bare.isprintable():
        return None
    return name


def parse(page: str, body: bytes, media_type: str) -> tuple[list[Listed], list[str]]:
    """The files (key relative to `page`, size if stated) and subfolders of one listing."""
    files: dict[str, int | None] = {}
    folders: list[str] = []
    if "json" in media_type:  # nginx autoindex_format json: [{name, type, size, mtime}]
        try:
            entries = json.loads(body)
        except (ValueError, RecursionError):
            return [], []
        for e in entries if isinstance(entries, list) else []:
            if not isinstance(e, dict) or not isinstance(e.get("name"), str):
                continue
            folder = e.get("type") == "directory"
            name = _child(page, e["name"] + ("/" if folder else ""))
            if name is None:
                continue
            if folder:
                folders.append(name)
            else:
                size = e.get("size")
                files[name] = size if isinstance(size, int) and size >= 0 else None
        return [Listed(k, s) for k, s in files.items()], folders
    parser = _Links()
    parser.feed(body.decode("utf-8", "replace"))
    for href, after in parser.links:
        name = _child(page, href)
        if name is None:
            continue
        if name.endswith("/"):
            if name not in folders:
                folders.append(name)
            continue
        # "  21-Nov-2026 10:00   658324" (nginx) or "2026-11-21 10:00  420 " (Apache)
        first_line = after.strip().splitlines()[0] if after.strip() else ""
        size = _SIZE.search(first_line)
        if name not in files or files[name] is None:
            files[name] = int(size.group(1)) if size and len(first_line.split()) >= 3 else None
    return [Listed(k, s) for k, s in files.items()], folders


async def crawl(
    base_url: str, origins: Origins, client: httpx.AsyncClient, limit: int, deadline: float
) -> list[Listed]:
    """Every object under `base_url` (a folder URL), breadth first, up to `limit` keys.

    Bounded in depth, pages, page size and time (`deadline`, monotonic). A folder the
    server will not list (403, 404: no autoindex) lists nothing; any other failure fails the
    crawl, so a half-read listing is never taken for the whole.
    """
    found: list[Listed] = []
    queue: deque[tuple[str, int]] = deque([("", 0)])
    pages = 0
    while queue and len(found) < limit:
        prefix, depth = queue.popleft()
        url = base_url + quote_key(prefix)
        origins.check(url, "listing")
        pages += 1
        if pages > MAX_PAGES:
            raise UpstreamUnavailable(f"the listing has more than {MAX_PAGES} folders")
        left = deadline - time.monotonic()
        if left <= 0:
            raise UpstreamTimeout("listing the upstream took too long")
        try:
            async with client.stream("GET", url, timeout=left) as r:
                if r.status_code in (403, 404):  # autoindex off, or a folder gone meanwhile
                    continue
                if r.status_code != 200:
                    raise UpstreamUnavailable(
                        f"listing a folder: upstream answered {r.status_code}", r.status_code
                    )
                body = bytearray()
                async for chunk in r.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_PAGE_BYTES:
                        raise UpstreamUnavailable("a listing page is too large")
                media = r.headers.get("content-type", "")
        except httpx.TimeoutException:
            raise UpstreamTimeout("listing the upstream timed out") from None
        except httpx.HTTPError as e:
            raise UpstreamUnavailable(f"listing the upstream failed ({type(e).__name__})") from None
        files, folders = parse(url, bytes(body), media)
        found += [Listed(prefix + f.key, f.size) for f in files]
        if depth < MAX_DEPTH:
            queue += [(prefix + f, depth + 1) for f in folders]
    return sorted(found[:limit], key=lambda f: f.key)
