"""The tiled path measured: a target's original images scored whole (resized to the detector's S) and
as overlapping tiles (:func:`pipeline.method.tiles.tiled_map`, what ``predict --tile`` runs), side by
side on the same masks, for the dataset option ``datasets.<name>.tile``.

Both paths score with the detector alone (its guides and its scoring settings: the zero-shot
detector an operator runs with ``predict``), from the image files, not from the feature store, whose
tokens are of the resized images. Per image:

- **resized**: ``Detector.predict`` of the whole image; its map and its image score as predict
  reports them;
- **tiled**: an image larger than ``tile`` on some side is scored as its tiles, the map stitched at
  the image's size, and the image score is the detector's ``image_score`` of that map; an image no
  larger than ``tile`` is scored as in the resized path (as ``predict --tile`` does).

Pixel metrics need one grid per category (images of a real set differ in size), so every map and mask
is brought to ``grid`` x ``grid`` pixels: a map by PIL's bilinear resize (antialiased when shrinking),
a mask by "any defect pixel under the cell" (a BOX resize then ``> 0``), so a defect of a few pixels
stays in the ground truth however small it is against the image. The six metrics then come from the
same code as the stage's others (:class:`pipeline.evaluation.metrics_stream.PixelStream`), per
category and their mean.

With the target's batch signal (:class:`Batch`: the ``mutual`` patch scores evaluate already has, of the
store's resized tokens) three more paths are measured on the same grid: ``batch``, the mutual map alone;
``resized+batch`` and ``tiled+batch``, each guide map fused with it by the rule of
:mod:`pipeline.method.fusion` applied to grid pixels instead of patches (the guide probability as its
logit, each signal standardised over the category's grid pixels, their mean). A tiled guide map has no
patch grid in common with the batch's, so the grid is the one place both exist; on the resized path the
pixel rule reproduces the patch rule of the stage's ``guides+batch`` up to the resizes. The image score of
both fused paths is the batch distances' (:data:`pipeline.method.fusion.IMAGE_RULE`), computed as
evaluate computes it: from the standardised patch scores' map.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from pipeline.data.images import load_image, load_mask
from pipeline.errors import NonFiniteError
from pipeline.evaluation import metrics_stream
from pipeline.evaluation.evaluate import mean_over_categories
from pipeline.evaluation.metrics import METRIC_KEYS
from pipeline.method import fusion, neighbours, scoring, tiles

PATHS = ("resized", "tiled")
BATCH_PATHS = ("batch", "resized+batch", "tiled+batch")
"""The paths measured when the target's batch signal is given (module docstring)."""


class TiledError(ValueError):
    """The dataset option cannot be measured as asked (a global image score, images not the store's)."""


def grid_mask(mask: np.ndarray, grid: int) -> np.ndarray:
    """mask (H, W) {0, 1} -> (grid, grid) uint8: 1 where any defect pixel lies under the cell."""
    image = Image.fromarray((np.asarray(mask) != 0).astype(np.uint8) * 255)
    return (np.asarray(image.resize((grid, grid), Image.Resampling.BOX)) > 0).astype(np.uint8)


def grid_map(amap: np.ndarray, grid: int) -> np.ndarray:
    """map (h, w) float -> (grid, grid) float32 (bilinear, antialiased when shrinking)."""
    return tiles.resized(np.asarray(amap, np.float32), (grid, grid))


def check_finite(amap: np.ndarray, score: float, image: Path | str, path: str) -> None:
    """Refuse a NaN or infinite map or score: the metrics would rank it silently (as predict refuses it)."""
    if not (np.isfinite(score) and np.isfinite(amap).all()):
        raise NonFiniteError(f"{image}: the detector's {path} map or image score is not finite (NaN or Inf); "
                             "check the detector's vectors and the backbone weights")


def check_samples(samples: Sequence, paths: Sequence[str], where: str) -> None:
    """Refuse samples that are not the store's images, in its order: the metrics would be mislabelled."""
    got = [s.relpath for s in samples]
    if got != list(paths):
        first = next((i for i, (a, b) in enumerate(zip(got, paths)) if a != b), min(len(got), len(paths)))
        raise TiledError(f"{where}: the dataset's images ({len(got)}) are not the feature store's ({len(paths)}), "
                         f"first difference at image {first}: re-run the extract stage (dvc repro)")


@dataclass(frozen=True)
class Batch:
    """The target's batch signal for :func:`tiled_metrics`: per category the mutual patch scores (n, L) of
    its images in store order (None for a category of one image, which has no other image to compare
    with), on the store's patch ``grid`` (gh, gw), upsampled to ``size`` x ``size`` as evaluate's maps."""

    scores: Mapping[str, np.ndarray | None]
    grid: tuple[int, int]
    size: int


