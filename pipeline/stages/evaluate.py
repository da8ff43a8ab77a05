"""Stage evaluate@<run>: score the target store with the guides fitted on the auxiliary set.

    python -m pipeline.stages.evaluate --target features/synth_b --aux features/synth_a \
        --sae models/synth_a/sae --guides models/synth_a/guides --out reports/synth_a_to_synth_b

Writes into ``--out``: ``metrics.json`` (means over categories; with several guide seeds the mean
over seeds and ``<key>_std``; the two controls under ``controls``), ``per_category.json``, plot data
under ``plots/`` (image and pixel ROC/PR, thinned) and PNGs (``roc_pr.png``, ``per_category.png``,
``overlays/<category>.png``).

Inputs must belong together: the guides' checkpoint records the sha256 of the SAE it was fitted on
and the fingerprint of its auxiliary store, and both are checked (:func:`guides.check_provenance`).
Tokens and CLS read are checked finite (an error names the store, array, image and chunk).

Outputs are all or nothing: everything (metrics, JSON text, CSV text, PNG bytes) is computed first and
only then written, each file through a temp file and ``os.replace``, ``metrics.json`` last. A metric
the target leaves undefined (no anomalous or no normal image) is ``null`` with its reason under
``null_reasons``; a pooled ROC/PR curve that is undefined (one class at that level) is written as its
CSV header alone, so every declared plot exists, with the reason under ``null_reasons`` too
(``image_curves``, ``pixel_curves``). Per-category file names come from :func:`report.report_path`,
which refuses a category name that would leave ``overlays/``.

Controls, scored exactly like the result:
- ``untrained_init``: the guide codes as initialised, before any training (what the learned
  coefficients add);
- ``no_sae``: local guides = mean normal and mean anomalous auxiliary patch tokens, global guides =
  mean normal and mean anomalous auxiliary CLS tokens (what the SAE dictionary adds).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import guides, metrics, report, sae, scoring, store
from pipeline.files import sha256_file
from pipeline.config import load_params
from pipeline.runtime import resolve_device
from pipeline.stages import run, setup_logging

log = logging.getLogger("pipeline.stages.evaluate")

KEYS = metrics.METRIC_KEYS
CHECKED = ("backbone", "weights_sha256", "layer", "image_size")
CURVE_COLUMNS = {"roc": ("fpr", "tpr", "threshold"), "pr": ("recall", "precision", "threshold")}
"""Columns of the plot CSVs (metrics.curves' rows), also the header of an undefined curve's file."""


def no_sae_guides(aux: store.FeatureStore, device: torch.device) -> torch.Tensor:
    """(4, d) guide vectors from auxiliary means, in guides.ROWS order (the no-SAE control).

    Normal patches are those with no anomalous pixel; the anomalous mean weights every patch by the
    fraction of its pixels that are anomalous (small defects rarely cover half a patch, and a hard
    threshold would leave the mean undefined on sets of small defects).
    """
    grid = tuple(aux.attrs["grid"])
    d = aux.tokens.shape[-1]
    sums = {name: torch.zeros(d, dtype=torch.float64) for name in ("pn", "pa", "cn", "ca")}
    counts = dict.fromkeys(sums, 0.0)
    for chunk in range(aux.n_chunks):
        a = aux.read(chunk, ("tokens", "cls", "masks", "labels"), finite=True)
        tokens = torch.from_numpy(a["tokens"].astype(np.float32)).reshape(-1, d)
        cover = F.adaptive_avg_pool2d(torch.from_numpy(a["masks"]).float()[:, None], grid).reshape(-1)
        cls = torch.from_numpy(a["cls"].astype(np.float32))
        labels = torch.from_numpy(a["labels"].astype(bool))
        weights = {"pn": (cover == 0).float(), "pa": cover, "cn": (~labels).float(), "ca": labels.float()}
        for key, rows in (("pn", tokens), ("pa", tokens), ("cn", cls), ("ca", cls)):
            sums[key] += (weights[key][:, None].double() * rows.double()).sum(0)
            counts[key] += float(weights[key].sum())
    empty = [k for k, n in counts.items() if n == 0]
    if empty:
        raise ValueError(f"{aux.path}: no {', '.join(empty)} samples for the no-SAE control "
                         "(pn/pa: normal/anomalous patches, cn/ca: normal/anomalous images)")
    mean = {k: (sums[k] / counts[k]).float() for k in sums}
    return torch.stack([mean["cn"], mean["ca"], mean["pn"], mean["pa"]]).to(device)


def category_ranges(target: store.FeatureStore) -> dict[str, tuple[int, int]]:
    """Category name -> [start, stop) rows; the extract stage writes each category contiguously."""
    category = target.category[:]
    out = {}
    for i, name in enumerate(target.attrs["categories"]):
        rows = np.flatnonzero(category == i)
        if len(rows) == 0:
            continue
        if rows[-1] - rows[0] + 1 != len(rows):
            raise ValueError(f"{target.path}: category {name!r} is not contiguous in the store")
        out[name] = (int(rows[0]), int(rows[-1]) + 1)
    return out


def score_rows(target, start, stop, vectors: dict[str, torch.Tensor], cfg, temperature, device):
    """Maps (n, S, S) and image scores (n,) of rows [start, stop) for every named guide set."""
    grid, size = tuple(target.attrs["grid"]), target.masks.shape[-1]
    maps = {name: [] for name in vectors}
    probs = {name: [] for name in vectors}
    for i in range(start, stop, cfg.batch_images):
        j = min(i + cfg.batch_images, stop)
        arrays = {"tokens": target.tokens[i:j], "cls": target.cls[i:j]}
        for name, values in arrays.items():  # names the store, array, image and chunk of a NaN/Inf
            target.check_finite(name, values, i)
        tokens = torch.from_numpy(arrays["tokens"].astype(np.float32)).to(device)
        cls = torch.from_numpy(arrays["cls"].astype(np.float32)).to(device)
        for name, g in vectors.items():
            maps[name].append(scoring.anomaly_maps(tokens, g, grid, size, temperature=temperature, sigma=cfg.blur_sigma))
            probs[name].append(scoring.global_probability(cls, g))
    out = {}
    for name in vectors:
        m = np.concatenate(maps[name])
        s = scoring.image_scores(m, cfg.image_score, lse_temperature=cfg.lse_temperature,
                                 top_fraction=cfg.top_fraction, global_probs=np.concatenate(probs[name]))
        out[name] = (m, s)
    return out


def overlay_rows(target: store.FeatureStore, start: int, labels, masks, maps, n: int) -> list[tuple]:
    """Up to ``n`` images of one category (half anomalous where possible) with mask, map and caption.

    Images come from the store's ``images`` array (already at S), never from the dataset's files, so a
    moved or absent dataset cannot fail this stage.
    """
    anomalous, normal = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n_anomalous = min(len(anomalous), n - min(len(normal), n // 2))
    pick = sorted([*anomalous[:n_anomalous], *normal[: n - n_anomalous]])
    rows = []
    for i in pick:
        relpath = target.attrs["paths"][start + i]
        rows.append((target.images[start + i], masks[i], maps[i], f"{relpath.split('/')[-2]} {maps[i].max():.2f}"))
    return rows


def mean_over_categories(per_category: dict[str, dict]) -> dict[str, float | None]:
    """Mean of each key over the categories where it is defined (None where no category has it)."""
    out = {}
    for key in KEYS:
        values = [m[key] for m in per_category.values() if m.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def seed_summary(per_seed: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Mean over seeds, plus ``<key>_std`` (sample std, ddof=1) when there are several."""
    out: dict[str, float | None] = {}
    for key in KEYS:
        values = [m[key] for m in per_seed if m[key] is not None]
        out[key] = float(np.mean(values)) if values else None
        if len(per_seed) > 1:
            out[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, type=Path, help="the target dataset's feature store")
    parser.add_argument("--aux", required=True, type=Path, help="the auxiliary feature store (no-SAE control)")
    parser.add_argument("--sae", required=True, type=Path)
    parser.add_argument("--guides", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="report folder, reports/<A>_to_<T>")
    parser.add_argument("--params", default="params.yaml", type=Path)
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_params(args.params, ["evaluate"]).evaluate
    device = resolve_device(cfg.device)
    model, dead_mask, sae_config = sae.load(args.sae, device)
    codes_per_seed, guides_config = guides.load(args.guides)
    provenance = guides_config["features"]
    expect = {k: provenance[k] for k in CHECKED}
    # A target extracted with another backbone, layer, image size or weights lives in another space.
    target = store.open_store(args.target, expect=expect)
    aux = store.open_store(args.aux, expect=expect)
    # The guides must have been fitted on this SAE and this auxiliary store, or the report is mislabelled.
    guides.check_provenance(guides_config, args.guides, sae_sha256=sha256_file(args.sae / "sae.safetensors"),
                            sae_folder=args.sae, aux_attrs=aux.attrs, aux_path=args.aux)
    ranges = category_ranges(target)
    # category names become file names: refuse one that would leave overlays/ before any work is done
    overlay_paths = {category: report.report_path(args.out / "overlays", category, ".png") for category in ranges}
    training = guides_config["training"]
    dictionary = model.dictionary.detach()

    vectors: dict[str, torch.Tensor] = {}
    seeds = training["seeds"]
    for s, codes in zip(seeds, codes_per_seed):
        vectors[f"learned/{s}"] = guides.guide_vectors(codes.to(device), dictionary)
        init = guides.GuideCodes(dictionary.shape[0], dead_mask, variant=training["variant"],
                                 guide_topk=training["guide_topk"], init_mean=training["init_mean"],
                                 init_std=training["init_std"], generator=torch.Generator().manual_seed(s))
        vectors[f"untrained_init/{s}"] = guides.guide_vectors(init.effective().detach().to(device), dictionary)
    vectors["no_sae/0"] = no_sae_guides(aux, device)

    files: dict[Path, bytes] = {}  # every output, rendered before the first one is written
    per_category: dict[str, dict[str, dict]] = {name: {} for name in vectors}
    pooled_labels, pooled_scores, pixel_sample = [], [], ([], [])
    rng = np.random.default_rng(0)
    # labels-only categories (a folder target without ground_truth/): their zero masks are no ground truth
    no_masks = set(target.attrs.get("categories_without_masks", []))
    for category, (start, stop) in tqdm(ranges.items(), desc="evaluate", unit="category"):
        labels = target.labels[start:stop].astype(np.int64)
        masks = target.masks[start:stop]
        scored = score_rows(target, start, stop, vectors, cfg, training["temperature"], device)
        for name, (maps, scores) in scored.items():
            per_category[name][category] = metrics.compute_all(labels, scores, masks, maps,
                                                               has_masks=category not in no_masks)
        maps, scores = scored[f"learned/{seeds[0]}"]
        pooled_labels.append(labels)
        pooled_scores.append(scores)
        take = rng.random(masks.shape) < min(1.0, 2_000_000 / max(1, target.masks.shape[0] * masks[0].size))
        if category not in no_masks:  # else its zero masks would count as normal pixels in the pooled curve
            pixel_sample[0].append(masks[take])
            pixel_sample[1].append(maps[take])
        # rendered here so that no category's maps outlive its turn (all of them would not fit on MVTec
        # at 448 px); a PNG's bytes are small
        rows = overlay_rows(target, start, labels, masks, maps, cfg.overlays_per_category)
        # one colour scale per category, from its own maps: raw probabilities can all sit near 0
        lo, hi = float(maps.min()), float(maps.max())
        fig = report.overlays_figure(rows, vmin=lo, vmax=max(hi, lo + 1e-6),
                                     title=f"{category}: image, ground truth, anomaly map (seed {seeds[0]}, "
                                           f"colours span {lo:.3f}-{hi:.3f})")
        if fig is not None:
            files[overlay_paths[category]] = report.png_bytes(fig)

    def summary(prefix: str) -> dict:
        names = [n for n in vectors if n.startswith(prefix + "/")]
        return seed_summary([mean_over_categories(per_category[n]) for n in names])

    learned = summary("learned")
    result = {
        **learned,
        "n_images": int(target.n_images),
        "n_categories": len(ranges),
        "backbone": target.attrs["backbone"],
        "weights_sha256": target.attrs["weights_sha256"],
        "aux": provenance["dataset"],
        "target": target.attrs["dataset"],
        "image_score": cfg.image_score,
        "seeds": seeds,
        "controls": {"untrained_init": summary("untrained_init"), "no_sae": summary("no_sae")},
    }
    by_category = {}
    for category in ranges:
        runs = [per_category[n][category] for n in vectors if n.startswith("learned/")]
        entry = seed_summary(runs)
        reasons = {k: v for r in runs for k, v in r.get("null_reasons", {}).items()}
        if reasons:
            entry["null_reasons"] = reasons
        entry["controls"] = {c: seed_summary([per_category[n][category] for n in vectors if n.startswith(c + "/")])
                             for c in ("untrained_init", "no_sae")}
        by_category[category] = entry

    null_reasons = {key: "undefined in every category; " + "; ".join(
                        f"{c}: {e['null_reasons'][key]}" for c, e in by_category.items() if key in e.get("null_reasons", {}))
                    for key in KEYS if learned[key] is None}
    labels, scores = np.concatenate(pooled_labels), np.concatenate(pooled_scores)
    pix_masks, pix_maps = (np.concatenate(a) if a else np.zeros(0, np.uint8) for a in pixel_sample)
    curves = {}
    for level, (y, score, unit) in {"image": (labels, scores, "images"), "pixel": (pix_masks, pix_maps, "pixels")}.items():
        reason = metrics.one_class_reason(y, unit)
        if level == "pixel" and not pixel_sample[0]:
            reason = metrics.NO_MASKS_REASON
        if reason:
            # DVC declares the CSVs as outputs: an undefined curve is its header alone, not a missing file
            null_reasons[f"{level}_curves"] = f"plots/{level}_roc.csv and plots/{level}_pr.csv are empty: {reason}"
            curves[level] = {"roc": [], "pr": []}
        else:
            curves[level] = metrics.curves(y, score, cfg.curve_points, unit=unit)
    if null_reasons:
        result["null_reasons"] = null_reasons

    title = f"{result['aux']} → {result['target']}"
    for level, c in curves.items():
        for kind in ("roc", "pr"):
            path = report.report_path(args.out / "plots", f"{level}_{kind}", ".csv")
            files[path] = report.csv_text(path, c[kind], CURVE_COLUMNS[kind]).encode()
    files[args.out / "roc_pr.png"] = report.png_bytes(report.roc_pr_figure(curves, title=title))
    files[args.out / "per_category.png"] = report.png_bytes(report.per_category_figure(by_category, title=title))
    files[args.out / "per_category.json"] = report.json_text(args.out / "per_category.json", by_category).encode()
    # last: a metrics.json newer than the rest means the whole report is from one run
    files[args.out / "metrics.json"] = report.json_text(args.out / "metrics.json", result).encode()

    (args.out / "overlays").mkdir(parents=True, exist_ok=True)  # a declared output, even with no overlay
    for path, data in files.items():
        report.write_bytes(path, data)
    log.info("%s -> %s: %s", result["aux"], result["target"],
             ", ".join(f"{k} {learned[k]:.3f}" for k in KEYS if learned[k] is not None))
    log.info("controls: %s", {c: {k: round(v, 3) for k, v in m.items() if v is not None and not k.endswith("_std")}
                              for c, m in result["controls"].items()})
    for key, reason in null_reasons.items():
        log.warning("%s: %s", key, reason)

if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run(main)
