from __future__ import annotations

import asyncio

import pytest

from qwenasr_appliance.transcription.admission import AdmissionController, Overloaded


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