def tiled_metrics(det, samples: Sequence, tile: int, *, grid: int, scratch: Path, max_pixels: int,
                  allow_empty_masks: bool = False, without_masks: Sequence[str] = (),
                  batch: Batch | None = None) -> dict[str, Any]:
    """metrics.json's ``tiled`` block for ``samples`` (the target's test images, store order) scored by
    ``det`` (a :class:`pipeline.method.detector.Detector` with its backbone): per path the six metrics'
    means over categories, per category each path's metrics, the count of tiled images, the tiles an
    image of them took on average, and each path's seconds per image. With ``batch`` also the
    :data:`BATCH_PATHS` (module docstring)."""
    tile = tiles.check_tile(tile)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise TiledError(f"evaluate.tiled_grid must be an integer of at least 2 pixels, got {grid!r}")
    if det.settings.image_score == "global":
        raise TiledError("the detector's image score is 'global' (the CLS token's), which has no map to stitch: "
                         "the tiled path needs a map-based scoring.image_score")
    top = tiles.map_top(det)
    by_category: dict[str, list] = defaultdict(list)
    for s in samples:
        by_category[s.category].append(s)
    if batch is not None and set(batch.scores) != set(by_category):
        raise TiledError(f"the batch scores are of categories {sorted(batch.scores)}, the images of "
                         f"{sorted(by_category)}")
    seconds = dict.fromkeys(PATHS, 0.0)
    n_tiled, n_tiles = 0, 0
    per_category: dict[str, dict] = {}
    for number, (category, items) in enumerate(by_category.items()):
        has_masks = category not in set(without_masks)
        mutual = None if batch is None else batch.scores[category]
        if mutual is not None and np.shape(mutual)[0] != len(items):
            raise TiledError(f"{category}: {np.shape(mutual)[0]} rows of batch scores for {len(items)} images")
        # a category's grid maps and masks wait on disk for the fused paths, whose statistics need them all
        kept = None if mutual is None else _Kept(scratch, number, len(items), grid)
        streams = {p: metrics_stream.PixelStream(scratch, f"tiled-{p}", rank=has_masks) for p in PATHS}
        scores = {p: np.zeros(len(items)) for p in PATHS}
        labels = np.array([s.label for s in items], np.int64)
        try:
            for i, s in enumerate(items):
                image = load_image(s.image, max_pixels)
                mask = load_mask(s.mask, image.size, allow_empty=allow_empty_masks)
                t0 = time.perf_counter()
                maps, image_scores = det.predict([image])
                seconds["resized"] += time.perf_counter() - t0
                whole, scores["resized"][i] = maps[0], float(image_scores[0])
                if max(image.size) > tile:
                    t0 = time.perf_counter()
                    stitched, count = tiles.tiled_map(lambda crops: det.predict(crops)[0], image, tile, top)
                    scores["tiled"][i] = float(scoring.score_images(stitched[None], None, det.settings)[0])
                    seconds["tiled"] += time.perf_counter() - t0
                    n_tiled, n_tiles = n_tiled + 1, n_tiles + count
                else:
                    stitched, scores["tiled"][i] = whole, scores["resized"][i]
                    seconds["tiled"] += time.perf_counter() - t0
                check_finite(whole, scores["resized"][i], s.image, "resized")
                check_finite(stitched, scores["tiled"][i], s.image, "tiled")
                cell = grid_mask(mask, grid)[None]
                regions = metrics_stream.label_regions(cell != 0) if has_masks else None
                for path, amap in (("resized", whole), ("tiled", stitched)):
                    at_grid = grid_map(amap, grid)
                    streams[path].add(cell, at_grid[None], regions)
                    if kept is not None:
                        kept.maps[path][i] = at_grid
                if kept is not None:
                    kept.cells[i] = cell[0]
            per_category[category] = {p: streams[p].metrics(labels, scores[p], has_masks=has_masks) for p in PATHS}
        finally:
            for stream in streams.values():
                stream.close()
        if batch is not None:
            per_category[category].update(
                _undefined(neighbours.ONE_IMAGE) if kept is None
                else _batch_paths(det, np.asarray(mutual, np.float32), kept, labels, has_masks, batch, scratch, grid))
        if kept is not None:
            kept.remove()
    n = max(1, len(samples))  # the mean over the images of both paths: the tiled one's includes the untiled
    paths = PATHS + (BATCH_PATHS if batch is not None else ())
    means = {p: mean_over_categories({c: m[p] for c, m in per_category.items()}) for p in paths}
    return {"tile": tile, "grid": grid, "n_images": len(samples), "n_tiled": n_tiled,
            "tiles_per_tiled_image": (n_tiles / n_tiled) if n_tiled else None,
            **means, "seconds_per_image": {p: seconds[p] / n for p in PATHS}, "per_category": per_category}


