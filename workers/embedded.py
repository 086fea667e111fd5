"""The embedded default: retrieval jobs on a few threads inside `fdp serve`, no Redis.

The threads are daemon threads of our own, not a ThreadPoolExecutor: the interpreter joins an
executor's threads at exit, so one retrieval stuck on a silent upstream would keep Ctrl+C
from stopping the proxy. Closing the queue also stops running retrievals at their next
chunk (their partial files go). A failed attempt waits for its retry on a timer, never on a
runner thread, so jobs in back-off cannot hold up the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import replace

import anyio
import anyio.to_thread

from policies.config import Settings
from upstreams.base import ObjectNotFound
from workers.base import Waiters
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
from workers.retry import backoff, is_final
from workers.stats import JobStats

log = logging.getLogger("fdp.workers")
#: Ended jobs kept for `GET /jobs/{id}` (besides FINISHED_TTL).
MAX_JOBS = 10000

#: how long closing waits for running retrievals to notice; the rest die with the process
CLOSE_GRACE_SECONDS = 1.0


class Stopped(Exception):
    """The queue is closing: the retrieval gives up between two chunks."""


class EmbeddedQueue:
    """Jobs on `queue.workers` daemon threads in this process; state and owners in memory."""

    def __init__(self, settings: Settings, workers: int | None = None) -> None:
        self.settings = settings
        self.workers = workers or settings.queue.workers
        self.lock = threading.Lock()  # guards jobs, owners, timers and threads
        self.jobs: dict[str, JobInfo] = {}
        self.owners: dict[str, set[str]] = {}
        self.timers: set[threading.Timer] = set()
        self.threads: list[threading.Thread] = []
        self.ready: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.waiters = Waiters()
        #: how attempts ended, for /metrics
        self.stats = JobStats()
        self._context: Context | None = None
        self._context_lock = threading.Lock()

    def depth(self) -> int:
        """Jobs waiting for a runner."""
        return self.ready.qsize()

    def recent(self, n: int) -> list[JobInfo]:
        """The latest jobs."""
        with self.lock:
            infos = sorted(self.jobs.values(), key=lambda i: i.created, reverse=True)[:n]
            return [replace(i) for i in infos]

    def context(self) -> Context:
        with self._context_lock:
            if self._context is None:
                self._context = Context(self.settings)
            return self._context

    # -- the proxy's side ------------------------------------------------------------------

    async def submit(self, dataset: str, path: str, owner: str, max_attempts: int) -> JobInfo:
        jid = job_id(dataset, path)
        with self.lock:
            self._expire()
            info = self.jobs.get(jid)
            fresh = info is None or info.done
            if fresh:  # a new attempt for an object the cache does not hold
                info = self.jobs[jid] = JobInfo(jid, dataset, path, max_attempts=max_attempts)
            self.owners.setdefault(jid, set()).add(owner)
        if fresh:
            self._spawn()
            self.ready.put(jid)
        found = await self.get(jid)
        assert found is not None
        return found

    async def get(self, job_id: str) -> JobInfo | None:
        """A snapshot: the runner threads keep changing the job itself."""
        with self.lock:
            info = self.jobs.get(job_id)
            if info is None:
                return None
            position = None
            if info.state == QUEUED:
                queued = sorted((i.created, i.id) for i in self.jobs.values() if i.state == QUEUED)
                position = [j for _, j in queued].index(job_id)
            return replace(info, owners=sorted(self.owners.get(job_id, ())), position=position)

    async def wait(self, job_id: str, seconds: float) -> JobInfo | None:
        with self.waiters.waiting(job_id) as event:
            with self.lock:
                info = self.jobs.get(job_id)
                pending = info is not None and not info.done
            if pending and seconds > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), seconds)
        return await self.get(job_id)

    async def problem(self) -> str | None:
        return None

    async def start(self) -> None:
        self.waiters.loop = asyncio.get_running_loop()
        self._spawn()

    async def close(self) -> None:
        """Stop at once: retries are dropped, running retrievals stop at their next chunk."""
        self.stopping.set()
        with self.lock:
            timers, self.timers = self.timers, set()
            threads = list(self.threads)
        for timer in timers:
            timer.cancel()
        for _ in threads:
            self.ready.put(None)
        idle = await anyio.to_thread.run_sync(join, threads, CLOSE_GRACE_SECONDS)
        if self._context is not None and idle:
            self._context.close()  # else a thread still uses it; it goes with the process

    # -- the runner threads ----------------------------------------------------------------

    def _spawn(self) -> None:
        with self.lock:
            while len(self.threads) < self.workers and not self.stopping.is_set():
                thread = threading.Thread(
                    target=self._work, name=f"fdp-job-{len(self.threads)}", daemon=True
                )
                thread.start()
                self.threads.append(thread)

    def _work(self) -> None:
        while (jid := self.ready.get()) is not None and not self.stopping.is_set():
            self._attempt(jid)

    def _attempt(self, jid: str) -> None:
        with self.lock:
            info = self.jobs.get(jid)
            if info is None or info.state != QUEUED:
                return
            info.attempts += 1
            info.state, info.started, info.error = RUNNING, time.time(), None

        def progress(done: int, total: int | None) -> None:
            if self.stopping.is_set():
                raise Stopped("the proxy is stopping")
            with self.lock:
                info.bytes_done, info.bytes_total = done, total

        try:
            retrieve(self.context(), info.dataset, info.path, progress)
        except Stopped:
            return  # closing: nobody reads this job again
        except Exception as e:
            self._record(info, e)
        except BaseException as e:  # never leave a job running that no thread runs
            self._record(info, e)
            raise
        else:
            self._record(info, None)

    def _record(self, info: JobInfo, error: BaseException | None) -> None:
        """An attempt ended (`error` None: it succeeded): retry it later, or end the job."""
        if error is not None:
            log.warning(
                "job %s (%s/%s) attempt %d failed: %s",
                info.id,
                info.dataset,
                info.path,
                info.attempts,
                describe(error),
            )
        took = time.time() - (info.started or time.time())
        with self.lock:
            if error is None:
                info.state = SUCCEEDED
            else:
                info.error = describe(error)
                retry = isinstance(error, Exception) and not is_final(error)
                if retry and info.attempts < info.max_attempts and not self.stopping.is_set():
                    info.state = QUEUED
                    self._later(info.id, backoff(info.attempts))
                    self.stats.record("retried", took)
                    return
                info.state = FAILED
                info.not_found = isinstance(error, ObjectNotFound)
            info.finished = time.time()
        self.stats.record(info.state, took)
        self.waiters.wake(info.id)

    def _later(self, jid: str, delay: float) -> None:
        """Queue `jid` again after `delay` seconds (called holding the lock)."""

        def due() -> None:
            with self.lock:
                self.timers.discard(timer)
            if not self.stopping.is_set():
                self.ready.put(jid)

        timer = threading.Timer(delay, due)
        timer.daemon = True
        self.timers.add(timer)
        timer.start()

    def _expire(self) -> None:
        """Forget jobs that ended long ago, and the oldest ended ones beyond MAX_JOBS
        (called holding the lock): the memory of jobs is bounded by age and size."""
        cutoff = time.time() - FINISHED_TTL
        excess = len(self.jobs) - MAX_JOBS
        for jid, info in list(self.jobs.items()):  # oldest first
            if info.finished is not None and (info.finished < cutoff or excess > 0):
                del self.jobs[jid]
                self.owners.pop(jid, None)
                excess -= 1


def join(threads: list[threading.Thread], seconds: float) -> bool:
    """Wait up to `seconds` in all for `threads` to end; whether they all did."""
    deadline = time.monotonic() + seconds
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return not any(thread.is_alive() for thread in threads)
