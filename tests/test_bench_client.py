"""The benchmark's CPU-side pieces: workload synthesis, the load client's statistics, the report."""

from __future__ import annotations

import asyncio
import email.message
import email.parser
import io
import math
from pathlib import Path

import httpx
import numpy as np
import pytest
from bench import report
from bench.client import (
    RequestResult,
    Target,
    histogram_quantile,
    multipart_body,
    parse_metrics,
    percentile,
    run_load,
    stage_stats,
    summarize,
    token_stats,
)
from bench.run_all import Plan
from bench.workload import AudioItem, clip_specs, decode, encode, ensure, synthesize_speech

from tests.test_bench_gpu_busy import three_gpus

# -- workload ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [16_000, 44_100])
def test_synthesis_has_the_requested_duration_and_level(rate: int) -> None:
    samples = synthesize_speech(3.25, seed=7, sample_rate=rate)
    assert samples.dtype == np.float32
    assert samples.shape == (round(3.25 * rate),)
    assert np.all(np.isfinite(samples))
    assert 0.3 < float(np.max(np.abs(samples))) <= 1.0


def test_synthesis_is_deterministic_and_seeds_differ() -> None:
    a = synthesize_speech(2.0, seed=1)
    assert np.array_equal(a, synthesize_speech(2.0, seed=1))
    assert not np.allclose(a, synthesize_speech(2.0, seed=2))


def test_synthesis_is_speech_like_voiced_segments_and_pauses() -> None:
    samples = synthesize_speech(20.0, seed=3)
    frames = samples[: samples.size // 400 * 400].reshape(-1, 400)  # 25 ms
    energy = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1))
    quiet = float((energy < 0.01).mean())
    assert 0.1 < quiet < 0.7, quiet  # pauses, but mostly speech
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(samples.size, 1 / 16_000)
    low = spectrum[(freqs > 80) & (freqs < 1000)].sum()
    high = spectrum[freqs > 4000].sum()
    assert low > 5 * high  # the energy sits in the voiced range, as in speech


@pytest.mark.parametrize(("fmt", "rate"), [("mp3", 44_100), ("mp3", 16_000), ("wav", 16_000)])
def test_encoded_files_decode_to_the_same_duration(fmt: str, rate: int) -> None:
    samples = synthesize_speech(2.5, seed=5, sample_rate=rate)
    data = encode(samples, rate, fmt)
    decoded, decoded_rate = decode(data)
    assert decoded_rate == rate
    assert abs(decoded.size / rate - 2.5) < 0.06
    if fmt == "wav":
        assert np.max(np.abs(decoded - samples)) < 1e-4
    av = pytest.importorskip("av")  # the servers' other decoder (PyAV / FFmpeg)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        total = sum(frame.samples for frame in container.decode(stream))
    assert abs(total / rate - 2.5) < 0.1


def test_ensure_caches_files_and_keeps_indices_apart(tmp_path: Path) -> None:
    items = ensure(tmp_path, clip_specs("wav", [0, 1], seconds=1.0), workers=1)
    assert [item.seconds for item in items] == [1.0, 1.0]
    assert items[0].read() != items[1].read()
    mtime = items[0].path.stat().st_mtime_ns
    again = ensure(tmp_path, clip_specs("wav", [0], seconds=1.0), workers=1)
    assert again[0].path == items[0].path and again[0].path.stat().st_mtime_ns == mtime
    assert items[0].content_type == "audio/wav"


def test_plan_gives_every_request_its_own_clip() -> None:
    plan = Plan(
        formats=["mp3", "wav"], concurrency=[1, 16, 64], long_seconds=[488.0], clip_seconds=29.5,
        requests_factor=2, min_requests=32, requests_c1=16, warmup_requests=4, max_new_tokens=100,
    )  # fmt: skip
    plan.allocate()
    assert [(fmt, n, len(idx)) for fmt, n, idx in plan.cells] == [
        ("mp3", 1, 16), ("mp3", 16, 32), ("mp3", 64, 128), ("wav", 1, 16), ("wav", 16, 32), ("wav", 64, 128),
    ]  # fmt: skip
    every = [i for idx in plan.warmup.values() for i in idx] + [i for _, _, idx in plan.cells for i in idx]
    assert len(every) == len(set(every))
    assert {spec.fmt for spec in plan.long_specs()} == {"mp3", "wav"}


