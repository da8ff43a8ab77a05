"""Benchmark: the batch signal (mutual scoring) and the reference signal, side by side in one run.

    python benchmarks/neighbours.py [--images 32] [--lengths 256 1024] [--d 384] [--repeats 2]
                                    [--store features/synth_a] [--bank-images 16]

For each L (256: a 16x16 grid, 224 px on a /14 backbone; 1024: 32x32, 448 px) and N images it times
:func:`pipeline.method.neighbours.mutual` three ways on the same tokens:

- ``before``: :func:`before_mutual`, the one-sided float32 code the evaluate stage ran for the
  ``mutual`` baseline (every image pair multiplied from both sides): the reference for the speed-ups;
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
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.method import neighbours


def best_of(repeats: int, fn):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def before_mutual(read, n_images: int, length: int, fraction: float = neighbours.MUTUAL_FRACTION, *,
                  device: torch.device | str = "cpu", elements: int = neighbours.BLOCK_ELEMENTS,
                  block: int | None = None) -> np.ndarray:
    """The one-sided float32 mutual scoring the evaluate stage ran before ``neighbours.mutual``: kept
    here, out of the library, as the measured baseline of the batch path's speed-up (whose target,
    >= 4x at 448 px, is still open on this machine's CPUs). Tokens of ``n_images`` images of ``length``
    patches, read through ``read`` -> patch scores (N, L) float32.

    Query images are taken ``b`` at a time (``block``, by default :func:`block_images`) against
    reference images ``b`` at a time, each reference block read again for every query block, so
    ``read`` is never asked for more than ``b`` images and no (N, L, d) array is ever held. Memory: the
    query and one reference block (b, L, d) float32, one (b·L, b·L) block of cosines, the query block's
    (b·L, N) nearest-patch distances (O(b·L·N)) and the (N, L) result. The image's own column is set to
    +inf before the k smallest are taken, so an image never scores against itself.
    """
    n = n_images
    if n < 2:
        raise ValueError(neighbours.ONE_IMAGE)
    k = neighbours.mutual_k(n - 1, fraction)
    b = neighbours.block_images(length, n, elements) if block is None else max(1, min(n, block))

    def unit(i: int, j: int) -> torch.Tensor:
        """Images [i, j), L2-normalised float32 on ``device``, as ((j − i)·L, d)."""
        values = torch.as_tensor(read(i, j))
        if values.ndim != 3 or tuple(values.shape[:2]) != (j - i, length):
            raise ValueError(f"mutual: the reader gave {tuple(values.shape)} for images [{i}, {j}), "
                             f"expected ({j - i}, {length}, d)")
        return F.normalize(values.to(device=device, dtype=torch.float32), dim=-1).reshape((j - i) * length, -1)

    out = np.empty((n, length), dtype=np.float32)
    for qa in range(0, n, b):
        qb = min(qa + b, n)
        query = unit(qa, qb)  # (bq·L, d)
        nearest = torch.empty(len(query), n, dtype=torch.float32, device=query.device)  # (bq·L, N)
        for ra in range(0, n, b):
            rb = min(ra + b, n)
            reference = query if ra == qa else unit(ra, rb)  # (br·L, d): the query block is its own diagonal
            cos = query @ reference.T  # (bq·L, br·L)
            nearest[:, ra:rb] = 1 - cos.reshape(len(query), rb - ra, length).amax(dim=-1)
            del reference, cos
        for i in range(qa, qb):  # an image is no reference for itself
            nearest[(i - qa) * length:(i - qa + 1) * length, i] = math.inf
        smallest = torch.topk(nearest, k, dim=1, largest=False).values  # (bq·L, k)
        out[qa:qb] = smallest.mean(dim=1).reshape(qb - qa, length).cpu().numpy()
    return out


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
        rows["before (one-sided, f32)"] = best_of(args.repeats,
                                                    lambda: before_mutual(read, n, length))
        for name, kw in [("one-sided float32", dict(symmetric=False)), ("symmetric float32", {}),
                         ("symmetric bfloat16", dict(precision="bfloat16"))]:
            rows[name] = best_of(args.repeats, lambda: neighbours.mutual(read, n, length, **kw))
        base_t, base = rows["before (one-sided, f32)"]
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
