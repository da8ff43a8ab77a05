"""Benchmark: tokens/s of SAE training streamed from a Zarr store vs the same loop on tokens in memory.

    python benchmarks/sae_stream.py [--images 150] [--epochs 2] [--repeats 7]

Both sides call the same :func:`pipeline.method.sae.train` with the same seed, model and settings; only
``read(chunk)`` differs. "store" is the closure ``pipeline/stages/train_sae.py`` builds over
``store.open_store(...).tokens`` (a Zarr slice per chunk, on the background reader thread); "memory"
slices a float16 numpy array loaded before the clock starts. The store is synthetic (tokens drawn from
N(mu, 1), mu a fixed random vector, cast to float16, 32 images per chunk as extract writes them) and
lives in a temp dir, so the run needs no real features; after the first pass its chunk files sit in
the page cache, as they do in a multi-epoch run.

Two rates per side: ``TrainStats.tokens_per_s`` (time inside the optimisation step only, so it hides
any wait for data) and wall-clock tokens/s over the whole ``train`` call (what a person waits for).
The ratio that counts is wall-clock store / memory. Sides are interleaved (memory, store, memory,
store, ...) so machine noise hits both. Target: median ratio >= 0.90 on 2 cores.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

# tqdm reads TQDM_* when it is imported: set before pipeline imports it, or the bar clutters the table.
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _stores import build_store  # noqa: E402  (this folder is on sys.path when run as a script)
from pipeline.method import sae
from pipeline.features import store  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per image")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--chunk-images", type=int, default=32)
    parser.add_argument("--n-latents", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-images", type=int, default=16)
    parser.add_argument("--buffer-tokens", type=int, default=65_536)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed call")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        build_store(path, args.images, args.tokens, args.dim, args.chunk_images, seed=0)
        features = store.open_store(path)
        c = features.chunk_images

        def read_store(chunk: int) -> np.ndarray:  # exactly the stage's closure
            return features.tokens[chunk * c : (chunk + 1) * c]

        preloaded = features.tokens[:]  # float16 (N, L, d), loaded before any clock starts

        def read_memory(chunk: int) -> np.ndarray:
            return preloaded[chunk * c : (chunk + 1) * c]

        def run(read, epochs: int) -> tuple[float, float]:
            """(TrainStats.tokens_per_s, wall-clock tokens/s) of one ``train`` call on a fresh model."""
            model = sae.TopKSAE(args.dim, args.n_latents, args.k, generator=torch.Generator().manual_seed(0))
            t0 = time.perf_counter()
            stats = sae.train(model, read, features.n_chunks, tokens_per_image=args.tokens,
                              batch_images=args.batch_images, epochs=epochs, lr=1e-3, betas=(0.5, 0.999),
                              k_aux=512, auxk_coef=1 / 32, dead_tokens=200_000,
                              buffer_tokens=args.buffer_tokens, seed=0)
            wall = time.perf_counter() - t0
            return stats.tokens_per_s, stats.tokens_seen / wall

        run(read_memory, 1)  # warm-up: allocator, kernel selection, page cache of the store
        run(read_store, 1)
        rows = []
        for rep in range(args.repeats):
            mem, sto = run(read_memory, args.epochs), run(read_store, args.epochs)
            rows.append((mem, sto))
            print(f"repeat {rep}: memory {mem[1]:7.0f} tok/s wall ({mem[0]:7.0f} step)   "
                  f"store {sto[1]:7.0f} tok/s wall ({sto[0]:7.0f} step)   "
                  f"ratio wall {sto[1] / mem[1]:.3f}  step {sto[0] / mem[0]:.3f}", flush=True)

    med = lambda f: statistics.median(f(r) for r in rows)  # noqa: E731
    print(f"\n{args.images} images x {args.tokens} tokens x {args.dim}, chunks of {args.chunk_images}, "
          f"n_latents {args.n_latents}, k {args.k}, batch {args.batch_images} images, {args.epochs} epoch(s)/call, "
          f"{torch.get_num_threads()} threads")
    print(f"median memory: {med(lambda r: r[0][1]):.0f} tok/s wall, {med(lambda r: r[0][0]):.0f} tok/s step | "
          f"median store: {med(lambda r: r[1][1]):.0f} tok/s wall, {med(lambda r: r[1][0]):.0f} tok/s step")
    print(f"median of per-repeat ratios store/memory: wall {med(lambda r: r[1][1] / r[0][1]):.3f} (target >= 0.90), "
          f"step {med(lambda r: r[1][0] / r[0][0]):.3f}")


if __name__ == "__main__":
    main()
