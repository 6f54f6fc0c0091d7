"""The dynamic batcher with a fake backend: flush rules, cost units, backpressure, deadlines."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batcher import (
    Batcher,
    BatcherClosed,
    ClientGone,
    DeadlineExceeded,
    InferenceFailed,
    QueueFull,
)
from service.metrics import Metrics
from tests.service_fixtures import histogram_buckets

K = 3


class FakeBackend:
    """Logits = the row's first pixel in every class; records batch sizes and threads."""

    name, device, has_raw = "fake", "cpu", True

    def __init__(self, delay: float = 0.0, fail_first: int = 0):
        self.delay, self.fail_left = delay, fail_first
        self.batches: list[int] = []
        self.threads: set[int] = set()

    def run(self, image, noise, masks):
        self.threads.add(threading.get_ident())
        if self.fail_left:
            self.fail_left -= 1
            raise RuntimeError("boom")
        time.sleep(self.delay)
        self.batches.append(len(image))
        v = image[:, 0, 0, 0].astype(np.float32)
        return np.repeat(v[:, None], K, 1), -np.repeat(v[:, None], K, 1)

    def close(self):
        pass


def rows(n: int, start: float = 0.0):
    image = np.zeros((n, 3, 4, 4), np.float32)
    image[:, 0, 0, 0] = start + np.arange(n)
    return image, np.zeros_like(image), np.zeros((n, 1, 1, 4, 4), np.float32)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def make(backend, **kw) -> Batcher:
    opts = dict(max_batch_size=4, max_delay_ms=20, queue_size=64) | kw
    b = Batcher(backend, **opts)
    b.start()
    return b


def test_flushes_when_the_batch_is_full_without_waiting_for_the_delay():
    async def go():
        fb = FakeBackend()
        b = await make(fb, max_delay_ms=10_000)
        t0 = time.perf_counter()
        jobs = await asyncio.gather(*(b.infer(*rows(1, i), timeout_s=5) for i in range(4)))
        assert time.perf_counter() - t0 < 2 and fb.batches == [4]
        assert [j.logits[0, 0] for j in jobs] == [0, 1, 2, 3]  # answers go back to their jobs
        assert threading.get_ident() not in fb.threads  # inference ran off the event loop
        await b.aclose()

    run(go())


def test_a_lone_request_waits_at_most_the_delay():
    async def go():
        fb = FakeBackend()
        b = await make(fb, max_batch_size=100, max_delay_ms=60)
        t0 = time.perf_counter()
        job = await b.infer(*rows(1), timeout_s=5)
        waited = time.perf_counter() - t0
        assert 0.05 <= waited < 1.0 and fb.batches == [1] and job.batches == [1]
        await b.aclose()

    run(go())


def test_a_lone_client_stops_paying_the_delay_and_concurrent_ones_still_batch():
    """Closed loop, one request at a time: after a few batches in which nobody joined, requests
    flush at once, every one of them (a lone client never has two jobs queued, which is what
    turns waiting back on); then 6 staggered concurrent clients: their jobs queue up behind a
    batch, waiting comes back on, and batches fill again."""

    async def go():
        fb = FakeBackend(delay=0.01)  # longer than the clients' stagger: jobs queue up behind a batch
        b = await make(fb, max_batch_size=8, max_delay_ms=40)
        waits = []
        for i in range(20):
            t0 = time.perf_counter()
            await b.infer(*rows(1, i), timeout_s=5)
            waits.append(time.perf_counter() - t0)
        assert min(waits[:2]) >= 0.04  # waiting is the starting assumption
        fast = [w for w in waits[6:] if w < 0.02]
        assert len(fast) == len(waits[6:]), waits  # none waited

        async def client(i: int):
            await asyncio.sleep(0.004 * i)  # staggered: only a batch that waits gathers them
            await b.infer(*rows(1), timeout_s=5)

        for _ in range(6):  # concurrent traffic: found when jobs queue up, then batched
            await asyncio.gather(*(client(i) for i in range(6)))
        assert fb.batches[-2:] == [6, 6], str(fb.batches[-40:])
        await b.aclose()

    run(go())


