from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from qwenasr_appliance.engines.base import EngineDescription
from qwenasr_appliance.metrics import Metrics
from qwenasr_appliance.transcription.admission import (
    AdmissionController,
    Overloaded,
    admission_limit,
    follow_engine_capacity,
)


def test_admits_up_to_the_limit_then_queues_then_rejects() -> None:
    async def scenario() -> None:
        admission = AdmissionController(max_concurrent=2, max_queue=1, queue_timeout=5)
        release = asyncio.Event()
        started: list[int] = []

        async def job(n: int) -> float:
            async with admission.slot() as waited:
                started.append(n)
                await release.wait()
                return waited

        tasks = [asyncio.create_task(job(n)) for n in range(3)]
        await asyncio.sleep(0.05)
        assert (admission.active, admission.queued) == (2, 1)
        with pytest.raises(Overloaded) as refused:
            async with admission.slot():
                pass
        assert refused.value.reason == "queue_full" and refused.value.retry_after >= 1
        release.set()
        waits = await asyncio.gather(*tasks)
        assert started == [0, 1, 2]
        assert waits[2] > 0 and (admission.active, admission.queued) == (0, 0)

    asyncio.run(scenario())


def test_queue_timeout_and_cancellation_free_their_places() -> None:
    async def scenario() -> None:
        admission = AdmissionController(max_concurrent=1, max_queue=4, queue_timeout=0.1)
        hold = asyncio.Event()

        async def holder() -> None:
            async with admission.slot():
                await hold.wait()

        holding = asyncio.create_task(holder())
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as timed_out:
            async with admission.slot():
                pass
        assert timed_out.value.reason == "queue_timeout"
        waiter = asyncio.create_task(admission.slot().__aenter__())
        await asyncio.sleep(0.01)
        assert admission.queued == 1
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert admission.queued == 0
        hold.set()
        await holding
        assert admission.active == 0

    asyncio.run(scenario())


def test_raising_the_limit_wakes_waiters() -> None:
    async def scenario() -> None:
        admission = AdmissionController(max_concurrent=1, max_queue=4, queue_timeout=5)
        hold = asyncio.Event()

        async def job() -> None:
            async with admission.slot():
                await hold.wait()

        tasks = [asyncio.create_task(job()) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert admission.active == 1
        admission.set_limit(3)
        await asyncio.sleep(0.01)
        assert (admission.active, admission.queued) == (3, 0)
        hold.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


def _description(capacity: int) -> EngineDescription:
    return EngineDescription(
        name="test-double", model="m", device="none", dtype="none", quantization=None, max_concurrency=capacity
    )


def test_admission_limit_is_the_setting_else_the_engine_capacity() -> None:
    assert admission_limit(3, _description(256)) == 3  # MAX_CONCURRENT_REQUESTS wins when set
    assert admission_limit(0, _description(256)) == 256
    assert admission_limit(0, _description(0)) == 1
    assert admission_limit(0, None) == 1  # no engine (yet), or it could not describe itself


def test_the_limit_follows_each_engine_and_the_gauge_shows_it() -> None:
    async def scenario() -> None:
        metrics = Metrics(CollectorRegistry())
        admission = AdmissionController(max_concurrent=1, max_queue=8, queue_timeout=5, metrics=metrics)
        gauge = lambda: metrics.registry.get_sample_value("qwenasr_concurrency_limit")  # noqa: E731
        assert gauge() == 1.0
        follow = follow_engine_capacity(admission, 0)
        release = asyncio.Event()

        async def job() -> None:
            async with admission.slot():
                await release.wait()

        tasks = [asyncio.create_task(job()) for _ in range(4)]
        await asyncio.sleep(0.02)
        assert (admission.active, admission.queued) == (1, 3)
        follow(_description(4))  # the engine serves with capacity 4: the waiting requests start
        assert (admission.limit, admission.active, admission.queued, gauge()) == (4, 4, 0, 4.0)
        follow(_description(2))  # restarted with less: the running ones finish, new ones wait
        assert (admission.limit, admission.active, gauge()) == (2, 4, 2.0)
        release.set()
        await asyncio.gather(*tasks)
        fixed = follow_engine_capacity(admission, 3)
        fixed(_description(256))
        assert (admission.limit, gauge()) == (3, 3.0)

    asyncio.run(scenario())
