"""Render benchmark results (`results.json` from `run_all.py`) as markdown, with the issue's target checks.

    python -m bench.report results.json [more.json ...] [--merged merged.json]

Several files are merged first (a later file's entry replaces an earlier one with the same key), so the
results of several device calls, or of a machine that was recycled between calls, combine into one report.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SECTIONS = ("loads", "long_files", "offline")

# The targets (H200, bf16; found with the GPU idle most of the time). Throughputs in audio
# seconds per wall second, GPU busy in percent of time with a kernel running (NVML, bench/gpu_busy.py).
TARGET_C256_THROUGHPUT = 3500.0  # appliance at c=256, with the GPU at least TARGET_GPU_BUSY busy
TARGET_GPU_BUSY = 80.0
TARGET_C64_THROUGHPUT = 2500.0  # appliance at c=64
TARGET_C1_P50_RATIO = 1.0  # appliance c=1 p50 no worse than vllm serve's
TARGET_LONG_SECONDS = 488.0
TARGET_LONG_FORMAT = "mp3"
TARGET_LONG_WALL = 0.40  # one 488 s mp3 in <= 0.40 s
TARGET_STARTUP_RATIO = 1.10  # appliance start-up to ready <= vllm serve's + 10 %, from the same cache state
TARGET_SCALING = 1.8  # appliance on two GPUs >= 1.8 x its one-GPU throughput ...
TARGET_SCALING_CONCURRENCY = 512  # ... at this concurrency
CACHE_STATES = ("cold", "warm")  # servers.<system>.startup_seconds_<state>, from run_all.vllm_cache
# Kept from the earlier issue (H100): relative to vllm serve and the ceiling on the same machine.
TARGET_C64_SPEEDUP = 1.5  # appliance c=64 throughput >= 1.5 x vllm serve's
TARGET_CEILING_SHARE = 0.8  # appliance c=256 throughput >= 80 % of the offline ceiling
TARGET_LONG_WALL_OTHER = 1.0  # one 488 s file of another format (wav) in <= 1.0 s
CLIENT_CPU_WARNING = 0.8  # the client is one Python process: near a full core it may be the bottleneck

Entry = dict[str, Any]


def gpus_of(entry: Entry) -> int:
    """How many GPUs the servers could see in a run (`gpus`, from its GPU busy record); 1 when unknown:
    results written before the field existed, or without NVML, came from one GPU."""
    return int(entry.get("gpus") or 1)


def entry_key(section: str, entry: Entry) -> tuple[Any, ...]:
    if section == "loads":
        return (entry.get("system"), entry.get("format"), entry.get("concurrency"), gpus_of(entry))
    if section == "long_files":
        return (
            entry.get("system"), entry.get("format"), entry.get("audio_seconds"), entry.get("index", 0),
            gpus_of(entry),
        )  # fmt: skip
    if section == "offline":
        return (entry.get("batch"), gpus_of(entry))
    raise ValueError(f"unknown section {section!r}")


def model_variant(doc: dict[str, Any]) -> str | None:
    """The model a results document measured: its size, `-noeos` when the EOS token was stripped; None
    when the document does not say (results written before `meta.model_size`)."""
    meta = doc.get("meta", {})
    size = meta.get("model_size")
    if size is None:
        return None
    return f"{size}{'-noeos' if meta.get('strip_eos') else ''}"


def merge(documents: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One results document from several: entries by key (later wins), servers and meta merged.

    Raises ValueError for documents of different models (`model_variant`): their entries share keys and
    their start-up times one `servers` record, so one would silently replace the other; report each
    model on its own."""
    merged: dict[str, Any] = {"schema": 1, "meta": {"invocations": []}, "servers": {}}
    rows: dict[str, dict[tuple[Any, ...], Entry]] = {section: {} for section in SECTIONS}
    models: dict[str, None] = {}
    for doc in documents:
        variant = model_variant(doc)
        if variant is not None:
            models[variant] = None
        if len(models) > 1:
            raise ValueError(f"results of different models ({', '.join(models)}): report each model on its own")
        for section in SECTIONS:
            for entry in doc.get(section, []):
                rows[section][entry_key(section, entry)] = entry
        if doc.get("profile"):
            merged["profile"] = doc["profile"]
        for system, info in doc.get("servers", {}).items():
            merged["servers"].setdefault(system, {}).update(info)
        meta = dict(doc.get("meta", {}))
        invocations = meta.pop("invocations", [])
        merged["meta"].update(meta)
        for invocation in invocations:
            if invocation not in merged["meta"]["invocations"]:
                merged["meta"]["invocations"].append(invocation)
    for section in SECTIONS:
        merged[section] = list(rows[section].values())
    return merged


