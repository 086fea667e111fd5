"""Data that is not ready yet: queue the retrieval, hold the request, or say when to come back.

DESIGN.md's contract: `Prefer: respond-async` gets 202 at once; otherwise the request is
held up to the dataset's `hold_seconds` (shortened by `Prefer: wait=N`) and served if the
data arrives, else answered with `not_ready_status` (202 or 503), `Retry-After` (an
estimate from the queue, not a constant) and `Location: /jobs/{id}`.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

from starlette.types import Send

from policies.config import Dataset
from upstreams.base import ObjectNotFound, UpstreamObject
from workers.jobs import FAILED, RUNNING, SUCCEEDED, JobInfo
from workers.queue import JobQueue


class RetrievalError(Exception):
    """A retrieval failed for good; the message names why (it is safe to show)."""


def is_slow(policy: Dataset, obj: UpstreamObject) -> bool:
    """Whether this object is fetched by a background job rather than on the request."""
    limit = policy.async_.background_above
    return (
        policy.archive
        or not obj.online
        or (limit is not None and obj.size is not None and obj.size > limit)
    )


def parse_prefer(header: str | None) -> tuple[bool, float | None]:
    """(respond-async asked, wait=N seconds) from RFC 7240 `Prefer` headers."""
    respond_async, wait = False, None
    for pref in (header or "").split(","):
        name, _, value = pref.strip().partition("=")
        name = name.strip().lower()
        if name == "respond-async":
            respond_async = True
        elif name == "wait":
            try:
                wait = max(0.0, float(value.strip().strip('"')))
            except ValueError:
                continue
    return respond_async, wait


class Durations:
    """Observed retrieval times per dataset (moving average), for Retry-After estimates."""

    def __init__(self) -> None:
        self.average: dict[str, float] = {}

    def observe(self, info: JobInfo) -> None:
        if info.state == SUCCEEDED and info.started and info.finished:
            took = info.finished - info.started
            old = self.average.get(info.dataset)
            self.average[info.dataset] = took if old is None else 0.7 * old + 0.3 * took

    def retry_after(self, info: JobInfo, policy: Dataset) -> int:
        typical = self.average.get(info.dataset, float(policy.async_.retry_after))
        if info.state == RUNNING and info.started:
            left = typical - (time.time() - info.started)
            if info.bytes_total and info.bytes_done:
                elapsed = max(time.time() - info.started, 1e-3)
                left = (info.bytes_total - info.bytes_done) / (info.bytes_done / elapsed)
        else:
            left = typical * (1 + (info.position or 0))
        return max(1, min(3600, math.ceil(left)))


async def not_ready(
    send: Send, status: int, info: JobInfo, retry_after: int, public_url: str, applied: bool
) -> None:
    body = json.dumps({**info.public(), "retry_after": retry_after}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(retry_after).encode()),
        (b"location", f"{public_url}/jobs/{info.id}".encode()),
        (b"cache-control", b"no-store"),
    ]
    if applied:
        headers.append((b"preference-applied", b"respond-async"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def hold(
    queue: JobQueue,
    durations: Durations,
    info: JobInfo,
    seconds: float,
    stopping: asyncio.Event | None = None,
) -> JobInfo:
    """Wait up to `seconds` for the job, or until the server is stopping (then the client
    gets its "come back later" at once); raises RetrievalError if it failed for good.

    ObjectNotFound when the provider said the object is not there: a 404, not a 502.
    """
    waiting = asyncio.ensure_future(queue.wait(info.id, seconds))
    stop = asyncio.ensure_future((stopping or asyncio.Event()).wait())
    try:
        await asyncio.wait({waiting, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not waiting.done():
            waiting.cancel()
    current = (waiting.result() if waiting.done() and not waiting.cancelled() else None) or info
    durations.observe(current)
    if current.state == FAILED and current.not_found:
        raise ObjectNotFound(current.error or "no such object at the provider")
    if current.state == FAILED:
        raise RetrievalError(
            f"retrieval failed after {current.attempts} attempts: "
            f"{current.error or 'unknown error'}"
        )
    return current
