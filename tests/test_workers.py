from __future__ import annotations

import asyncio
import os
import pickle
import signal

import numpy as np
import pytest

from qwenasr_appliance.audio.decode import AudioError, AudioTooLongError, decode_audio
from qwenasr_appliance.workers import WorkerCrashedError, WorkerPool, WorkerTimeoutError


def _die() -> None:
    os._exit(3)  # what a decoder segfault looks like to the pool


def _pid() -> int:
    return os.getpid()


def test_a_crashed_worker_fails_only_its_task_and_the_pool_recovers() -> None:
    async def scenario() -> None:
        pool = WorkerPool(1, "test")
        try:
            first = await pool.run(_pid)
            assert first != os.getpid()
            with pytest.raises(WorkerCrashedError):
                await pool.run(_die)
            assert await pool.run(_pid) not in (first, os.getpid())
        finally:
            pool.close()
        with pytest.raises(WorkerCrashedError):
            await pool.run(_pid)

    asyncio.run(scenario())


def test_decoding_in_a_worker_returns_audio_and_audio_errors_keep_their_code() -> None:
    async def scenario() -> None:
        pool = WorkerPool(1, "decode")
        try:
            with pytest.raises(AudioError) as empty:
                await pool.run(decode_audio, b"", "x.wav", max_seconds=10)
            assert empty.value.code == "empty_file"
            import io

            import soundfile as sf

            buffer = io.BytesIO()
            sf.write(buffer, np.zeros(8000, dtype=np.float32), 8000, format="WAV")
            decoded = await pool.run(decode_audio, buffer.getvalue(), "x.wav", max_seconds=10)
            assert decoded.samples.shape == (16_000,) and decoded.samples.dtype == np.float32
        finally:
            pool.close()

    asyncio.run(scenario())


def test_audio_errors_survive_pickling() -> None:
    error = pickle.loads(pickle.dumps(AudioError("invalid_audio", "bad")))
    assert (error.code, error.message, str(error)) == ("invalid_audio", "bad", "bad")
    too_long = pickle.loads(pickle.dumps(AudioTooLongError(9000.0, 7200.0, at_least=True)))
    assert isinstance(too_long, AudioTooLongError) and too_long.code == "audio_too_long" and too_long.at_least


def _slow_pid(seconds: float) -> int:
    import time

    time.sleep(seconds)
    return os.getpid()


def test_a_result_nobody_waits_for_is_cleaned_up_and_queued_work_is_dropped() -> None:
    async def scenario() -> None:
        pool = WorkerPool(1, "test")
        cleaned: list[int] = []
        try:
            await pool.warm_up()
            running = asyncio.create_task(pool.run_with_cleanup(cleaned.append, _slow_pid, 0.3))
            queued = asyncio.create_task(pool.run_with_cleanup(cleaned.append, _slow_pid, 0.0))
            await asyncio.sleep(0.1)
            running.cancel()
            queued.cancel()
            await asyncio.gather(running, queued, return_exceptions=True)
            assert await pool.run(_slow_pid, 0.0) != os.getpid()  # the worker finished the first, then this
            assert len(cleaned) == 1  # the running task's result; the queued one never ran
        finally:
            pool.close()

    asyncio.run(scenario())


def test_the_pool_answers_while_other_threads_hold_the_interpreter_lock() -> None:
    import threading

    stop = threading.Event()

    def hold() -> None:
        while not stop.is_set():
            sum(range(20_000))

    async def scenario() -> None:
        pool = WorkerPool(2, "test")
        try:
            await pool.warm_up()
            results = await asyncio.gather(*(pool.run(_slow_pid, 0.01) for _ in range(8)))
            assert len(set(results)) == 2  # both workers took tasks
        finally:
            pool.close()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        asyncio.run(scenario())
    finally:
        stop.set()
        thread.join()


