"""Two job queues behind one interface: RQ on Redis, and an embedded in-process runner.

Both: one job per object however many ask (the id is the object's fingerprint), retries
with backoff up to the dataset's limit, progress in bytes, and a wake-up for waiters the
moment a job finishes (Redis pub/sub across replicas; a thread-safe event in-process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from redis.exceptions import RedisError

from policies.config import Settings
from workers.jobs import (
    FAILED,
    FINISHED_TTL,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Context,
    JobInfo,
    describe,
    job_id,
    retrieve,
)

log = logging.getLogger("fdp.workers")

CHANNEL = "fdp:jobs:done"
QUEUE_NAME = "fdp-retrieval"
#: A running job's lease: its worker renews it; a job whose lease lapsed lost its worker.
LEASE_KEY = "fdp:lease:{}"
LEASE_SECONDS = 10
BACKOFF = (2.0, 5.0, 15.0, 30.0, 60.0)


class QueueUnavailable(Exception):
    """The job queue (Redis) cannot be reached; asking again later may work."""


def backoff(attempt: int) -> float:
    return BACKOFF[min(attempt - 1, len(BACKOFF) - 1)]


class JobQueue(Protocol):
    def submit(self, dataset: str, path: str, owner: str, max_attempts: int) -> JobInfo: ...
    def get(self, job_id: str) -> JobInfo | None: ...
    async def wait(self, job_id: str, seconds: float) -> JobInfo | None: ...
    def problem(self) -> str | None: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...


class Waiters:
    """asyncio events per job id, set from any thread when the job finishes."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.events: dict[str, asyncio.Event] = {}

    def event(self, jid: str) -> asyncio.Event:
        self.loop = asyncio.get_running_loop()
        return self.events.setdefault(jid, asyncio.Event())

    def wake(self, jid: str) -> None:
        """Callable from any thread."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.release, jid)

    def release(self, jid: str) -> None:
        """Wake the waiters of `jid` (on the loop's thread)."""
        event = self.events.pop(jid, None)
        if event is not None:
            event.set()


class EmbeddedQueue:
    """Jobs run in a small thread pool inside the proxy (no Redis)."""

    def __init__(self, settings: Settings, workers: int = 2) -> None:
        self.settings = settings
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="fdp-job")
        self.jobs: dict[str, JobInfo] = {}
        self.lock = threading.Lock()
        self.waiters = Waiters()
        self._context: Context | None = None
        self._context_lock = threading.Lock()

    def context(self) -> Context:
        with self._context_lock:
            if self._context is None:
                self._context = Context(self.settings)
            return self._context

    def submit(self, dataset: str, path: str, owner: str, max_attempts: int) -> JobInfo:
        jid = job_id(dataset, path)
        with self.lock:
            info = self.jobs.get(jid)
            if info is not None and not info.done:
                if owner not in info.owners:
                    info.owners.append(owner)
                return info
            info = self.jobs[jid] = JobInfo(
                jid, dataset, path, owners=[owner], max_attempts=max_attempts
            )
            self._expire()
        self.pool.submit(self._run, info)
        return info

    def _expire(self) -> None:
        cutoff = time.time() - FINISHED_TTL
        for jid in [j for j, i in self.jobs.items() if i.finished and i.finished < cutoff]:
            del self.jobs[jid]

    def _run(self, info: JobInfo) -> None:
        while True:
            info.attempts += 1
            info.state, info.started, info.error = RUNNING, time.time(), None

            def progress(done: int, total: int | None) -> None:
                info.bytes_done, info.bytes_total = done, total

            try:
                retrieve(self.context(), info.dataset, info.path, progress)
                info.state = SUCCEEDED
                break
            except Exception as e:
                info.error = describe(e)
                log.warning(
                    "job %s (%s/%s) attempt %d failed: %s",
                    info.id,
                    info.dataset,
                    info.path,
                    info.attempts,
                    info.error,
                )
                if info.attempts >= info.max_attempts:
                    info.state = FAILED
                    break
                info.state = QUEUED
                time.sleep(backoff(info.attempts))
        info.finished = time.time()
        self.waiters.wake(info.id)

    def get(self, jid: str) -> JobInfo | None:
        info = self.jobs.get(jid)
        if info is not None and info.state == QUEUED:
            queued = sorted((i.created, i.id) for i in self.jobs.values() if i.state == QUEUED)
            info.position = [j for _, j in queued].index(jid)
        return info

    async def wait(self, jid: str, seconds: float) -> JobInfo | None:
        info = self.jobs.get(jid)
        if info is None or info.done or seconds <= 0:
            return info
        event = self.waiters.event(jid)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)
        return self.jobs.get(jid)

    def problem(self) -> str | None:
        return None

    async def start(self) -> None:
        self.waiters.loop = asyncio.get_running_loop()

    async def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self._context is not None:
            self._context.close()


