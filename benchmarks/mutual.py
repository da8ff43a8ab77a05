"""Benchmark: the cost per image of the ``mutual`` baseline (``pipeline.baselines.mutual``).

    python benchmarks/mutual.py [--images 16 32] [--d 384] [--repeats 2] [--device cpu]

Data (seeded): a category of N images of random tokens, L = 256 (DINOv2-S/14 at 224 px, a 16x16 grid)
and L = 1024 (448 px, 32x32), width d. Mutual scoring compares every image with every other one,
(N − 1) matmuls of (L, d) x (d, L) per image, so the time per image grows linearly with N (and with
L²): the printed ``ms/image`` divided by N − 1 (``ms/image/other``) should stay about constant.
Printed times are the best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pipeline import baselines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[16, 32], help="category sizes N")
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, d = {args.d}")
    print(f"{'px':>4} {'L':>5} {'N':>5} {'ms/image':>10} {'ms/image/other':>15} {'GFLOP/s':>8}")
    for px, length in ((224, 256), (448, 1024)):
        for n in args.images:
            tokens = torch.from_numpy(rng.standard_normal((n, length, args.d)).astype(np.float16))
            best = float("inf")
            for _ in range(args.repeats):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                baselines.mutual(tokens, device=args.device)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
            per_image = best / n
            flop = 2 * n * n * length * length * args.d  # the full N x N grid of (L, d) x (d, L), self included
            print(f"{px:>4} {length:>5} {n:>5} {1e3 * per_image:>10.1f} {1e3 * per_image / (n - 1):>15.2f} "
                  f"{flop / best / 1e9:>8.1f}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