def _big(seed: int, mib: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(mib * (1 << 20) // 8)


async def _big_results_arrive_whole() -> None:
    pool = WorkerPool(2, "test")
    try:
        # Larger than the 1 MiB pipe: each reply arrives over several reads, and two at once interleave.
        results = await asyncio.gather(*(pool.run(_big, seed, 3) for seed in range(4)))
        for seed, result in enumerate(results):
            np.testing.assert_array_equal(result, _big(seed, 3))
        assert await pool.run(_pid) != os.getpid()  # the workers are still the same healthy pool
    finally:
        pool.close()


def test_replies_larger_than_the_pipe_arrive_whole() -> None:
    asyncio.run(_big_results_arrive_whole())


def test_replies_larger_than_the_pipe_arrive_whole_under_uvloop() -> None:
    # uvloop (granian's loop where it is installed, as beside vLLM) makes watched descriptors non-blocking:
    # a reply read with a blocking-style recv() then failed halfway and the pool took the worker for dead.
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(_big_results_arrive_whole())


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [int(pool["num_threads"]) for pool in threadpool_info()]


def test_workers_run_numerical_libraries_on_one_thread() -> None:
    async def scenario() -> list[int]:
        pool = WorkerPool(1, "test")
        try:
            return await pool.run(_blas_threads)
        finally:
            pool.close()

    threads = asyncio.run(scenario())
    assert threads and set(threads) == {1}  # numpy's OpenBLAS at least, each limited to one thread


# --------------------------------------------------------------------------- deadlines, deaths, shutdown (issue 12)


def _sleep(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


def _worker_pids(pool: WorkerPool) -> list[int]:
    return [worker.process.pid for worker in pool._workers if worker.process.pid is not None]


def test_a_task_past_its_deadline_kills_and_replaces_its_worker() -> None:
    replaced: list[str] = []

    async def scenario() -> None:
        pool = WorkerPool(1, "test", job_timeout=0.5, on_replaced=replaced.append)
        try:
            (stuck,) = [await pool.run(_pid)]
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(WorkerTimeoutError):
                await pool.run(_sleep, 30.0)
            assert loop.time() - started < 3.0
            assert await pool.run(_pid) != stuck  # a fresh worker serves the next task
            for _ in range(50):
                if not _alive(stuck):
                    break
                await asyncio.sleep(0.1)
            assert not _alive(stuck), "the hung worker was not killed"
            assert pool.status().replaced == {"timeout": 1}
        finally:
            pool.close()

    asyncio.run(scenario())
    assert replaced == ["timeout"]


def test_a_stopped_worker_is_stalled_then_killed_at_the_deadline() -> None:
    async def scenario() -> None:
        pool = WorkerPool(1, "test", job_timeout=1.0)
        try:
            await pool.warm_up()
            (pid,) = _worker_pids(pool)
            os.kill(pid, signal.SIGSTOP)  # what the issue did: the worker hangs
            await asyncio.sleep(0.1)
            status = pool.status()
            assert (status.stalled, status.usable) == (1, 0)
            with pytest.raises(WorkerTimeoutError):
                await pool.run(_pid)
            assert await pool.run(_pid) != pid
            assert pool.status().usable == 1
        finally:
            pool.close()

    asyncio.run(scenario())


def test_a_worker_killed_from_outside_is_a_death_not_a_crash_of_its_own() -> None:
    async def scenario() -> None:
        pool = WorkerPool(1, "test")
        try:
            await pool.warm_up()
            (pid,) = _worker_pids(pool)
            os.kill(pid, signal.SIGSTOP)
            running = asyncio.ensure_future(pool.run(_pid))
            await asyncio.sleep(0.1)
            os.kill(pid, signal.SIGKILL)  # the OOM killer
            with pytest.raises(WorkerCrashedError) as killed:
                await running
            assert killed.value.exitcode == -signal.SIGKILL and not killed.value.crashed_by_itself
            with pytest.raises(WorkerCrashedError) as crashed:
                await pool.run(os.abort)
            assert crashed.value.crashed_by_itself
        finally:
            pool.close()

    asyncio.run(scenario())


def test_the_decoder_retries_once_on_a_fresh_worker_when_one_is_killed() -> None:
    from qwenasr_appliance.audio.decoder_pool import AudioDecoder
    from tests.hardening import tone_wav

    async def scenario() -> None:
        decoder = AudioDecoder(1, max_seconds=60)
        try:
            await decoder.warm_up()
            (pid,) = _worker_pids(decoder._pool)
            os.kill(pid, signal.SIGSTOP)
            running = asyncio.ensure_future(decoder.decode(tone_wav(1.0), "a.wav"))
            await asyncio.sleep(0.2)
            os.kill(pid, signal.SIGKILL)
            result = await running
            assert result.audio.duration_seconds == pytest.approx(1.0)
        finally:
            decoder.close()

    asyncio.run(scenario())


def test_close_kills_stopped_workers_without_waiting_on_the_loop() -> None:
    async def scenario() -> list[int]:
        pool = WorkerPool(3, "test")
        await pool.warm_up()
        pids = _worker_pids(pool)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        loop = asyncio.get_running_loop()
        started = loop.time()
        pool.close()
        assert loop.time() - started < 0.5
        assert await asyncio.to_thread(pool.join_closed, 10)
        return pids

    pids = asyncio.run(scenario())
    assert not any(_alive(pid) for pid in pids)


_ORPHAN_SCRIPT = """
import asyncio, os, sys, time
from qwenasr_appliance.workers import WorkerPool
async def main():
    pool = WorkerPool(2, "orphan-test")
    await pool.warm_up()
    print(" ".join(str(w.process.pid) for w in pool._workers), flush=True)
    time.sleep(60)
asyncio.run(main())
"""


def test_workers_die_with_the_server_process() -> None:
    """K5: SIGKILL of the serving process (granian killing its worker) leaves no worker behind."""
    import subprocess
    import sys
    import time

    server = subprocess.Popen([sys.executable, "-c", _ORPHAN_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        pids = [int(pid) for pid in server.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(pid) for pid in pids)
        os.kill(pids[0], signal.SIGSTOP)  # a stopped worker too
        server.kill()
        server.wait(10)
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in pids), "a worker outlived its server"
    finally:
        if server.poll() is None:
            server.kill()
