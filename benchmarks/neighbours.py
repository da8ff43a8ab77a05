"""Benchmark: the batch signal (mutual scoring) and the reference signal, side by side in one run.

    python benchmarks/neighbours.py [--images 32] [--lengths 256 1024] [--d 384] [--repeats 2]
                                    [--store features/synth_a] [--bank-images 16]

For each L (256: a 16x16 grid, 224 px on a /14 backbone; 1024: 32x32, 448 px) and N images it times
:func:`pipeline.method.neighbours.mutual` three ways on the same tokens:

- ``baselines.mutual_streamed``: the one-sided float32 code the evaluate stage ran for the ``mutual``
  baseline (every image pair multiplied from both sides): the reference for the speed-ups;
- ``one-sided float32``: ``symmetric=False``, the same algorithm in this module;
- ``symmetric float32``: each pair of image blocks multiplied once, both directions reduced from it;
- ``symmetric bfloat16``: the same in bfloat16 matmuls.

It prints ms per image per other image, the speed-ups over the one-sided path, and the largest
difference of each path from the reference scores (float32 paths: summation order only;
bfloat16: its rounding). Then the reference signal: a batch of 16 query images against the patches of
``--bank-images`` normal images, ms per query image, float32 and bfloat16.

Tokens: random with a shared component (nearest patches close, as in real tokens), or with ``--store``
the first N images of a feature store (real tokens; the store's own L is used). Best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pipeline.method import baselines, neighbours


def best_of(repeats: int, fn):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def random_tokens(n: int, length: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(1, 1, d))
    return (base + 0.7 * rng.normal(size=(n, length, d))).astype(np.float16)


def store_tokens(path: str, n: int) -> np.ndarray:
    import zarr

    tokens = zarr.open_group(path, mode="r")["tokens"]
    return np.asarray(tokens[:n])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--store", help="read the first --images images' tokens from this feature store")
    ap.add_argument("--bank-images", type=int, default=16)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    lengths = [None] if args.store else args.lengths
    for length in lengths:
        tokens = store_tokens(args.store, args.images) if args.store else random_tokens(args.images, length, args.d)
        n, length, d = tokens.shape
        read = lambda i, j: tokens[i:j]  # noqa: E731
        pairs = n * (n - 1)
        rows = {}
        rows["baselines.mutual_streamed"] = best_of(args.repeats,
                                                    lambda: baselines.mutual_streamed(read, n, length))
        for name, kw in [("one-sided float32", dict(symmetric=False)), ("symmetric float32", {}),
                         ("symmetric bfloat16", dict(precision="bfloat16"))]:
            rows[name] = best_of(args.repeats, lambda: neighbours.mutual(read, n, length, **kw))
        base_t, base = rows["baselines.mutual_streamed"]
        print(f"\nmutual, N={n}, L={length}, d={d}")
        for name, (t, out) in rows.items():
            print(f"  {name:26s} {t * 1e3 / pairs:8.3f} ms/image/other  x{base_t / t:5.2f}  "
                  f"max |diff| {np.abs(out - base).max():.2e}")
        bank_n = min(args.bank_images, n - 1)
        bank = tokens[:bank_n].reshape(-1, d)
        query = torch.from_numpy(tokens[bank_n:bank_n + 16])
        t32, r32 = best_of(args.repeats, lambda: neighbours.reference(query, bank))
        t16, r16 = best_of(args.repeats, lambda: neighbours.reference(query, bank, precision="bfloat16"))
        print(f"reference, {len(query)} images vs {bank_n} normal images ({len(bank)} patches):"
              f" float32 {t32 * 1e3 / len(query):.2f} ms/image, bfloat16 {t16 * 1e3 / len(query):.2f} ms/image"
              f" (x{t32 / t16:.2f}), max |diff| {(r16 - r32).abs().max():.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