# -- RQ on Redis --------------------------------------------------------------------------

_worker_context: Context | None = None


def run_job(dataset: str, path: str) -> None:
    """The RQ job function (runs in `fdp worker`); progress goes to the job's meta."""
    from rq import get_current_job

    from policies.loader import load_settings

    global _worker_context
    if _worker_context is None:
        _worker_context = Context(load_settings(None))
    job = get_current_job()
    assert job is not None
    job.meta["attempts"] = job.meta.get("attempts", 0) + 1
    job.save_meta()
    last = 0.0
    stop = threading.Event()

    def renew() -> None:
        key = LEASE_KEY.format(job.id)
        while not stop.is_set():
            with contextlib.suppress(Exception):  # Redis blips: the next renewal may work
                job.connection.set(key, "1", ex=LEASE_SECONDS)
            stop.wait(LEASE_SECONDS / 3)
        with contextlib.suppress(Exception):
            job.connection.delete(key)

    threading.Thread(target=renew, name=f"lease-{job.id}", daemon=True).start()

    def progress(done: int, total: int | None) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last > 0.5 or (total is not None and done >= total):
            last = now
            job.meta.update(bytes_done=done, bytes_total=total)
            job.save_meta()

    try:
        retrieve(_worker_context, dataset, path, progress)
    except Exception as e:
        stop.set()
        job.meta["error"] = describe(e)
        job.save_meta()
        retries_left = job.retries_left or 0
        if retries_left == 0:
            job.connection.publish(CHANNEL, job.id)  # final failure: wake the waiters
        raise RuntimeError(job.meta["error"]) from None
    stop.set()
    job.meta["error"] = None
    job.save_meta()
    job.connection.publish(CHANNEL, job.id)


