"""Stage export@<A>: the deployable detector of the SAE and guides fitted on auxiliary set A.

    python -m pipeline.stages.export --features features/synth_a --sae models/synth_a/sae \
        --guides models/synth_a/guides --weights models/backbones/dinov2_vits14.safetensors \
        --out models/synth_a/detector

Writes ``<out>/detector.safetensors`` (``vectors`` (n_seeds, 4, d): each seed's decoded guides ``c·D``)
and ``<out>/detector.json`` (:mod:`pipeline.method.detector`), both atomically, the JSON last, and
``<out>/atoms.safetensors``, the SAE atoms the guide codes use and the codes on them
(:class:`pipeline.method.atoms.DetectorAtoms`), which ``predict --explain`` decomposes scores over. One detector per
auxiliary set, not per run: it depends on the SAE and guides of A and on the scoring settings only,
never on a target, so every run from A scores with the same one.

``--weights`` is recorded as ``weights_path`` (where :class:`~pipeline.method.detector.Detector` looks by
default) and is not read: the sha256 recorded is the feature store's ``weights_sha256``, the weights the
tokens came from, and that is what binds the detector to its backbone.

The threshold (``threshold_rule`` ``aux_f1_max``): the auxiliary store's own images are scored with the
detector (the mean of the seeds' maps, the configured image score) and the image threshold with the
highest F1 over all of them pooled is kept (:func:`pipeline.evaluation.metrics.f1_max_threshold`). Target labels are
never seen (zero-shot), so the auxiliary set is the only labelled data there is. Other rules considered:

- a quantile of the auxiliary normal images' scores (e.g. 95 %: a 5 % false-alarm rate on A). It
  ignores the anomalous images, and the right rate is a property of the user's line, not of A; that is
  what ``predict --threshold-from-normals`` is for, on the user's own good images;
- the mean of per-category F1-max thresholds: a deployed detector has one threshold, so the pooled
  one is the one whose F1 on A is actually reached.

F1-max was kept because it is the same criterion as the reported oracle ``image_f1_max``, so the gap
between ``image_f1_at_aux_threshold`` and ``image_f1_max`` in metrics.json measures exactly what
transferring the threshold costs. The auxiliary images are the ones the guides were fitted on, so the
F1 recorded here is an in-sample figure, an upper bound on what a target sees.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from pipeline.method import atoms
from pipeline.method import detector
from pipeline.evaluation import evaluate as evaluation
from pipeline.method import guides
from pipeline.evaluation import metrics
from pipeline.method import sae
from pipeline.method import scoring
from pipeline.method import thresholds
from pipeline.features import store
from pipeline.config import load_params
from pipeline.files import sha256_file
from pipeline.launch import resolve_device
from pipeline.launch import run, setup_logging

log = logging.getLogger("pipeline.stages.export")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", required=True, type=Path, help="the auxiliary feature store, features/<A>")
    parser.add_argument("--sae", required=True, type=Path, help="models/<A>/sae")
    parser.add_argument("--guides", required=True, type=Path, help="models/<A>/guides")
    parser.add_argument("--weights", required=True, type=Path,
                        help="the backbone weights path to record (not read), models/backbones/<name>.safetensors")
    parser.add_argument("--out", required=True, type=Path, help="the detector folder, models/<A>/detector")
    parser.add_argument("--params", default="params.yaml", type=Path)
    args = parser.parse_args(argv)
    setup_logging()
    params = load_params(args.params, ["scoring", "evaluate"])
    cfg, sc = params.evaluate, params.scoring
    device = resolve_device(cfg.device)
    model, _, sae_config = sae.load(args.sae)
    codes_per_seed, guides_config = guides.load(args.guides)
    provenance = guides_config["features"]
    aux = store.open_store(args.features, expect={k: provenance[k] for k in store.TOKEN_SPACE})
    sae_sha256 = sha256_file(args.sae / "sae.safetensors")
    guides.check_provenance(guides_config, args.guides, sae_sha256=sae_sha256, sae_folder=args.sae,
                            aux_attrs=aux.attrs, aux_path=args.features)
    training = guides_config["training"]
    seeds = [int(s) for s in training["seeds"]]
    dictionary = model.dictionary.detach().float()
    vectors = torch.stack([guides.guide_vectors(codes.float(), dictionary) for codes in codes_per_seed])
    settings = scoring.ScoreSettings(temperature=float(training["temperature"]), blur_sigma=sc.blur_sigma,
                                     image_score=sc.image_score, lse_temperature=sc.lse_temperature,
                                     top_fraction=sc.top_fraction, fusion=sc.fusion)

    f1, threshold, threshold_aux = aux_threshold(aux, vectors, seeds, settings, cfg.batch_images, device, args.features)
    info = {
        "format": detector.FORMAT,
        "backbone": aux.attrs["backbone"],
        "weights_sha256": aux.attrs["weights_sha256"],
        "weights_source": aux.attrs.get("weights_source"),
        "weights_path": args.weights.as_posix(),
        "layer": int(aux.attrs["layer"]),
        "image_size": int(aux.attrs["image_size"]),
        "grid": [int(g) for g in aux.attrs["grid"]],
        "dim": int(vectors.shape[-1]),
        "rows": list(guides.ROWS),
        **{key: getattr(settings, key) for key in ("temperature", "blur_sigma", "image_score", "lse_temperature",
                                                  "top_fraction", "fusion")},
        "seeds": seeds,
        "seed_combination": "mean of the seeds' maps, then the image score of the mean map "
                            "(global: mean of the seeds' global probabilities)",
        "map_range": [0.0, 1.0] if settings.fusion == "none" else [0.0, 2.0],
        "threshold": threshold,
        "threshold_rule": "aux_f1_max",
        "threshold_note": "the image-score threshold with the highest F1 over the auxiliary set's own images "
                          "(pooled over its categories, mean-of-seeds maps); anomalous where score >= threshold",
        "threshold_aux": threshold_aux,
        "pixel_threshold": threshold_aux["pixel_threshold"],
        "pixel_threshold_rule": "aux_pixel_f1_max",
        "pixel_threshold_note": "the map value with the highest pixel F1 over the auxiliary set's own maps "
                                "(mean-of-seeds maps, all pixels pooled, at the map PNGs' resolution of "
                                "1/65535 of the range); a pixel is defect where map >= pixel_threshold",
        "aux": {"dataset": aux.attrs["dataset"], "store": guides.store_fingerprint(aux.attrs)},
        "sae_sha256": sae_sha256,
        "sae": {k: sae_config[k] for k in ("d_in", "n_latents", "k") if k in sae_config},
        "guides": {"sha256": sha256_file(args.guides / "guides.safetensors"), "variant": training.get("variant"),
                   "seeds": seeds, "training": training},
    }
    # the atoms first: detector.json, written last, marks a complete export
    atoms.DetectorAtoms.from_codes(codes_per_seed.float(), dictionary).save(args.out)
    detector.save(args.out, vectors, info)
    log.info("%s: detector with %d seed(s) at %s; threshold %.6g (aux F1 %.3f)", aux.attrs["dataset"],
             len(seeds), args.out, threshold, f1)


def aux_threshold(aux: store.FeatureStore, vectors: torch.Tensor, seeds: list[int], settings: scoring.ScoreSettings,
                  batch_images: int, device: torch.device, where: Path) -> tuple[float, float, dict]:
    """(F1, threshold, detector.json's ``threshold_aux``): the F1-max image-score threshold of the
    detector's own scoring (the mean of the seeds' maps, maps not kept) over every auxiliary image, and
    in ``threshold_aux`` the pixel F1-max threshold of the same maps (:class:`thresholds.PixelF1`)."""
    pixels = thresholds.PixelF1(top=1.0 if settings.fusion == "none" else 2.0)

    def sink(offset: int, maps: dict) -> None:
        m = maps[evaluation.ENSEMBLE]
        pixels.add(m, aux.masks[offset:offset + len(m)])

    scored = evaluation.score_rows(aux, 0, aux.n_images, {k: v.to(device) for k, v in
                                                          evaluation.learned_sets(vectors, seeds).items()},
                                   settings, batch_images, device, keep_maps=False, sink=sink)
    _, scores = scored[evaluation.ENSEMBLE]
    labels = aux.labels[:].astype(np.int64)
    reason = metrics.one_class_reason(labels, "images")
    if reason:
        raise detector.DetectorError(f"{where}: {reason}; the threshold is chosen on the auxiliary set's "
                                     "normal and anomalous images, so it needs both")
    f1, threshold = metrics.f1_max_threshold(labels, scores)
    at = metrics.at_threshold(labels, scores, threshold)
    try:
        pixel_f1, pixel_threshold = pixels.best()
    except thresholds.ThresholdError as err:
        raise detector.DetectorError(f"{where}: {err}") from None
    return f1, threshold, {"image_f1": f1, "image_precision": at["image_precision_at_aux_threshold"],
                           "image_recall": at["image_recall_at_aux_threshold"], "n_images": int(labels.size),
                           "n_anomalous": int(labels.sum()), "pixel_threshold": pixel_threshold,
                           "pixel_f1": pixel_f1}


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run(main)