class _Kept:
    """One category's grid maps of both guide paths and its grid masks, in .npy files of ``scratch``."""

    def __init__(self, scratch: Path, number: int, n: int, grid: int) -> None:
        self.files = {p: Path(scratch) / f"tiled-{number}-{p}.npy" for p in (*PATHS, "cells", "batch")}
        self.maps = {p: np.lib.format.open_memmap(self.files[p], mode="w+", dtype=np.float32, shape=(n, grid, grid))
                     for p in (*PATHS, "batch")}
        self.cells = np.lib.format.open_memmap(self.files["cells"], mode="w+", dtype=np.uint8, shape=(n, grid, grid))

    def remove(self) -> None:
        del self.maps, self.cells
        for f in self.files.values():
            f.unlink(missing_ok=True)


def _undefined(reason: str) -> dict[str, dict]:
    return {p: {**dict.fromkeys(METRIC_KEYS), "null_reasons": dict.fromkeys(METRIC_KEYS, reason)} for p in BATCH_PATHS}


STATS_ROWS = 16
"""Images whose grid maps are standardised or scored at once."""


def _fusion_signal(values: np.ndarray, probability: bool) -> torch.Tensor:
    """Grid map values -> the signal the fusion rule standardises, float64: the logit of a probability,
    any other map (the batch's, a guide that is no probability) as it is."""
    t = torch.from_numpy(np.ascontiguousarray(values, np.float32))
    return fusion.logit(t) if probability else t.double()


def _statistics(maps: np.ndarray, signal) -> tuple[float, float]:
    """(mean, population std) of ``signal`` of every value of ``maps`` (n, g, g), summed in float64 over
    chunks so that no category's maps are in memory at once."""
    total, squares, count = 0.0, 0.0, 0
    for i in range(0, len(maps), STATS_ROWS):
        v = signal(maps[i:i + STATS_ROWS]).double()
        total, squares, count = total + float(v.sum()), squares + float((v * v).sum()), count + v.numel()
    mean = total / count
    return mean, float(np.sqrt(max(squares / count - mean * mean, 0.0)))


def _batch_paths(det, mutual: np.ndarray, kept: _Kept, labels: np.ndarray, has_masks: bool, batch: Batch,
                 scratch: Path, grid: int) -> dict[str, dict]:
    """The :data:`BATCH_PATHS` metrics of one category from its kept guide grid maps and masks."""
    settings = det.settings
    raw = torch.from_numpy(mutual)
    decided = fusion.decision(None, raw)  # what the fused paths' image score is read from, as in evaluate
    scores = {"batch": [], "decided": []}
    for i in range(0, len(mutual), STATS_ROWS):
        j = min(i + STATS_ROWS, len(mutual))
        maps = scoring.patch_maps(raw[i:j], batch.grid, batch.size, sigma=settings.blur_sigma)
        scores["batch"].append(scoring.score_images(maps, None, settings))
        scores["decided"].append(scoring.score_images(
            scoring.patch_maps(decided[i:j], batch.grid, batch.size, sigma=settings.blur_sigma), None, settings))
        for k, m in enumerate(maps):
            kept.maps["batch"][i + k] = grid_map(m, grid)
    image = {name: np.concatenate(v) for name, v in scores.items()}
    probability = settings.fusion == "none"  # otherwise the guide map is a product, not a probability
    stats = {"batch": _statistics(kept.maps["batch"], lambda v: _fusion_signal(v, False)),
             **{p: _statistics(kept.maps[p], lambda v: _fusion_signal(v, probability)) for p in PATHS}}
    streams = {p: metrics_stream.PixelStream(scratch, f"tiled-{p}", rank=has_masks) for p in BATCH_PATHS}
    try:
        for i in range(len(mutual)):
            cell = np.asarray(kept.cells[i])[None]
            regions = metrics_stream.label_regions(cell != 0) if has_masks else None
            b = np.asarray(kept.maps["batch"][i])
            streams["batch"].add(cell, b[None], regions)
            flat_b = _fusion_signal(b.reshape(1, -1), False)
            for path in PATHS:
                g = _fusion_signal(np.asarray(kept.maps[path][i]).reshape(1, -1), probability)
                fused = fusion.standardised_mean(g, flat_b, stats=[stats[path], stats["batch"]])
                streams[f"{path}+batch"].add(cell, fused.reshape(1, grid, grid).numpy(), regions)
        return {p: streams[p].metrics(labels, image["batch" if p == "batch" else "decided"], has_masks=has_masks)
                for p in BATCH_PATHS}
    finally:
        for stream in streams.values():
            stream.close()
