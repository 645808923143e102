"""ShutdownGrace in process: taking granian's stop trigger, and pulling it only when live sessions are done
(or when the grace period ends). The same against real granian processes: tests/test_realtime_shutdown.py."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest
from granian import _signals

from qwenasr_appliance.api.shutdown import ShutdownGrace


class FakeStop:
    """Stands in for granian's WorkerSignal: counts `set()` calls and when they came (loop time)."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def set(self) -> None:
        self.calls.append(asyncio.get_running_loop().time())


def taken_over(grace_seconds: float) -> tuple[ShutdownGrace, FakeStop]:
    grace = ShutdownGrace(grace_seconds)
    stop = FakeStop()
    grace._server_stop = stop
    return grace, stop


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_capture_keeps_granians_trigger_once_and_puts_its_function_back(monkeypatch: pytest.MonkeyPatch) -> None:
    stop = FakeStop()
    loops: list[Any] = []

    def set_loop_signals(loop: Any) -> FakeStop:
        loops.append(loop)
        return stop

    monkeypatch.setattr(_signals, "set_loop_signals", set_loop_signals)
    grace = ShutdownGrace(5.0)
    grace.capture_server_stop()
    grace.capture_server_stop()  # a second app in the process does not wrap the wrapper
    assert _signals.set_loop_signals is not set_loop_signals
    assert _signals.set_loop_signals("the loop") is stop  # what granian's worker does, once
    assert loops == ["the loop"]
    assert _signals.set_loop_signals is set_loop_signals
    assert grace._server_stop is stop


def test_the_server_stops_when_the_last_live_session_is_done() -> None:
    async def scenario() -> tuple[list[float], float, float]:
        grace, stop = taken_over(30.0)
        grace.install_signal_handlers()
        loop = asyncio.get_running_loop()
        try:
            with grace.defer_server_stop(), grace.defer_server_stop():  # two live sessions
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.wait_for(grace.began.wait(), 5)
                os.kill(os.getpid(), signal.SIGINT)  # a second signal changes nothing
                await asyncio.sleep(0.2)
                assert stop.calls == [] and grace.draining
                left = grace.seconds_left()
                released = loop.time()
            await settle()
            return stop.calls, released, left
        finally:
            grace.close()

    calls, released, left = asyncio.run(scenario())
    assert len(calls) == 1 and calls[0] >= released
    assert 29.0 < left < 30.0


def test_with_nothing_open_the_server_stops_at_once() -> None:
    async def scenario() -> list[float]:
        grace, stop = taken_over(30.0)
        grace.install_signal_handlers()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(grace.began.wait(), 5)
            await settle()
            return stop.calls
        finally:
            grace.close()

    assert len(asyncio.run(scenario())) == 1


def test_the_end_of_the_grace_period_stops_the_server_even_with_sessions_open() -> None:
    async def scenario() -> tuple[list[float], float, bool]:
        grace, stop = taken_over(0.3)
        grace.install_signal_handlers()
        loop = asyncio.get_running_loop()
        try:
            with grace.defer_server_stop():  # a session that never ends
                signalled = loop.time()
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.wait_for(grace.expired.wait(), 5)
                await settle()
                return stop.calls, signalled, grace.seconds_left() == 0.0
        finally:
            grace.close()

    calls, signalled, none_left = asyncio.run(scenario())
    assert len(calls) == 1 and calls[0] - signalled >= 0.29
    assert none_left


def test_close_hands_later_signals_straight_to_the_server() -> None:
    async def scenario() -> list[float]:
        grace, stop = taken_over(30.0)
        grace.install_signal_handlers()
        grace.close()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.2)
        return stop.calls

    assert len(asyncio.run(scenario())) == 1
