"""Stage neighbours@<T>: the target-only nearest-patch scores, once per target for every run.

    python -m pipeline.stages.neighbours --target features/<T> --normals normals/<T> --out neighbours/<T>

Writes ``neighbours/<T>/patch_scores.safetensors`` (:mod:`pipeline.evaluation.target_scores`): the
batch (``mutual``) patch scores of each category against its own other images, and the few-shot
reference scores of each seeded draw of k good images: drawn from the target's train/good images
(``--normals``, stage normals@<T>) where it has them, else from its test/good images. They depend on the target's tokens alone, so
every ``evaluate@<A>_to_<T>`` reads them instead of recomputing them.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from pipeline.config import load_params
from pipeline.evaluation import target_scores
from pipeline.features import store
from pipeline.method import neighbours
from pipeline.launch import resolve_device, run, setup_logging

log = logging.getLogger("pipeline.stages.neighbours")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, type=Path, help="the target dataset's feature store")
    parser.add_argument("--normals", type=Path, default=None,
                        help="the target's train/good store, normals/<T> (stage normals@<T>); without it every "
                             "category draws its references from its test/good images")
    parser.add_argument("--out", required=True, type=Path, help="folder, neighbours/<T>")
    parser.add_argument("--params", default="params.yaml", type=Path)
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_params(args.params, ["neighbours"]).neighbours
    target = store.open_store(args.target)
    started = time.perf_counter()
    mutual, one_image = target_scores.compute_mutual(target, precision=cfg.precision,
                                                     device=resolve_device(cfg.device))
    pool, no_pool = (None, {}) if args.normals is None else target_scores.open_pool(args.normals, target)
    for name, reason in sorted(no_pool.items()):
        log.info("%s: category %r: %s", args.target, name, reason)
    reference, reference_info = target_scores.compute_reference(target, cfg.reference_k, cfg.reference_seeds,
                                                                pool=pool, precision=cfg.precision,
                                                                max_patches=cfg.max_patches,
                                                                device=resolve_device(cfg.device))
    normals = ({} if pool is None else
               target_scores.compute_normals(target, pool, reference_info, max_patches=cfg.max_patches,
                                             device=resolve_device(cfg.device)))
    path = target_scores.write(args.out, target, mutual, precision=cfg.precision,
                               fraction=neighbours.MUTUAL_FRACTION, one_image=one_image, reference=reference,
                               reference_info=reference_info, normals=normals)
    log.info("%s: mutual and reference scores of %d images in %.1f s (%s) -> %s", args.target, target.n_images,
             time.perf_counter() - started, cfg.precision, path)
    for name in one_image:
        log.warning("%s: category %r has one image: no mutual score", args.target, name)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run(main)