def test_samples_are_cost_units_and_big_jobs_are_split_in_order():
    async def go():
        fb = FakeBackend()
        b = await make(fb, max_batch_size=4, max_delay_ms=5)
        job = await b.infer(*rows(10), timeout_s=5)
        assert fb.batches == [4, 4, 2] and job.batches == [4, 4, 2]
        assert job.logits[:, 0].tolist() == list(range(10)) and job.raw[:, 0].tolist() == [
            -v for v in range(10)
        ]
        fb.batches.clear()
        a, c = await asyncio.gather(b.infer(*rows(3), timeout_s=5), b.infer(*rows(3, 10), timeout_s=5))
        assert fb.batches == [4, 2] and max(fb.batches) <= 4
        assert c.logits[:, 0].tolist() == [10, 11, 12]
        await b.aclose()

    run(go())


def test_full_queue_refuses_with_retry_after_but_admits_an_oversized_job_when_empty():
    async def go():
        fb = FakeBackend()
        b = await make(fb, max_batch_size=8, max_delay_ms=200, queue_size=8)
        first = b.submit(*rows(5), timeout_s=5)
        with pytest.raises(QueueFull) as e:
            b.submit(*rows(4), timeout_s=5)
        assert e.value.retry_after >= 1
        second = b.submit(*rows(3), timeout_s=5)  # exactly fills the queue: fine
        await asyncio.gather(b.wait(first), b.wait(second))
        big = await b.infer(*rows(20), timeout_s=5)  # alone in an empty queue: admitted, split
        assert big.done == 20 and b.depth == 0
        await b.aclose()

    run(go())


def test_deadline_frees_the_queue_and_costs_no_compute():
    async def go():
        fb = FakeBackend()
        b = await make(fb, max_batch_size=100, max_delay_ms=300)
        with pytest.raises(DeadlineExceeded):
            await b.infer(*rows(5), timeout_s=0.05)
        assert b.depth == 0  # room given back at once
        await asyncio.sleep(0.4)
        assert fb.batches == []  # the expired job never reached the model
        await b.aclose()

    run(go())


def test_an_abandoned_job_frees_the_queue_and_costs_no_compute():
    async def go():
        fb = FakeBackend()
        b = await make(fb, max_batch_size=100, max_delay_ms=300)
        gone, kept = b.submit(*rows(5), timeout_s=5), b.submit(*rows(2, start=10), timeout_s=5)
        assert b.depth == 7
        b.abandon(gone, ClientGone())
        assert b.depth == 2  # room given back at once
        with pytest.raises(ClientGone):
            await b.wait(gone)
        job = await b.wait(kept)
        assert fb.batches == [2]  # only the kept job's rows reached the model
        assert job.logits[:, 0].tolist() == [10.0, 11.0]
        await b.aclose()

    run(go())


def test_inference_failure_fails_only_that_batch():
    async def go():
        fb = FakeBackend(fail_first=1)
        b = await make(fb, max_delay_ms=1)
        with pytest.raises(InferenceFailed):
            await b.infer(*rows(2), timeout_s=5)
        job = await b.infer(*rows(2), timeout_s=5)
        assert job.done == 2 and b.depth == 0
        await b.aclose()

    run(go())


def test_close_drains_queued_jobs_then_refuses():
    async def go():
        fb = FakeBackend(delay=0.01)
        b = await make(fb, max_batch_size=2, max_delay_ms=50)
        jobs = [b.submit(*rows(3), timeout_s=5) for _ in range(3)]
        await b.aclose()
        assert all(j.future.done() and j.done == 3 for j in jobs)
        with pytest.raises(BatcherClosed):
            b.submit(*rows(1), timeout_s=5)

    run(go())


def test_batches_are_measured():
    async def go():
        m = Metrics("m")
        b = await make(FakeBackend(), max_batch_size=4, max_delay_ms=50, metrics=m)
        await asyncio.gather(*(b.infer(*rows(1), timeout_s=5) for _ in range(4)))
        await b.aclose()
        text = m.render().decode()
        assert histogram_buckets(text, "atop_batch_size")[4.0] == 1
        assert histogram_buckets(text, "atop_batch_requests")[4.0] == 1
        assert "atop_queue_wait_seconds_count 4.0" in text and "atop_queue_depth 0.0" in text

    run(go())
