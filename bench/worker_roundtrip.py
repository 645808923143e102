"""Round trip of one decode from the server's event loop to a decode worker and back, while other
threads of the server hold the interpreter lock (as vLLM's frontend threads do under load).

    python -m bench.worker_roundtrip --busy 0,1,3 --switch-interval 0.005
    python -m bench.worker_roundtrip --busy 0,1,3 --pool executor   # concurrent.futures, for comparison

Decodes a 30 s 16 kHz wav clip from `bench.workload` (2 ms of work) 30 times per setting and prints the
median and maximum wall time seen by the caller.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from qwenasr_appliance.audio.transfer import decode_for_transfer, receive  # noqa: E402
from qwenasr_appliance.workers import WorkerPool  # noqa: E402


def _hold_the_lock(stop: threading.Event) -> None:
    total = 0
    while not stop.is_set():
        for i in range(20_000):  # pure Python: holds the interpreter lock between switches
            total += i


async def measure(pool_kind: str, data: bytes, busy: int, repeat: int) -> list[float]:
    loop = asyncio.get_running_loop()
    call = functools.partial(decode_for_transfer, data, "clip.wav", max_seconds=7200)
    pool: WorkerPool | None = None
    executor: ProcessPoolExecutor | None = None
    if pool_kind == "pool":
        pool = WorkerPool(2, "bench")
        await pool.warm_up()
    else:
        executor = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
        await asyncio.gather(*(loop.run_in_executor(executor, call) for _ in range(2)))
    stop = threading.Event()
    threads = [threading.Thread(target=_hold_the_lock, args=(stop,)) for _ in range(busy)]
    for thread in threads:
        thread.start()
    walls = []
    try:
        for _ in range(repeat):
            started = time.perf_counter()
            result = await pool.run(call) if pool is not None else await loop.run_in_executor(executor, call)
            receive(result)
            walls.append(time.perf_counter() - started)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        if pool is not None:
            pool.close()
        if executor is not None:
            executor.shutdown()
    return walls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", default="0,1,3", help="threads holding the interpreter lock")
    parser.add_argument("--pool", default="pool", choices=("pool", "executor"))
    parser.add_argument("--switch-interval", type=float, default=0.005, help="sys.setswitchinterval in the server")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--audio-root", type=Path, default=Path("/tmp/qwenasr-bench/audio"))
    args = parser.parse_args(argv)

    from bench.workload import clip_specs, ensure

    data = ensure(args.audio_root, clip_specs("wav", [0]))[0].read()
    sys.setswitchinterval(args.switch_interval)
    for busy in (int(b) for b in args.busy.split(",")):
        walls = asyncio.run(measure(args.pool, data, busy, args.repeat))
        print(
            f"pool={args.pool} switch_interval={args.switch_interval} busy_threads={busy}: "
            f"median {statistics.median(walls) * 1000:.1f} ms, max {max(walls) * 1000:.1f} ms",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
