"""Benchmark: peak RSS of the train_sae stage on a store of N images vs one of 4N images.

    python benchmarks/sae_memory.py [--images 100] [--factor 4] [--epochs 1] [--buffer-tokens 65536]

Runs the real stage, ``python -m pipeline.stages.train_sae --features ... --out ... --report ...
--params ...``, as a child process on two synthetic stores (tokens ~ N(mu, 1) float16, 256 x 384,
chunks of 32 images, as extract writes them) built in a temp dir with a params file holding only a
``sae:`` section. Each child's own peak RSS comes from ``os.wait4`` (the rusage of that one child, not
the running maximum over all children that RUSAGE_CHILDREN gives). Small and large runs alternate
(small, large, small, large, ...); RSS is far less noisy than time, but it is still printed per repeat.

By default the small store is trained for ``factor`` times the epochs of the large one, so both runs
take the same number of optimiser steps and only the store's size differs: the allocator's footprint
still creeps up over the first tens of steps, and 6 steps vs 25 would count that as growth with N
(``--no-equal-tokens`` gives both the same epochs).

Streaming means memory is bounded by the shuffle buffer (``sae.buffer_tokens`` rows x d x 4 bytes, plus
its shuffled copy and two chunks) whatever the store's size. Note that a store whose tokens all fit
in the buffer holds all of them in it, so the bound is only reached once N x L > buffer_tokens: at the
params default (65,536 rows) N = 100 images (25,600 tokens) is below it and 4N above it, so the growth
printed is the buffer filling up; ``--buffer-tokens 16384`` puts both stores above it. Target: growth
from N to 4N < 10 %.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _stores import build_store  # this folder is on sys.path when run as a script


def peak_rss_mib(features: Path, tmp: Path, params: Path, tag: str) -> float:
    """Run the train_sae stage on ``features``; the child's own peak RSS in MiB (Linux: ru_maxrss in KiB)."""
    cmd = [sys.executable, "-m", "pipeline.stages.train_sae", "--features", str(features),
           "--out", str(tmp / f"model_{tag}"), "--report", str(tmp / f"report_{tag}"), "--params", str(params)]
    env = {**os.environ, "TQDM_DISABLE": "1", "SPG_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parents[1])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    return usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100, help="N, images of the small store")
    parser.add_argument("--factor", type=int, default=4, help="the large store holds factor x N images")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per image")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--chunk-images", type=int, default=32)
    parser.add_argument("--n-latents", type=int, default=1024)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the large store")
    parser.add_argument("--equal-tokens", action=argparse.BooleanOptionalAction, default=True,
                        help="train the small store factor x the epochs, so both runs take the same steps")
    parser.add_argument("--buffer-tokens", type=int, default=65_536, help="sae.buffer_tokens (params default)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small, large = args.images, args.images * args.factor
        for n in (small, large):
            build_store(tmp / f"store_{n}", n, args.tokens, args.dim, args.chunk_images, seed=n)
        epochs = {small: args.epochs * (args.factor if args.equal_tokens else 1), large: args.epochs}
        params = {}
        for n in (small, large):
            params[n] = tmp / f"params_{n}.yaml"
            params[n].write_text(
                "sae:\n"
                f"  n_latents: {args.n_latents}\n  k: {args.k}\n  epochs: {epochs[n]}\n"
                f"  buffer_tokens: {args.buffer_tokens}\n  batch_images: 16\n  seed: 0\n  device: cpu\n")
        rows = []
        for rep in range(args.repeats):
            a = peak_rss_mib(tmp / f"store_{small}", tmp, params[small], f"{small}_{rep}")
            b = peak_rss_mib(tmp / f"store_{large}", tmp, params[large], f"{large}_{rep}")
            rows.append((a, b))
            print(f"repeat {rep}: peak RSS {small} images {a:7.1f} MiB   {large} images {b:7.1f} MiB   "
                  f"growth {100 * (b / a - 1):+.1f} %", flush=True)

    a = statistics.median(r[0] for r in rows)
    b = statistics.median(r[1] for r in rows)
    print(f"\ntrain_sae stage, {args.tokens} tokens x {args.dim} float16, chunks of {args.chunk_images}, "
          f"n_latents {args.n_latents}, k {args.k}, buffer_tokens {args.buffer_tokens}; "
          f"{small} images x {epochs[small]} epoch(s) vs {large} images x {epochs[large]} epoch(s) "
          f"({small * args.tokens} vs {large * args.tokens} tokens per epoch)")
    print(f"median peak RSS: {small} images {a:.1f} MiB | {large} images {b:.1f} MiB | "
          f"growth {100 * (b / a - 1):+.1f} % (target < 10 %)")


if __name__ == "__main__":
    main()
