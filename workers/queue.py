"""Retrieval jobs as the proxy sees them: one interface, two backends.

- EmbeddedQueue (workers.embedded): a few daemon threads inside `fdp serve`, no Redis.
- RQQueue (workers.rq_queue): RQ on Redis, run by `fdp worker` processes (workers.worker).

Both: one job per object however many ask (the id is the object's fingerprint), owners kept
per job so everyone who joined can read it, retries with jittered back-off (none for an
object that is not there), progress in bytes, and a wake-up for held requests the moment a
job ends. Every call is a coroutine that never blocks the event loop.
"""

from __future__ import annotations

from policies.config import Settings
from workers.base import JobQueue, QueueUnavailable, Waiters, running
from workers.embedded import EmbeddedQueue
from workers.rq_queue import RQQueue
from workers.worker import run_worker

__all__ = [
    "EmbeddedQueue",
    "JobQueue",
    "QueueUnavailable",
    "RQQueue",
    "Waiters",
    "make_queue",
    "run_worker",
    "running",
]


def make_queue(settings: Settings) -> JobQueue:
    """RQ when `queue.redis_url` is set, else the embedded runner."""
    if settings.queue.redis_url:
        return RQQueue(settings.queue)
    return EmbeddedQueue(settings)
