"""Stage evaluate@<run>: score the target store with the guides fitted on the auxiliary set.

    python -m pipeline.stages.evaluate --target features/synth_b --aux features/synth_a \
        --sae models/synth_a/sae --guides models/synth_a/guides --detector models/synth_a/detector \
        --out reports/synth_a_to_synth_b

The learned guides scored are the detector's (``models/<A>/detector``, the export stage's), with its
scoring settings, through the same library code as :class:`pipeline.method.detector.Detector`, so the maps here
equal ``predict``'s for the same images. The method (guide sets, controls, scoring, summaries) lives in
:mod:`pipeline.evaluation.evaluate`; this module keeps paths, I/O and reports.

Writes into ``--out``: ``metrics.json`` (means over categories; with several guide seeds the mean
over seeds and ``<key>_std``; the two controls under ``controls``), ``per_category.json``, plot data
under ``plots/`` (image and pixel ROC/PR, thinned) and PNGs (``roc_pr.png``, ``per_category.png``,
``overlays/<category>.png``).

Inputs must belong together: the guides' checkpoint records the sha256 of the SAE it was fitted on
and the fingerprint of its auxiliary store, and both are checked (:func:`guides.check_provenance`); the
detector records the sha256 of that SAE and of those guides, and its scoring settings must be params
``scoring``'s (else: re-run export).

Keys of ``metrics.json`` beyond the six metrics of docs/design.md#artifacts (each a mean over categories; per
category in ``per_category.json``):

- ``seed_ensemble``: the six metrics of the mean of the seeds' maps (the detector's default scoring),
  next to the per-seed mean (the top-level keys), so the two ways of using several seeds compare;
- ``image_f1_at_aux_threshold``, ``image_precision_at_aux_threshold``, ``image_recall_at_aux_threshold``:
  the decisions ``score >= aux_threshold`` (detector.json's threshold, chosen on the auxiliary set) on
  the target's images. The threshold belongs to the detector's scoring, so these are computed on the
  mean-of-seeds map's scores, as ``seed_ensemble`` is; compare them with ``seed_ensemble.image_f1_max``
  (the oracle: the best threshold chosen with the target's labels). Null with a reason where undefined
  (recall and F1 without anomalous images, precision when no image reaches the threshold).
Tokens and CLS read are checked finite (an error names the store, array, image and chunk).

Outputs are all or nothing: everything (metrics, JSON text, CSV text, PNG bytes) is computed first and
only then written, each file through a temp file and ``os.replace``, ``metrics.json`` last. A metric
the target leaves undefined (no anomalous or no normal image) is ``null`` with its reason under
``null_reasons``; a pooled ROC/PR curve that is undefined (one class at that level) is written as its
CSV header alone, so every declared plot exists, with the reason under ``null_reasons`` too
(``image_curves``, ``pixel_curves``). Per-category file names come from :func:`report.report_path`,
which refuses a category name that would leave ``overlays/``.

- ``image_by_score``: image AUROC, AP and F1-max for every image score (``max``, ``lse``, ``top_mean``,
  ``global``; means over categories) of the detector's scoring, the mean of the seeds' maps (so
  ``image_by_score[image_score]`` equals ``seed_ensemble``'s image metrics); the controls and the
  baselines carry their own ``image_by_score``. ``image_score`` itself is unchanged.
- ``baselines``: training-free scorings of the same target tokens (:mod:`pipeline.method.baselines`), with the
  same upsampling, blur, image score and metric code, per category then the mean over categories, each
  labelled with its ``setting``: ``self_dissimilarity`` (single image) and ``mutual`` (batch zero-shot:
  it sees the other unlabelled target images of its category; null for a category of one image). They
  have no CLS guide: their ``global`` image score is null with a reason, so with ``image_score: global``
  their top-level image metrics are null and ``image_by_score`` holds the map-based ones.

Controls, scored exactly like the result:
- ``untrained_init``: the guide codes as initialised, before any training (what the learned
  coefficients add);
- ``no_sae``: local guides = mean normal and mean anomalous auxiliary patch tokens, global guides =
  mean normal and mean anomalous auxiliary CLS tokens (what the SAE dictionary adds).
"""

from __future__ import annotations

