"""Benchmark: predict's images/s with reference normals and with the batch, beside zero-shot predict.

    python benchmarks/predict_signals.py --detector models/synth_a/detector [--image-sizes 224 448]
        [--images 32] [--normals 16] [--batch-size 8] [--repeats 3]

Per image size and repeat, interleaved so machine noise hits every mode alike, the whole
``predict_files`` (decode, backbone, scoring, the PNGs and scores.csv) on the same ``--images`` files:

- **zero-shot**: the guides alone (the default);
- **reference**: ``--normals`` known-good images scored against (built from their files in each run,
  as ``predict --normals`` does: their forward is part of the cost), fused with the guides;
- **batch**: ``--batch``, the inputs scoring each other, fused with the guides.

Prints images/s of each and the ratios to zero-shot (the target: reference >= 0.8 x zero-shot at
224 px) and the batch mode's cost per image. Random smooth images: the speed does not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from predict_throughput import detector_at, write_images

from pipeline.cli.predict import Options, predict_files
from pipeline.launch import resolve_device
from pipeline.method.detector import Detector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", required=True, type=Path)
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--normals", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--source-size", type=int, nargs=2, default=[320, 240], metavar=("W", "H"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_images(tmp / "images", args.images, tuple(args.source_size))
        write_images(tmp / "normals", args.normals, tuple(args.source_size), seed=1)
        modes = {"zero-shot": Options(batch_size=args.batch_size),
                 "reference": Options(batch_size=args.batch_size, reference_normals=(str(tmp / "normals"),)),
                 "batch": Options(batch_size=args.batch_size, batch=True)}
        for size in args.image_sizes:
            detector = Detector.load(detector_at(args.detector, size, tmp), device=str(device))
            rates: dict[str, list[float]] = {m: [] for m in modes}
            predict_files([tmp / "images"], detector, tmp / "warm", modes["zero-shot"])
            for rep in range(args.repeats):
                for mode, opts in modes.items():
                    t0 = time.perf_counter()
                    predict_files([tmp / "images"], detector, tmp / f"out_{size}_{mode}_{rep}", opts)
                    rates[mode].append(args.images / (time.perf_counter() - t0))
                print(f"{size}px repeat {rep}: " + "   ".join(f"{m} {r[-1]:7.2f} img/s" for m, r in rates.items()),
                      flush=True)
            zero = rates["zero-shot"]
            for mode in ("reference", "batch"):
                ratio = statistics.median(a / b for a, b in zip(rates[mode], zero))
                print(f"{size}px {mode}: median {statistics.median(rates[mode]):.2f} img/s, "
                      f"{ratio:.3f} x zero-shot ({args.images} images"
                      f"{f', {args.normals} normals' if mode == 'reference' else ''}); "
                      f"{1000 / statistics.median(rates[mode]):.1f} ms per image", flush=True)


if __name__ == "__main__":
    main()
