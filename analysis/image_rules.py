"""Which image score decides a fused mode best, on the mean over every target (a research analysis
behind docs/experiments.md; nothing here is used by the pipeline).

    python -m analysis.image_rules --root . --runs synth_a_to_synth_b synth_b_to_synth_a ... [--out f.json]

The fused map (:func:`pipeline.method.fusion.fuse` of the guide and the batch) localises better than
either signal on the mean of the targets, yet its maximum ranks images worse than the batch's own
maximum on every target measured. These candidates keep the fused map for the pixels and change only
the image score, each from the category's maps upsampled and blurred as evaluate makes them:

- ``fused_max``: the fused map's maximum (what evaluate reports as ``guides+batch``);
- ``batch_max``: the batch map's maximum (the ``mutual`` baseline: the guide has no say);
- ``batch_at_fused_peak``: the batch map's value at the fused map's peak pixel (the guides choose
  where to look, the batch says how far from the other images it is there);
- ``batch_in_fused_top<q>``: the mean of the batch map over the pixels in the top ``q`` of the fused
  map, per image (q of 1, 2, 5 and 10 %);
- ``batch_max_in_fused_top<q>``: the batch map's maximum over those pixels;
- ``fused_top<q>``: the fused map's mean over its own top ``q``;
- ``batch_top<q>``: the batch map's mean over its own top ``q`` (the control for ``batch_in_fused_top``:
  what the guides' choice of pixels adds);
- ``guide_max``: the guide map's maximum (the zero-shot detector's), for reference.

Image AUROC and AP per category, the mean over categories per run and over runs. Targets with no good
image (bsdata) have no image metric and are skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from analysis import fusion_rules
from analysis.fusion_rules import load_run
from pipeline.evaluation import evaluate as evaluation
from pipeline.evaluation import metrics, target_scores
from pipeline.method import fusion, scoring

QUANTILES = (0.01, 0.02, 0.05, 0.1)


def image_rules(guide_map: np.ndarray, batch_map: np.ndarray, fused_map: np.ndarray) -> dict[str, np.ndarray]:
    """Maps (n, H, W) each -> {rule: image scores (n,)}."""
    n = len(fused_map)
    g, b, f = (m.reshape(n, -1) for m in (guide_map, batch_map, fused_map))
    peak = f.argmax(axis=1)
    out = {"fused_max": f.max(1), "batch_max": b.max(1), "guide_max": g.max(1),
           "batch_at_fused_peak": b[np.arange(n), peak]}
    order = np.argsort(-f, axis=1)
    for q in QUANTILES:
        k = max(1, int(round(q * f.shape[1])))
        top = order[:, :k]
        picked = np.take_along_axis(b, top, axis=1)
        out[f"batch_in_fused_top{q:g}"] = picked.mean(1)
        out[f"batch_max_in_fused_top{q:g}"] = picked.max(1)
        out[f"fused_top{q:g}"] = np.take_along_axis(f, top, axis=1).mean(1)
        out[f"batch_top{q:g}"] = -np.sort(-b, axis=1)[:, :k].mean(1)
    return out


def score_run(root: Path, aux: str, target_name: str) -> dict[str, dict]:
    target, det, arrays, vectors = load_run(root, aux, target_name)
    grid, size = tuple(target.attrs["grid"]), target.masks.shape[-1]
    probability = det.settings.fusion == "none"
    per: dict[str, dict] = {}
    for category, (start, stop) in evaluation.category_ranges(target).items():
        mutual = target_scores.category_mutual(arrays, start, stop)
        labels = target.labels[start:stop].astype(np.int64)
        if mutual is None or labels.min() == labels.max():
            continue
        signals = evaluation.guide_signals(target, start, stop, vectors, det.settings, 16, torch.device("cpu"))
        guide, batch = torch.from_numpy(signals["guides"]), torch.from_numpy(mutual)

        def maps(values: torch.Tensor) -> np.ndarray:
            return scoring.patch_maps(values, grid, size, sigma=det.settings.blur_sigma)

        by_rule = image_rules(maps(guide), maps(batch), maps(fusion.fuse(guide, batch, probability=probability)))
        for name, scores in by_rule.items():
            m = metrics.image_metrics(labels, scores)
            per.setdefault(name, {})[category] = {"image_auroc": m["image_auroc"], "image_ap": m["image_ap"]}
    return {name: {k: float(np.mean([c[k] for c in cats.values()])) for k in ("image_auroc", "image_ap")}
            for name, cats in per.items()}


def main(argv: list[str] | None = None) -> int:
    return fusion_rules.run_all(argv, score_run, ("image_auroc", "image_ap"), __doc__.split("\n\n")[0],
                                "<aux>_to_<target> names (targets with good images)", 26)


if __name__ == "__main__":
    raise SystemExit(main())
