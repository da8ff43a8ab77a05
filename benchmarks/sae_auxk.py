"""Benchmark: SAE training tokens/s with the AuxK decode chosen by density vs always sparse.

    python benchmarks/sae_auxk.py [--images 64] [--tokens 256] [--dim 384] [--n-latents 2048]

Once latents die, every step also decodes the top ``k_aux`` (512) dead latents of each token. At 512
of 2048 or 4096 latents that code is dense enough that a scatter into a (B, n) matrix and a matrix
product beat ``embedding_bag``, whose backward is a scatter-add of B x 512 rows
(``pipeline.method.sae.DENSE_DECODE_DENSITY``). Both sides run the same :func:`pipeline.method.sae.train` on the
same in-memory float16 tokens with the same seed; "sparse" sets ``DENSE_DECODE_DENSITY`` above 1, so
every decode gathers rows, as before the switch. ``--dead-tokens`` is small (4,096 by default) so
that latents die within the first epoch, as they do over a real run (50-75 % dead on the embedded
sets). Sides are interleaved; the ratio that counts is density-chosen / always-sparse wall tokens/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.method import sae  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--n-latents", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--k-aux", type=int, default=512)
    parser.add_argument("--dead-tokens", type=int, default=4096)
    parser.add_argument("--batch-images", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    mu = rng.normal(0.0, 2.0, size=args.dim).astype(np.float32)
    tokens = (mu + rng.standard_normal((args.images, args.tokens, args.dim), dtype=np.float32)).astype(np.float16)
    chunk = 16

    def read(c: int) -> np.ndarray:
        return tokens[c * chunk : (c + 1) * chunk]

    n_chunks = -(-args.images // chunk)
    default = sae.DENSE_DECODE_DENSITY

    def run(density: float) -> tuple[float, float, float]:
        """(wall tokens/s, final dead fraction, final-step FVU) of one ``train`` call."""
        sae.DENSE_DECODE_DENSITY = density
        try:
            model = sae.TopKSAE(args.dim, args.n_latents, args.k, generator=torch.Generator().manual_seed(0))
            t0 = time.perf_counter()
            stats = sae.train(model, read, n_chunks, tokens_per_image=args.tokens, batch_images=args.batch_images,
                              epochs=args.epochs, lr=1e-3, betas=(0.5, 0.999), k_aux=args.k_aux,
                              auxk_coef=1 / 32, dead_tokens=args.dead_tokens, buffer_tokens=65_536, seed=0,
                              log_every=1)
            return stats.tokens_seen / (time.perf_counter() - t0), stats.curve[-1]["dead"], stats.curve[-1]["fvu"]
        finally:
            sae.DENSE_DECODE_DENSITY = default

    run(default)  # warm-up
    rows = []
    for rep in range(args.repeats):
        sparse, chosen = run(2.0), run(default)
        rows.append((sparse[0], chosen[0]))
        print(f"repeat {rep}: always sparse {sparse[0]:7.0f} tok/s   by density {chosen[0]:7.0f} tok/s   "
              f"ratio {chosen[0] / sparse[0]:.2f}   (dead {chosen[1]:.2f}; last-step FVU {sparse[2]:.4f} vs {chosen[2]:.4f})",
              flush=True)
    print(f"\n{args.images} images x {args.tokens} tokens x {args.dim}, n_latents {args.n_latents}, k {args.k}, "
          f"k_aux {args.k_aux}, {torch.get_num_threads()} threads")
    print(f"median tokens/s: always sparse {statistics.median(r[0] for r in rows):.0f}, "
          f"by density {statistics.median(r[1] for r in rows):.0f}; median ratio "
          f"{statistics.median(r[1] / r[0] for r in rows):.2f}")


if __name__ == "__main__":
    main()
