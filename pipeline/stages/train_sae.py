"""Stage train_sae@A: the TopK SAE on the auxiliary dataset's patch tokens, streamed from its store.

    python -m pipeline.stages.train_sae --features features/synth_a --out models/synth_a/sae \
        --report reports/synth_a --checkpoint-dir checkpoints/synth_a/train_sae

Writes ``<out>/config.json`` + ``<out>/sae.safetensors`` (docs/design.md#artifacts), ``<report>/sae.json`` (final
FVU, dead fraction, epochs), ``<report>/sae_curve.csv`` and ``<report>/sae_curve.png``. These are
tracked (git or DVC), so they hold no timings and no paths of this machine: the measured tokens/s is
only logged.

While it trains, a snapshot (weights, Adam, dead-latent counters, stream position, curve) is saved to
``--checkpoint-dir`` every ``--checkpoint-minutes``; a killed run started again with the same params
and store resumes from it and ends with the same weights as an uninterrupted run. The folder is not a
DVC output (DVC keeps stages with persistent outputs out of its run cache) and is deleted once the
model is saved.

On several GPUs (NCCL) or CPU processes (gloo), the same arguments under torchrun:

    torchrun --nproc_per_node 4 -m pipeline.stages.train_sae ... --shards 4

Each rank streams its own chunks (shard s of ``--shards`` S reads chunks s, s+S, ...), every global
step holds ``sae.batch_images`` images (batch/S per shard), gradients, FVU and dead-latent counters are
summed over the ranks, and only rank 0 writes. ``--shards`` (default: the number of processes) fixes
the token stream: one process with ``--shards 4`` takes the same steps as 4 ranks, up to float
rounding. The checkpoint folder must be one every rank can read.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pipeline import launch
from pipeline.method import distributed
from pipeline.evaluation import report
from pipeline.method import resume, sae
from pipeline.features import store
from pipeline.config import load_params
from pipeline.launch import run, setup_logging

log = logging.getLogger("pipeline.stages.train_sae")

STORE_FINGERPRINT = ("dataset", "inputs_sha256", "weights_sha256", "backbone", "layer", "image_size", "grid", "schema")
"""Store attrs that identify its tokens; with the tokens' shape and chunking they key a snapshot."""


def resume_key(cfg, device: torch.device, features: store.FeatureStore, shards: int = 1, world: int = 1) -> dict:
    """Everything that determines the trained weights, so a snapshot made with any of it different is
    not resumed: the sae params (``device`` as resolved, since CPU and CUDA round differently), the
    store's fingerprint and layout, the code and library versions that compute the steps, and the
    shards and processes (they fix the stream and the order of the sums)."""
    code = {name: hashlib.sha256(Path(path).read_bytes()).hexdigest()
            for name, path in (("sae", sae.__file__), ("train_sae", __file__))}
    return {
        "sae": {**{k: v for k, v in asdict(cfg).items() if k not in ("device", "precision")}, "device": device.type,
                "autocast": str(sae.autocast_dtype(cfg.precision, device))},
        "store": {**{k: features.attrs.get(k) for k in STORE_FINGERPRINT},
                  "tokens": list(features.tokens.shape), "chunk_images": features.chunk_images},
        "code": code,
        "versions": {"torch": torch.__version__, "numpy": np.__version__},
        "parallel": {"shards": shards, "world_size": world},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", required=True, type=Path, help="the auxiliary dataset's feature store")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint folder, models/<A>/sae")
    parser.add_argument("--report", required=True, type=Path, help="report folder, reports/<A>")
    parser.add_argument("--params", default="params.yaml", type=Path)
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="where the resumable snapshot is kept while training (default: <out>.resume); "
                             "not a DVC output, deleted once the model is saved")
    parser.add_argument("--checkpoint-minutes", type=float, default=10.0,
                        help="minutes between snapshots, 0 for after every step (does not change the result)")
    parser.add_argument("--shards", type=int, default=None,
                        help="streams the epoch is split into, a multiple of the torchrun processes "
                             "(default: their number; 1 when run plainly); fixes the result")
    args = parser.parse_args(argv)
    if not args.checkpoint_minutes >= 0:
        parser.error(f"--checkpoint-minutes must be >= 0, got {args.checkpoint_minutes}")
    checkpoint_dir = args.checkpoint_dir or args.out.with_name(args.out.name + ".resume")
    setup_logging()
    cfg = load_params(args.params, ["sae"]).sae
    features = store.open_store(args.features)
    with launch.process_group(cfg.device) as (info, device):
        _train(args, cfg, features, device, info.world_size, checkpoint_dir)