# -- client statistics -------------------------------------------------------------------------------


def test_percentile_matches_numpy_linear_interpolation() -> None:
    rng = np.random.default_rng(0)
    values = list(rng.exponential(size=37))
    for q in (0, 5, 50, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([2.0], 95) == 2.0
    assert math.isnan(percentile([], 50))
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summary_throughput_is_successful_audio_over_wall_time() -> None:
    results = [
        RequestResult(index=i, audio_seconds=30.0, started=0.0, latency=lat, status=200, error="")
        for i, lat in enumerate([1.0, 2.0, 3.0])
    ] + [RequestResult(index=3, audio_seconds=30.0, started=0.0, latency=0.1, status=503, error="http_503")]
    summary = summarize(results, wall_seconds=2.0)
    assert summary["throughput"] == 45.0  # 3 x 30 s / 2 s; the failed request's audio does not count
    assert summary["requests"] == 4 and summary["ok"] == 3 and summary["errors"] == 1
    assert summary["error_kinds"] == {"http_503": 1}
    assert summary["p50"] == 2.0 and summary["p95"] == pytest.approx(2.9)
    assert summary["requests_per_second"] == 1.5


def test_multipart_body_is_valid_form_data() -> None:
    body, content_type = multipart_body(
        {"model": "m", "max_completion_tokens": "100"}, "a.mp3", "audio/mpeg", b"\x00ID3"
    )
    message = email.parser.BytesParser().parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    parts: dict[str, email.message.Message] = {}
    for part in message.walk():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            parts[name] = part
    assert set(parts) == {"model", "max_completion_tokens", "file"}
    assert parts["model"].get_payload() == "m"
    assert parts["max_completion_tokens"].get_payload() == "100"
    assert parts["file"].get_content_type() == "audio/mpeg"
    assert parts["file"].get_payload(decode=True) == b"\x00ID3"


def test_run_load_keeps_the_concurrency_and_counts_errors(tmp_path: Path) -> None:
    in_flight = 0
    peak = 0
    seen_fields: list[bytes] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        body = await request.aread()
        seen_fields.append(body)
        await asyncio.sleep(0.01)
        in_flight -= 1
        if b"clip-3" in body:
            return httpx.Response(500, json={"error": {"code": "boom"}})
        return httpx.Response(200, json={"text": "hello world"})

    items = []
    for i in range(10):
        path = tmp_path / f"clip-{i}.wav"
        path.write_bytes(b"RIFF" + bytes([i]))
        items.append(AudioItem(name=path.name, fmt="wav", seconds=30.0, path=path))
    target = Target("vllm", "http://server", "qwen3-asr", {"max_completion_tokens": "100"})
    load = asyncio.run(run_load(target, items, 3, transport=httpx.MockTransport(handler)))
    assert peak == 3
    assert len(load.results) == 10 and [r.index for r in load.results] == list(range(10))
    summary = load.summary()
    assert summary["ok"] == 9 and summary["error_kinds"] == {"http_500_boom": 1}
    assert summary["throughput"] == pytest.approx(9 * 30.0 / load.wall_seconds, rel=0.01)
    assert all(b'name="max_completion_tokens"' in body and b'name="model"' in body for body in seen_fields)
    assert all(r.latency > 0 for r in load.results)


METRICS_BEFORE = """
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="qwen3-asr"} 1000.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="qwen3-asr"} 10.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="qwen3-asr"} 0.0
vllm:prompt_tokens_total{engine="0",model_name="qwen3-asr"} 4000.0
qwenasr_stage_duration_seconds_bucket{le="0.01",stage="decode"} 0.0
qwenasr_stage_duration_seconds_bucket{le="0.1",stage="decode"} 0.0
qwenasr_stage_duration_seconds_bucket{le="+Inf",stage="decode"} 0.0
qwenasr_stage_duration_seconds_count{stage="decode"} 0.0
qwenasr_stage_duration_seconds_sum{stage="decode"} 0.0
"""

METRICS_AFTER = """
vllm:generation_tokens_total{engine="0",model_name="qwen3-asr"} 4000.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="qwen3-asr"} 39.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="qwen3-asr"} 1.0
vllm:prompt_tokens_total{engine="0",model_name="qwen3-asr"} 16000.0
qwenasr_stage_duration_seconds_bucket{le="0.01",stage="decode"} 10.0
qwenasr_stage_duration_seconds_bucket{le="0.1",stage="decode"} 30.0
qwenasr_stage_duration_seconds_bucket{le="+Inf",stage="decode"} 30.0
qwenasr_stage_duration_seconds_count{stage="decode"} 30.0
qwenasr_stage_duration_seconds_sum{stage="decode"} 0.9
"""


def test_token_and_stage_statistics_from_metric_deltas() -> None:
    before, after = parse_metrics(METRICS_BEFORE), parse_metrics(METRICS_AFTER)
    tokens = token_stats(before, after)
    assert tokens is not None
    assert tokens["engine_requests"] == 30 and tokens["finished"] == {"length": 29, "stop": 1}
    assert tokens["generation_tokens"] == 3000 and tokens["tokens_per_engine_request"] == 100.0
    assert tokens["prompt_tokens"] == 12000
    stages = stage_stats(before, after)
    assert stages is not None
    assert stages["decode"]["count"] == 30 and stages["decode"]["mean_ms"] == pytest.approx(30.0)
    assert stages["decode"]["p50_ms"] == pytest.approx(32.5)  # 15th of 30 lies in (0.01, 0.1]: 0.01 + 0.09 * 5/20
    assert token_stats({}, parse_metrics("qwenasr_x_total 1")) is None


def test_histogram_quantile_follows_prometheus() -> None:
    buckets = [(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.1)
    assert histogram_quantile(buckets, 0.95) == pytest.approx(0.75)
    assert histogram_quantile([(0.1, 0.0), (math.inf, 0.0)], 0.5) is None


# -- report ------------------------------------------------------------------------------------------


def _load(
    system: str,
    fmt: str,
    n: int,
    throughput: float,
    p50: float,
    tokens: float = 100.0,
    *,
    busy: list[float] | None = None,
    gpu_error: str | None = None,
) -> dict[str, object]:
    """A `loads` entry as run_all writes it; `busy`: each GPU's mean kernel-busy % (its GPU count too)."""
    entry: dict[str, object] = {
        "system": system, "format": fmt, "concurrency": n, "requests": 32, "ok": 32, "errors": 0,
        "throughput": throughput, "p50": p50, "p95": p50 * 1.5, "mean": p50, "client_cpu_fraction": 0.1,
        "tokens": {"engine_requests": 32, "finished": {"length": 32}, "tokens_per_engine_request": tokens},
        "stages": {"decode": {"mean_ms": 20.0, "p95_ms": 30.0}, "engine": {"mean_ms": 250.0, "p95_ms": 300.0}}
        if system == "appliance" else None,
    }  # fmt: skip
    if busy is not None:
        entry["gpu_busy"] = _busy(busy, gpu_error)
        entry["gpus"] = len(busy)
    return entry


def _busy(means: list[float], error: str | None = None) -> dict[str, object]:
    """An available GPU busy record (bench/gpu_busy.py) with these per-GPU means."""
    gpus = [
        {"index": i, "uuid": f"GPU-{i}", "name": "NVIDIA H200", "samples": 200, "busy_mean": mean,
         "busy_p50": mean, "busy_zero_share": 0.05, "memory_used_mib_mean": 120_000, "memory_used_mib_max": 121_000,
         "memory_total_mib": 143_771, "error": None}
        for i, mean in enumerate(means)
    ]  # fmt: skip
    return {
        "available": True, "method": "NVML nvmlDeviceGetUtilizationRates().gpu, polled", "interval_seconds": 0.1,
        "seconds": 20.0, "cuda_visible_devices": None, "gpus": gpus, "busy_mean": sum(means) / len(means),
        "error": error,
    }  # fmt: skip


NO_NVML = {"available": False, "reason": "NVML library not found (NVML Shared Library Not Found)"}


def test_report_renders_tables_and_target_checks() -> None:
    data = {
        "meta": {"max_new_tokens": 100, "clip_seconds": 29.5, "model_size": "1.7b", "invocations": []},
        "servers": {"vllm": {"startup_seconds": 120.0}},
        "loads": [
            _load("vllm", "mp3", 1, 100.0, 0.30),
            _load("appliance", "mp3", 1, 110.0, 0.31),
            _load("vllm", "mp3", 64, 1900.0, 1.0),
            _load("appliance", "mp3", 64, 3000.0, 0.6),
            _load("appliance", "mp3", 256, 3900.0, 2.0, tokens=99.0),
        ],
        "long_files": [
            {
                "system": "appliance",
                "format": "mp3",
                "audio_seconds": 488.0,
                "ok": True,
                "wall_seconds": 0.8,
                "rtf": 0.0016,
            }
        ],
        "offline": [{"batch": 256, "throughput": 5000.0, "throughput_median": 4900.0, "repeats": []}],
    }
    text = report.render(data)
    assert "| appliance | mp3 | 64 | 32/32 | 3,000 |" in text
    checks = {name: (ok, detail) for name, ok, detail in report.target_checks(data)}
    assert checks["c=64 mp3: appliance >= 1.5x vllm serve (earlier issue)"] == (
        True,
        "3,000 vs 1,900 audio-s/s = 1.58x",
    )
    assert checks["c=256 mp3: appliance >= 80% of offline ceiling (earlier issue)"] == (
        False,
        "3,900 vs 5,000 audio-s/s = 78%",
    )
    assert checks["c=1 mp3: appliance p50 <= vllm serve p50"] == (False, "0.310 s vs 0.300 s = 1.03x")  # no slack now
    assert checks["one 488 s mp3 file <= 0.4 s"] == (False, "0.800 s")
    length = next(v for k, v in checks.items() if k.startswith("same output length"))
    assert length[0] is False and "c=256" in length[1]  # 99 tokens per request is not the fixed length
    assert "| mp3 | 64 | 3,000 | 1,900 | 1.58x |" in text


def test_c64_speedup_check_passes_at_one_and_a_half() -> None:
    data = {"meta": {}, "loads": [_load("vllm", "wav", 64, 1000.0, 1.0), _load("appliance", "wav", 64, 1500.0, 1.0)]}
    checks = {name: ok for name, ok, _ in report.target_checks(data)}
    assert checks["c=64 wav: appliance >= 1.5x vllm serve (earlier issue)"] is True
    assert checks["c=1 wav: appliance p50 <= vllm serve p50"] is None


def test_merge_lets_later_results_win() -> None:
    first = {"loads": [_load("vllm", "mp3", 16, 900.0, 0.5)], "servers": {"vllm": {"startup_seconds": 100}}}
    second = {"loads": [_load("vllm", "mp3", 16, 1000.0, 0.4), _load("appliance", "mp3", 16, 1500.0, 0.3)]}
    merged = report.merge([first, second])
    assert sorted((e["system"], e["throughput"]) for e in merged["loads"]) == [("appliance", 1500.0), ("vllm", 1000.0)]
    assert merged["servers"]["vllm"]["startup_seconds"] == 100


def _checks(data: dict[str, object]) -> dict[str, tuple[bool | None, str]]:
    return {name: (ok, detail) for name, ok, detail in report.target_checks(data)}


def test_report_shows_each_runs_gpu_busy_or_why_not() -> None:
    long_file = {"system": "appliance", "format": "mp3", "audio_seconds": 488.0, "ok": True, "wall_seconds": 0.35,
                 "gpu_busy": _busy([61.0])}  # fmt: skip
    data = {
        "meta": {"invocations": []},
        "loads": [
            _load("vllm", "mp3", 64, 1900.0, 1.0, busy=[41.0]),
            _load("appliance", "mp3", 64, 3000.0, 0.6, busy=[84.4], gpu_error="GPU 0: NVMLError: Unknown Error"),
            _load("appliance", "mp3", 512, 7000.0, 2.0, busy=[85.0, 80.0]),
            {**_load("vllm", "wav", 1, 100.0, 0.3), "gpu_busy": NO_NVML},
            {**_load("appliance", "wav", 1, 100.0, 0.3), "gpu_busy": NO_NVML},
            _load("appliance", "wav", 16, 900.0, 0.5),  # written before the sampler existed
        ],
        "long_files": [long_file],
        "offline": [
            {
                "batch": 256,
                "throughput": 5000.0,
                "throughput_median": 4900.0,
                "repeats": [],
                "gpu_busy": _busy([97.0]),
                "gpus": 1,
            }
        ],
    }
    text = report.render(data)
    assert "| cached prompt tokens | client CPU | GPU busy % |" in text
    assert "| vllm | mp3 | 64 | 32/32 | 1,900 |" in text and "| 0.10 | 41 |" in text
    assert "| 0.10 | 84* |" in text
    assert "| 0.10 | 85 / 80 |" in text  # one mean per GPU
    assert text.count("| 0.10 | n/a |") == 2 and "| 0.10 | - |" in text
    assert "GPU busy n/a: NVML library not found (NVML Shared Library Not Found) (2 runs)" in text
    assert "GPU busy *: NVML failed during the run (GPU 0: NVMLError: Unknown Error) (1 run)" in text
    assert "| ok | 61 |" in text  # the long file
    assert "| 4,900 | - | - |  | 97 |" in text  # the offline ceiling
    section = text.split("## GPU busy per run (NVML)")[1]
    assert "every 0.1 s from the first request to the last answer" in section
    assert "| appliance | mp3 c=512 | 1 NVIDIA H200 | 200 | 80.0 | 80.0 | 5.0 | 121,000 / 143,771 |  |" in section
    assert "| offline | batch 256 | 0 NVIDIA H200 | 200 | 97.0 |" in section
    assert "| appliance | mp3 488 s file | 0 NVIDIA H200 |" in section
    assert "| mp3 | 512 (2 GPUs) |" not in text  # no vllm serve run on two GPUs to compare with


def test_report_without_nvml_says_not_available() -> None:
    data = {"meta": {"dry_run": True}, "loads": [{**_load("appliance", "mp3", 256, 10.0, 1.0), "gpu_busy": NO_NVML}]}
    text = report.render(data)
    assert "| 0.10 | n/a |" in text
    assert text.split("## GPU busy per run (NVML)")[1].strip().startswith("GPU busy n/a: NVML library not found")
    ok, detail = _checks(data)["c=256 mp3: GPU kernel-busy >= 80% under the appliance"]
    assert (
        ok is None
        and detail == "not measured: GPU busy not available: NVML library not found (NVML Shared Library Not Found)"
    )


@pytest.mark.parametrize(
    ("throughput", "busy", "verdicts"),
    [
        (3500.0, [80.0], (True, True)),  # both at the target
        (3499.0, [79.9], (False, False)),
        (4000.0, None, (True, None)),  # no GPU busy record: not measured
    ],
)
def test_c256_throughput_and_gpu_busy_targets(
    throughput: float, busy: list[float] | None, verdicts: tuple[bool | None, bool | None]
) -> None:
    checks = _checks({"loads": [_load("appliance", "mp3", 256, throughput, 2.0, busy=busy)]})
    assert checks["c=256 mp3: appliance >= 3,500 audio-s/s"][0] is verdicts[0]
    ok, detail = checks["c=256 mp3: GPU kernel-busy >= 80% under the appliance"]
    assert ok is verdicts[1]
    if busy:
        assert detail == f"GPU0 {busy[0]:.1f}% (p50 {busy[0]:.0f}%, 0% in 5% of 200 samples)"
    else:
        assert detail == "not measured: no GPU busy record"


def test_issue_targets_not_measured_without_their_runs() -> None:
    checks = _checks({"loads": [_load("vllm", "mp3", 64, 1900.0, 1.0)], "servers": {}})
    for name in (
        "c=256 mp3: appliance >= 3,500 audio-s/s",
        "c=256 mp3: GPU kernel-busy >= 80% under the appliance",
        "c=64 mp3: appliance >= 2,500 audio-s/s",
        "c=1 mp3: appliance p50 <= vllm serve p50",
        "one 488 s mp3 file <= 0.4 s",
        "c=512 mp3: appliance on 2 GPUs >= 1.8x its 1-GPU throughput",
        "start-up to ready (cache state not recorded): appliance <= vllm serve + 10%",
    ):
        assert checks[name] == (None, "not measured"), name


@pytest.mark.parametrize(("throughput", "ok"), [(2500.0, True), (2499.0, False)])
def test_c64_throughput_target(throughput: float, ok: bool) -> None:
    checks = _checks({"loads": [_load("appliance", "wav", 64, throughput, 1.0)]})
    assert checks["c=64 wav: appliance >= 2,500 audio-s/s"] == (ok, f"{throughput:,.0f} audio-s/s")


@pytest.mark.parametrize(("p50", "ok"), [(0.300, True), (0.299, True), (0.301, False)])
def test_c1_p50_no_worse_than_vllm_serve(p50: float, ok: bool) -> None:
    checks = _checks({"loads": [_load("vllm", "mp3", 1, 100.0, 0.300), _load("appliance", "mp3", 1, 100.0, p50)]})
    assert checks["c=1 mp3: appliance p50 <= vllm serve p50"][0] is ok


@pytest.mark.parametrize(("fmt", "walls", "ok"), [("mp3", [0.45, 0.40], True), ("mp3", [0.41], False),
                                                    ("wav", [0.9], True), ("wav", [1.1], False)])  # fmt: skip
def test_one_488_s_file_target(fmt: str, walls: list[float], ok: bool) -> None:
    longs = [
        {"system": "appliance", "format": fmt, "audio_seconds": 488.0, "index": i, "ok": True, "wall_seconds": wall}
        for i, wall in enumerate(walls)
    ]
    longs.append({"system": "vllm", "format": fmt, "audio_seconds": 488.0, "ok": True, "wall_seconds": 0.01})
    checks = _checks({"loads": [_load("appliance", fmt, 1, 100.0, 0.3)], "long_files": longs})
    name = "one 488 s mp3 file <= 0.4 s" if fmt == "mp3" else "one 488 s wav file <= 1 s (earlier issue)"
    verdict, detail = checks[name]
    assert verdict is ok
    assert detail.startswith(f"{min(walls):.3f} s")


def test_startup_target_per_cache_state() -> None:
    servers = {
        "vllm": {"startup_seconds": 60.0, "startup_seconds_cold": 100.0, "startup_seconds_warm": 50.0},
        "appliance": {"startup_seconds": 56.0, "startup_seconds_cold": 110.0, "startup_seconds_warm": 56.0},
    }
    checks = _checks({"servers": servers})
    assert checks["start-up to ready (cold cache): appliance <= vllm serve + 10%"] == (
        True,
        "110.0 s vs 100.0 s (limit 110.0 s)",
    )
    assert checks["start-up to ready (warm cache): appliance <= vllm serve + 10%"] == (
        False,
        "56.0 s vs 50.0 s (limit 55.0 s)",
    )
    assert not any("not recorded" in name for name in checks)
    del servers["vllm"]["startup_seconds_warm"]
    checks = _checks({"servers": servers})
    assert checks["start-up to ready (warm cache): appliance <= vllm serve + 10%"] == (
        None,
        "not measured (only appliance 56.0 s)",
    )
    plain = {"vllm": {"startup_seconds": 100.0}, "appliance": {"startup_seconds": 105.0}}
    ok, detail = _checks({"servers": plain})[
        "start-up to ready (cache state not recorded): appliance <= vllm serve + 10%"
    ]
    assert ok is True and "may not have started from the same cache state" in detail
    header = report.section_meta({"servers": servers, "meta": {}})
    assert "- appliance: start-up 56.0 s; start-ups by cache state: cold 110.0 s, warm 56.0 s" in header


@pytest.mark.parametrize(("two_gpus", "ok"), [(7200.0, True), (6800.0, False)])
def test_two_gpu_scaling_target_at_c512(two_gpus: float, ok: bool) -> None:
    data = {
        "loads": [
            _load("appliance", "mp3", 512, 4000.0, 3.0, busy=[88.0]),
            _load("appliance", "mp3", 512, two_gpus, 3.0, busy=[86.0, 84.0]),
        ]
    }
    verdict, detail = _checks(data)["c=512 mp3: appliance on 2 GPUs >= 1.8x its 1-GPU throughput"]
    assert verdict is ok
    assert detail.startswith(
        f"{two_gpus:,.0f} vs 4,000 audio-s/s = {two_gpus / 4000:.2f}x; per GPU {two_gpus / 2:,.0f}"
    )
    assert "GPU0 86.0%" in detail and "GPU1 84.0%" in detail
    # The one-GPU targets read the one-GPU runs only.
    assert _checks(data)["c=256 mp3: appliance >= 3,500 audio-s/s"] == (None, "not measured")


def test_merge_keeps_one_and_two_gpu_runs_apart() -> None:
    one = {"loads": [_load("appliance", "mp3", 512, 4000.0, 3.0, busy=[88.0]), _load("vllm", "mp3", 512, 3000.0, 3.0)]}
    two = {"loads": [_load("appliance", "mp3", 512, 7500.0, 3.0, busy=[86.0, 84.0])]}
    merged = report.merge([one, two])
    assert sorted((e["system"], e.get("gpus"), e["throughput"]) for e in merged["loads"]) == [
        ("appliance", 1, 4000.0), ("appliance", 2, 7500.0), ("vllm", None, 3000.0),
    ]  # fmt: skip
    assert report.entry_key("loads", _load("vllm", "mp3", 512, 1.0, 1.0)) == ("vllm", "mp3", 512, 1)


# -- offline ceiling (the loop around LLM.generate, with a stand-in for vLLM) ------------------------


def test_offline_ceiling_times_distinct_batches_with_fixed_length_sampling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys
    import types

    from bench import offline_ceiling

    calls: list[tuple[list[dict[str, object]], dict[str, object]]] = []

    class FakeLLM:
        def __init__(self, **kwargs: object) -> None:
            self.kwargs = kwargs

        def generate(
            self, prompts: list[dict[str, object]], params: dict[str, object], use_tqdm: bool = True
        ) -> list[object]:
            calls.append((prompts, params))
            count = int(params["max_tokens"])  # type: ignore[call-overload]
            output = types.SimpleNamespace(token_ids=list(range(count)))
            return [types.SimpleNamespace(outputs=[output]) for _ in prompts]

    fake = types.ModuleType("vllm")
    fake.LLM = FakeLLM  # type: ignore[attr-defined]
    fake.SamplingParams = lambda **kwargs: kwargs  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", fake)
    nvml = three_gpus(busy={1: [90.0, 100.0]})
    monkeypatch.setitem(sys.modules, "pynvml", nvml.module())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    out = tmp_path / "offline.json"
    args = offline_ceiling.build_parser().parse_args(
        ["--model", str(tmp_path), "--out", str(out), "--batch", "3", "--repeats", "2", "--warmup", "1",
         "--clip-seconds", "1.0", "--max-tokens", "7"]
    )  # fmt: skip
    result = offline_ceiling.run(args)
    assert [len(prompts) for prompts, _ in calls] == [1, 3, 3]
    params = calls[1][1]
    assert params["max_tokens"] == params["min_tokens"] == 7 and params["ignore_eos"] is True
    assert params["temperature"] == 0.0
    prompt = calls[1][0][0]
    assert prompt["prompt"] == offline_ceiling.appliance_prompt()
    audio, rate = prompt["multi_modal_data"]["audio"]  # type: ignore[index]
    assert rate == 16_000 and len(audio) == 16_000
    first, second = (np.concatenate([p["multi_modal_data"]["audio"][0] for p in c[0]]) for c in calls[1:])  # type: ignore[index]
    assert not np.allclose(first, second)  # every batch is new audio
    assert result["tokens_per_request"] == 7.0 and len(result["repeats"]) == 2
    assert result["throughput"] == max(r["throughput"] for r in result["repeats"])
    assert result["engine_args"]["max_num_seqs"] == 256 and result["engine_args"]["load_format"] == "dummy"
    # GPU busy around each timed batch only (not the warm-up); the entry carries the best batch's.
    assert all(r["gpu_busy"]["available"] and r["gpu_busy"]["gpus"][0]["index"] == 1 for r in result["repeats"])
    assert result["gpu_busy"] is max(result["repeats"], key=lambda r: r["throughput"])["gpu_busy"]
    assert nvml.calls == ["init", "shutdown"] * 2


def test_vllm_cache_state_is_read_where_vllm_keeps_it(tmp_path: Path) -> None:
    from bench.run_all import vllm_cache

    root = tmp_path / "vllm-cache"
    assert vllm_cache({"VLLM_CACHE_ROOT": str(root)}) == {"root": str(root), "files": 0, "state": "cold"}
    (root / "torch_compile_cache" / "abc").mkdir(parents=True)
    assert vllm_cache({"VLLM_CACHE_ROOT": str(root)})["state"] == "cold"  # folders alone hold nothing
    (root / "torch_compile_cache" / "abc" / "graph.py").write_text("")
    (root / "modelinfos.json").write_text("{}")
    assert vllm_cache({"VLLM_CACHE_ROOT": str(root)}) == {"root": str(root), "files": 2, "state": "warm"}
    assert vllm_cache({"VLLM_CACHE_ROOT": str(root)}, limit=1)["files"] == 1
    assert vllm_cache({"XDG_CACHE_HOME": str(tmp_path)})["root"] == str(tmp_path / "vllm")
    assert vllm_cache({"HOME": str(tmp_path)})["root"] == str(tmp_path / ".cache" / "vllm")


def test_the_appliance_must_be_on_vllm_in_benchmark_mode() -> None:
    from bench.run_all import check_appliance_engine

    def status(name: str, quantization: str | None = None, bench: bool = True) -> dict[str, object]:
        details = {"bench_ignore_eos": True} if bench else {}
        engine = {"name": name, "quantization": quantization, "details": details}
        return {"engine": {"plan": "p", "engine": engine}}

    assert check_appliance_engine(status("vllm")) is None
    assert "bench_ignore_eos" in str(check_appliance_engine(status("vllm", bench=False)))
    assert check_appliance_engine(None) is not None
    with pytest.raises(RuntimeError, match="fallback"):
        check_appliance_engine(status("cpu"))
    with pytest.raises(RuntimeError, match="fallback"):
        check_appliance_engine(status("vllm", quantization="bitsandbytes"))


def test_the_appliance_runs_with_its_shipped_defaults_except_what_fairness_demands(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 17: MAX_CONCURRENT_REQUESTS=256 in the benchmark hid that the default admitted one request
    at a time. Admission, queue and timeouts stay at their defaults; each override has its reason,
    settings inherited from the caller's shell are dropped, and the report header lists the overrides."""
    from bench.run_all import APPLIANCE_OVERRIDE_REASONS, appliance_overrides, appliance_server, build_parser

    monkeypatch.setenv("MAX_CONCURRENT_REQUESTS", "256")  # e.g. left over in the caller's shell
    monkeypatch.setenv("HF_HOME", "/cache/hf")  # not an appliance setting: kept
    args = build_parser().parse_args(["--out", "/tmp/unused", "--appliance-env", "LOG_LEVEL=debug"])
    env = appliance_server(args, Path("/models/dummy"), None, Path("/tmp")).env  # type: ignore[arg-type]
    shipped = ("MAX_CONCURRENT_REQUESTS", "MAX_QUEUE_SIZE", "QUEUE_TIMEOUT_SECONDS", "REQUEST_TIMEOUT_SECONDS")
    for name in (*shipped, "DECODE_WORKERS", "CHUNK_SECONDS", "MAX_AUDIO_SECONDS"):
        assert name not in env, name
    assert env["HF_HOME"] == "/cache/hf" and env["LOG_LEVEL"] == "debug"
    overrides = appliance_overrides(env, args.appliance_env)
    assert set(overrides) == {*APPLIANCE_OVERRIDE_REASONS, "LOG_LEVEL"}
    assert all(o["why"] for o in overrides.values())
    assert overrides["LOG_LEVEL"]["why"] == "set by hand (--appliance-env)"

    status = {"queue": {"max_concurrent_requests": 256}}
    data = {
        "meta": {"invocations": []},
        "servers": {"appliance": {"startup_seconds": 90.0, "status": status, "overrides": overrides}},
    }
    header = report.section_meta(data)
    assert "admission limit 256 (/status)" in header
    assert "- appliance runs with its shipped defaults except:" in header
    assert "  - `ENGINE=vllm`: " in header and "MAX_CONCURRENT_REQUESTS" not in header


def test_merge_refuses_results_of_different_models() -> None:
    """A 0.6B run's rows share their keys with the 1.7B run's: merged, one would replace the other."""
    big = {"meta": {"model_size": "1.7b"}, "loads": [_load("appliance", "mp3", 16, 1500.0, 0.3)]}
    small = {"meta": {"model_size": "0.6b"}, "loads": [_load("appliance", "mp3", 16, 2500.0, 0.2)]}
    no_eos = {"meta": {"model_size": "1.7b", "strip_eos": True}, "loads": []}
    unknown = {"loads": [_load("vllm", "mp3", 16, 900.0, 0.5)]}  # written before meta.model_size
    for pair in ([big, small], [big, no_eos], [small, unknown, big]):
        with pytest.raises(ValueError, match="different models"):
            report.merge(pair)
    assert len(report.merge([big, unknown, dict(big)])["loads"]) == 2


def test_each_model_keeps_its_own_state_file() -> None:
    from bench import run_all

    def name(*argv: str) -> str:
        return run_all.results_file_name(run_all.build_parser().parse_args(["--out", "/tmp/x", *argv]))

    assert name() == "results-1.7b.json"
    assert name("--model-size", "0.6b") == "results-0.6b.json"
    assert name("--strip-eos") == "results-1.7b-noeos.json"
    assert name("--dry-run") == "results-1.7b-dry.json"
