"""Find event-loop stalls in the appliance's API process while it is under load.

Two instruments, both from outside the server:

* a loop-lag probe: `GET /health` every `--probe-interval` seconds during the load. The handler does no
  work, so its latency is the time the request waited for the server's event loop: a p99 or max far
  above the idle value means something blocks the loop (decoding, JSON, a synchronous call);
* py-spy (when installed: `pip install py-spy`, a static binary): `py-spy record --subprocesses` on the
  server's main PID for the length of the load, written as a speedscope profile (open it at
  https://www.speedscope.app), plus one `py-spy dump` of every thread's stack in the middle of the run
  (kept in `profile.json`).
  py-spy needs ptrace rights (root, or CAP_SYS_PTRACE in a container).

    python -m bench.profile_api --url http://127.0.0.1:8101 --pid 12345 --concurrency 256 \
        --requests 512 --format mp3 --out /tmp/profile
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.client import Target, measured_run, percentile
from bench.workload import AudioItem, clip_specs, ensure


async def probe_loop_lag(base_url: str, interval: float, stop: asyncio.Event) -> list[float]:
    """`GET /health` latencies (seconds) until `stop` is set."""
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as client:
        while not stop.is_set():
            start = time.perf_counter()
            with contextlib.suppress(httpx.HTTPError):
                await client.get("/health")
                latencies.append(time.perf_counter() - start)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
    return latencies


def _lag_summary(latencies: Sequence[float]) -> dict[str, Any]:
    if not latencies:
        return {"probes": 0}
    return {
        "probes": len(latencies),
        "p50_ms": round(1000 * percentile(latencies, 50), 2),
        "p95_ms": round(1000 * percentile(latencies, 95), 2),
        "p99_ms": round(1000 * percentile(latencies, 99), 2),
        "max_ms": round(1000 * max(latencies), 2),
    }


def profile_run(
    target: Target,
    items: Sequence[AudioItem],
    concurrency: int,
    out_dir: Path,
    *,
    pid: int | None = None,
    probe_interval: float = 0.05,
    expected_seconds: float = 30.0,
) -> dict[str, Any]:
    """One load run with the loop-lag probe and, with `pid` and py-spy installed, a py-spy profile.

    Writes `profile.json` (and `profile.speedscope.json`, `py-spy-dump.txt` with py-spy) to `out_dir`.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(_profile(target, items, concurrency, out_dir, pid, probe_interval, expected_seconds))
    result["files"] = sorted(p.name for p in out_dir.iterdir() if p.name.startswith(("profile", "py-spy")))
    (out_dir / "profile.json").write_text(json.dumps(result, indent=2))
    return result


async def _profile(
    target: Target,
    items: Sequence[AudioItem],
    concurrency: int,
    out_dir: Path,
    pid: int | None,
    probe_interval: float,
    expected_seconds: float,
) -> dict[str, Any]:
    idle = await probe_loop_lag_for(target.base_url, 1.0, probe_interval)
    py_spy = shutil.which("py-spy")
    recorder: asyncio.subprocess.Process | None = None
    notes: list[str] = []
    if pid and py_spy:
        recorder = await asyncio.create_subprocess_exec(
            py_spy, "record", "--pid", str(pid), "--subprocesses", "--rate", "100", "--nonblocking",
            "--duration", str(max(5, round(expected_seconds * 1.5))), "--format", "speedscope",
            "--output", str(out_dir / "profile.speedscope.json"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    elif pid:
        notes.append("py-spy is not installed: loop-lag probe only")
    stop = asyncio.Event()
    probe = asyncio.create_task(probe_loop_lag(target.base_url, probe_interval, stop))

    async def dump_midway() -> bytes:
        if not (pid and py_spy):
            return b""
        await asyncio.sleep(expected_seconds / 2)
        dump = await asyncio.create_subprocess_exec(
            py_spy, "dump", "--pid", str(pid), "--subprocesses", "--nonblocking",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await dump.communicate()
        return output

    dumper = asyncio.create_task(dump_midway())
    summary = await measured_run(target, items, concurrency, fmt=items[0].fmt if items else None)
    stop.set()
    loaded = await probe
    dump = b""
    if dumper.done() and not dumper.cancelled():
        dump = dumper.result()
    else:
        dumper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dumper
        notes.append("the load ended before the mid-run stack dump")
    if recorder is not None:
        try:
            _, errors = await asyncio.wait_for(recorder.communicate(), max(10.0, expected_seconds * 2))
            if recorder.returncode:
                notes.append(f"py-spy record failed ({recorder.returncode}): {errors.decode(errors='replace')[-2000:]}")
        except TimeoutError:
            recorder.kill()
            await recorder.communicate()
            notes.append("py-spy record did not finish in time")
    summary.pop("latencies", None)
    return {
        "load": summary,
        "loop_lag_idle": _lag_summary(idle),
        "loop_lag_under_load": _lag_summary(loaded),
        "notes": notes,
        "py_spy_dump": dump.decode(errors="replace")[-20000:] if dump else None,
    }


async def probe_loop_lag_for(base_url: str, seconds: float, interval: float) -> list[float]:
    stop = asyncio.Event()
    task = asyncio.create_task(probe_loop_lag(base_url, interval, stop))
    await asyncio.sleep(seconds)
    stop.set()
    return await task


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--pid", type=int, default=None, help="the server's main PID, for py-spy")
    parser.add_argument("--model", default="qwen3-asr")
    parser.add_argument("--format", dest="fmt", default="mp3", choices=("mp3", "wav"))
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=0, help="default: 2 x concurrency")
    parser.add_argument("--first-index", type=int, default=90_000, help="clip indices no other run used")
    parser.add_argument("--clip-seconds", type=float, default=29.5)
    parser.add_argument("--root", type=Path, default=Path("/tmp/qwenasr-bench/audio"))
    parser.add_argument("--probe-interval", type=float, default=0.05)
    parser.add_argument("--expected-seconds", type=float, default=30.0, help="about how long the load runs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    count = args.requests or 2 * args.concurrency
    items = ensure(
        args.root, clip_specs(args.fmt, range(args.first_index, args.first_index + count), args.clip_seconds)
    )
    target = Target("appliance", args.url, args.model)
    result = profile_run(
        target, items, args.concurrency, args.out, pid=args.pid, probe_interval=args.probe_interval,
        expected_seconds=args.expected_seconds,
    )  # fmt: skip
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
