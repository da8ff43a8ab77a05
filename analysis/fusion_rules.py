"""Which rule fuses the guide map with the batch best, on the mean over every target (a research
analysis behind docs/experiments.md; nothing here is used by the pipeline).

    python -m analysis.fusion_rules --root . --runs synth_a_to_synth_b synth_b_to_synth_a ... [--out f.json]

For each run (aux -> target) it reads the target store, the aux detector and the target's
``neighbours/<T>`` batch scores, and scores each category with every candidate rule:

- ``geometric``: sqrt(guide · batch) per patch (scale-free, no statistics);
- ``zmean``: mean of the two signals, each standardised over the category's patches;
- ``rankmean``: mean of the two signals' ranks (percentiles) over the category's patches;
- ``zmean_w<w>``, ``zlogit_w<w>``, ``geometric_w<w>``: the same with weight w on the guide (the
  guide as its logit for ``zlogit``), w in {0.5, 0.25};
- ``rzlogit``, ``rzmean``: the ``zlogit_w0.5`` / ``zmean_w0.5`` means with each signal standardised by its
  median and MAD (×1.4826) instead of mean and std; ``rzlogit_max``: the larger of the two;
- ``late_w<w>``: image scores fused late: each signal's own image score standardised over the category's
  images, weight w on the guide's (as a logit); pixel maps those of ``fuse``;
- ``gate``: the guide's standardised logit counted in proportion to the batch's own belief, sigmoid of
  the batch's z, plus the batch's z, halved: the guides sharpen where the batch already sees something
  and cannot raise a patch the batch finds normal;
- ``agree``: the ``fuse`` mean with weight w = max(0, correlation of the two z's over the category's
  patches) on the guide, (w · z(logit) + z(batch)) / (1 + w): a guide that disagrees with the batch
  on a set counts less there (label-free, per category);
- ``zmin``: the smaller of the two z's (a patch must be anomalous to both);
- ``guide`` and ``batch`` alone, for reference.

``--only a b ...`` scores just those rules (``guide``, ``batch`` and ``fuse`` always).

Then upsampled and blurred like a guide map, image score = max, and the six metrics per category, the
mean over categories, per run and over runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

from pipeline.evaluation import evaluate as evaluation
from pipeline.evaluation import metrics, target_scores
from pipeline.features import store
from pipeline.method import detector, fusion, scoring


def standardised(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-12)


def rules(guide: np.ndarray, batch: np.ndarray) -> dict[str, np.ndarray]:
    z = standardised
    r = lambda x: rankdata(x.ravel()).reshape(x.shape) / x.size  # noqa: E731
    logit = np.log(np.clip(guide, 1e-6, None)) - np.log(np.clip(1 - guide, 1e-6, None))
    out = {"guide": guide, "batch": batch,
           "geometric": fusion.geometric(torch.from_numpy(guide), torch.from_numpy(batch)).numpy(),
           "rankmean": (r(guide) + r(batch)) / 2,
           "fuse": fusion.fuse(torch.from_numpy(guide), torch.from_numpy(batch)).numpy()}
    # Robust standardisation: median and MAD over the set's patches. Defects are a small share of the
    # patches, so these describe the normal patches; a signal that separates the defects well keeps a
    # large score on them instead of having its spread inflated by them (as the std is).
    rz = lambda x: (x - np.median(x)) / (1.4826 * np.median(np.abs(x - np.median(x))) + 1e-12)  # noqa: E731
    out["rzlogit"] = (rz(logit) + rz(batch)) / 2
    out["rzmean"] = (rz(guide) + rz(batch)) / 2
    out["rzlogit_max"] = np.maximum(rz(logit), rz(batch))
    zl, zb = z(logit), z(batch)
    out["gate"] = (zl / (1 + np.exp(-zb)) + zb) / 2
    w = max(0.0, float(np.mean(zl * zb)))  # the correlation of two standardised signals
    out["agree"] = (w * zl + zb) / (1 + w)
    out["zmin"] = np.minimum(zl, zb)
    for w in (0.5, 0.25):
        out[f"zmean_w{w}"] = w * z(guide) + (1 - w) * z(batch)
        out[f"zlogit_w{w}"] = w * z(logit) + (1 - w) * z(batch)
        out[f"geometric_w{w}"] = np.clip(guide, 0, None) ** w * np.clip(batch, 0, None) ** (1 - w)
    return out


def load_run(root: Path, aux: str, target_name: str):
    """A run's inputs in a checkout at ``root``: the target store, the aux detector (no backbone), the
    target's cached batch scores and the guide vectors evaluate scores with (learned seeds, no-SAE)."""
    target = store.open_store(root / "features" / target_name)
    det = detector.Detector.load(root / "models" / aux / "detector", with_backbone=False)
    arrays, _ = target_scores.load(root / "neighbours" / target_name, target)
    vectors = {**evaluation.learned_sets(det.vectors, det.seeds),
               "no_sae/0": evaluation.no_sae_guides(store.open_store(root / "features" / aux), torch.device("cpu"))}
    return target, det, arrays, vectors