import argparse
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.method import detector
from pipeline.evaluation import evaluate as evaluation
from pipeline.evaluation import html_report
from pipeline.method import guides
from pipeline.evaluation import metrics
from pipeline.evaluation import metrics_stream
from pipeline.evaluation import report
from pipeline.evaluation import target_scores
from pipeline.evaluation import tiled
from pipeline.method import sae
from pipeline.features import store
from pipeline.method import scoring
from pipeline.evaluation.evaluate import ENSEMBLE
from pipeline.files import sha256_file
from pipeline.config import load_params
from pipeline.launch import resolve_device
from pipeline.launch import run, setup_logging

log = logging.getLogger("pipeline.stages.evaluate")

KEYS = metrics.METRIC_KEYS
THRESHOLD_KEYS = metrics.THRESHOLD_KEYS
CURVE_COLUMNS = {"roc": ("fpr", "tpr", "threshold"), "pr": ("recall", "precision", "threshold")}
"""Columns of the plot CSVs (metrics.curves' rows), also the header of an undefined curve's file."""


def overlay_pick(labels: np.ndarray, n: int) -> list[int]:
    """The rows (of one category, labels (n_images,)) of its overlays: up to ``n``, half anomalous
    where possible, ascending."""
    anomalous, normal = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n_anomalous = min(len(anomalous), n - min(len(normal), n // 2))
    return [int(i) for i in sorted([*anomalous[:n_anomalous], *normal[: n - n_anomalous]])]


def overlay_rows(target: store.FeatureStore, start: int, labels, masks, maps, n: int) -> list[tuple]:
    """Up to ``n`` images of one category (:func:`overlay_pick`) with mask, map and caption. ``masks``
    and ``maps`` are indexed by the category's row: arrays (n_images, S, S) or {row: (S, S)} of the
    picked rows.

    Images come from the store's ``images`` array (already at S), never from the dataset's files, so a
    moved or absent dataset cannot fail this stage.
    """
    rows = []
    for i in overlay_pick(labels, n):
        relpath = target.attrs["paths"][start + i]
        rows.append((target.images[start + i], masks[i], maps[i], f"{relpath.split('/')[-2]} {maps[i].max():.2f}"))
    return rows


class CategoryMaps:
    """The sink (:data:`evaluation.MapSink`) of one category's maps, batch by batch: every
    scored set's maps go to its :class:`metrics_stream.PixelStream` (run files in ``folder``); of the
    ``overlay_set``'s maps only what the report needs stays: the pooled pixel-curve sample (drawn from
    ``rng`` batch by batch, the same draws as one ``rng.random`` of the category's mask shape), the
    overlay rows' maps and masks, and the colour range. Memory: one batch, whatever the category size.
    """

    def __init__(self, target: store.FeatureStore, start: int, folder: Path, *, has_masks: bool, overlay_set: str,
                 overlay_pick: list[int], sample_fraction: float, rng: np.random.Generator):
        self.target, self.start, self.folder, self.has_masks = target, start, folder, has_masks
        self.overlay_set, self.pick, self.fraction, self.rng = overlay_set, set(overlay_pick), sample_fraction, rng
        self.streams: dict[str, metrics_stream.PixelStream] = {}
        self.sample: tuple[list, list] = ([], [])
        self.overlay_masks: dict[int, np.ndarray] = {}
        self.overlay_maps: dict[int, np.ndarray] = {}
        self.lo, self.hi = np.inf, -np.inf
        self._batch: tuple[int, int, np.ndarray, tuple | None] | None = None  # (row, n, masks, regions)

    def __call__(self, row: int, maps: dict[str, np.ndarray]) -> None:
        n = len(next(iter(maps.values())))
        if self._batch is None or self._batch[:2] != (row, n):  # the sets of one batch share its masks
            masks = self.target.masks[self.start + row:self.start + row + n]
            regions = metrics_stream.label_regions(masks != 0) if self.has_masks else None
            self._batch = (row, n, masks, regions)
        _, _, masks, regions = self._batch
        for name, m in maps.items():
            if name not in self.streams:
                self.streams[name] = metrics_stream.PixelStream(self.folder, f"{len(self.streams)}",
                                                                rank=self.has_masks)
            self.streams[name].add(masks, m, regions)
        m = maps.get(self.overlay_set)
        if m is None:
            return
        take = self.rng.random(masks.shape) < self.fraction
        if self.has_masks:  # else its zero masks would count as normal pixels in the pooled curve
            self.sample[0].append(masks[take])
            self.sample[1].append(m[take])
        for i in self.pick & set(range(row, row + n)):
            self.overlay_masks[i], self.overlay_maps[i] = masks[i - row].copy(), m[i - row].copy()
        self.lo, self.hi = min(self.lo, float(m.min())), max(self.hi, float(m.max()))

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()


@dataclass
class Inputs:
    """What one run scores with, loaded and checked to belong together."""

    target: store.FeatureStore
    aux: store.FeatureStore
    det: detector.Detector
    vectors: dict[str, torch.Tensor]
    batch_scores: dict | None
    scores_info: dict
    aux_name: str


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, type=Path, help="the target dataset's feature store")
    parser.add_argument("--aux", required=True, type=Path, help="the auxiliary feature store (no-SAE control)")
    parser.add_argument("--sae", required=True, type=Path)
    parser.add_argument("--guides", required=True, type=Path)
    parser.add_argument("--detector", required=True, type=Path,
                        help="the detector exported from these SAE and guides, models/<A>/detector")
    parser.add_argument("--out", required=True, type=Path, help="report folder, reports/<A>_to_<T>")
    parser.add_argument("--neighbours", type=Path,
                        help="the target's patch scores from the neighbours stage, neighbours/<T> "
                             "(without it the batch scores are computed here)")
    parser.add_argument("--weights", type=Path,
                        help="the backbone weights, models/backbones/<name>.safetensors: read only when the target's "
                             "datasets entry sets tile (default: the detector's weights_path)")
    parser.add_argument("--params", default="params.yaml", type=Path)
    return parser.parse_args(argv)


def load_inputs(args: argparse.Namespace, scoring_params: dict, device: torch.device) -> Inputs:
    """Open the stores, SAE, guides and detector of a run, refusing any that do not belong together."""
    model, dead_mask, _ = sae.load(args.sae, device)
    _, guides_config = guides.load(args.guides)
    provenance = guides_config["features"]
    expect = {k: provenance[k] for k in store.TOKEN_SPACE}
    # A target extracted with another backbone, layer, image size or weights lives in another space.
    target = store.open_store(args.target, expect=expect)
    aux = store.open_store(args.aux, expect=expect)
    # The guides must have been fitted on this SAE and this auxiliary store, or the report is mislabelled.
    sae_sha256 = sha256_file(args.sae / "sae.safetensors")
    guides.check_provenance(guides_config, args.guides, sae_sha256=sae_sha256,
                            sae_folder=args.sae, aux_attrs=aux.attrs, aux_path=args.aux)
    # ... and the detector must have been exported from them, with these scoring settings
    det = detector.Detector.load(args.detector, device=device, with_backbone=False)
    check_detector(det, args.detector, sae_sha256=sae_sha256, sae_folder=args.sae,
                   guides_sha256=sha256_file(args.guides / "guides.safetensors"), guides_folder=args.guides,
                   params=scoring_params, params_path=args.params)
    batch_scores, scores_info = target_scores.load(args.neighbours, target) if args.neighbours else (None, {})
    vectors = evaluation.guide_sets(det.vectors, det.seeds, model.dictionary.detach(), dead_mask,
                                    guides_config["training"], aux, device)
    return Inputs(target, aux, det, vectors, batch_scores, scores_info, provenance["dataset"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    params = load_params(args.params, ["scoring", "evaluate", "datasets", "data"])
    cfg = params.evaluate
    device = resolve_device(cfg.device)
    run_in = load_inputs(args, {k: getattr(params.scoring, k) for k in detector.SETTINGS}, device)
    target, det = run_in.target, run_in.det
    ranges = evaluation.category_ranges(target)
    # category names become file names: refuse one that would leave overlays/ before any work is done
    overlay_paths = {category: report.report_path(args.out / "overlays", category, ".png") for category in ranges}
    collected = evaluation.Collected.empty(list(run_in.vectors), run_in.scores_info.get("reference", {}).get("ks", []),
                                           run_in.scores_info)
    files: dict[Path, bytes] = {}  # every output, rendered before the first one is written
    rng = np.random.default_rng(0)
    # every category's maps stream to sorted run files here, batch by batch, and the pixel metrics come
    # from merging them (metrics_stream): a category's maps never sit in memory at once
    scratch = metrics_stream.scratch_folder(args.out)
    try:
        for category, (start, stop) in tqdm(ranges.items(), desc="evaluate", unit="category"):
            png = score_category(run_in, category, start, stop, collected, cfg, params.scoring.image_score,
                                 device, scratch, rng)
            if png is not None:
                files[overlay_paths[category]] = png
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # our own folder of run files, made above

    run_info = {"n_images": int(target.n_images), "n_categories": len(ranges), "backbone": target.attrs["backbone"],
                "weights_sha256": target.attrs["weights_sha256"], "aux": run_in.aux_name,
                "target": target.attrs["dataset"], "image_score": params.scoring.image_score, "seeds": det.seeds}
    result, by_category, curves = evaluation.assemble(
        collected, list(ranges), threshold_info={"aux_threshold": det.threshold,
                                                 "threshold_rule": det.info["threshold_rule"]},
        run_info=run_info, curve_points=cfg.curve_points)
    tile = tiled_option(params, target, args.params)
    if tile is not None:
        result["tiled"] = score_tiled(params, target, args, tile, device,
                                      batch=tiled_batch(target, ranges, run_in.batch_scores, device))
    write_report(args.out, files, result, by_category, curves)
    log_summary(result, det)


def tiled_option(params, target: store.FeatureStore, params_path: Path) -> int | None:
    """``datasets.<target>.tile`` of params (None: off), checked to name the store's own data."""
    name = target.attrs["dataset"]
    ds = params.datasets.get(name)
    if ds is None or ds.tile is None:
        return None
    if (ds.format, Path(ds.root)) != (target.attrs["format"], Path(target.attrs["root"])):
        raise tiled.TiledError(f"{params_path}: datasets.{name} is format {ds.format} at {ds.root}, but the target store "
                               f"was extracted from format {target.attrs['format']} at {target.attrs['root']}: re-run "
                               "the extract stage (dvc repro)")
    return ds.tile


def tiled_batch(target: store.FeatureStore, ranges: dict[str, tuple[int, int]], batch_scores: dict | None,
                device: torch.device) -> tiled.Batch:
    """The target's batch signal for the tiled block: each category's mutual patch scores, from the
    neighbours stage's arrays where the run has them, else computed from the store as the category loop
    computes them."""
    scores = {category: (target_scores.mutual_of(target, start, stop, device=device) if batch_scores is None
                         else target_scores.category_mutual(batch_scores, start, stop))
              for category, (start, stop) in ranges.items()}
    return tiled.Batch(scores=scores, grid=tuple(target.attrs["grid"]), size=int(target.masks.shape[-1]))


def score_tiled(params, target: store.FeatureStore, args: argparse.Namespace, tile: int, device: torch.device,
                batch: tiled.Batch | None = None) -> dict:
    """metrics.json's ``tiled`` block (:func:`pipeline.evaluation.tiled.tiled_metrics`): the target's image
    files scored whole and as tiles by the detector with its backbone, and with ``batch`` each fused with
    the batch signal."""
    from pipeline.data import tables

    ds = params.datasets[target.attrs["dataset"]]
    samples = tables.load_table(ds.format, Path(ds.root), splits=target.attrs["splits"], categories=ds.categories,
                                max_pixels=params.data.max_pixels)
    tiled.check_samples(samples, target.attrs["paths"], str(target.path))
    det = detector.Detector.load(args.detector, weights=args.weights, device=device)
    log.info("tiled: %d images of %s scored whole and as %d px tiles", len(samples), target.attrs["dataset"], tile)
    scratch = metrics_stream.scratch_folder(args.out)
    try:
        block = tiled.tiled_metrics(det, samples, tile, grid=params.evaluate.tiled_grid, scratch=scratch,
                                    max_pixels=params.data.max_pixels, allow_empty_masks=params.data.allow_empty_masks,
                                    without_masks=target.attrs.get("categories_without_masks", []), batch=batch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for path in tiled.PATHS + (tiled.BATCH_PATHS if batch is not None else ()):
        log.info("tiled: %s image AUROC %s, pixel AUROC %s, AUPRO %s", path, block[path]["image_auroc"],
                 block[path]["pixel_auroc"], block[path]["pixel_aupro"])
    return block


def score_category(run_in: Inputs, category: str, start: int, stop: int, collected: evaluation.Collected,
                   cfg, image_score: str, device: torch.device, scratch: Path,
                   rng: np.random.Generator) -> bytes | None:
    """Score one category in every mode into ``collected``; its overlay PNG's bytes (None: no overlay)."""
    target, det, vectors = run_in.target, run_in.det, run_in.vectors
    labels = target.labels[start:stop].astype(np.int64)
    # labels-only categories (a folder target without ground_truth/): their zero masks are no ground truth
    has_masks = category not in set(target.attrs.get("categories_without_masks", []))
    overlay_set = f"learned/{det.seeds[0]}"
    sink = CategoryMaps(target, start, scratch, has_masks=has_masks, overlay_set=overlay_set,
                        overlay_pick=overlay_pick(labels, cfg.overlays_per_category),
                        sample_fraction=min(1.0, 2_000_000 / max(1, target.masks.shape[0]
                                                                 * int(np.prod(target.masks.shape[1:])))),
                        rng=rng)
    try:
        modes: dict = {}
        scored = evaluation.score_rows(target, start, stop, vectors, det.settings, cfg.batch_images, device,
                                       keep_maps=False, by_mode=modes, sink=sink)
        for name, (_, scores) in scored.items():
            collected.per_category[name][category] = sink.streams[name].metrics(labels, scores, has_masks=has_masks)
            collected.by_score[name][category] = evaluation.image_by_score(labels, modes[name])
        mutual = (target_scores.mutual_of(target, start, stop, device=device) if run_in.batch_scores is None
                  else target_scores.category_mutual(run_in.batch_scores, start, stop))
        for name, entry in evaluation.baseline_rows(target, start, stop, det.settings, cfg.batch_images,
                                                    device, sink=sink, mutual=mutual).items():
            collected.per_baseline[name][category] = evaluation.baseline_metrics(
                labels, None, entry, image_score, has_masks=has_masks, pixels=sink.streams.get(name))
        for name, by_mode in (evaluation.fused_rows(target, start, stop, vectors, det.settings,
                                                    cfg.batch_images, device, mutual, sink=sink).items()
                              if mutual is not None else ()):
            collected.per_fused[name][category] = evaluation.batch_rule_metrics(labels, evaluation.baseline_metrics(
                labels, None, (None, by_mode, None), image_score, has_masks=has_masks, pixels=sink.streams[name]),
                by_mode, image_score)
        few_shot(collected.per_few_shot, target, start, stop, category, vectors, det.settings, cfg.batch_images,
                 device, run_in.batch_scores, mutual, labels, has_masks,
                 run_in.scores_info.get("reference", {}).get("max_patches"))
    finally:
        sink.close()
    # the aux threshold belongs to the detector's scoring: the mean of the seeds' maps
    at = metrics.at_threshold(labels, scored[ENSEMBLE][1], det.threshold)
    operator = metrics.operator_view(labels, scored[ENSEMBLE][1])
    entry = collected.per_category[ENSEMBLE][category]
    reasons = {**entry["null_reasons"], **at.pop("null_reasons"), **operator.pop("null_reasons")}
    entry.update(at, **operator, null_reasons=reasons)
    collected.counts[category] = (int(labels.size), int(np.count_nonzero(labels)))
    collected.pooled_labels.append(labels)
    collected.pooled_scores.append(scored[overlay_set][1])
    collected.pixel_sample[0].extend(sink.sample[0])
    collected.pixel_sample[1].extend(sink.sample[1])
    # rendered here so that no category's overlay maps outlive its turn; a PNG's bytes are small
    rows = overlay_rows(target, start, labels, sink.overlay_masks, sink.overlay_maps, cfg.overlays_per_category)
    # one colour scale per category, from its own maps: raw probabilities can all sit near 0
    lo, hi = sink.lo, sink.hi
    fig = report.overlays_figure(rows, vmin=lo, vmax=max(hi, lo + 1e-6),
                                 title=f"{category}: image, ground truth, anomaly map (seed {det.seeds[0]}, "
                                       f"colours span {lo:.3f}-{hi:.3f})")
    return None if fig is None else report.png_bytes(fig)


def write_report(out: Path, files: dict[Path, bytes], result: dict, by_category: dict, curves: dict) -> None:
    """Render the run-level files beside the overlays in ``files`` and write them all, metrics.json last."""
    title = f"{result['aux']} → {result['target']}"
    for level, c in curves.items():
        for kind in ("roc", "pr"):
            path = report.report_path(out / "plots", f"{level}_{kind}", ".csv")
            files[path] = report.csv_text(path, c[kind], CURVE_COLUMNS[kind]).encode()
    files[out / "roc_pr.png"] = report.png_bytes(report.roc_pr_figure(curves, title=title))
    files[out / "per_category.png"] = report.png_bytes(report.per_category_figure(by_category, title=title))
    files[out / "per_category.json"] = report.json_text(out / "per_category.json", by_category).encode()
    # the overlays are in ``files``, not yet on disk
    files[out / "report.html"] = html_report.evaluate_page(out, result, by_category, title, written=set(files))
    # last: a metrics.json newer than the rest means the whole report is from one run
    files[out / "metrics.json"] = report.json_text(out / "metrics.json", result).encode()
    (out / "overlays").mkdir(parents=True, exist_ok=True)  # a declared output, even with no overlay
    for path, data in files.items():
        report.write_bytes(path, data)


def log_summary(result: dict, det: detector.Detector) -> None:
    log.info("%s -> %s: %s", result["aux"], result["target"],
             ", ".join(f"{k} {result[k]:.3f}" for k in KEYS if result[k] is not None))
    plain = lambda m: {k: round(v, 3) for k, v in m.items()  # noqa: E731
                       if isinstance(v, float) and not k.endswith("_std")}
    log.info("controls: %s", {c: plain(m) for c, m in result["controls"].items()})
    log.info("baselines: %s", {b: plain(m) for b, m in result["baselines"].items()})
    log.info("fused: %s", {b: plain(m) for b, m in result["fused"].items()})
    log.info("aux threshold %.6g (%s) on the mean of the seeds' maps: %s", det.threshold, det.info["threshold_rule"],
             ", ".join(f"{k} {result[k]:.3f}" for k in THRESHOLD_KEYS if result[k] is not None))
    for key, reason in result.get("null_reasons", {}).items():
        log.warning("%s: %s", key, reason)


def few_shot(per_few_shot: dict, target: store.FeatureStore, start: int, stop: int, category: str, vectors: dict,
             settings: scoring.ScoreSettings, batch_images: int, device: torch.device, batch_scores: dict | None,
             mutual: np.ndarray | None, labels: np.ndarray, has_masks: bool, max_patches: int | None = None) -> None:
    """Score one category's few-shot draws for every k into ``per_few_shot[k][mode][category]``."""
    if not per_few_shot:
        return
    signals = None
    for k, modes in per_few_shot.items():
        reference = target_scores.category_reference(batch_scores, k, start, stop)
        if reference is None:
            continue
        if signals is None:  # the guide signals of the category, shared by every k and draw
            signals = evaluation.guide_signals(target, start, stop, vectors, settings, batch_images, device)
        scored = evaluation.few_shot_metrics(
            labels, target.masks[start:stop], signals, reference, mutual, tuple(target.attrs["grid"]), settings,
            has_masks=has_masks,
            tokens_of=lambda rows: np.stack([target.tokens[start + int(r)] for r in rows]).astype(np.float32),
            max_patches=max_patches, normals=target_scores.category_normals(batch_scores, k, category))
        for name, draws in scored.items():
            modes[name][category] = draws


def check_detector(det: detector.Detector, folder: Path, *, sae_sha256: str, sae_folder: Path, guides_sha256: str,
                   guides_folder: Path, params: dict, params_path: Path) -> None:
    """Refuse a detector exported from other SAE or guides, or with other scoring settings than params."""
    where = folder / "detector.json"
    hint = f"re-run the export stage (dvc repro export@{folder.parent.name})"
    if det.info["sae_sha256"] != sae_sha256:
        raise detector.DetectorError(f"{where}: exported from an SAE with sha256 {det.info['sae_sha256']}, but "
                                     f"{sae_folder / 'sae.safetensors'} has {sae_sha256}; {hint}")
    recorded = det.info["guides"].get("sha256")
    if recorded != guides_sha256:
        raise detector.DetectorError(f"{where}: exported from guides with sha256 {recorded}, but "
                                     f"{guides_folder / 'guides.safetensors'} has {guides_sha256}; {hint}")
    for key, value in params.items():
        recorded = getattr(det.settings, key)  # with the defaults of keys older detectors lack
        if recorded != value:
            raise detector.DetectorError(f"{where}: {key} is {recorded!r} but scoring.{key} in {params_path} is "
                                         f"{value!r}; {hint}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run(main)
