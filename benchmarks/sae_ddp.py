"""Benchmark: SAE training tokens/s with 1 and 2 torchrun ranks (gloo, CPU), and on 1 GPU when there is one.

    python benchmarks/sae_ddp.py [--images 256] [--dim 384] [--latents 2048] [--epochs 2]

Builds a synthetic store in a temp dir (:func:`_stores.build_store`), then launches this script under
``python -m torch.distributed.run --standalone --nproc_per_node N`` for N = 1 and 2 on CPU (gloo, one
thread a rank), and N = 1 with ``--device cuda`` when torch sees a GPU. Every launch trains the same
SAE with ``shards 2`` (so the 1- and 2-rank runs take the same global steps of ``batch_images`` images)
through :func:`pipeline.method.sae.train`, the loop the train_sae stage runs, and rank 0 prints the global
tokens per wall-clock second of the ``train`` call.

On a 2-core machine the two CPU figures are a correctness smoke (both launches end, the FVU agrees),
not a speed claim: two ranks share the two cores with the reader threads and gloo, so no speed-up is
to be expected there; the figures that mean something come from a machine with a core (or a GPU) per rank.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    """One rank: open the store, train, print the rate on rank 0."""
    from pipeline.method import distributed
    from pipeline.method import sae
    from pipeline.features import store

    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    features = store.open_store(args.store)
    with launch.process_group(args.device) as (info, device):
        comm = distributed.Comm() if info.world_size > 1 else None
        n, tokens_per_image, d = features.tokens.shape
        model = sae.TopKSAE(d, args.latents, 32, generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        stats = sae.train(model, lambda c: features.read(c)["tokens"], features.n_chunks,
                          tokens_per_image=tokens_per_image, batch_images=args.batch_images, epochs=args.epochs,
                          lr=1e-3, betas=(0.9, 0.999), k_aux=512, auxk_coef=1 / 32, dead_tokens=10**9,
                          buffer_tokens=16 * args.batch_images * tokens_per_image, seed=0, device=device,
                          shards=2, comm=comm)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        fvu, _ = sae.evaluate(model, lambda c: features.read(c)["tokens"], features.n_chunks, device=device, comm=comm)
        if distributed.is_main():
            print(f"RESULT ranks={info.world_size} device={device.type} tokens={stats.tokens_seen} "
                  f"wall_tok_s={stats.tokens_seen / wall:.0f} fvu={fvu:.6f}", flush=True)


def launch(store_path: Path, nproc: int, device: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           __file__, "--worker", "--store", str(store_path), "--device", device, "--latents", str(args.latents),
           "--batch-images", str(args.batch_images), "--epochs", str(args.epochs)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    line = re.search(r"RESULT (.*)", out.stdout).group(1)
    return dict(kv.split("=") for kv in line.split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per image")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--latents", type=int, default=2048)
    parser.add_argument("--batch-images", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(ROOT))
    from _stores import build_store

    print(f"{os.cpu_count()} CPU cores: the CPU rows are a correctness smoke (same FVU), not a speed claim"
          + (" on a machine this small" if (os.cpu_count() or 1) < 4 else ""))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        build_store(path, args.images, args.tokens, args.dim, chunk_images=32, seed=0)
        rows = [launch(path, 1, "cpu", args), launch(path, 2, "cpu", args)]
        if torch.cuda.is_available():
            rows.append(launch(path, 1, "cuda", args))
    print(f"{'ranks':>5} {'device':>6} {'tokens':>9} {'tokens/s':>10} {'final FVU':>10}")
    for r in rows:
        print(f"{r['ranks']:>5} {r['device']:>6} {r['tokens']:>9} {r['wall_tok_s']:>10} {r['fvu']:>10}")


if __name__ == "__main__":
    main()
