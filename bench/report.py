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

# The targets (H100, 1.7B, bf16).
TARGET_C64_SPEEDUP = 1.5  # appliance c=64 throughput >= 1.5 x vllm serve's
TARGET_CEILING_SHARE = 0.8  # appliance c=256 throughput >= 80 % of the offline ceiling
TARGET_C1_P50_SLACK = 1.05  # appliance c=1 p50 <= vllm serve's p50 + 5 %
TARGET_LONG_SECONDS = 488.0
TARGET_LONG_WALL = 1.0  # one 488 s file in <= 1.0 s
CLIENT_CPU_WARNING = 0.8  # the client is one Python process: near a full core it may be the bottleneck

Entry = dict[str, Any]


def entry_key(section: str, entry: Entry) -> tuple[Any, ...]:
    if section == "loads":
        return (entry.get("system"), entry.get("format"), entry.get("concurrency"))
    if section == "long_files":
        return (entry.get("system"), entry.get("format"), entry.get("audio_seconds"), entry.get("index", 0))
    if section == "offline":
        return (entry.get("batch"),)
    raise ValueError(f"unknown section {section!r}")


def merge(documents: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One results document from several: entries by key (later wins), servers and meta merged."""
    merged: dict[str, Any] = {"schema": 1, "meta": {"invocations": []}, "servers": {}}
    rows: dict[str, dict[tuple[Any, ...], Entry]] = {section: {} for section in SECTIONS}
    for doc in documents:
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
        key=lambda e: (str(e.get("format")), int(e.get("concurrency", 0)), _system_order(str(e.get("system")))),
    )


def _find(data: dict[str, Any], system: str, fmt: str, concurrency: int) -> Entry | None:
    entry: Entry
    for entry in data.get("loads", []):
        if entry.get("system") == system and entry.get("format") == fmt and entry.get("concurrency") == concurrency:
            return entry
    return None


def _ceiling(data: dict[str, Any]) -> Entry | None:
    rows = data.get("offline", [])
    return max(rows, key=lambda e: int(e.get("batch", 0))) if rows else None


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b:
        return None
    return float(a) / float(b)


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
            ]
        )
    headers = ["system", "format", "concurrency", "ok/requests", "audio-s/s", "p50 s", "p95 s", "errors",
               "tokens/req", "finished", "cached prompt tokens", "client CPU"]  # fmt: skip
    text = table(headers, rows)
    busy = [e for e in data.get("loads", []) if float(e.get("client_cpu_fraction") or 0.0) > CLIENT_CPU_WARNING]
    if busy:
        text += (
            f"\n\n**Warning:** the client used more than {CLIENT_CPU_WARNING:.0%} of a core in "
            f"{len(busy)} run(s): there the client, not the server, may set the pace."
        )
    return text


def section_compare(data: dict[str, Any]) -> str:
    rows = []
    keys = sorted({(str(e.get("format")), int(e.get("concurrency", 0))) for e in data.get("loads", [])})
    for fmt, n in keys:
        app, ref = _find(data, "appliance", fmt, n), _find(data, "vllm", fmt, n)
        if not app or not ref:
            continue
        speed = _ratio(app.get("throughput"), ref.get("throughput"))
        p50 = _ratio(app.get("p50"), ref.get("p50"))
        rows.append(
            [fmt, str(n), _num(app.get("throughput")), _num(ref.get("throughput")),
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
             _num(e.get("throughput")), per, finished, "ok" if e.get("ok") else f"failed {e.get('error_kinds')}"]
        )  # fmt: skip
    if not rows:
        return "(none)"
    return table(["system", "format", "audio s", "MiB", "wall s", "RTF", "audio-s/s", "tokens/req", "finished",
                  "outcome"], rows)  # fmt: skip


def section_offline(data: dict[str, Any]) -> str:
    rows = []
    for e in sorted(data.get("offline", []), key=lambda e: int(e.get("batch", 0))):
        repeats = ", ".join(_num(r.get("throughput")) for r in e.get("repeats", []))
        rows.append(
            [str(e.get("batch")), _num(e.get("throughput")), _num(e.get("throughput_median")),
             _num(e.get("wall_seconds"), 3), _num(e.get("tokens_per_request"), 1), repeats]
        )  # fmt: skip
    if not rows:
        return "(not measured)"
    return table(["batch", "best audio-s/s", "median audio-s/s", "wall s (best)", "tokens/req", "repeats"], rows)


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
    """(target, passed or None when not measured, the numbers) for each of the issue's targets."""
    checks: list[tuple[str, bool | None, str]] = []
    formats = sorted({str(e.get("format")) for e in data.get("loads", [])}) or ["mp3"]
    ceiling = _ceiling(data)
    for fmt in formats:
        app, ref = _find(data, "appliance", fmt, 64), _find(data, "vllm", fmt, 64)
        if app and ref:
            ratio = _ratio(app.get("throughput"), ref.get("throughput")) or 0.0
            checks.append(
                (f"c=64 {fmt}: appliance >= {TARGET_C64_SPEEDUP}x vllm serve", ratio >= TARGET_C64_SPEEDUP,
                 f"{_num(app.get('throughput'))} vs {_num(ref.get('throughput'))} audio-s/s = {ratio:.2f}x"),
            )  # fmt: skip
        else:
            checks.append((f"c=64 {fmt}: appliance >= {TARGET_C64_SPEEDUP}x vllm serve", None, "not measured"))
        app = _find(data, "appliance", fmt, 256)
        if app and ceiling:
            share = _ratio(app.get("throughput"), ceiling.get("throughput")) or 0.0
            checks.append(
                (f"c=256 {fmt}: appliance >= {TARGET_CEILING_SHARE:.0%} of offline ceiling", share >= TARGET_CEILING_SHARE,
                 f"{_num(app.get('throughput'))} vs {_num(ceiling.get('throughput'))} audio-s/s = {share:.0%}"),
            )  # fmt: skip
        else:
            checks.append(
                (f"c=256 {fmt}: appliance >= {TARGET_CEILING_SHARE:.0%} of offline ceiling", None, "not measured")
            )
        app, ref = _find(data, "appliance", fmt, 1), _find(data, "vllm", fmt, 1)
        if app and ref and app.get("p50") is not None and ref.get("p50") is not None:
            limit = float(ref["p50"]) * TARGET_C1_P50_SLACK
            checks.append(
                (f"c=1 {fmt}: appliance p50 <= vllm serve p50 + 5%", float(app["p50"]) <= limit,
                 f"{float(app['p50']):.3f} s vs {float(ref['p50']):.3f} s (limit {limit:.3f} s)"),
            )  # fmt: skip
        else:
            checks.append((f"c=1 {fmt}: appliance p50 <= vllm serve p50 + 5%", None, "not measured"))
        longs = [
            e for e in data.get("long_files", [])
            if e.get("system") == "appliance" and e.get("format") == fmt and float(e.get("audio_seconds", 0)) == TARGET_LONG_SECONDS
        ]  # fmt: skip
        if longs:
            walls = [e.get("wall_seconds") for e in longs]
            best = min((float(w) for w in walls if w is not None), default=None)
            checks.append(
                (f"one {TARGET_LONG_SECONDS:g} s {fmt} file <= {TARGET_LONG_WALL} s", best is not None and best <= TARGET_LONG_WALL,
                 f"{_num(best, 3)} s"),
            )  # fmt: skip
        else:
            checks.append((f"one {TARGET_LONG_SECONDS:g} s {fmt} file <= {TARGET_LONG_WALL} s", None, "not measured"))
    checks.append(output_length_check(data))
    errors = sum(int(e.get("errors", 0)) for e in data.get("loads", [])) + sum(
        0 if e.get("ok") else 1 for e in data.get("long_files", [])
    )
    measured = bool(data.get("loads") or data.get("long_files"))
    checks.append(("no failed requests", errors == 0 if measured else None, f"{errors} failed"))
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
    data = merge(json.loads(path.read_text()) for path in args.files)
    if args.merged:
        args.merged.write_text(json.dumps(data, indent=1))
    sys.stdout.write(render(data))
    failed = any(ok is False for _, ok, _ in target_checks(data))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
