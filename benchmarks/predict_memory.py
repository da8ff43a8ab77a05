"""Benchmark: peak RSS of predict on N images vs 8N images, side by side in one run.

    python benchmarks/predict_memory.py [--images 40] [--factor 8] [--detector models/synth_a/detector]
        [--batch-size 8] [--source-size 640 480] [--repeats 2]

Each measurement is a child process; its own peak RSS comes from ``os.wait4`` (the rusage of that one
child). With ``--detector`` the child is the real command, ``python -m pipeline.predict --detector ...``
(backbone, scoring and all); without it the child runs ``pipeline.cli.predict.predict_files`` with a fake
detector (map = the red channel at 224 x 224, score = its maximum), which measures predict's own part:
the walk over the inputs, decoding, the maps resized to the original size, the two PNGs per image and the
tables. Small and large runs alternate (small, large, small, large, ...).

The large folder holds the small folder's images ``factor`` times over (hard links under other names),
so the two differ only in how many images are streamed. Streaming means memory is bounded by one batch
of decoded images and their maps whatever N is: target growth from N to 8N < 10 %.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


class RedDetector:
    """The Detector contract's predict / threshold / info, without a backbone: map = red / 255 at S x S."""

    threshold = 0.5
    image_size = 224
    seeds = [0]
    info = {"format": "fake", "backbone": "none (benchmark fake)"}

    def predict(self, images):
        s = self.image_size
        maps = np.stack([np.asarray(im.resize((s, s), Image.Resampling.BILINEAR))[..., 0] / np.float32(255)
                         for im in images]).astype(np.float32)
        return maps, maps.reshape(len(maps), -1).max(axis=1).astype(np.float64)


def child(images: Path, out: Path, batch_size: int) -> None:
    from pipeline.cli.predict import predict_files

    predict_files([images], RedDetector(), out, batch_size=batch_size)


def peak_rss_mib(cmd: list[str]) -> float:
    """Run ``cmd``; the child's own peak RSS in MiB (Linux: ru_maxrss in KiB)."""
    env = {**os.environ, "TQDM_DISABLE": "1", "SPG_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {os.waitstatus_to_exitcode(status)}")
    return usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40, help="N, images of the small run")
    parser.add_argument("--factor", type=int, default=8, help="the large run scores factor x N images")
    parser.add_argument("--detector", type=Path, default=None, help="a real detector folder (default: a fake)")
    parser.add_argument("--device", default="auto", help="with --detector")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--source-size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=2, type=Path, metavar=("IMAGES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.batch_size)
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        small, large = tmp / "small", tmp / "large"
        small.mkdir(), large.mkdir()
        w, h = args.source_size
        for i in range(args.images):
            blobs = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
            blobs.save(small / f"{i:04d}.png")
            for k in range(args.factor):
                os.link(small / f"{i:04d}.png", large / f"{k:02d}_{i:04d}.png")

        def command(images: Path, out: Path) -> list[str]:
            if args.detector is None:
                return [sys.executable, __file__, "--child", str(images), str(out), "--batch-size", str(args.batch_size)]
            return [sys.executable, "-m", "pipeline.cli.predict", "--detector", str(args.detector), str(images),
                    "--out", str(out), "--batch-size", str(args.batch_size), "--device", args.device]

        n_small, n_large = args.images, args.images * args.factor
        rows = []
        for rep in range(args.repeats):
            a = peak_rss_mib(command(small, tmp / f"out_small_{rep}"))
            b = peak_rss_mib(command(large, tmp / f"out_large_{rep}"))
            rows.append((a, b))
            print(f"repeat {rep}: peak RSS {n_small} images {a:7.1f} MiB   {n_large} images {b:7.1f} MiB   "
                  f"growth {100 * (b / a - 1):+.1f} %", flush=True)

    a = statistics.median(r[0] for r in rows)
    b = statistics.median(r[1] for r in rows)
    what = f"python -m pipeline.predict --detector {args.detector}" if args.detector else "predict_files, fake detector"
    print(f"\n{what}; images {w}x{h} PNG, batch {args.batch_size}")
    print(f"median peak RSS: {n_small} images {a:.1f} MiB | {n_large} images {b:.1f} MiB | "
          f"growth {100 * (b / a - 1):+.1f} % (target < 10 %)")


if __name__ == "__main__":
    main()
