"""Decode + resample speed of `decode_audio` on a pinned number of cores.

    python bench/decode_speed.py --minutes 10 --format mp3 --threads 1
    python bench/decode_speed.py --minutes 10 --format mp3,wav,flac,m4a,ogg,webm

Synthesises N minutes of 44.1 kHz stereo speech-like audio (48 kHz for Opus), encodes it, then
decodes it in a fresh child process pinned to `--threads` CPUs with every thread pool limited to
that many threads, so the peak RSS reported is the decoder's own (interpreter and libraries, input
bytes, output and decoder state), not the synthesiser's. Linux only (reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def limit_threads(threads: int) -> None:
    """Must run before numpy, soxr or av are imported."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))[:threads]
        os.sched_setaffinity(0, cpus)


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB.

    VmHWM rather than getrusage: ru_maxrss survives exec, so a child would report the peak of the
    parent it was forked from.
    """
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def child(path: Path, filename: str, repeat: int, threads: int) -> None:
    limit_threads(threads)
    sys.path.insert(0, str(REPO / "src"))
    from qwenasr_appliance.audio.decode import decode_audio

    data = path.read_bytes()
    baseline, _ = rss_mib()
    walls, cpus = [], []
    decoded = None
    for _ in range(repeat):
        decoded = None  # drop the previous result before the next run
        started, started_cpu = time.perf_counter(), time.process_time()
        decoded = decode_audio(data, filename, max_seconds=24 * 3600)
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - started_cpu)
    assert decoded is not None
    _, peak = rss_mib()
    print(
        json.dumps(
            {
                "audio_seconds": decoded.duration_seconds,
                "wall_seconds": min(walls),
                "cpu_seconds": min(cpus),
                "baseline_rss_mib": baseline,
                "peak_rss_mib": peak,
                "output_mib": decoded.samples.nbytes / 2**20,
                "decoder": decoded.decoder,
                "codec": decoded.codec,
            }
        )
    )


def synthesise(fmt: str, minutes: float, directory: Path) -> Path:
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "src"))
    from tests.audio_fixtures import encode, speech_like

    rate = 44100
    signal = speech_like(minutes * 60, rate, channels=2)
    path = directory / f"speech-{minutes:g}min.{fmt}"
    path.write_bytes(encode(signal, rate, fmt))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument(
        "--format", default="mp3", help="one or more of wav,flac,mp3,ogg,opus,m4a,webm,... (comma list)"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPUs the decoding process may use")
    parser.add_argument("--repeat", type=int, default=3, help="decodes per format; the fastest is reported")
    parser.add_argument("--json", action="store_true", help="print one JSON object per format")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--filename", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.filename, args.repeat, args.threads)
        return

    with tempfile.TemporaryDirectory() as tmp:
        if not args.json:
            print(f"{args.minutes:g} min of 44.1 kHz stereo speech-like audio, {args.threads} thread(s)")
            print(
                f"{'format':8} {'size MiB':>8} {'decode s':>9} {'cpu s':>7} {'audio s/s':>10} {'peak RSS':>9}  decoder"
            )
        for fmt in args.format.split(","):
            path = synthesise(fmt, args.minutes, Path(tmp))
            result = subprocess.run(
                [
                    *(sys.executable, __file__, "--child", str(path), "--filename", path.name),
                    *("--repeat", str(args.repeat), "--threads", str(args.threads)),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            stats = json.loads(result.stdout.strip().splitlines()[-1])
            stats.update(format=fmt, size_mib=path.stat().st_size / 2**20, minutes=args.minutes, threads=args.threads)
            stats["audio_seconds_per_second"] = stats["audio_seconds"] / stats["wall_seconds"]
            if args.json:
                print(json.dumps(stats))
            else:
                print(
                    f"{fmt:8} {stats['size_mib']:8.1f} {stats['wall_seconds']:9.2f} {stats['cpu_seconds']:7.2f} "
                    f"{stats['audio_seconds_per_second']:10.0f} {stats['peak_rss_mib']:8.0f}M  "
                    f"{stats['decoder']} ({stats['codec']}; baseline RSS {stats['baseline_rss_mib']:.0f}M, "
                    f"output {stats['output_mib']:.0f}M)"
                )


if __name__ == "__main__":
    main()
