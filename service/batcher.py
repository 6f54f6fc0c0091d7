"""Dynamic batching for one model version.

Requests become jobs of *rows*: one row is one image under one EOT draw of the random
transform, so a request of n images with ``samples=k`` costs n*k rows. Sizes and limits are in
rows ("cost units"):

* a batch is flushed when ``max_batch_size`` rows are waiting, or ``max_delay`` after the oldest
  waiting job arrived (as Triton: a job that already waited during the previous batch does not
  wait again);
* the wait is adaptive: the batcher remembers how many jobs joined a batch while it waited
  (a moving average). When waiting has stopped paying (fewer than half a job joins on average:
  a lone client, or traffic too sparse to batch) a batch flushes at once instead of holding the
  request for ``max_delay``. Waiting is back on as soon as a flush finds two jobs queued: they
  arrived while the previous batch ran, so there is concurrent traffic to gather (a lone client
  never queues two, so it never pays the delay). Under load the average stays high and batches
  keep filling;
* a job larger than a batch is split across consecutive batches; no batch exceeds the cap;
* the queue holds at most ``queue_size`` rows; beyond that ``submit`` raises ``QueueFull`` (an
  oversized job is still admitted into an empty queue, so it cannot be refused forever);
* each job has a deadline: rows of an expired job are dropped before they cost compute; so are
  the rows of a job whose client went away (``abandon``: the route watches the connection);
* inference runs in one worker thread, off the event loop; one Batcher per model version, so a
  batch never mixes versions;
* a job may ask for the image outputs too (``views``, for /inspect): a batch holding such a job
  runs ``backend.run_views`` and hands t(x) and g(t(x)) to the jobs that asked. Inspect and
  classify requests share the queue, the batches and the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("atop.service")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__("queue full")
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    pass


class BatcherClosed(Exception):
    pass


class InferenceFailed(Exception):
    pass


class ClientGone(Exception):
    """The job's client went away before its answer was ready."""


@dataclass(eq=False)
class Job:
    image: np.ndarray  # [R, 3, H, W]
    noise: np.ndarray  # [R, 3, H, W]
    masks: np.ndarray  # [R, C, 1, H, W]
    deadline: float  # loop.time()
    enqueued: float  # loop.time()
    future: asyncio.Future
    logits: np.ndarray | None = None
    raw: np.ndarray | None = None
    taken: int = 0  # rows handed to a batch
    done: int = 0  # rows computed
    started: float | None = None  # loop.time() when the first row entered a batch
    inference_s: float = 0.0
    abandoned: bool = False
    batches: list[int] = field(default_factory=list)
    views: bool = False  # also wants the image outputs (transformed, purified)
    transformed: np.ndarray | None = None  # [R, C, 3, H, W] when views and the backend has them
    purified: np.ndarray | None = None  # [R, 3, H, W]

    @property
    def rows(self) -> int:
        return len(self.image)


JOINERS_TO_WAIT = 0.5  # wait while at least this many jobs join a waiting batch on average


