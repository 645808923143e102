"""The benchmark orchestrator for one GPU machine: `vllm serve`, the appliance, the offline ceiling.

One invocation runs the parts named in `--only`, in that order, each on its own (a server is stopped and
its GPU memory released before the next part starts):

* `vllm`: writes the dummy model directory (once), starts `vllm serve MODEL --load-format dummy ...`,
  warms it up, runs the client matrix (formats x concurrency levels, 30 s clips) and the long files,
  stops it;
* `appliance`: the same for `python -m qwenasr_appliance serve` (ENGINE=vllm, LOAD_FORMAT=dummy,
  QWENASR_BENCH_IGNORE_EOS=1, ...), with its `/metrics` scraped around every run for the stage times;
* `offline`: `bench/offline_ceiling.py` in a child process (vLLM's `LLM.generate`, batch 256).

Both servers get the same model directory, dtype, `max_num_seqs` and GPU memory share, the same clips
(each request a different clip, never repeated within a server's life) and the same client; they
differ in the base URL and in the form fields that fix the output length (`max_completion_tokens` for
`vllm serve`, whose request has no `ignore_eos`; the appliance fixes it itself in benchmark mode).
Each run's tokens are checked from vLLM's own counters on `/metrics`.

Results accumulate in `STATE/results-<model>.json` (one per `--model-size`/`--strip-eos`; machine-local, kept between calls while the machine is
warm) and after every run are copied to `--out` with a rendered `report.md`, so a call cut short still
returns what it measured. Several result files can be merged later with `bench/report.py A B ...`.

    python -m bench.run_all --out $OUT --make-dummy .gpu/extra/make_dummy_qwen3_asr.py --only vllm
    python -m bench.run_all --out /tmp/b --dry-run --concurrency 1,4 --long 60   # CPU, test double
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx

from bench import report as report_mod
from bench.client import Target, measured_run, run_load
from bench.gpu_busy import DEFAULT_INTERVAL_SECONDS, gpu_count
from bench.profile_api import profile_run
from bench.workload import CLIP_SECONDS, AudioItem, clip_specs, ensure, long_spec

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "qwen3-asr"
SYSTEMS = ("vllm", "appliance", "offline")
GPU_FREE_MIB = 2048


def log(message: str) -> None:
    print(f"[run_all {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- results -----------------------------------------------------------------------------------------


def results_file_name(args: argparse.Namespace) -> str:
    """The state file of this model (size, EOS stripped or not) and mode: a 0.6B run in the same lease
    as a 1.7B one keeps its own results instead of replacing the 1.7B rows that share its keys."""
    variant = f"{args.model_size}{'-noeos' if args.strip_eos else ''}"
    return f"results-{variant}{'-dry' if args.dry_run else ''}.json"


class Results:
    """The accumulated results: machine-local state file, copied with a report to the output folder."""

    def __init__(self, state_file: Path, out_dir: Path, fresh: bool) -> None:
        self.state_file = state_file
        self.out_dir = out_dir
        self.data: dict[str, Any] = {
            "schema": 1,
            "meta": {"invocations": []},
            "loads": [],
            "long_files": [],
            "offline": [],
            "servers": {},
        }
        if state_file.exists() and not fresh:
            with contextlib.suppress(ValueError):
                self.data = report_mod.merge([self.data, json.loads(state_file.read_text())])

    def put(self, section: str, entry: dict[str, Any]) -> None:
        key = report_mod.entry_key(section, entry)
        rows = [row for row in self.data[section] if report_mod.entry_key(section, row) != key]
        rows.append(entry)
        self.data[section] = rows
        self.save()

    def save(self) -> None:
        text = json.dumps(self.data, indent=1)
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.state_file)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "results.json").write_text(text)
        (self.out_dir / "report.md").write_text(report_mod.render(self.data))


# -- processes ---------------------------------------------------------------------------------------


class PidFile:
    """Process groups this script started, so a later call can end any a killed call left behind."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in json.loads(self.path.read_text()).items()}
        except (OSError, ValueError):
            return {}

    def add(self, name: str, pgid: int) -> None:
        groups = self._read()
        groups[name] = pgid
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(groups))

    def remove(self, name: str) -> None:
        groups = self._read()
        groups.pop(name, None)
        self.path.write_text(json.dumps(groups))

    def reap_leftovers(self) -> None:
        for name, pgid in self._read().items():
            if _group_alive(pgid):
                log(f"ending {name} (process group {pgid}) left over from an earlier call")
                _end_group(pgid)
            self.remove(name)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _end_group(pgid: int, grace: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.25)
    if _group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        time.sleep(1.0)


