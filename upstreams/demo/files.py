"""The demo provider's files: a raw ASGI server with Range, validators, staging delays,
injected faults, and nginx-style folder listings."""

from __future__ import annotations

import asyncio
import os
import time
from email.utils import formatdate
from html import escape
from pathlib import Path
from urllib.parse import quote

from starlette.types import Receive, Scope, Send
from werkzeug.http import parse_range_header

from upstreams.demo.state import State, changed_bytes, order_status

CHUNK = 256 * 1024


class DataFiles:
    """Raw ASGI file server: Range, conditional headers, staging delay, injected faults."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state: State = scope["app"].state.demo
        entry = scope.get("fdp.log", {})  # the request log's entry: bytes sent go there
        method = scope["method"]
        rel = scope["path"][len("/data/") :]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        fault = state.take_fault(method, scope["path"], headers.get("authorization"))
        if fault and fault.delay:
            await asyncio.sleep(fault.delay)
        if fault and fault.redirect:
            location = fault.redirect.replace("{path}", scope["path"])
            status = fault.status if fault.status and 300 <= fault.status < 400 else 302
            await _send_simple(send, status, b"", [(b"location", location.encode())])
            return
        if fault and fault.status:
            await _send_simple(send, fault.status, fault.body.encode())
            return
        path = (state.root / rel).resolve()
        if method not in ("GET", "HEAD"):
            await _send_simple(send, 405, b"")
            return
        inside = state.root.resolve() in path.parents
        if inside and path.is_dir() and scope["path"].endswith("/"):
            page = autoindex(scope["path"], path).encode()
            headers = [(b"content-type", b"text/html")]
            await _send_simple(send, 200, b"" if method == "HEAD" else page, headers)
            return
        if not path.is_file() or not inside:
            await _send_simple(send, 404, b'{"error":"no such file"}')
            return
        cid, iid = [*rel.split("/"), "", ""][:2]
        if cid in state.catalog["collections"] and order_status(state, cid, iid) in (
            "orderable",
            "ordered",
        ):
            await _send_simple(send, 409, b'{"error":"offline: order the item first"}')
            return
        delay = state.catalog["collections"].get(cid, {}).get("archive_delay", 0.0)
        if delay and method == "GET":
            ready_at = state.staged_at.setdefault(rel, time.monotonic() + delay)
            await asyncio.sleep(max(0.0, ready_at - time.monotonic()))
        st = path.stat()
        changed = fault is not None and fault.changed
        etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}{"-changed" if changed else ""}"'
        mtime = st.st_mtime + (3600 if changed else 0)
        out = [
            (b"accept-ranges", b"bytes"),
            (b"content-type", b"image/tiff"),
            (b"etag", etag.encode()),
            (b"last-modified", formatdate(mtime, usegmt=True).encode()),
        ]
        start, end, status = 0, st.st_size, 200
        ignore_range = fault is not None and fault.ignore_range
        rng = None if ignore_range else parse_range_header(headers.get("range"))
        if rng is not None and len(rng.ranges) == 1:
            bounds = rng.range_for_length(st.st_size)
            if bounds is None:
                out.append((b"content-range", f"bytes */{st.st_size}".encode()))
                await _send_simple(send, 416, b"", out)
                return
            start, end, status = bounds[0], bounds[1], 206
            out.append((b"content-range", f"bytes {start}-{end - 1}/{st.st_size}".encode()))
        if status == 206 and fault is not None and fault.short_by:
            end = max(start, end - fault.short_by)  # a lying 206: whole, but shorter
        length = end - start
        if method == "HEAD" and fault is not None and fault.head_length is not None:
            length = fault.head_length
        out.append((b"content-length", str(length).encode()))
        await send({"type": "http.response.start", "status": status, "headers": out})
        if method == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return
        limit = end if fault is None or fault.cut_after is None else start + fault.cut_after
        with path.open("rb") as f:
            pos = start
            while pos < min(end, limit):
                n = min(CHUNK, end - pos, limit - pos)
                chunk = os.pread(f.fileno(), n, pos)
                pos += len(chunk)
                entry["bytes"] = pos - start
                if fault is not None and fault.corrupt and chunk:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                if changed:
                    chunk = changed_bytes(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                entry["last_byte"] = time.time()
                if fault is not None and fault.chunk_delay:
                    await asyncio.sleep(fault.chunk_delay)
        if pos < end:
            return  # cut off: the server closes the connection with the body incomplete
        await send({"type": "http.response.body", "body": b""})


def autoindex(url_path: str, folder: Path) -> str:
    """A folder's listing as nginx's `autoindex on` writes it (names, dates, exact sizes)."""
    lines = ['<a href="../">../</a>']
    for child in sorted(folder.iterdir()):
        st = child.stat()
        name = child.name + ("/" if child.is_dir() else "")
        when = time.strftime("%d-%b-%Y %H:%M", time.gmtime(st.st_mtime))
        size = "-" if child.is_dir() else str(st.st_size)
        lines.append(f'<a href="{quote(name)}">{escape(name)}</a>{" " * 20}{when}{size:>20}')
    title = f"Index of {escape(url_path)}"
    body = "\n".join(lines)
    return (
        f"<html>\n<head><title>{title}</title></head>\n<body>\n"
        f"<h1>{title}</h1><hr><pre>{body}\n</pre><hr></body>\n</html>\n"
    )


async def _send_simple(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    out = [(k, v) for k, v in headers or [] if k != b"content-length"]
    out.append((b"content-length", str(len(body)).encode()))
    if not any(k == b"content-type" for k, _ in out):
        out.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})
