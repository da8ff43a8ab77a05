"""Benchmark: the cost per image of the ``mutual`` baseline (``pipeline.method.baselines.mutual``).

    python benchmarks/mutual.py [--images 16 32] [--d 384] [--repeats 2] [--device cpu] [--old]

Data (seeded): a category of N images of random tokens, L = 256 (DINOv2-S/14 at 224 px, a 16x16 grid)
and L = 1024 (448 px, 32x32), width d. Mutual scoring compares every image with every other one,
(N − 1) matmuls of (L, d) x (d, L) per image, so the time per image grows linearly with N (and with
L²): the printed ``ms/image`` divided by N − 1 (``ms/image/other``) should stay about constant.
Printed times are the best of ``--repeats``.

``--old`` also times :func:`old_mutual`, the in-memory code (the whole category
cast to float32 and normalised at once), on the same tokens, and prints old / new (target >= 0.8: the
streamed version reads, casts and normalises each reference block again for every query block).
:func:`old_mutual` is also the old path of ``benchmarks/evaluate_memory.py``.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from pipeline.method import baselines


def old_mutual(tokens, fraction: float = baselines.MUTUAL_FRACTION, *, device="cpu",
               elements: int = baselines.BLOCK_ELEMENTS) -> np.ndarray:
    """The in-memory ``baselines.mutual``: tokens (N, L, d) -> (N, L) float32, holding
    the whole category's normalised tokens (N, L, d) float32."""
    tokens = torch.as_tensor(tokens)
    n, length, d = tokens.shape
    if n < 2:
        raise ValueError(baselines.ONE_IMAGE)
    k = baselines.mutual_k(n - 1, fraction)
    unit = torch.nn.functional.normalize(tokens.to(device=device, dtype=torch.float32), dim=-1)  # (N, L, d)
    b = baselines.block_images(length, n, elements)
    out = torch.empty(n, length, dtype=torch.float32, device=unit.device)
    for qa in range(0, n, b):
        qb = min(qa + b, n)
        query = unit[qa:qb].reshape(-1, d)  # (bq·L, d)
        nearest = torch.empty(len(query), n, dtype=torch.float32, device=unit.device)  # (bq·L, N)
        for ra in range(0, n, b):
            rb = min(ra + b, n)
            cos = query @ unit[ra:rb].reshape(-1, d).T  # (bq·L, br·L)
            nearest[:, ra:rb] = 1 - cos.reshape(len(query), rb - ra, length).amax(dim=-1)
        for i in range(qa, qb):  # an image is no reference for itself
            nearest[(i - qa) * length:(i - qa + 1) * length, i] = math.inf
        smallest = torch.topk(nearest, k, dim=1, largest=False).values  # (bq·L, k)
        out[qa:qb] = smallest.mean(dim=1).reshape(qb - qa, length)
    return out.cpu().numpy()


def best_time(fn, repeats: int, device: str) -> tuple[float, np.ndarray]:
    """(best seconds of ``repeats`` calls, the last result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[16, 32], help="category sizes N")
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--old", action="store_true", help="also time the pre-streaming in-memory code")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, d = {args.d}")
    print(f"{'px':>4} {'L':>5} {'N':>5} {'ms/image':>10} {'ms/image/other':>15} {'GFLOP/s':>8}"
          + (f" {'old ms/image':>13} {'old/new':>8} {'max |diff|':>10}" if args.old else ""))
    for px, length in ((224, 256), (448, 1024)):
        for n in args.images:
            tokens = torch.from_numpy(rng.standard_normal((n, length, args.d)).astype(np.float16))
            best, new = best_time(lambda: baselines.mutual(tokens, device=args.device), args.repeats, args.device)
            per_image = best / n
            flop = 2 * n * n * length * length * args.d  # the full N x N grid of (L, d) x (d, L), self included
            line = (f"{px:>4} {length:>5} {n:>5} {1e3 * per_image:>10.1f} {1e3 * per_image / (n - 1):>15.2f} "
                    f"{flop / best / 1e9:>8.1f}")
            if args.old:
                old_best, old = best_time(lambda: old_mutual(tokens, device=args.device), args.repeats, args.device)
                line += f" {1e3 * old_best / n:>13.1f} {old_best / best:>8.2f} {float(np.abs(old - new).max()):>10.1e}"
            print(line, flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