# -- formatting --------------------------------------------------------------------------------------


def _num(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    return str(value)


def _ms(seconds: Any) -> str:
    return "-" if seconds is None else f"{1000 * float(seconds):,.0f}"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _tokens(entry: Entry) -> tuple[str, str]:
    tokens = entry.get("tokens") or {}
    per = tokens.get("tokens_per_engine_request")
    finished = tokens.get("finished") or {}
    stops = ", ".join(f"{k} {v}" for k, v in sorted(finished.items())) if finished else "-"
    return _num(per, 1), stops


def _system_order(system: str) -> int:
    return {"vllm": 0, "appliance": 1}.get(system, 2)


def _loads(data: dict[str, Any]) -> list[Entry]:
    return sorted(
        data.get("loads", []),
        key=lambda e: (
            str(e.get("format")), int(e.get("concurrency", 0)), gpus_of(e), _system_order(str(e.get("system")))
        ),
    )  # fmt: skip


def _find(data: dict[str, Any], system: str, fmt: str, concurrency: int, gpus: int = 1) -> Entry | None:
    entry: Entry
    for entry in data.get("loads", []):
        if (
            entry.get("system") == system
            and entry.get("format") == fmt
            and entry.get("concurrency") == concurrency
            and gpus_of(entry) == gpus
        ):
            return entry
    return None


def _ceiling(data: dict[str, Any]) -> Entry | None:
    rows = [e for e in data.get("offline", []) if gpus_of(e) == 1]
    return max(rows, key=lambda e: int(e.get("batch", 0))) if rows else None


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b:
        return None
    return float(a) / float(b)


def busy_cell(record: dict[str, Any] | None) -> str:
    """A table cell: each visible GPU's mean kernel-busy % ("84 / 83"), "*" when NVML failed during the
    run (the numbers cover the samples before), "n/a" without NVML, "-" for results without a record."""
    if not record:
        return "-"
    if not record.get("available"):
        return "n/a"
    cells = " / ".join(_num(g.get("busy_mean")) for g in record.get("gpus") or [])
    return cells + ("*" if record.get("error") else "")


def busy_notes(entries: Iterable[Entry]) -> str:
    """What a table's "n/a" and "*" GPU busy cells mean, each reason once with how many runs it covers."""
    reasons: dict[str, int] = {}
    for e in entries:
        record = e.get("gpu_busy") or {}
        if record and not record.get("available"):
            reason = f"n/a: {record.get('reason')}"
        elif record.get("error"):
            reason = f"*: NVML failed during the run ({record['error']})"
        else:
            continue
        reasons[reason] = reasons.get(reason, 0) + 1
    return "\n".join(f"GPU busy {reason} ({count} run{'s' if count != 1 else ''})" for reason, count in reasons.items())


def _with_notes(text: str, entries: Iterable[Entry]) -> str:
    notes = busy_notes(entries)
    return text + ("\n\n" + notes if notes else "")


def _busy_detail(record: dict[str, Any] | None) -> str:
    """A GPU busy record in a target check's numbers."""
    if not record:
        return "no GPU busy record"
    if not record.get("available"):
        return f"GPU busy not available: {record.get('reason')}"
    parts = [
        f"GPU{g.get('index')} {_num(g.get('busy_mean'), 1)}% (p50 {_num(g.get('busy_p50'))}%, "
        f"0% in {_num(100 * float(g['busy_zero_share']))}% of {g.get('samples')} samples)"
        if g.get("busy_zero_share") is not None
        else f"GPU{g.get('index')}: no sample"
        for g in record.get("gpus") or []
    ]
    if record.get("error"):
        parts.append(f"NVML error: {record['error']}")
    return "; ".join(parts)


# -- sections ----------------------------------------------------------------------------------------


def section_meta(data: dict[str, Any]) -> str:
    meta = data.get("meta", {})
    invocations = meta.get("invocations", [])
    gpus = sorted({"; ".join(i.get("gpu") or ["no GPU"]) for i in invocations})
    versions = sorted({str(i.get("vllm_version")) for i in invocations if i.get("vllm_version")})
    lines = [
        f"- GPU: {', '.join(gpus) or '-'}; vLLM {', '.join(versions) or '-'}; model {meta.get('model_size', '-')} "
        f"(dummy weights); {meta.get('max_new_tokens', '-')} output tokens per {meta.get('clip_seconds', '-')} s clip; "
        f"gpu_memory_utilization {meta.get('gpu_memory_utilization', '-')}, max_num_seqs {meta.get('max_num_seqs', '-')}"
        + ("; model directory without EOS token" if meta.get("strip_eos") else "")
        + ("; **dry run (test doubles, no GPU): the numbers mean nothing**" if meta.get("dry_run") else ""),
    ]
    for system, info in sorted(data.get("servers", {}).items(), key=lambda kv: _system_order(kv[0])):
        facts = [f"start-up {info['startup_seconds']} s" if "startup_seconds" in info else None]
        if facts[0] and "cache_state" in info:
            facts[0] += f" (vLLM cache {info['cache_state']})"
        by_state = [f"{state} {info[f'startup_seconds_{state}']} s" for state in CACHE_STATES
                    if f"startup_seconds_{state}" in info]  # fmt: skip
        facts.append(f"start-ups by cache state: {', '.join(by_state)}" if by_state else None)
        facts.append(f"KV cache {info['kv_cache_tokens']} tokens" if "kv_cache_tokens" in info else None)
        facts.append(f"error: {info['error']}" if "error" in info else None)
        facts.append(f"warning: {info['warning']}" if "warning" in info else None)
        queue = (info.get("status") or {}).get("queue") or {}
        if "max_concurrent_requests" in queue:
            facts.append(f"admission limit {queue['max_concurrent_requests']} (/status)")
        lines.append(f"- {system}: " + "; ".join(f for f in facts if f))
        if "overrides" in info:
            lines.append(f"- {system} runs with its shipped defaults except:")
            lines += [f"  - `{key}={o['value']}`: {o['why']}" for key, o in sorted(info["overrides"].items())]
    return "\n".join(lines)


def section_loads(data: dict[str, Any]) -> str:
    rows = []
    for e in _loads(data):
        per, finished = _tokens(e)
        rows.append(
            [
                str(e.get("system")),
                str(e.get("format")),
                str(e.get("concurrency")),
                f"{e.get('ok')}/{e.get('requests')}",
                _num(e.get("throughput")),
                _num(e.get("p50"), 3),
                _num(e.get("p95"), 3),
                _num(e.get("errors")),
                per,
                finished,
                _num((e.get("tokens") or {}).get("prompt_tokens_cached")),
                _num(e.get("client_cpu_fraction"), 2),
                busy_cell(e.get("gpu_busy")),
            ]
        )
    headers = ["system", "format", "concurrency", "ok/requests", "audio-s/s", "p50 s", "p95 s", "errors",
               "tokens/req", "finished", "cached prompt tokens", "client CPU", "GPU busy %"]  # fmt: skip
    text = _with_notes(table(headers, rows), _loads(data))
    busy = [e for e in data.get("loads", []) if float(e.get("client_cpu_fraction") or 0.0) > CLIENT_CPU_WARNING]
    if busy:
        text += (
            f"\n\n**Warning:** the client used more than {CLIENT_CPU_WARNING:.0%} of a core in "
            f"{len(busy)} run(s): there the client, not the server, may set the pace."
        )
    return text


def section_compare(data: dict[str, Any]) -> str:
    rows = []
    keys = sorted({(str(e.get("format")), int(e.get("concurrency", 0)), gpus_of(e)) for e in data.get("loads", [])})
    for fmt, n, gpus in keys:
        app, ref = _find(data, "appliance", fmt, n, gpus), _find(data, "vllm", fmt, n, gpus)
        if not app or not ref:
            continue
        speed = _ratio(app.get("throughput"), ref.get("throughput"))
        p50 = _ratio(app.get("p50"), ref.get("p50"))
        label = str(n) if gpus == 1 else f"{n} ({gpus} GPUs)"
        rows.append(
            [fmt, label, _num(app.get("throughput")), _num(ref.get("throughput")),
             _num(speed, 2) + "x" if speed else "-", _num(app.get("p50"), 3), _num(ref.get("p50"), 3),
             _num(p50, 2) + "x" if p50 else "-"]
        )  # fmt: skip
    if not rows:
        return "(needs both systems)"
    return table(["format", "concurrency", "appliance audio-s/s", "vllm serve audio-s/s", "speed-up",
                  "appliance p50 s", "vllm serve p50 s", "p50 ratio"], rows)  # fmt: skip


def section_long(data: dict[str, Any]) -> str:
    rows = []
    entries = sorted(
        data.get("long_files", []),
        key=lambda e: (float(e.get("audio_seconds", 0)), str(e.get("format")), _system_order(str(e.get("system")))),
    )
    for e in entries:
        per, finished = _tokens(e)
        rows.append(
            [str(e.get("system")), str(e.get("format")), _num(e.get("audio_seconds")),
             _num((e.get("bytes") or 0) / 2**20, 1), _num(e.get("wall_seconds"), 3), _num(e.get("rtf"), 5),
             _num(e.get("throughput")), per, finished, "ok" if e.get("ok") else f"failed {e.get('error_kinds')}",
             busy_cell(e.get("gpu_busy"))]
        )  # fmt: skip
    if not rows:
        return "(none)"
    return _with_notes(
        table(["system", "format", "audio s", "MiB", "wall s", "RTF", "audio-s/s", "tokens/req", "finished",
               "outcome", "GPU busy %"], rows),
        entries,
    )  # fmt: skip


def section_offline(data: dict[str, Any]) -> str:
    rows = []
    entries = sorted(data.get("offline", []), key=lambda e: (gpus_of(e), int(e.get("batch", 0))))
    for e in entries:
        repeats = ", ".join(_num(r.get("throughput")) for r in e.get("repeats", []))
        batch = str(e.get("batch")) if gpus_of(e) == 1 else f"{e.get('batch')} ({gpus_of(e)} GPUs)"
        rows.append(
            [batch, _num(e.get("throughput")), _num(e.get("throughput_median")),
             _num(e.get("wall_seconds"), 3), _num(e.get("tokens_per_request"), 1), repeats,
             busy_cell(e.get("gpu_busy"))]
        )  # fmt: skip
    if not rows:
        return "(not measured)"
    return _with_notes(
        table(["batch", "best audio-s/s", "median audio-s/s", "wall s (best)", "tokens/req", "repeats",
               "GPU busy % (best)"], rows),
        entries,
    )  # fmt: skip


def section_gpu_busy(data: dict[str, Any]) -> str:
    """Every run's GPU busy record, one row per GPU: the numbers behind the tables' GPU busy column."""
    rows = []
    runs: list[tuple[str, str, Entry]] = [
        (str(e.get("system")), f"{e.get('format')} c={e.get('concurrency')}", e) for e in _loads(data)
    ] + [
        (str(e.get("system")), f"{e.get('format')} {_num(e.get('audio_seconds'))} s file", e)
        for e in data.get("long_files", [])
    ] + [("offline", f"batch {e.get('batch')}", e) for e in data.get("offline", [])]  # fmt: skip
    for system, label, e in runs:
        record = e.get("gpu_busy") or {}
        if not record.get("available"):
            continue
        for g in record.get("gpus") or []:
            zero = g.get("busy_zero_share")
            rows.append(
                [system, label, f"{g.get('index')} {g.get('name', '')}".strip(), _num(g.get("samples")),
                 _num(g.get("busy_mean"), 1), _num(g.get("busy_p50"), 1),
                 _num(100 * float(zero), 1) if zero is not None else "-",
                 f"{_num(g.get('memory_used_mib_max'))} / {_num(g.get('memory_total_mib'))}",
                 str(g.get("error") or "")]
            )  # fmt: skip
    if not rows:
        notes = busy_notes(e for _, _, e in runs)
        return notes or "(not sampled)"
    first = next(e["gpu_busy"] for _, _, e in runs if (e.get("gpu_busy") or {}).get("available"))
    text = (
        f"Kernel-busy % of each GPU the servers could see ({first.get('method')} every "
        f"{first.get('interval_seconds')} s from the first request to the last answer; each value covers the "
        "driver's last sample period, 1/6 s to 1 s).\n\n"
    )
    headers = ["system", "run", "GPU", "samples", "busy % mean", "busy % p50", "% of samples at 0 %",
               "memory used MiB (max / total)", "NVML error"]  # fmt: skip
    return _with_notes(text + table(headers, rows), (e for _, _, e in runs))


def section_stages(data: dict[str, Any]) -> str:
    rows = []
    for e in _loads(data):
        stages = e.get("stages")
        if e.get("system") != "appliance" or not stages:
            continue
        cells = []
        accounted = 0.0
        for stage in ("decode", "queue", "engine", "response"):
            s = stages.get(stage) or {}
            mean = s.get("mean_ms")
            accounted += float(mean or 0.0)
            cells.append(f"{_num(mean, 1)} / {_num(s.get('p95_ms'), 1)}")
        client_mean = e.get("mean")
        other = 1000 * float(client_mean) - accounted if client_mean is not None else None
        rows.append([str(e.get("format")), str(e.get("concurrency")), *cells, _ms(client_mean), _num(other, 1)])
    if not rows:
        return "(no appliance stage metrics)"
    headers = ["format", "concurrency", "decode ms (mean / p95)", "queue ms", "engine ms", "response ms",
               "client latency ms (mean)", "outside the stages ms"]  # fmt: skip
    return table(headers, rows)


def section_profile(data: dict[str, Any]) -> str:
    profile = data.get("profile")
    if not profile:
        return ""
    load = profile.get("load", {})
    rows = [
        [name, _num(lag.get("probes")), _num(lag.get("p50_ms"), 1), _num(lag.get("p99_ms"), 1), _num(lag.get("max_ms"), 1)]
        for name, lag in (("idle", profile.get("loop_lag_idle", {})), ("under load", profile.get("loop_lag_under_load", {})))
    ]  # fmt: skip
    text = table(["appliance /health latency", "probes", "p50 ms", "p99 ms", "max ms"], rows)
    text += (
        f"\n\nLoad during the probe: {load.get('format')} at concurrency {load.get('concurrency')}, "
        f"{_num(load.get('throughput'))} audio-s/s. " + " ".join(profile.get("notes", []))
    )
    return "## Event-loop lag (profile run)\n\n" + text


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def target_checks(data: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """(target, passed or None when not measured, the numbers) for each of the issue's targets, one GPU
    unless said otherwise; then the earlier issue's relative targets and the run's own sanity checks."""
    checks: list[tuple[str, bool | None, str]] = []
    formats = sorted({str(e.get("format")) for e in data.get("loads", [])}) or [TARGET_LONG_FORMAT]
    ceiling = _ceiling(data)
    for fmt in formats:
        checks.append(_throughput_check(data, fmt, 256, TARGET_C256_THROUGHPUT))
        checks.append(_busy_check(data, fmt, 256))
        checks.append(_throughput_check(data, fmt, 64, TARGET_C64_THROUGHPUT))
        checks.append(_c1_check(data, fmt))
        checks.append(_long_check(data, fmt))
        checks.append(_scaling_check(data, fmt))
    checks += startup_checks(data)
    for fmt in formats:
        app, ref = _find(data, "appliance", fmt, 64), _find(data, "vllm", fmt, 64)
        name = f"c=64 {fmt}: appliance >= {TARGET_C64_SPEEDUP}x vllm serve (earlier issue)"
        if app and ref:
            ratio = _ratio(app.get("throughput"), ref.get("throughput")) or 0.0
            checks.append(
                (name, ratio >= TARGET_C64_SPEEDUP,
                 f"{_num(app.get('throughput'))} vs {_num(ref.get('throughput'))} audio-s/s = {ratio:.2f}x"),
            )  # fmt: skip
        else:
            checks.append((name, None, "not measured"))
        app = _find(data, "appliance", fmt, 256)
        name = f"c=256 {fmt}: appliance >= {TARGET_CEILING_SHARE:.0%} of offline ceiling (earlier issue)"
        if app and ceiling:
            share = _ratio(app.get("throughput"), ceiling.get("throughput")) or 0.0
            checks.append(
                (name, share >= TARGET_CEILING_SHARE,
                 f"{_num(app.get('throughput'))} vs {_num(ceiling.get('throughput'))} audio-s/s = {share:.0%}"),
            )  # fmt: skip
        else:
            checks.append((name, None, "not measured"))
    checks.append(output_length_check(data))
    errors = sum(int(e.get("errors", 0)) for e in data.get("loads", [])) + sum(
        0 if e.get("ok") else 1 for e in data.get("long_files", [])
    )
    measured = bool(data.get("loads") or data.get("long_files"))
    checks.append(("no failed requests", errors == 0 if measured else None, f"{errors} failed"))
    return checks


def _throughput_check(data: dict[str, Any], fmt: str, concurrency: int, target: float) -> tuple[str, bool | None, str]:
    name = f"c={concurrency} {fmt}: appliance >= {target:,.0f} audio-s/s"
    app = _find(data, "appliance", fmt, concurrency)
    if not app or app.get("throughput") is None:
        return (name, None, "not measured")
    return (name, float(app["throughput"]) >= target, f"{_num(app['throughput'])} audio-s/s")


def _busy_check(data: dict[str, Any], fmt: str, concurrency: int) -> tuple[str, bool | None, str]:
    name = f"c={concurrency} {fmt}: GPU kernel-busy >= {TARGET_GPU_BUSY:.0f}% under the appliance"
    app = _find(data, "appliance", fmt, concurrency)
    if not app:
        return (name, None, "not measured")
    record = app.get("gpu_busy")
    busy = (record or {}).get("busy_mean") if (record or {}).get("available") else None
    if busy is None:
        return (name, None, f"not measured: {_busy_detail(record)}")
    return (name, float(busy) >= TARGET_GPU_BUSY, _busy_detail(record))


def _c1_check(data: dict[str, Any], fmt: str) -> tuple[str, bool | None, str]:
    name = f"c=1 {fmt}: appliance p50 <= vllm serve p50"
    app, ref = _find(data, "appliance", fmt, 1), _find(data, "vllm", fmt, 1)
    if not (app and ref and app.get("p50") is not None and ref.get("p50") is not None):
        return (name, None, "not measured")
    limit = float(ref["p50"]) * TARGET_C1_P50_RATIO
    ratio = float(app["p50"]) / float(ref["p50"]) if ref["p50"] else math.inf
    return (name, float(app["p50"]) <= limit, f"{float(app['p50']):.3f} s vs {float(ref['p50']):.3f} s = {ratio:.2f}x")


def _long_check(data: dict[str, Any], fmt: str) -> tuple[str, bool | None, str]:
    limit = TARGET_LONG_WALL if fmt == TARGET_LONG_FORMAT else TARGET_LONG_WALL_OTHER
    name = f"one {TARGET_LONG_SECONDS:g} s {fmt} file <= {limit:g} s" + (
        "" if fmt == TARGET_LONG_FORMAT else " (earlier issue)"
    )
    longs = [
        e for e in data.get("long_files", [])
        if e.get("system") == "appliance" and e.get("format") == fmt and gpus_of(e) == 1
        and float(e.get("audio_seconds", 0)) == TARGET_LONG_SECONDS
    ]  # fmt: skip
    if not longs:
        return (name, None, "not measured")
    walls = [float(e["wall_seconds"]) for e in longs if e.get("wall_seconds") is not None]
    best = min(walls, default=None)
    detail = f"{_num(best, 3)} s" + (f" (best of {len(walls)})" if len(walls) > 1 else "")
    return (name, best is not None and best <= limit, detail)


def _scaling_check(data: dict[str, Any], fmt: str) -> tuple[str, bool | None, str]:
    n = TARGET_SCALING_CONCURRENCY
    name = f"c={n} {fmt}: appliance on 2 GPUs >= {TARGET_SCALING}x its 1-GPU throughput"
    one, two = _find(data, "appliance", fmt, n, 1), _find(data, "appliance", fmt, n, 2)
    if not (one and two and one.get("throughput") and two.get("throughput") is not None):
        return (name, None, "not measured")
    ratio = float(two["throughput"]) / float(one["throughput"])
    return (
        name,
        ratio >= TARGET_SCALING,
        f"{_num(two['throughput'])} vs {_num(one['throughput'])} audio-s/s = {ratio:.2f}x; "
        f"per GPU {_num(float(two['throughput']) / 2)} audio-s/s; 2 GPUs: {_busy_detail(two.get('gpu_busy'))}",
    )


def startup_checks(data: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """Start-up to ready, appliance vs vllm serve, per cache state the results carry
    (`startup_seconds_cold` / `_warm`); without any, the plain `startup_seconds`, said to be unpaired."""
    servers = data.get("servers", {})
    app, ref = servers.get("appliance") or {}, servers.get("vllm") or {}
    states = [s for s in CACHE_STATES if f"startup_seconds_{s}" in app or f"startup_seconds_{s}" in ref]
    pairs = [(f"{s} cache", f"startup_seconds_{s}", "") for s in states] or [
        ("cache state not recorded", "startup_seconds", "; the two may not have started from the same cache state")
    ]
    checks: list[tuple[str, bool | None, str]] = []
    for label, key, caveat in pairs:
        name = f"start-up to ready ({label}): appliance <= vllm serve + {TARGET_STARTUP_RATIO - 1:.0%}"
        if app.get(key) is None or ref.get(key) is None:
            have = ", ".join(
                f"{who} {side[key]} s" for who, side in (("appliance", app), ("vllm serve", ref)) if key in side
            )
            checks.append((name, None, "not measured" + (f" (only {have})" if have else "")))
            continue
        limit = float(ref[key]) * TARGET_STARTUP_RATIO
        checks.append(
            (name, float(app[key]) <= limit,
             f"{float(app[key]):.1f} s vs {float(ref[key]):.1f} s (limit {limit:.1f} s){caveat}")
        )  # fmt: skip
    return checks


def output_length_check(data: dict[str, Any]) -> tuple[str, bool | None, str]:
    """Every engine request of every run generated exactly max_new_tokens tokens (none stopped early)."""
    expected = data.get("meta", {}).get("max_new_tokens")
    bad: list[str] = []
    seen = 0
    for section in ("loads", "long_files"):
        for e in data.get(section, []):
            tokens = e.get("tokens")
            if not tokens or not tokens.get("engine_requests"):
                continue
            seen += 1
            finished = tokens.get("finished") or {}
            early = sum(v for k, v in finished.items() if k != "length")
            if early or (expected and tokens.get("tokens_per_engine_request") != float(expected)):
                label = f"{e.get('system')} {e.get('format')} " + (
                    f"c={e.get('concurrency')}" if section == "loads" else f"{e.get('audio_seconds')} s"
                )
                bad.append(f"{label}: {tokens.get('tokens_per_engine_request')} tokens/req, finished {finished}")
    name = f"same output length everywhere ({expected} tokens per engine request, no early stop)"
    if not seen:
        return (name, None, "no vLLM token counters seen")
    return (name, not bad, "; ".join(bad) if bad else f"{seen} runs checked")


def section_checks(data: dict[str, Any]) -> str:
    return table(
        ["target", "result", "numbers"], ([name, _verdict(ok), detail] for name, ok, detail in target_checks(data))
    )


def render(data: dict[str, Any]) -> str:
    parts = [
        "# qwenasr-appliance benchmark",
        section_meta(data),
        "## Targets",
        section_checks(data),
        "## 30 s clips: throughput and latency",
        section_loads(data),
        "## Appliance vs vllm serve",
        section_compare(data),
        "## Long files (one request, concurrency 1)",
        section_long(data),
        "## Offline ceiling (vLLM LLM.generate)",
        section_offline(data),
        "## GPU busy per run (NVML)",
        section_gpu_busy(data),
        "## Appliance stage times per request",
        section_stages(data),
    ]
    if data.get("profile"):
        parts.append(section_profile(data))
    return "\n\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="results.json files (later ones win)")
    parser.add_argument("--merged", type=Path, default=None, help="also write the merged results here")
    args = parser.parse_args(argv)
    try:
        data = merge(json.loads(path.read_text()) for path in args.files)
    except ValueError as error:
        parser.error(str(error))
    if args.merged:
        args.merged.write_text(json.dumps(data, indent=1))
    sys.stdout.write(render(data))
    failed = any(ok is False for _, ok, _ in target_checks(data))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
