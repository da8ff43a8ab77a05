"""Benchmark: the SAE's sparse decode (embedding_bag) vs the dense product, forward and forward+backward.

    python benchmarks/sae_decode.py [--batch 4096] [--n-latents 4096] [--k 32] [--dims 384 1024]

sparse  x̂ = F.embedding_bag(indices, D, per_sample_weights=values, mode="sum")   (TopKSAE.decode)
dense   x̂ = zeros(B, n_latents).scatter_(1, indices, values) @ D

values (B, k), indices (B, k) distinct per row (as topk gives), D (n_latents, d). "fwd" is a forward
under no_grad (scoring); "fwd+bwd" is a forward and a backward of x̂ against a fixed random upstream
gradient, with gradients w.r.t. D and values (training). Before timing, the two are checked to agree:
max |Δ| of x̂, of dD and of dvalues is printed. The alternatives run interleaved call by call (sparse,
dense, sparse, ...; the order flips every repeat) so machine noise hits both; each per-repeat figure is
the median of ``--iters`` calls.
Target: sparse faster than dense (speed-up > 1) for fwd+bwd at every d on CPU; docs/design.md#the-method expects
several times.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
    return F.embedding_bag(indices, dictionary, per_sample_weights=values, mode="sum")


def dense_decode(values: torch.Tensor, indices: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
    z = torch.zeros(values.shape[0], dictionary.shape[0], dtype=values.dtype).scatter_(1, indices, values)
    return z @ dictionary


def timed_pair(first: Callable[[], None], second: Callable[[], None], iters: int) -> tuple[float, float]:
    """Median seconds of ``iters`` calls of each, alternating call by call (first, second, first, ...)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(iters):
        for fn, out in ((first, times[0]), (second, times[1])):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096, help="tokens per batch")
    parser.add_argument("--n-latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 1024])
    parser.add_argument("--iters", type=int, default=5, help="calls per figure (median)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    summary = []
    for d in args.dims:
        dictionary = torch.randn(args.n_latents, d, generator=gen)
        dictionary /= dictionary.norm(dim=1, keepdim=True)
        dictionary.requires_grad_(True)
        indices = torch.rand(args.batch, args.n_latents, generator=gen).topk(args.k, dim=1).indices
        values = torch.rand(args.batch, args.k, generator=gen).requires_grad_(True)
        upstream = torch.randn(args.batch, d, generator=gen)

        def fwd(decode) -> Callable[[], None]:
            def call() -> None:
                with torch.no_grad():
                    decode(values, indices, dictionary)
            return call

        def fwd_bwd(decode) -> Callable[[], None]:
            def call() -> None:
                dictionary.grad = values.grad = None
                decode(values, indices, dictionary).backward(upstream)
            return call

        # Agreement, once, before timing.
        outs = {}
        for name, decode in (("sparse", sparse_decode), ("dense", dense_decode)):
            fwd_bwd(decode)()
            with torch.no_grad():
                outs[name] = (decode(values, indices, dictionary), dictionary.grad.clone(), values.grad.clone())
        diff = [float((a - b).abs().max()) for a, b in zip(outs["sparse"], outs["dense"])]
        print(f"d {d}: max |sparse - dense|: x̂ {diff[0]:.2e}, dD {diff[1]:.2e}, dvalues {diff[2]:.2e}", flush=True)

        for decode in (sparse_decode, dense_decode):  # warm-up
            fwd(decode)(), fwd_bwd(decode)()
        rows = {"fwd": [], "fwd+bwd": []}
        for rep in range(args.repeats):
            for mode, make in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                if rep % 2 == 0:
                    rows[mode].append(timed_pair(make(sparse_decode), make(dense_decode), args.iters))
                else:
                    rows[mode].append(timed_pair(make(dense_decode), make(sparse_decode), args.iters)[::-1])
            print(f"d {d} repeat {rep}: " + "   ".join(
                f"{mode} sparse {rows[mode][-1][0] * 1e3:7.1f} ms dense {rows[mode][-1][1] * 1e3:7.1f} ms "
                f"speed-up {rows[mode][-1][1] / rows[mode][-1][0]:5.2f}x" for mode in rows), flush=True)
        for mode, r in rows.items():
            summary.append((d, mode, statistics.median(x[0] for x in r), statistics.median(x[1] for x in r),
                            statistics.median(x[1] / x[0] for x in r)))

    print(f"\nbatch {args.batch} tokens, n_latents {args.n_latents}, k {args.k}, float32 CPU, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} repeats x {args.iters} calls")
    for d, mode, s, dn, ratio in summary:
        print(f"d {d:5d} {mode:8s}: sparse {s * 1e3:8.1f} ms | dense {dn * 1e3:8.1f} ms | "
              f"median speed-up (dense/sparse) {ratio:.2f}x")


if __name__ == "__main__":
    main()
