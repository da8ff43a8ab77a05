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
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from pipeline.data.images import load_image, load_mask
from pipeline.errors import NonFiniteError
from pipeline.evaluation import metrics_stream
from pipeline.evaluation.evaluate import mean_over_categories
from pipeline.method import scoring, tiles

PATHS = ("resized", "tiled")


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


def tiled_metrics(det, samples: Sequence, tile: int, *, grid: int, scratch: Path, max_pixels: int,
                  allow_empty_masks: bool = False, without_masks: Sequence[str] = ()) -> dict[str, Any]:
    """metrics.json's ``tiled`` block for ``samples`` (the target's test images, store order) scored by
    ``det`` (a :class:`pipeline.method.detector.Detector` with its backbone): per path the six metrics'
    means over categories, per category each path's metrics, the count of tiled images, the tiles an
    image of them took on average, and each path's seconds per image."""
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
    seconds = dict.fromkeys(PATHS, 0.0)
    n_tiled, n_tiles = 0, 0
    per_category: dict[str, dict] = {}
    for category, items in by_category.items():
        has_masks = category not in set(without_masks)
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
                    streams[path].add(cell, grid_map(amap, grid)[None], regions)
            per_category[category] = {p: streams[p].metrics(labels, scores[p], has_masks=has_masks) for p in PATHS}
        finally:
            for stream in streams.values():
                stream.close()
    n = max(1, len(samples))  # the mean over the images of both paths: the tiled one's includes the untiled
    means = {p: mean_over_categories({c: m[p] for c, m in per_category.items()}) for p in PATHS}
    return {"tile": tile, "grid": grid, "n_images": len(samples), "n_tiled": n_tiled,
            "tiles_per_tiled_image": (n_tiles / n_tiled) if n_tiled else None,
            **means, "seconds_per_image": {p: seconds[p] / n for p in PATHS}, "per_category": per_category}