class RQQueue:
    """Jobs on an RQ queue in Redis; `fdp worker` processes (any host) run them."""

    def __init__(self, redis_url: str, poll_seconds: float = 2.0) -> None:
        from redis import Redis
        from rq import Queue

        self.poll_seconds = poll_seconds
        self.redis = Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=10)
        self.queue = Queue(QUEUE_NAME, connection=self.redis)
        self.redis_url = redis_url
        self.waiters = Waiters()
        self._listener: asyncio.Task[None] | None = None

    def submit(self, dataset: str, path: str, owner: str, max_attempts: int) -> JobInfo:
        with self._reachable():
            return self._submit(dataset, path, owner, max_attempts)

    def get(self, jid: str) -> JobInfo | None:
        with self._reachable():
            return self._get(jid)

    def problem(self) -> str | None:
        """Why the queue cannot be used right now, for /readyz (None: it can)."""
        try:
            self.redis.ping()
        except RedisError as e:
            return f"redis: {type(e).__name__}"
        return None

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            yield
        except RedisError as e:
            raise QueueUnavailable(f"the job queue is unavailable ({type(e).__name__})") from None

    def _submit(self, dataset: str, path: str, owner: str, max_attempts: int) -> JobInfo:
        from rq import Retry
        from rq.exceptions import DuplicateJobError, NoSuchJobError
        from rq.job import Job

        jid = job_id(dataset, path)
        with contextlib.suppress(NoSuchJobError):
            job = Job.fetch(jid, connection=self.redis)
            status = job.get_status()
            if getattr(status, "value", status) in ("finished", "failed", "stopped", "canceled"):
                job.delete()  # a new attempt for an object the cache does not hold
        retries = max_attempts - 1  # RQ counts intervals from the end of the list
        retry = Retry(max=retries, interval=list(BACKOFF[:retries])) if retries else None
        try:
            self.queue.enqueue(
                run_job,
                dataset,
                path,
                job_id=jid,
                unique=True,
                retry=retry,
                result_ttl=FINISHED_TTL,
                failure_ttl=FINISHED_TTL,
                job_timeout=3600,
                meta={"owners": [owner], "max_attempts": max_attempts},
            )
        except DuplicateJobError:
            job = Job.fetch(jid, connection=self.redis)
            owners = job.meta.get("owners", [])
            if owner not in owners:
                job.meta["owners"] = [*owners, owner]
                job.save_meta()
        info = self._get(jid)
        assert info is not None
        return info

    def _get(self, jid: str) -> JobInfo | None:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:
            job = Job.fetch(jid, connection=self.redis)
        except NoSuchJobError:
            return None
        status = job.get_status()
        status = getattr(status, "value", status)
        if status == "started" and self._abandoned(job):
            return self._restart(job)
        state = {
            "queued": QUEUED,
            "scheduled": QUEUED,
            "deferred": QUEUED,
            "started": RUNNING,
            "finished": SUCCEEDED,
        }.get(status, FAILED)
        meta = job.get_meta()
        dataset, path = job.args[0], job.args[1]
        retries = job.retries_left or 0
        return JobInfo(
            id=jid,
            dataset=dataset,
            path=path,
            state=state,
            bytes_done=meta.get("bytes_done", 0),
            bytes_total=meta.get("bytes_total"),
            error=meta.get("error") if state in (FAILED, QUEUED) else None,
            owners=meta.get("owners", []),
            attempts=meta.get("attempts", 0),
            max_attempts=meta.get("max_attempts", retries + 1),
            created=job.created_at.timestamp() if job.created_at else time.time(),
            started=job.started_at.timestamp() if job.started_at else None,
            finished=job.ended_at.timestamp() if job.ended_at else None,
            position=job.get_position() if state == QUEUED else None,
        )

    def _abandoned(self, job: Any) -> bool:
        """Started, but its worker stopped renewing the lease (killed, host lost)."""
        started = job.started_at.timestamp() if job.started_at else time.time()
        return time.time() - started > LEASE_SECONDS and not self.redis.exists(
            LEASE_KEY.format(job.id)
        )

    def _restart(self, job: Any) -> JobInfo | None:
        """Give an abandoned job to another worker: same id, attempts counted on."""
        from rq.exceptions import DuplicateJobError

        meta = job.get_meta()
        log.warning("job %s lost its worker; queueing it again", job.id)
        with self.redis.lock(f"fdp:restart:{job.id}", timeout=10):
            if self.redis.exists(LEASE_KEY.format(job.id)):
                return self.get(job.id)
            job.delete()
            with contextlib.suppress(DuplicateJobError):  # another replica was quicker
                self.queue.enqueue(
                    run_job,
                    *job.args,
                    job_id=job.id,
                    unique=True,
                    result_ttl=FINISHED_TTL,
                    failure_ttl=FINISHED_TTL,
                    job_timeout=3600,
                    meta=meta,
                )
        return self.get(job.id)

    async def wait(self, jid: str, seconds: float) -> JobInfo | None:
        info = self.get(jid)
        deadline = time.monotonic() + seconds
        while info is not None and not info.done and (left := deadline - time.monotonic()) > 0:
            event = self.waiters.event(jid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(left, self.poll_seconds))  # fallback
            info = self.get(jid)
            # the worker announces before RQ records the job as finished: let it settle
            settle = time.monotonic() + 2.0
            while (
                event.is_set() and info is not None and not info.done and time.monotonic() < settle
            ):
                await asyncio.sleep(0.05)
                info = self.get(jid)
        return info

    async def _listen(self) -> None:
        from redis.asyncio import Redis

        warned = 0.0
        while True:
            try:
                client = Redis.from_url(self.redis_url)
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self.waiters.release(message["data"].decode())
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis down: waiters fall back to polling; retry later
                if time.monotonic() - warned > 60:
                    warned = time.monotonic()
                    log.warning("job events unavailable (%s); retrying", type(e).__name__)
                await asyncio.sleep(2.0)

    async def start(self) -> None:
        self.waiters.loop = asyncio.get_running_loop()
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        self.redis.close()


def make_queue(settings: Settings) -> JobQueue:
    if settings.queue.redis_url:
        return RQQueue(settings.queue.redis_url, settings.queue.poll_seconds)
    return EmbeddedQueue(settings)


def run_worker(
    settings: Settings, burst: bool = False, on_start: Callable[[], Any] | None = None
) -> None:
    """`fdp worker`: an RQ worker (with the scheduler, for retry back-off) on our queue."""
    from redis import Redis
    from rq import Queue, SimpleWorker

    assert settings.queue.redis_url, "fdp worker needs queue.redis_url"
    redis = Redis.from_url(settings.queue.redis_url)
    # no fork per job: the worker keeps its EODAG gateway and cache handles warm
    worker = SimpleWorker([Queue(QUEUE_NAME, connection=redis)], connection=redis)
    if on_start is not None:
        on_start()
    worker.work(with_scheduler=True, burst=burst)
