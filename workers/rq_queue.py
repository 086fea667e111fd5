"""RQ on Redis as the proxy sees it: submit, read and wait for jobs without blocking the loop.

RQ and redis-py block. Every call runs on a thread of this queue's own CapacityLimiter (not
the shared pool that file and upstream work use), over a client with short timeouts and no
retries of a timeout, so a Redis that stops answering costs a request QueueUnavailable after
`queue.timeout_seconds`, never a frozen event loop. After such a failure the queue answers
QueueUnavailable at once for COOLDOWN_SECONDS instead of letting every request wait out its
own timeout.

Ownership lives apart from the job (RQ's job.meta is the worker's to write): a Redis set per
job, added to atomically by whichever replica a user comes through. Abandoned jobs (their
worker died) are found with RQ's StartedJobRegistry and handed back by its own cleanup.
Wake-ups come over pub/sub (redis.asyncio), with pings, so a silent Redis is noticed there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry as RedisRetry
from rq import Queue, Retry
from rq.exceptions import DuplicateJobError, InvalidJobOperation, NoSuchJobError
from rq.job import Job

from policies.config import QueueConfig
from workers.base import QueueUnavailable, Waiters
from workers.jobs import FAILED, FINISHED_TTL, QUEUED, RUNNING, SUCCEEDED, JobInfo, job_id
from workers.retry import intervals
from workers.stats import JobStats
from workers.worker import CHANNEL, JOB_TIMEOUT, QUEUE_NAME, run_job

log = logging.getLogger("fdp.workers")

T = TypeVar("T")

#: threads for Redis calls: each call is bounded by the timeouts, so a few suffice
THREADS = 8
#: after Redis failed to answer, fail fast for this long
COOLDOWN_SECONDS = 5.0
#: who may read a job: a set per job id, kept as long as a finished job stays readable
OWNERS_KEY = "fdp:job:{}:owners"
OWNERS_TTL = FINISHED_TTL + JOB_TIMEOUT
#: one replica at a time replaces a job that ended (a new attempt at its object)
SUBMIT_LOCK = "fdp:submit:{}"
LOCK_SECONDS = 5
#: a quiet subscription is pinged this often; no answer within the timeout: reconnect
PING_SECONDS = 5.0
#: seconds `close` waits for the subscription to end
CLOSE_SECONDS = 2.0
RECONNECT_SECONDS = (1.0, 30.0)  # first and longest pause between subscription attempts
WARN_EVERY_SECONDS = 60.0

ENDED = {"finished", "failed", "stopped", "canceled"}
STATES = {
    "queued": QUEUED,
    "scheduled": QUEUED,  # waiting for its retry
    "deferred": QUEUED,
    "started": RUNNING,
    "finished": SUCCEEDED,
}


def _status(job: Job) -> str:
    status = job.get_status(refresh=False)
    return str(getattr(status, "value", status))


class RQQueue:
    """Jobs on an RQ queue in Redis; `fdp worker` processes (any host) run them."""

    def __init__(self, config: QueueConfig) -> None:
        assert config.redis_url, "RQQueue needs queue.redis_url"
        self.config = config
        self.redis = Redis.from_url(config.redis_url, **self._client_options(RedisRetry))
        self.queue = Queue(QUEUE_NAME, connection=self.redis)
        #: how attempts ended, as every worker counted them (for /metrics)
        self.stats = JobStats(self.redis)
        self.limiter = anyio.CapacityLimiter(THREADS)
        self.waiters = Waiters()
        self._down_until = 0.0
        self._listener: asyncio.Task[None] | None = None
        self._events_lost = False
        self._pause = RECONNECT_SECONDS[0]

    def depth(self) -> int:
        """Jobs waiting for a worker (blocks: one Redis call)."""
        return self.queue.count

    def recent(self, n: int) -> list[JobInfo]:
        """The latest jobs: running, queued, then ended (RQ's own registries; blocks)."""
        ids = [
            *self.queue.started_job_registry.get_job_ids(),
            *self.queue.get_job_ids(0, n),
            *self.queue.finished_job_registry.get_job_ids(-n, -1),
            *self.queue.failed_job_registry.get_job_ids(-n, -1),
        ]
        jobs = [j for j in Job.fetch_many(list(dict.fromkeys(ids)), connection=self.redis) if j]
        infos = [self._info(j) for j in jobs]
        return sorted(infos, key=lambda i: i.created, reverse=True)[:n]

    def _client_options(self, retry: Callable[..., Any]) -> dict[str, Any]:
        """Short timeouts; one retry of a dropped connection (a restarted Redis), none of a
        timeout (a silent Redis would only make the caller wait twice as long)."""
        return {
            "socket_connect_timeout": self.config.connect_timeout_seconds,
            "socket_timeout": self.config.timeout_seconds,
            "retry": retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        }

    # -- the JobQueue interface ------------------------------------------------------------

    async def submit(self, dataset: str, path: str, owner: str, max_attempts: int) -> JobInfo:
        return await self._call(self._submit, dataset, path, owner, max_attempts)

    async def get(self, job_id: str) -> JobInfo | None:
        return await self._call(self._get, job_id)

    async def wait(self, job_id: str, seconds: float) -> JobInfo | None:
        deadline = time.monotonic() + seconds
        with self.waiters.waiting(job_id) as event:
            info = await self.get(job_id)
            while info is not None and not info.done:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):  # polling covers lost announcements
                    await asyncio.wait_for(event.wait(), min(left, self.config.poll_seconds))
                event.clear()
                info = await self.get(job_id)
        return info

    async def problem(self) -> str | None:
        try:
            await self._call(self.redis.ping)
        except QueueUnavailable as e:
            return str(e)
        return None

    async def start(self) -> None:
        self.waiters.loop = asyncio.get_running_loop()
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def close(self) -> None:
        """Stop listening, boundedly: a Redis gone silent must not hold shutdown (ending a
        subscription may wait on its connection)."""
        if self._listener is not None:
            self._listener.cancel()
            done, _ = await asyncio.wait({self._listener}, timeout=CLOSE_SECONDS)
            if not done:
                log.warning("job announcements: the subscription did not end in time; left")
        self.redis.close()

    # -- calls on the queue's threads ------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking Redis/RQ call on one of our threads; Redis failures: QueueUnavailable."""

        def guarded() -> T:
            # checked on the thread: requests queued behind a timeout fail as soon as it fires
            if time.monotonic() < self._down_until:
                raise QueueUnavailable("the job queue is unavailable (Redis did not answer)")
            try:
                return fn(*args)
            except (RedisConnectionError, RedisTimeoutError) as e:
                self._down_until = time.monotonic() + COOLDOWN_SECONDS
                raise QueueUnavailable(
                    f"the job queue is unavailable ({type(e).__name__})"
                ) from None
            except RedisError as e:
                raise QueueUnavailable(
                    f"the job queue is unavailable ({type(e).__name__})"
                ) from None

        return await anyio.to_thread.run_sync(guarded, limiter=self.limiter)

    def _submit(self, dataset: str, path: str, owner: str, max_attempts: int) -> JobInfo:
        jid = job_id(dataset, path)
        self._join(jid, owner)
        job = self._fetch(jid)
        if job is None or _status(job) in ENDED:
            with self.redis.lock(
                SUBMIT_LOCK.format(jid), timeout=LOCK_SECONDS, blocking_timeout=LOCK_SECONDS
            ):
                job = self._fetch(jid)  # another replica may have been quicker
                if job is not None and _status(job) in ENDED:
                    job.delete()  # a new attempt for an object the cache does not hold
                    job = None
                if job is None:
                    self._enqueue(jid, dataset, path, max_attempts)
        info = self._get(jid)
        assert info is not None
        return info

    def _join(self, jid: str, owner: str) -> None:
        """Add `owner` to the job's owners: one atomic SADD, whatever other replicas do."""
        key = OWNERS_KEY.format(jid)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(key, owner)
            pipe.expire(key, OWNERS_TTL)
            pipe.execute()

    def _enqueue(self, jid: str, dataset: str, path: str, max_attempts: int) -> None:
        waits = intervals(max_attempts)  # jittered: jobs that failed together come back apart
        with contextlib.suppress(DuplicateJobError):
            self.queue.enqueue(
                run_job,
                dataset,
                path,
                job_id=jid,
                unique=True,
                retry=Retry(max=len(waits), interval=waits) if waits else None,
                result_ttl=FINISHED_TTL,
                failure_ttl=FINISHED_TTL,
                job_timeout=JOB_TIMEOUT,
                meta={"max_attempts": max_attempts},
            )

    def _fetch(self, jid: str) -> Job | None:
        try:
            return Job.fetch(jid, connection=self.redis)
        except NoSuchJobError:
            return None

    def _get(self, jid: str) -> JobInfo | None:
        job = self._fetch(jid)
        if job is not None and _status(job) == "started" and self._abandoned(jid):
            job = self._fetch(jid)
        if job is None:
            return None
        return self._info(job)

    def _abandoned(self, jid: str) -> bool:
        """Whether the job's worker stopped beating; if so RQ's own cleanup requeues or fails it."""
        registry = self.queue.started_job_registry
        if jid not in registry.get_expired_job_ids():
            return False
        if not self.queue.acquire_maintenance_lock():  # a worker or replica is at it already
            return True
        try:
            log.warning("job %s lost its worker; RQ gives it to another or fails it", jid)
            registry.cleanup()
        finally:
            self.queue.release_maintenance_lock()
        job = self._fetch(jid)
        if job is None:
            return True
        if _status(job) == "scheduled":
            # a dead worker is no upstream failure to back off from, and RQ's scheduler may
            # have died with it (its lock outlives it by a minute): straight back, at the front
            with contextlib.suppress(InvalidJobOperation):  # another replica was quicker
                self.queue.scheduled_job_registry.requeue(job, at_front=True)
        elif _status(job) == "failed":  # no attempts left: it ended
            self.redis.publish(CHANNEL, jid)
        return True

    def _info(self, job: Job) -> JobInfo:
        status = _status(job)
        state = STATES.get(status, FAILED)
        meta = job.meta
        error = meta.get("error")
        if state == FAILED and not error:
            error = "retrieval failed (its worker stopped)"
        owners = self.redis.smembers(OWNERS_KEY.format(job.id))
        return JobInfo(
            id=job.id,
            dataset=job.args[0],
            path=job.args[1],
            state=state,
            bytes_done=meta.get("bytes_done", 0),
            bytes_total=meta.get("bytes_total"),
            error=error if state in (FAILED, QUEUED) else None,
            not_found=state == FAILED and bool(meta.get("not_found")),
            owners=sorted(o.decode() for o in owners),
            attempts=meta.get("attempts", 0),
            max_attempts=meta.get("max_attempts", (job.retries_left or 0) + 1),
            created=job.created_at.timestamp() if job.created_at else time.time(),
            started=job.started_at.timestamp() if job.started_at else None,
            finished=job.ended_at.timestamp() if job.ended_at else None,
            position=job.get_position() if status == "queued" else None,
        )

    # -- announcements ---------------------------------------------------------------------

    async def _listen(self) -> None:
        """Stay subscribed to job announcements; when Redis fails, back off and try again."""
        warned = -math.inf
        while True:
            try:
                await self._subscribe()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # RedisError, OSError, a silent Redis: waiters poll
                self._events_lost = True
                if time.monotonic() - warned >= WARN_EVERY_SECONDS:
                    warned = time.monotonic()
                    log.warning(
                        "job announcements unavailable (%s); held requests poll every %g s "
                        "until Redis answers again",
                        type(e).__name__,
                        self.config.poll_seconds,
                    )
                await asyncio.sleep(self._pause)
                self._pause = min(self._pause * 2, RECONNECT_SECONDS[1])

    async def _subscribe(self) -> None:
        """One subscription, until Redis fails or stops answering (raises then)."""
        assert self.config.redis_url
        client = AsyncRedis.from_url(self.config.redis_url, **self._client_options(AsyncRetry))
        async with client, client.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(CHANNEL)
            self._pause = RECONNECT_SECONDS[0]
            if self._events_lost:
                self._events_lost = False
                log.info("job announcements restored")
            pinged = False
            while True:
                timeout = self.config.timeout_seconds if pinged else PING_SECONDS
                message = await pubsub.get_message(timeout=timeout)
                if message is None:
                    if pinged:
                        raise TimeoutError("Redis did not answer a ping")
                    await pubsub.ping()
                    pinged = True
                    continue
                pinged = False  # anything at all proves the connection alive
                if message["type"] == "message":
                    self.waiters.release(message["data"].decode())