class Batcher:
    def __init__(
        self,
        backend,
        *,
        max_batch_size: int,
        max_delay_ms: float,
        queue_size: int,
        metrics=None,
        name: str = "model",
    ):
        self.backend = backend
        self.max_batch = max_batch_size
        self.max_delay = max_delay_ms / 1000.0
        self.queue_size = queue_size
        self.metrics = metrics
        self.name = name
        self.depth = 0  # rows waiting, not yet in a batch
        self._jobs: list[Job] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._batch_s = 0.0  # moving average of a batch's inference time
        self._joiners = 1.0  # moving average of the jobs that joined a batch while it waited
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"atop-infer-{name}")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    # --- submitting --------------------------------------------------------------------------
    def retry_after(self) -> int:
        """Seconds until the queue has likely drained: the Retry-After of a refused request."""
        per_batch = self._batch_s or 0.05
        return max(1, math.ceil(self.depth / self.max_batch * per_batch))

    def submit(
        self,
        image: np.ndarray,
        noise: np.ndarray,
        masks: np.ndarray,
        timeout_s: float,
        *,
        views: bool = False,
    ) -> Job:
        """Queue a job (synchronous, never waits); QueueFull when it does not fit."""
        if self._closing:
            raise BatcherClosed()
        rows = len(image)
        if self.depth and self.depth + rows > self.queue_size:
            raise QueueFull(self.retry_after())
        loop = asyncio.get_running_loop()
        now = loop.time()
        job = Job(image, noise, masks, now + timeout_s, now, loop.create_future(), views=views)
        self._jobs.append(job)
        self._add_depth(rows)
        self._wake.set()
        return job

    async def wait(self, job: Job) -> Job:
        """The finished job; DeadlineExceeded when its deadline passes first."""
        remaining = job.deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), max(remaining, 0.0))
        except TimeoutError:
            self.abandon(job, DeadlineExceeded())
            raise DeadlineExceeded() from None

    def abandon(self, job: Job, exc: Exception) -> None:
        """Nobody wants ``job`` any more: its waiter gets ``exc``, its queue room is freed now
        (not when the loop reaches it), and rows not yet in a batch are never computed."""
        job.abandoned = True
        if job in self._jobs:
            self._jobs.remove(job)
        self._fail(job, exc)

    async def infer(self, image, noise, masks, timeout_s: float, *, views: bool = False) -> Job:
        return await self.wait(self.submit(image, noise, masks, timeout_s, views=views))

    # --- the loop ----------------------------------------------------------------------------
    def _add_depth(self, rows: int) -> None:
        self.depth += rows
        if self.metrics is not None:
            self.metrics.queue_depth.inc(rows)

    def _fail(self, job: Job, exc: Exception) -> None:
        self._add_depth(-(job.rows - job.taken))
        job.taken = job.rows
        if not job.future.done():
            job.future.set_exception(exc)

    def _take(self, now: float) -> list[tuple[Job, int, int]]:
        """Up to max_batch rows from the head of the queue, dropping dead jobs."""
        parts, room = [], self.max_batch
        while self._jobs and room:
            job = self._jobs[0]
            if job.abandoned or now > job.deadline:
                self._jobs.pop(0)
                self._fail(job, DeadlineExceeded())
                continue
            n = min(room, job.rows - job.taken)
            parts.append((job, job.taken, job.taken + n))
            if job.started is None:
                job.started = now
                if self.metrics is not None:
                    self.metrics.queue_wait.observe(now - job.enqueued)
            job.taken += n
            self._add_depth(-n)
            room -= n
            if job.taken == job.rows:
                self._jobs.pop(0)
        return parts

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._jobs:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            flush_at = self._jobs[0].enqueued + self._delay()
            waits, before = flush_at > loop.time() and self.depth < self.max_batch, len(self._jobs)
            while self.depth < self.max_batch and not self._closing:
                timeout = flush_at - loop.time()
                if timeout <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    break
            if waits:
                self._joiners = 0.7 * self._joiners + 0.3 * (len(self._jobs) - before)
            parts = self._take(loop.time())
            if parts:
                await self._run(parts)

    def _delay(self) -> float:
        """How long the head job may wait for company: ``max_delay`` while waiting pays, else
        nothing. Two jobs queued at a flush (they came while the last batch ran) mean concurrent
        traffic: waiting is back on, and the moving average then decides whether it stays on."""
        if len(self._jobs) > 1:  # back to the starting assumption: two idle waits to turn it off
            self._joiners = max(self._joiners, 1.0)
        return self.max_delay if self._joiners >= JOINERS_TO_WAIT else 0.0

    async def _run(self, parts: list[tuple[Job, int, int]]) -> None:
        def cat(attr: str) -> np.ndarray:
            arrays = [getattr(j, attr)[a:b] for j, a, b in parts]
            return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

        n = sum(b - a for _, a, b in parts)
        views = any(j.views for j, _, _ in parts) and getattr(self.backend, "has_views", False)
        t0 = time.perf_counter()
        try:
            run = self.backend.run_views if views else self.backend.run
            out = await asyncio.get_running_loop().run_in_executor(
                self._executor, run, cat("image"), cat("noise"), cat("masks")
            )
            logits, raw = out[0], out[1]
            transformed, purified = out[2:] if views else (None, None)
            if any(a is not None and a.shape[0] != n for a in (logits, raw, transformed, purified)):
                raise InferenceFailed(f"backend returned {logits.shape[0]} rows for a batch of {n}")
        except Exception as e:
            log.error("inference failed on a batch of %d rows (%s): %s", n, self.name, e)
            if self.metrics is not None:
                self.metrics.batch_errors.inc()
            for job in {j for j, _, _ in parts}:
                if job in self._jobs:
                    self._jobs.remove(job)
                self._fail(job, InferenceFailed(str(e)))
            return
        dt = time.perf_counter() - t0
        self._batch_s = dt if not self._batch_s else 0.8 * self._batch_s + 0.2 * dt
        if self.metrics is not None:
            self.metrics.observe_batch(rows=n, requests=len({id(j) for j, _, _ in parts}), seconds=dt)
        offset = 0
        for job, a, b in parts:
            if job.logits is None:
                job.logits = np.empty((job.rows, logits.shape[1]), np.float32)
                job.raw = None if raw is None else np.empty((job.rows, raw.shape[1]), np.float32)
            job.logits[a:b] = logits[offset : offset + b - a]
            if raw is not None:
                job.raw[a:b] = raw[offset : offset + b - a]
            if job.views and transformed is not None and purified is not None:
                if job.transformed is None:
                    job.transformed = np.empty((job.rows, *transformed.shape[1:]), np.float32)
                    job.purified = np.empty((job.rows, *purified.shape[1:]), np.float32)
                job.transformed[a:b] = transformed[offset : offset + b - a]
                job.purified[a:b] = purified[offset : offset + b - a]
            offset += b - a
            job.done += b - a
            job.inference_s += dt
            job.batches.append(n)
            if job.done == job.rows and not job.future.done():
                job.future.set_result(job)

    # --- closing -----------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Stop taking jobs, finish the queued ones, then stop the worker thread."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