ONLY: set[str] | None = None
"""``--only``: the rules scored (None: every rule)."""


def score_run(root: Path, aux: str, target_name: str) -> dict[str, dict]:
    target, det, arrays, vectors = load_run(root, aux, target_name)
    grid, size = tuple(target.attrs["grid"]), target.masks.shape[-1]
    no_masks = set(target.attrs.get("categories_without_masks", []))
    per: dict[str, dict] = {}
    for category, (start, stop) in evaluation.category_ranges(target).items():
        mutual = target_scores.category_mutual(arrays, start, stop)
        if mutual is None:
            continue
        signals = evaluation.guide_signals(target, start, stop, vectors, det.settings, 16, torch.device("cpu"))
        labels, masks = target.labels[start:stop].astype(np.int64), target.masks[start:stop]
        image, fused_maps = {}, None
        for name, values in rules(signals["guides"], mutual).items():
            if ONLY is not None and name not in ONLY | {"guide", "batch", "fuse"}:
                continue
            maps = scoring.patch_maps(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)), grid, size,
                                      sigma=det.settings.blur_sigma)
            image[name] = maps.reshape(len(maps), -1).max(1)
            fused_maps = maps if name == "fuse" else fused_maps
            m = metrics.compute_all(labels, image[name], masks, maps, has_masks=category not in no_masks)
            per.setdefault(name, {})[category] = m
        # Late fusion: each signal's own image score (its map's max; the guide's as a logit), standardised
        # over the category's images, then averaged; the pixel maps stay those of ``fuse``.
        guide_logit = standardised(fusion.logit(torch.from_numpy(image["guide"])).numpy())
        late = {f"late_w{w}": w * guide_logit + (1 - w) * standardised(image["batch"]) for w in (0.5, 0.25)
                if ONLY is None or f"late_w{w}" in ONLY}
        for name, scores in late.items():
            per.setdefault(name, {})[category] = metrics.compute_all(labels, scores, masks, fused_maps,
                                                                     has_masks=category not in no_masks)
    return {name: evaluation.mean_over_categories(cats) for name, cats in per.items()}


def run_all(argv: list[str] | None, score, keys: tuple[str, ...], description: str, runs_help: str,
            width: int, options=None) -> int:
    """The command line of an analysis over runs: ``score(root, aux, target)`` -> {rule: metrics} for each
    ``--runs`` name, a line per run, then the mean of ``keys`` over the runs where defined, and the
    whole as JSON to ``--out``. ``options(parser)``, given, adds arguments and returns what to call with
    the parsed arguments before scoring."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--runs", nargs="+", required=True, help=runs_help)
    ap.add_argument("--out", type=Path)
    apply = options(ap) if options is not None else None
    args = ap.parse_args(argv)
    if apply is not None:
        apply(args)
    torch.set_grad_enabled(False)
    out = {}
    for run in args.runs:
        aux, target = run.split("_to_")
        out[run] = score(args.root, aux, target)
        print(run, {r: {k: None if m[k] is None else round(m[k], 3) for k in keys} for r, m in out[run].items()},
              flush=True)
    print("mean over runs (where defined):")
    for name in next(iter(out.values())):
        row = {}
        for key in keys:
            values = [out[r][name][key] for r in out if out[r][name][key] is not None]
            row[key] = round(float(np.mean(values)), 4) if values else None
        print(f"  {name:{width}s} {row}")
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    def only(ap: argparse.ArgumentParser):
        ap.add_argument("--only", nargs="+", help="score just these rules (guide, batch and fuse always)")

        def apply(args) -> None:
            global ONLY
            ONLY = None if args.only is None else set(args.only)
        return apply

    return run_all(argv, score_run, ("image_auroc", "pixel_auroc", "pixel_aupro"), __doc__.split("\n\n")[0],
                   "<aux>_to_<target> names", 10, options=only)


if __name__ == "__main__":
    raise SystemExit(main())
