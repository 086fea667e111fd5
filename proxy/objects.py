"""`PUT /admin/objects/{dataset}/{path}`: an upload at a site, served at once and announced.

For an admin or a member of the dataset's `owners` groups. The body goes to a temporary
file (never held in memory) and is checked against `Content-Length` and, when the client
sends one, its `Content-Digest`/`Repr-Digest` sha-256 (RFC 9530): a link that dropped or
corrupted the upload leaves nothing behind. Then it is put in the cache as `fdp cache put`
does, and announced before the answer, so the answer names its announcement.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import anyio.to_thread
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from cache.feed import announce_quietly
from cache.store import Store, object_key
from proxy.auth import Forbidden, Unauthorized, identity
from proxy.feed import Feed
from proxy.problems import BadRequest, ProxyError
from upstreams.base import DatasetNotFound, safe_key

#: bytes written to the temporary file at a time (the writes run in a thread)
WRITE_BATCH = 1 << 20


class TooLarge(ProxyError):
    status, slug = 413, "content-too-large"


class StoreUnavailable(ProxyError):
    status, slug = 503, "cache-unavailable"


def _digest(request: Request) -> bytes | None:
    """The sha-256 the client says its body has (`Content-Digest` or `Repr-Digest`)."""
    for name in ("content-digest", "repr-digest"):
        value = request.headers.get(name)
        if value is None:
            continue
        for member in value.split(","):
            algorithm, _, encoded = member.strip().partition("=")
            if algorithm.strip().lower() == "sha-256":
                try:
                    return base64.b64decode(encoded.strip().strip(":"), validate=True)
                except ValueError:
                    raise BadRequest(f"{name}: sha-256=:base64:") from None
    return None


def _write(f: IO[bytes], digests: tuple[Any, ...], chunks: list[bytes]) -> None:
    for chunk in chunks:
        f.write(chunk)
        for digest in digests:
            digest.update(chunk)


async def _receive(request: Request, folder: Path, limit: int) -> tuple[Path, str, str]:
    """The body in a temporary file beside the cache, its sha-256 (hex; checked) and its
    sha-512 (base64, for its announcement: so the object is not read back for it)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise TooLarge(f"an object of at most {limit} bytes")
    fd, name = tempfile.mkstemp(dir=folder, suffix=".upload")
    path, size, batch = Path(name), 0, []
    digests = digest, sha512 = hashlib.sha256(), hashlib.sha512()
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"an object of at most {limit} bytes")
                batch.append(chunk)
                if sum(map(len, batch)) >= WRITE_BATCH:
                    await anyio.to_thread.run_sync(_write, f, digests, batch)
                    batch = []
            await anyio.to_thread.run_sync(_write, f, digests, batch)
        if declared is not None and size != int(declared):
            raise BadRequest(f"the body had {size} bytes, not the {declared} announced")
        wanted = _digest(request)
        if wanted is not None and wanted != digest.digest():
            raise BadRequest("the body does not match its Content-Digest: not stored")
        return path, digest.hexdigest(), base64.b64encode(sha512.digest()).decode("ascii")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)  # (a metadata write: no thread for it, even when cancelled)
        raise


async def put(request: Request) -> Response:
    state = request.app.state
    dataset, rel = request.path_params["dataset"], request.path_params["path"]
    who = await identity(request)
    if who.subject is None:
        raise Unauthorized("uploads need a bearer token", invalid=False)
    entry = state.registry.entries.get(dataset)
    if entry is None:
        raise DatasetNotFound(f"no dataset {dataset!r}")
    if not (who.admin or set(entry.policy.owners) & who.groups):
        raise Forbidden("uploads are for admins and the dataset's owners")
    path = safe_key(rel)
    store: Store | None = state.delivery.store
    if store is None:
        raise StoreUnavailable("the cache is not available", headers={"retry-after": "30"})
    settings = state.settings
    try:
        source, sha256, sha512 = await _receive(request, store.tmp, int(settings.cache.max_bytes))
    except ClientDisconnect:
        return Response(status_code=400)  # (nobody is listening)
    try:
        existed = await anyio.to_thread.run_sync(store.record, object_key(dataset, path))
        ingest = functools.partial(
            store.ingest, media_type=request.headers.get("content-type"), sha512=sha512
        )
        record = await anyio.to_thread.run_sync(
            ingest, dataset, path, source, int(settings.cache.block_size)
        )
    finally:
        with contextlib.suppress(OSError):
            os.unlink(source)
    hub: Feed = state.feed
    notice = await anyio.to_thread.run_sync(announce_quietly, store, hub.log, record)
    if notice is not None:
        hub.announced(notice)
    location = f"{state.public_url}/assets/{dataset}/{quote(path)}"
    body = {
        "dataset": dataset,
        "path": path,
        "size": record.size,
        "sha256": sha256,
        "announced": notice.id if notice is not None else None,
    }
    return JSONResponse(
        body,
        status_code=200 if existed is not None else 201,
        headers={"location": location, "cache-control": "no-store"},
    )