def _train(args, cfg, features: store.FeatureStore, device: torch.device, world: int, checkpoint_dir: Path) -> None:
    n, tokens_per_image, d = features.tokens.shape
    shards = args.shards or world
    distributed.check_shards(shards, world, cfg.batch_images * tokens_per_image, "sae.batch_images x tokens",
                             n_chunks=features.n_chunks)
    comm = distributed.Comm() if world > 1 else None

    def read(chunk: int):
        # finite=True: a NaN/Inf token stops the run with the store, image and chunk named
        return features.read(chunk, finite=True)["tokens"]

    log.info("%s: %d images x %d tokens of width %d; n_latents %d, k %d, %d epochs on %s (%s)",
             args.features, n, tokens_per_image, d, cfg.n_latents, cfg.k, cfg.epochs, device,
             sae.autocast_dtype(cfg.precision, device) or torch.float32)
    torch.manual_seed(cfg.seed)
    model = sae.TopKSAE(d, cfg.n_latents, cfg.k, decoder_bias=cfg.decoder_bias,
                        generator=torch.Generator().manual_seed(cfg.seed))
    mean = None
    if cfg.decoder_bias:  # one streamed pass for the data mean, only when the ablation asks for it
        total = torch.zeros(d, dtype=torch.float64)
        for _, tokens in features.iter_chunks():
            total += torch.from_numpy(tokens.astype("float32")).reshape(-1, d).sum(0, dtype=torch.float64)
        mean = (total / (n * tokens_per_image)).float()
    if shards > 1:
        log.info("%d shards over %d process(es), rank %d; %d tokens per global step", shards, world,
                 distributed.rank(), cfg.batch_images * tokens_per_image)
    checkpoint = resume.TrainCheckpoint(checkpoint_dir, resume_key(cfg, device, features, shards, world),
                                     every_s=60 * args.checkpoint_minutes)
    stats = sae.train(model, read, features.n_chunks, tokens_per_image=tokens_per_image,
                      batch_images=cfg.batch_images, epochs=cfg.epochs, lr=cfg.lr, betas=tuple(cfg.betas),
                      k_aux=cfg.k_aux, auxk_coef=cfg.auxk_coef, dead_tokens=cfg.dead_tokens,
                      buffer_tokens=cfg.buffer_tokens, seed=cfg.seed, device=device, mean=mean,
                      checkpoint=checkpoint, shards=shards, comm=comm,
                      dtype=sae.autocast_dtype(cfg.precision, device))
    final_fvu, dead_mask = sae.evaluate(model, read, features.n_chunks, device=device, comm=comm)
    if not distributed.is_main():  # every rank holds the same model and reports; rank 0 writes them
        return
    # What later stages need to refuse a target store extracted differently from this SAE's tokens.
    provenance = {k: features.attrs[k] for k in ("dataset", "backbone", "weights_sha256", "layer", "image_size", "grid")}
    extra = {"training": asdict(cfg), "features": provenance}
    if shards > 1:  # only then: a single-process checkpoint has no shards key, so it matches one written without torchrun
        extra["shards"] = shards
    sae.save(model, args.out, dead_mask, extra=extra)
    summary = {
        "fvu": final_fvu,
        "dead_fraction": float(dead_mask.float().mean()),
        "n_dead": int(dead_mask.sum()),
        "epochs": stats.epochs,
        "tokens_seen": stats.tokens_seen,
        "n_latents": cfg.n_latents,
        "k": cfg.k,
    }
    report.write_json(args.report / "sae.json", summary)
    report.write_csv(args.report / "sae_curve.csv", stats.curve)
    report.plot_curves(args.report / "sae_curve.png", stats.curve, "step", ["fvu", "auxk"],
                       f"SAE on {provenance['dataset']}: n_latents {cfg.n_latents}, k {cfg.k}")
    # Only now is the snapshot redundant: a kill before this line resumes and rewrites the same outputs.
    checkpoint.remove()
    log.info("FVU %.4f, dead %.1f%% of latents, %.0f tokens/s", final_fvu, 100 * summary["dead_fraction"],
             stats.tokens_per_s)


if __name__ == "__main__":
    run(main)
