"""Wall time of the server's decode step for one long file: one pass vs pieces across the workers.

    python -m bench.decode_pieces --seconds 488 --format mp3 --workers 1,2,4,8,16

Runs `decoding.AudioDecoder` exactly as the server does (spawned worker processes, shared-memory
files, the same plan), on a synthesised speech-like file from `bench.workload` (44.1 kHz mp3 or 16 kHz
wav, as the side-by-side benchmark sends) or on `--file`. With one worker the file is decoded in one
pass. Reports the fastest of `--repeat` decodes after a warm-up decode, and checks that every result
equals the one-pass decode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from qwenasr_appliance.audio.decode import decode_audio  # noqa: E402
from qwenasr_appliance.audio.decoder_pool import AudioDecoder  # noqa: E402


async def measure(data: bytes, filename: str, workers: int, repeat: int) -> dict[str, object]:
    decoder = AudioDecoder(workers, max_seconds=4 * 3600)
    try:
        await decoder.warm_up()
        result = await decoder.decode(data, filename)  # warm: imports and first-use costs
        walls = []
        for _ in range(repeat):
            started = time.perf_counter()
            result = await decoder.decode(data, filename)
            walls.append(time.perf_counter() - started)
    finally:
        decoder.close()
    reference = decode_audio(data, filename, max_seconds=4 * 3600).samples
    samples = np.asarray(result.audio.samples)
    difference = float(np.abs(samples - reference).max()) if samples.shape == reference.shape else float("inf")
    return {
        "workers": workers,
        "pieces": result.pieces,
        "wall_seconds": round(min(walls), 4),
        "audio_seconds": round(result.audio.duration_seconds, 3),
        "audio_s_per_s": round(result.audio.duration_seconds / min(walls), 1),
        "max_abs_difference": difference,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=488.0)
    parser.add_argument("--format", default="mp3", choices=("mp3", "wav"))
    parser.add_argument("--file", type=Path, default=None, help="decode this file instead of a synthesised one")
    parser.add_argument("--workers", default="1,2,4,8,16", help="decode worker counts to try")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--audio-root", type=Path, default=Path("/tmp/qwenasr-bench/audio"))
    args = parser.parse_args(argv)

    if args.file is None:
        from bench.workload import ensure, long_spec

        path = ensure(args.audio_root, [long_spec(args.format, args.seconds)])[0].path
    else:
        path = args.file
    data = path.read_bytes()
    for workers in (int(w) for w in args.workers.split(",")):
        row = asyncio.run(measure(data, path.name, workers, args.repeat))
        print(json.dumps({"file": path.name, "bytes": len(data), **row}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