@dataclass
class Server:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    ready_path: str
    log_path: Path
    pids: PidFile
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.log_path.open("wb")
        log(f"starting {self.name}: {' '.join(self.argv)}")
        self.started_at = time.perf_counter()
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
        handle.close()
        self.pids.add(self.name, self.process.pid)

    def wait_ready(self, timeout: float) -> float:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            try:
                response = httpx.get(self.url + self.ready_path, timeout=5)
                if response.status_code == 200:
                    seconds = time.perf_counter() - self.started_at
                    log(f"{self.name} ready after {seconds:.0f} s")
                    return seconds
                last = f"{response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            time.sleep(1.0)
        raise TimeoutError(f"{self.name} not ready within {timeout:.0f} s (last: {last}); see {self.log_path}")

    def stop(self) -> None:
        if self.process is None:
            return
        started = time.perf_counter()
        # SIGTERM to the server's main process only: it shuts its own children down (vLLM's engine core,
        # granian's worker, decode pools). Whatever of its process group is left after that is killed.
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(45)
        _end_group(self.process.pid, grace=10.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        log(f"stopped {self.name} in {time.perf_counter() - started:.1f} s")
        self.pids.remove(self.name)
        self.process = None


def nvidia_smi(query: str) -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def wait_gpu_free(timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        used = nvidia_smi("memory.used")
        if not used or all(float(u) < GPU_FREE_MIB for u in used):
            return
        time.sleep(1.0)
    log(f"GPU memory still in use after {timeout:.0f} s: {nvidia_smi('memory.used')} MiB")


def vllm_cache(env: Mapping[str, str], limit: int = 10_000) -> dict[str, Any]:
    """The state of vLLM's cache directory as a server is about to start: "cold" when it holds no file,
    else "warm" (with how many files, counted up to `limit`).

    The directory is resolved as vLLM does (`vllm.envs.VLLM_CACHE_ROOT`): $VLLM_CACHE_ROOT, else
    $XDG_CACHE_HOME/vllm, else ~/.cache/vllm; its torch.compile artifacts are what a warm start reuses.
    "warm" says only that some earlier start (of either server, any configuration) left files there.
    Caches elsewhere (Triton's, FlashInfer's) are not looked at.
    """
    home = Path(env.get("HOME") or Path.home())
    cache_home = Path(env.get("XDG_CACHE_HOME") or home / ".cache")
    root = Path(env.get("VLLM_CACHE_ROOT") or cache_home / "vllm").expanduser()
    files = 0
    for _dirpath, _dirs, names in os.walk(root):
        files += len(names)
        if files >= limit:
            break
    return {"root": str(root), "files": min(files, limit), "state": "warm" if files else "cold"}


def tail(path: Path, limit: int = 2 * 2**20) -> bytes:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            return handle.read()
    except OSError:
        return b""


_LOG_FACTS = {
    "kv_cache_tokens": re.compile(r"GPU KV cache size: ([\d,]+) tokens"),
    "max_concurrency": re.compile(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x"),
    "model_runner_v2": re.compile(r"(Model Runner V2[^\n\"]{0,120})"),
}


def log_facts(path: Path) -> dict[str, str]:
    text = tail(path, 8 * 2**20).decode(errors="replace")
    facts: dict[str, str] = {}
    for key, pattern in _LOG_FACTS.items():
        match = pattern.search(text)
        if match:
            facts[key] = " / ".join(match.groups())
    return facts


# -- the plan ----------------------------------------------------------------------------------------


@dataclass
class Plan:
    formats: list[str]
    concurrency: list[int]
    long_seconds: list[float]
    clip_seconds: float
    requests_factor: int
    min_requests: int
    requests_c1: int
    warmup_requests: int
    max_new_tokens: int
    long_repeats: int = 1
    profile_requests: int = 0
    gpu_busy_interval: float | None = DEFAULT_INTERVAL_SECONDS  # seconds between NVML polls; None: none
    cells: list[tuple[str, int, list[int]]] = field(default_factory=list)  # (format, concurrency, clip indices)
    warmup: dict[str, list[int]] = field(default_factory=dict)
    profile: list[int] = field(default_factory=list)

    def requests_for(self, concurrency: int) -> int:
        if concurrency == 1:
            return self.requests_c1
        return max(self.requests_factor * concurrency, self.min_requests)

    def allocate(self) -> None:
        """Give every request of one server's life its own clip index (one counter across formats)."""
        counter = 0
        for fmt in self.formats:
            self.warmup[fmt] = list(range(counter, counter + self.warmup_requests))
            counter += self.warmup_requests
        for fmt in self.formats:
            for n in self.concurrency:
                count = self.requests_for(n)
                self.cells.append((fmt, n, list(range(counter, counter + count))))
                counter += count
        self.profile = list(range(counter, counter + self.profile_requests))

    def items(self, root: Path, fmt: str, indices: list[int]) -> list[AudioItem]:
        return ensure(root, clip_specs(fmt, indices, self.clip_seconds))

    def all_specs(self) -> list[Any]:
        specs = []
        for fmt, indices in self.warmup.items():
            specs += clip_specs(fmt, indices, self.clip_seconds)
        for fmt, _n, indices in self.cells:
            specs += clip_specs(fmt, indices, self.clip_seconds)
        if self.formats:
            specs += clip_specs(self.formats[0], self.profile, self.clip_seconds)
        specs += self.long_specs()
        return specs

    def long_specs(self) -> list[Any]:
        specs = []
        index = 0
        for seconds in self.long_seconds:
            for fmt in self.formats:
                for _ in range(self.long_repeats):
                    specs.append(long_spec(fmt, seconds, index))
                    index += 1
        return specs


class Clock:
    def __init__(self, budget: float) -> None:
        self.start = time.monotonic()
        self.budget = budget

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start) if self.budget > 0 else 1e9


# -- one server --------------------------------------------------------------------------------------


async def bench_server(
    system: str, target: Target, plan: Plan, audio_root: Path, results: Results, clock: Clock, margin: float
) -> None:
    warm_started = time.perf_counter()
    for fmt, indices in plan.warmup.items():
        if indices:
            warm = await run_load(
                target, plan.items(audio_root, fmt, indices), min(16, len(indices)), request_timeout=300
            )
            bad = sum(1 for r in warm.results if r.error)
            log(f"{system} warm-up {fmt}: {len(indices)} requests, {bad} errors")
            if bad == len(indices):
                kinds = {r.error for r in warm.results}
                raise RuntimeError(f"{system}: every warm-up request failed ({kinds})")
    results.data["servers"].setdefault(system, {})["warmup_seconds"] = round(time.perf_counter() - warm_started, 1)
    for fmt, n, indices in plan.cells:
        if clock.left() < margin:
            log(f"{system} {fmt} c={n}: skipped, {clock.left():.0f} s left")
            continue
        items = plan.items(audio_root, fmt, indices)
        entry = await measured_run(
            target, items, n, request_timeout=max(30.0, min(600.0, clock.left() - margin / 2)), fmt=fmt,
            gpu_busy_interval=plan.gpu_busy_interval,
        )  # fmt: skip
        entry.update(system=system, clip_seconds=plan.clip_seconds, fields=dict(target.fields))
        with_gpus(entry)
        results.put("loads", entry)
        tokens = entry.get("tokens") or {}
        log(
            f"{system} {fmt} c={n}: {entry['throughput']:,.0f} audio-s/s, p50 {entry['p50']} s, p95 {entry['p95']} s, "
            f"errors {entry['errors']}, tokens/req {tokens.get('tokens_per_engine_request')}, "
            f"finished {tokens.get('finished')}, client cpu {entry['client_cpu_fraction']}, "
            f"GPU busy {busy_words(entry.get('gpu_busy'))}"
        )
    for spec in plan.long_specs():
        if clock.left() < margin + spec.seconds / 100:
            log(f"{system} long {spec.seconds:g} s {spec.fmt}: skipped, {clock.left():.0f} s left")
            continue
        item = ensure(audio_root, [spec])[0]
        entry = await measured_run(
            target, [item], 1, request_timeout=max(30.0, min(900.0, clock.left() - margin / 2)), fmt=spec.fmt,
            gpu_busy_interval=plan.gpu_busy_interval,
        )  # fmt: skip
        wall = entry["max"] if entry["ok"] else None
        long_entry = {
            "system": system,
            "format": spec.fmt,
            "audio_seconds": spec.seconds,
            "index": spec.index,
            "ok": entry["ok"] == 1,
            "error_kinds": entry["error_kinds"],
            "wall_seconds": wall,
            "rtf": round(wall / spec.seconds, 5) if wall else None,
            "throughput": round(spec.seconds / wall, 1) if wall else None,
            "bytes": item.path.stat().st_size,
            "tokens": entry.get("tokens"),
            "stages": entry.get("stages"),
            "gpu_busy": entry.get("gpu_busy"),
        }
        with_gpus(long_entry)
        results.put("long_files", long_entry)
        log(
            f"{system} long {spec.seconds:g} s {spec.fmt}: wall {wall} s, tokens {entry.get('tokens')}, "
            f"GPU busy {busy_words(entry.get('gpu_busy'))}"
        )


def with_gpus(entry: dict[str, Any]) -> dict[str, Any]:
    """Add `gpus`, the number of GPUs the servers could see during the run (NVML, CUDA_VISIBLE_DEVICES),
    when the GPU busy record knows it: part of the results' keys, so one-GPU and two-GPU runs of the
    same system, format and concurrency stay apart when merged."""
    count = gpu_count(entry.get("gpu_busy"))
    if count is not None:
        entry["gpus"] = count
    return entry


def busy_words(record: dict[str, Any] | None) -> str:
    """A GPU busy record in a log line: each GPU's mean percent, or why there is none."""
    if not record:
        return "not sampled"
    if not record.get("available"):
        return f"not available ({record.get('reason')})"
    return " / ".join(f"GPU{g['index']} {g['busy_mean']}%" for g in record["gpus"] if g["busy_mean"] is not None)


def vllm_server(args: argparse.Namespace, model_dir: Path, pids: PidFile, logs: Path) -> Server:
    env = {
        **os.environ,
        "PYTHONPATH": _pythonpath(),
        # Long files: vLLM refuses > 600 s of audio and > 25 MB uploads by default.
        "VLLM_MAX_AUDIO_DECODE_DURATION_S": "7200",
        "VLLM_MAX_AUDIO_CLIP_FILESIZE_MB": "1024",
    }
    argv = [
        args.python, "-m", "vllm.entrypoints.cli.main", "serve", str(model_dir),
        "--served-model-name", MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(args.vllm_port),
        "--load-format", "dummy",
        "--dtype", args.dtype,
        "--max-num-seqs", str(args.max_num_seqs),
        "--gpu-memory-utilization", str(args.gpu_memory_utilization),
        "--seed", "0",
        *args.vllm_arg,
    ]  # fmt: skip
    return Server("vllm", argv, env, args.vllm_port, "/v1/models", logs / "vllm_serve.log", pids)


# Why each appliance setting differs from its shipped default: the benchmark runs the appliance as users
# get it (admission, queue, timeouts, worker pools: MAX_CONCURRENT_REQUESTS=256 here once hid that the
# default admitted one request at a time) except what comparing it with `vllm serve` on the same
# workload demands. bench/README.md lists the same; the report's header repeats it.
APPLIANCE_OVERRIDE_REASONS: Final[dict[str, str]] = {
    "ENGINE": "measure vLLM, never a CPU fallback (auto would pick vLLM too on a GPU)",
    "MODEL_ID": "the same local model directory as vllm serve (no real weights here)",
    "SERVED_MODEL_NAME": "the same model name as vllm serve, so one client config serves both",
    "LOAD_FORMAT": "random weights, as vllm serve --load-format dummy",
    "DTYPE": "the same precision as vllm serve (--dtype)",
    "QUANT_MODE": "no 4-bit plan: vllm serve runs unquantized",
    "MAX_NEW_TOKENS": "the same output budget as the client's max tokens for vllm serve",
    "QWENASR_BENCH_IGNORE_EOS": "fixed-length outputs (random weights would stop at random), as vllm serve's ignore_eos",
    "MAX_NUM_SEQS": "the same batch size as vllm serve (--max-num-seqs)",
    "GPU_MEMORY_UTILIZATION": "the same GPU memory share as vllm serve (--gpu-memory-utilization)",
    "MAX_UPLOAD_BYTES": "the long-file runs upload WAVs over the 25 MB default (vllm serve's limit is raised too)",
    "SHUTDOWN_GRACE_SECONDS": "stop between parts without waiting; no request runs then (no effect on any number)",
    "HOST": "loopback: the client runs on the same machine",
    "PORT": "--appliance-port",
}


def appliance_settings() -> frozenset[str]:
    """The appliance's environment variables, as `.env.example` lists them (a test keeps it complete)."""
    lines = (REPO / ".env.example").read_text().splitlines()
    return frozenset(line.split("=", 1)[0].strip() for line in lines if re.match(r"[A-Z][A-Z0-9_]*=", line))


def appliance_server(args: argparse.Namespace, model_dir: Path, pids: PidFile, logs: Path) -> Server:
    """The appliance with its shipped defaults except `APPLIANCE_OVERRIDE_REASONS` and --appliance-env."""
    overrides = {
        "ENGINE": "vllm",
        "MODEL_ID": str(model_dir),
        "SERVED_MODEL_NAME": MODEL_NAME,
        "LOAD_FORMAT": "dummy",
        "DTYPE": args.dtype,
        "QUANT_MODE": "none",
        "MAX_NEW_TOKENS": str(args.max_new_tokens),
        "QWENASR_BENCH_IGNORE_EOS": "1",
        "MAX_NUM_SEQS": str(args.max_num_seqs),
        "GPU_MEMORY_UTILIZATION": str(args.gpu_memory_utilization),
        "MAX_UPLOAD_BYTES": str(1024 * 2**20),
        "SHUTDOWN_GRACE_SECONDS": "5",
        "HOST": "127.0.0.1",
        "PORT": str(args.appliance_port),
    }
    assert set(overrides) == set(APPLIANCE_OVERRIDE_REASONS), "every override needs its reason"
    # Settings inherited from the caller's environment would silently change the defaults: drop them.
    env = {k: v for k, v in os.environ.items() if k not in appliance_settings()}
    env.update(PYTHONPATH=_pythonpath(), **overrides)
    for item in args.appliance_env:
        key, _, value = item.partition("=")
        env[key] = value
    argv = [args.python, "-m", "qwenasr_appliance", "serve"]
    return Server("appliance", argv, env, args.appliance_port, "/ready", logs / "appliance.log", pids)


def appliance_overrides(env: dict[str, str], extra: Sequence[str]) -> dict[str, dict[str, str]]:
    """What the report header lists: each appliance setting in `env` beyond the shipped defaults, its
    value and why (`--appliance-env` items: "set by hand")."""
    by_hand = {item.partition("=")[0] for item in extra}
    return {
        key: {"value": env[key], "why": "set by hand (--appliance-env)" if key in by_hand else reason}
        for key, reason in {**APPLIANCE_OVERRIDE_REASONS, **dict.fromkeys(by_hand, "")}.items()
        if key in env
    }


def double_server(name: str, port: int, pids: PidFile, logs: Path, python: str) -> Server:
    """Dry run: granian serving the real app around the test double engine (no GPU, no vLLM)."""
    env = {
        **os.environ,
        "PYTHONPATH": _pythonpath(),
        "SERVED_MODEL_NAME": MODEL_NAME,
        "MAX_UPLOAD_BYTES": str(1024 * 2**20),
        "LOG_LEVEL": "warning",
        "SHUTDOWN_GRACE_SECONDS": "5",
        # The double's capacity stands for max_num_seqs: admission follows it, as on vLLM.
        "DOUBLE_MAX_CONCURRENCY": "256",
    }
    argv = [
        python, "-m", "granian", "--interface", "asgi", "--factory", "--host", "127.0.0.1",
        "--port", str(port), "--workers", "1", "tests.doubles:create_test_app",
    ]  # fmt: skip
    return Server(f"{name}-double", argv, env, port, "/ready", logs / f"{name}_double.log", pids)


def _pythonpath() -> str:
    parts = [str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)


def make_model(args: argparse.Namespace, state: Path) -> Path:
    if args.model_dir:
        return Path(args.model_dir)
    model_dir = state / f"model-{args.model_size}{'-noeos' if args.strip_eos else ''}"
    if not (model_dir / "config.json").exists():
        if not args.make_dummy:
            raise SystemExit("--make-dummy PATH (make_dummy_qwen3_asr.py) is needed to write the model directory")
        argv = [args.python, str(args.make_dummy), str(model_dir), args.model_size]
        if args.tokenizer_dir:
            argv.append(str(args.tokenizer_dir))
        subprocess.run(argv, check=True)
        if args.strip_eos:
            strip_eos(model_dir)
    return model_dir


def strip_eos(model_dir: Path) -> None:
    """Opt-in: no end-of-sequence token at all, for either server (see bench/README.md)."""
    generation = json.loads((model_dir / "generation_config.json").read_text())
    generation.pop("eos_token_id", None)
    (model_dir / "generation_config.json").write_text(json.dumps(generation))
    tokenizer = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer["eos_token"] = None
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    log(f"stripped the EOS token from {model_dir}")


def check_appliance_engine(status: Any) -> str | None:
    """The appliance must serve on vLLM in benchmark mode, not on a fallback plan (CPU, 4-bit).

    Raises when `/status` names another engine or a quantization; returns a warning when it cannot tell.
    """
    engine = ((status or {}).get("engine") or {}).get("engine") or {}
    details = engine.get("details") or {}
    plan = ((status or {}).get("engine") or {}).get("plan")
    if (engine.get("name") and engine.get("name") != "vllm") or engine.get("quantization"):
        raise RuntimeError(
            f"the appliance is not serving vLLM in bf16 (plan {plan!r}, engine {engine.get('name')!r}, "
            f"quantization {engine.get('quantization')!r}): the benchmark would measure a fallback"
        )
    if not engine.get("name"):
        return "could not read the appliance's engine from /status"
    if not details.get("bench_ignore_eos"):
        return "the appliance's /status does not report bench_ignore_eos: is QWENASR_BENCH_IGNORE_EOS honoured?"
    return None


def run_server_part(
    system: str, server: Server, target_fields: dict[str, str], args: argparse.Namespace,
    plan: Plan, audio_root: Path, results: Results, clock: Clock, out_dir: Path,
) -> None:  # fmt: skip
    cache = vllm_cache(server.env)
    server.start()
    try:
        # Synthesize the workload while the server starts, in a child process forked from this (still
        # single-threaded) process, so the start-up time is measured as it is.
        synth = multiprocessing.get_context("fork").Process(
            target=ensure, args=(audio_root, plan.all_specs(), args.workers or None), name="workload"
        )
        synth.start()
        try:
            startup = server.wait_ready(max(30.0, min(args.ready_timeout, clock.left() - 30)))
        finally:
            synth.join()
        if synth.exitcode != 0:
            raise RuntimeError(f"workload synthesis failed (exit code {synth.exitcode})")
        info: dict[str, Any] = {
            "startup_seconds": round(startup, 1),
            "argv": server.argv,
            "cache_state": cache["state"],
            "vllm_cache": cache,
            f"startup_seconds_{cache['state']}": round(startup, 1),
        }
        # The start-up target compares both servers from the same cache state: keep the other state's
        # start-up, measured by an earlier call on this machine.
        earlier = results.data["servers"].get(system, {})
        info.update({k: v for k, v in earlier.items() if k.startswith("startup_seconds_") and k not in info})
        if system == "appliance":
            with contextlib.suppress(httpx.HTTPError, ValueError):
                info["status"] = httpx.get(server.url + "/status", timeout=10).json()
            info["env"] = {k: v for k, v in server.env.items() if k not in os.environ or os.environ[k] != v}
            info["env"].pop("PYTHONPATH", None)
            info["overrides"] = appliance_overrides(server.env, args.appliance_env)
            if not args.dry_run:
                warning = check_appliance_engine(info.get("status"))
                if warning:
                    log(f"warning: {warning}")
                    info["warning"] = warning
        results.data["servers"][system] = info
        target = Target(system, server.url, MODEL_NAME, target_fields)
        asyncio.run(bench_server(system, target, plan, audio_root, results, clock, args.margin))
        if plan.profile and system == "appliance" and server.process is not None and clock.left() > args.margin + 60:
            concurrency = max(plan.concurrency)
            log(f"profiling the appliance at concurrency {concurrency} ({len(plan.profile)} requests)")
            profile = profile_run(
                target, plan.items(audio_root, plan.formats[0], plan.profile), concurrency, out_dir,
                pid=server.process.pid, expected_seconds=args.profile_seconds,
            )  # fmt: skip
            results.data["profile"] = profile
            results.save()
            log(f"loop lag under load: {profile['loop_lag_under_load']}; idle: {profile['loop_lag_idle']}")
    finally:
        server.stop()
        facts = log_facts(server.log_path)
        results.data["servers"].setdefault(system, {}).update(facts)
        results.save()
        (out_dir / server.log_path.name).write_bytes(tail(server.log_path))
        wait_gpu_free()


def run_offline(
    args: argparse.Namespace, model_dir: Path, results: Results, clock: Clock, out_dir: Path, logs: Path
) -> None:
    out_file = logs / "offline.json"
    out_file.unlink(missing_ok=True)
    argv = [
        args.python, "-m", "bench.offline_ceiling", "--model", str(model_dir), "--out", str(out_file),
        "--batch", str(args.offline_batch), "--repeats", str(args.offline_repeats),
        "--warmup", str(args.offline_warmup), "--clip-seconds", str(args.clip_seconds),
        "--max-tokens", str(args.max_new_tokens), "--max-num-seqs", str(args.max_num_seqs),
        "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--dtype", args.dtype,
        "--gpu-busy-interval", str(args.gpu_busy_interval),
    ]  # fmt: skip
    log_path = logs / "offline.log"
    log(f"starting offline ceiling: {' '.join(argv)}")
    with log_path.open("wb") as handle:
        process = subprocess.Popen(
            argv, env={**os.environ, "PYTHONPATH": _pythonpath()}, stdout=handle, stderr=subprocess.STDOUT,
            cwd=REPO, start_new_session=True,
        )  # fmt: skip
        try:
            process.wait(timeout=max(60.0, clock.left() - 15))
        except subprocess.TimeoutExpired:
            log("offline ceiling ran out of time")
        finally:
            if process.poll() is None:
                _end_group(process.pid)
    (out_dir / "offline.log").write_bytes(tail(log_path))
    if out_file.exists():
        entry = with_gpus(json.loads(out_file.read_text()))
        results.put("offline", entry)
        log(
            f"offline ceiling: {entry['throughput']:,.0f} audio-s/s (median {entry['throughput_median']:,.0f}), "
            f"GPU busy {busy_words(entry.get('gpu_busy'))}"
        )
    else:
        log(f"offline ceiling failed (exit {process.returncode}); see {log_path}")
    wait_gpu_free()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json, report.md and log tails")
    parser.add_argument(
        "--state", type=Path, default=Path("/tmp/qwenasr-bench"), help="machine-local cache and results"
    )
    parser.add_argument("--fresh", action="store_true", help="forget results accumulated in --state")
    parser.add_argument("--only", default="vllm,appliance,offline", help="parts, in order: vllm, appliance, offline")
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument("--formats", default="mp3,wav")
    parser.add_argument("--long", default="488,3600", help="long-file durations in seconds ('' for none)")
    parser.add_argument("--long-repeats", type=int, default=1)
    parser.add_argument("--clip-seconds", type=float, default=CLIP_SECONDS)
    parser.add_argument("--requests-factor", type=int, default=4, help="requests per run: max(F x N, --min-requests)")
    parser.add_argument("--min-requests", type=int, default=64)
    parser.add_argument("--requests-c1", type=int, default=32, help="requests of the concurrency-1 run")
    parser.add_argument("--warmup-requests", type=int, default=16, help="per format, before the first run")
    parser.add_argument("--model-size", default="1.7b", choices=("1.7b", "0.6b"))
    parser.add_argument("--model-dir", type=Path, default=None, help="an existing model directory")
    parser.add_argument("--make-dummy", type=Path, default=None, help="path of make_dummy_qwen3_asr.py")
    parser.add_argument("--tokenizer-dir", type=Path, default=None, help="real Qwen3 vocab.json/merges.txt folder")
    parser.add_argument("--strip-eos", action="store_true", help="model directory without any EOS token (both servers)")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--vllm-port", type=int, default=8100)
    parser.add_argument("--appliance-port", type=int, default=8101)
    parser.add_argument("--vllm-arg", action="append", default=[], help="extra `vllm serve` argument (repeatable)")
    parser.add_argument("--appliance-env", action="append", default=[], help="extra appliance KEY=VALUE (repeatable)")
    parser.add_argument("--ready-timeout", type=float, default=400.0)
    parser.add_argument("--deadline", type=float, default=0.0, help="seconds this call may take (0: no limit)")
    parser.add_argument("--margin", type=float, default=60.0, help="seconds kept free at the deadline for stopping")
    parser.add_argument("--offline-batch", type=int, default=256)
    parser.add_argument("--offline-repeats", type=int, default=3)
    parser.add_argument("--offline-warmup", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="processes synthesizing audio (0: all cores)")
    parser.add_argument(
        "--gpu-busy-interval", type=float, default=DEFAULT_INTERVAL_SECONDS,
        help="seconds between NVML polls of the GPUs' kernel-busy %% during every run (0: none)",
    )  # fmt: skip
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument(
        "--profile", action="store_true", help="appliance only: a last run with the loop-lag probe and py-spy"
    )
    parser.add_argument("--profile-seconds", type=float, default=20.0, help="about how long the profile run takes")
    parser.add_argument("--dry-run", action="store_true", help="test doubles instead of vLLM (CPU only); no offline")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    clock = Clock(args.deadline)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown part(s) {sorted(unknown)}; use {', '.join(SYSTEMS)}")
    state: Path = args.state
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    audio_root = state / "audio"
    pids = PidFile(state / "pids.json")
    pids.reap_leftovers()
    results = Results(state / results_file_name(args), args.out, args.fresh)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)

    plan = Plan(
        formats=[f.strip() for f in args.formats.split(",") if f.strip()],
        concurrency=[int(c) for c in args.concurrency.split(",") if c.strip()],
        long_seconds=[float(s) for s in args.long.split(",") if s.strip()],
        clip_seconds=args.clip_seconds,
        requests_factor=args.requests_factor,
        min_requests=args.min_requests,
        requests_c1=args.requests_c1,
        warmup_requests=args.warmup_requests,
        max_new_tokens=args.max_new_tokens,
        long_repeats=args.long_repeats,
        gpu_busy_interval=args.gpu_busy_interval or None,
    )
    if args.profile and "appliance" in parts:
        plan.profile_requests = plan.requests_for(max(plan.concurrency))
    plan.allocate()
    invocation: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parts": parts,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "dry_run": args.dry_run,
        "gpu": nvidia_smi("name,memory.total,driver_version"),
        "cpu_count": os.cpu_count(),
    }
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        invocation["vllm_version"] = importlib.metadata.version("vllm")
    results.data["meta"]["invocations"].append(invocation)
    results.data["meta"].update(
        model_size=args.model_size,
        max_new_tokens=args.max_new_tokens,
        clip_seconds=args.clip_seconds,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        strip_eos=args.strip_eos,
        dry_run=args.dry_run,
    )
    results.save()
    model_dir = REPO if args.dry_run else make_model(args, state)
    status = 0
    try:
        for part in parts:
            if clock.left() < args.margin:
                log(f"{part}: skipped, {clock.left():.0f} s left")
                continue
            try:
                if part == "offline":
                    if args.dry_run:
                        log("offline: skipped in a dry run (needs vLLM and a GPU)")
                        continue
                    run_offline(args, model_dir, results, clock, args.out, logs)
                    continue
                if args.dry_run:
                    port = args.vllm_port if part == "vllm" else args.appliance_port
                    server = double_server(part, port, pids, logs, args.python)
                elif part == "vllm":
                    server = vllm_server(args, model_dir, pids, logs)
                else:
                    server = appliance_server(args, model_dir, pids, logs)
                fields = {"max_completion_tokens": str(args.max_new_tokens)} if part == "vllm" else {}
                run_server_part(part, server, fields, args, plan, audio_root, results, clock, args.out)
            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
                status = 1
                log(f"{part} failed: {exc}")
                results.data["servers"].setdefault(part, {})["error"] = str(exc)
                results.save()
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}); results so far are in {args.out}")
        status = 130
    finally:
        results.save()
    print(report_mod.render(results.data))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
