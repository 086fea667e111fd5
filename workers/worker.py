"""`fdp worker`: an RQ worker that runs retrievals, heartbeats while it does, announces endings.

RQ already knows abandoned jobs: a running job sits in its queue's StartedJobRegistry until
its heartbeat lapses, and `StartedJobRegistry.cleanup()` then hands it back to the queue
(counting it as a failed attempt) or fails it. RQ's SimpleWorker sends no heartbeat while a
job runs, though, so it registers each job for `job_timeout + 60` s; this worker beats every
few seconds instead, so a worker that dies is noticed within LEASE_SECONDS.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker, get_current_job
from rq.job import Job, JobStatus

from policies.config import Settings
from upstreams.base import ObjectNotFound
from workers.jobs import Context, describe, retrieve
from workers.retrieval import Progress, RetrievalFailed
from workers.retry import is_final
from workers.stats import JobStats

log = logging.getLogger("fdp.workers")

QUEUE_NAME = "fdp-retrieval"
#: where workers announce that a job ended (RQ has recorded it): held requests wake at once
CHANNEL = "fdp:jobs:done"
#: a running job's heartbeat lives this long; its worker renews it three times as often
LEASE_SECONDS = 10
JOB_TIMEOUT = 3600
#: how often a worker runs RQ's registry maintenance (abandoned jobs included) by itself
MAINTENANCE_SECONDS = 60
#: at most one progress write per job this often
PROGRESS_SECONDS = 0.5

_context: Context | None = None


def run_job(dataset: str, path: str) -> None:
    """The RQ job function: one attempt at a retrieval; progress and errors go to job.meta."""
    from policies.loader import load_settings

    global _context
    if _context is None:  # once per worker: the EODAG gateway and cache handles stay warm
        _context = Context(load_settings(None))
    job = get_current_job()
    assert job is not None
    job.meta["attempts"] = job.meta.get("attempts", 0) + 1
    job.save_meta()
    try:
        retrieve(_context, dataset, path, progress_of(job))
    except Exception as e:
        job.meta["error"] = describe(e)
        if is_final(e):
            job.meta["not_found"] = isinstance(e, ObjectNotFound)
            job.retries_left = 0  # RQ's Retry is per job: this failure must end it now
        job.save_meta()
        raise RetrievalFailed(job.meta["error"]) from None
    job.meta["error"] = None
    job.save_meta()


def progress_of(job: Job) -> Progress:
    """Progress into the job's meta, written at most every PROGRESS_SECONDS (and at the end)."""
    last = 0.0

    def progress(done: int, total: int | None) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last > PROGRESS_SECONDS or (total is not None and done >= total):
            last = now
            job.meta.update(bytes_done=done, bytes_total=total)
            job.save_meta()

    return progress


def announce(connection: Redis, jid: str) -> None:
    """Wake the held requests of every replica (they also poll, so a lost message only delays)."""
    with contextlib.suppress(RedisError):
        connection.publish(CHANNEL, jid)


class Heartbeat:
    """Calls `beat` every `every` seconds on a daemon thread, from start() until stop()."""

    def __init__(self, beat: Callable[[], object], every: float) -> None:
        self.beat = beat
        self.every = every
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="fdp-heartbeat", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Idempotent; waits (briefly) for a beat in flight."""
        self.stopped.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(self.every)

    def _run(self) -> None:
        while not self.stopped.wait(self.every):
            try:
                self.beat()
            except Exception as e:  # a Redis blip: the next beat may work
                log.warning("job heartbeat failed (%s)", type(e).__name__)


class Worker(SimpleWorker):
    """RQ's SimpleWorker (no fork per job: warm handles) with heartbeats during each job,
    and a bounded warm shutdown: a job that does not end within `grace` seconds of the stop
    request goes back to the front of its queue (its cached blocks stay), and the worker
    exits."""

    def __init__(self, *args: Any, grace: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._heartbeat: Heartbeat | None = None
        self.grace = grace
        self.stats = JobStats(self.connection)

    def request_stop(self, signum: int, frame: Any) -> None:
        if self.grace is not None and self.get_current_job_id() is not None:
            timer = threading.Timer(self.grace, self._give_back, (self.get_current_job_id(),))
            timer.daemon = True
            timer.start()
        super().request_stop(signum, frame)

    def _give_back(self, job_id: str) -> None:
        """(On a timer thread: the job still runs on the main one.) Requeue and leave."""
        job = self.get_current_job()
        if job is None or job.id != job_id or job.get_status() != JobStatus.STARTED:
            return  # it ended in time
        if self._heartbeat is not None:
            self._heartbeat.stop()
        queue = Queue(job.origin, connection=self.connection)
        with self.connection.pipeline() as pipe:
            queue.started_job_registry.remove_executions(job, pipeline=pipe)
            pipe.execute()
        queue.enqueue_job(job, at_front=True)
        log.warning(
            "job %s handed back to the queue: it did not end within %g s", job_id, self.grace
        )
        logging.shutdown()
        os._exit(0)  # the main thread is inside the job: leave without finishing it

    def get_heartbeat_ttl(self, job: Job) -> int:
        return LEASE_SECONDS

    def execute_job(self, job: Job, queue: Queue) -> None:
        self._heartbeat = Heartbeat(lambda: self.maintain_heartbeats(job), LEASE_SECONDS / 3)
        try:
            super().execute_job(job, queue)
        finally:  # every path, BaseException included: no heartbeat outlives its job
            self._heartbeat.stop()
            self._heartbeat = None

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        super().prepare_job_execution(job, remove_from_intermediate_queue)
        if self._heartbeat is not None:
            self._heartbeat.start()

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        if self._heartbeat is not None:  # before RQ records the outcome and drops the execution
            self._heartbeat.stop()
        super().handle_execution_ended(job, queue, heartbeat_ttl)

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: Any) -> None:
        super().handle_job_success(job, queue, started_job_registry)
        self.stats.record("succeeded", _took(job))
        announce(self.connection, job.id)

    def handle_job_failure(
        self, job: Job, queue: Queue, started_job_registry: Any = None, exc_string: str = ""
    ) -> None:
        super().handle_job_failure(job, queue, started_job_registry, exc_string)
        if job.get_status(refresh=False) == JobStatus.FAILED:  # not rescheduled: it ended
            self.stats.record("failed", _took(job))
            announce(self.connection, job.id)
        else:
            self.stats.record("retried", _took(job))


def _took(job: Job) -> float:
    """Seconds the job's attempt ran (0 if RQ did not note its start)."""
    started = job.started_at
    if started is None:
        return 0.0
    now = datetime.now(UTC)
    if started.tzinfo is None:  # RQ writes naive UTC times
        now = now.replace(tzinfo=None)
    return max(0.0, (now - started).total_seconds())


def run_worker(
    settings: Settings, burst: bool = False, on_start: Callable[[], Any] | None = None
) -> None:
    """`fdp worker`: our Worker (with RQ's scheduler, for retry back-off) on our queue."""
    assert settings.queue.redis_url, "fdp worker needs queue.redis_url"
    redis = Redis.from_url(settings.queue.redis_url)
    worker = Worker(
        [Queue(QUEUE_NAME, connection=redis)],
        connection=redis,
        maintenance_interval=MAINTENANCE_SECONDS,
        grace=settings.queue.worker_grace_seconds,
    )
    if on_start is not None:
        on_start()
    worker.work(with_scheduler=True, burst=burst)
