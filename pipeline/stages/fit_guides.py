"""Stage fit_guides@A: the four guide codes on the auxiliary dataset, one set per seed.

    python -m pipeline.stages.fit_guides --features features/synth_a --sae models/synth_a/sae \
        --out models/synth_a/guides --report reports/synth_a

Writes ``<out>/config.json`` + ``<out>/guides.safetensors`` (``codes`` (4, n_latents) of the first
seed, ``codes_per_seed``), ``<report>/guides.json`` (final loss terms, non-zeros per guide, top-10
atoms per guide), ``<report>/guides_curve.csv`` and its PNG.

The checkpoint's config records the SAE's content hash (``sae_sha256``) and the auxiliary store's
fingerprint (``aux_store``), which evaluate checks. Every array read is checked finite (an error names
the store, array, image and chunk), and so are the losses, the codes and the reports, before any file
is written: a failed run leaves the previous outputs as they were.

Under torchrun (``torchrun --nproc_per_node N -m pipeline.stages.fit_guides ... --shards N``) each
rank streams its own chunks and computes its share of every global batch of ``guides.batch_images``
images; the codes' gradients and the loss terms are summed over the ranks and only rank 0 writes.
``--shards`` fixes the image stream as in train_sae.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline import launch
from pipeline.method import distributed
from pipeline.method import guides
from pipeline.evaluation import report
from pipeline.method import sae
from pipeline.features import store
from pipeline.files import sha256_file
from pipeline.config import load_params
from pipeline.launch import run, setup_logging

log = logging.getLogger("pipeline.stages.fit_guides")

ARRAYS = ("tokens", "cls", "masks", "labels")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", required=True, type=Path, help="the auxiliary dataset's feature store")
    parser.add_argument("--sae", required=True, type=Path, help="the SAE checkpoint folder, models/<A>/sae")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint folder, models/<A>/guides")
    parser.add_argument("--report", required=True, type=Path, help="report folder, reports/<A>")
    parser.add_argument("--params", default="params.yaml", type=Path)
    parser.add_argument("--shards", type=int, default=None,
                        help="streams each epoch is split into, a multiple of the torchrun processes "
                             "(default: their number; 1 when run plainly); fixes the result")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_params(args.params, ["guides"]).guides
    model, dead_mask, sae_config = sae.load(args.sae)
    provenance = sae_config["features"]
    # The SAE was trained on this store's tokens: refuse a store re-extracted differently since.
    features = store.open_store(args.features, expect={k: provenance[k] for k in store.TOKEN_SPACE})
    # Guides are fitted against pixel masks: a labels-only store's all-zero masks would teach "no defect".
    no_masks = features.attrs.get("categories_without_masks") or []
    if no_masks:
        which = f"category {no_masks[0]} has" if len(no_masks) == 1 else f"categories {', '.join(no_masks)} have"
        raise store.StoreError(f"{args.features}: {which} labels but no masks (attr categories_without_masks; its "
                               "dataset has no ground_truth/ folder); fit_guides needs pixel masks on the auxiliary "
                               "set: add the masks, or use the dataset as a target only (remove it from "
                               "aux_datasets in params.yaml)")
    with launch.process_group(cfg.device) as (info, device):
        _fit(args, cfg, features, model, dead_mask, sae_config, provenance, device, info.world_size)


def _fit(args, cfg, features: store.FeatureStore, model: sae.TopKSAE, dead_mask: torch.Tensor, sae_config: dict,
         provenance: dict, device: torch.device, world: int) -> None:
    shards = args.shards or world
    distributed.check_shards(shards, world, cfg.batch_images, "guides.batch_images", n_chunks=features.n_chunks)
    comm = distributed.Comm() if world > 1 else None
    grid = tuple(features.attrs["grid"])

    def read(chunk: int):
        return features.read(chunk, ARRAYS, finite=True)

    results = []
    for seed in cfg.seeds:
        result = guides.fit(read, features.n_chunks, model.dictionary.detach(), dead_mask, grid,
                            variant=cfg.variant, guide_topk=cfg.guide_topk, init_mean=cfg.init_mean,
                            init_std=cfg.init_std, temperature=cfg.temperature, gamma=cfg.focal_gamma,
                            l1_coef=cfg.l1_coef, lr=cfg.lr, betas=tuple(cfg.betas), batch_images=cfg.batch_images,
                            epochs=cfg.epochs, ema_decay=cfg.ema_decay, seed=seed, device=device,
                            desc=f"fit_guides seed {seed}", shards=shards, comm=comm,
                            dtype=sae.autocast_dtype(cfg.precision, device))
        log.info("seed %d: final terms %s", seed, {k: round(v, 4) for k, v in result.final_terms.items()})
        results.append(result)
    if not distributed.is_main():  # every rank holds the same codes; rank 0 writes them
        return
    codes = torch.stack([r.codes for r in results])
    config = {"training": asdict(cfg), "features": provenance,
              "sae": {k: sae_config[k] for k in ("d_in", "n_latents", "k")},
              # what evaluate checks: these guides belong with this SAE and this auxiliary store
              "sae_sha256": sha256_file(args.sae / "sae.safetensors"),
              "aux_store": guides.store_fingerprint(features.attrs)}
    if shards > 1:  # only then: a single-process checkpoint has no shards key, so it matches one written without torchrun
        config["shards"] = shards
    summary = {
        "seeds": list(cfg.seeds),
        "final_terms": {f"seed_{s}": r.final_terms for s, r in zip(cfg.seeds, results)},
        "nonzero_mean": {name: float((codes[:, i] > 0).sum(dim=1).float().mean()) for i, name in enumerate(guides.ROWS)},
        f"guides_seed_{cfg.seeds[0]}": guides.summarize(codes[0]),
    }
    curve = [{"seed": s, **row} for s, r in zip(cfg.seeds, results) for row in r.curve]
    first = [row for row in curve if row["seed"] == cfg.seeds[0]]
    # everything rendered and checked (finite codes, JSON without NaN) before the first file is written
    guides.check_finite_codes(codes, f"{args.out}: refusing to save")
    files = {
        args.report / "guides.json": report.json_text(args.report / "guides.json", summary).encode(),
        args.report / "guides_curve.csv": report.csv_text(args.report / "guides_curve.csv", curve).encode(),
        args.report / "guides_curve.png": report.png_bytes(report.curves_figure(
            first, "epoch", ["focal", "dice_anomaly", "dice_normal", "global_ce", "loss"],
            f"Guides on {provenance['dataset']} (seed {cfg.seeds[0]})")),
    }
    guides.save(args.out, codes, config)
    for path, data in files.items():
        report.write_bytes(path, data)


if __name__ == "__main__":
    run(main)
