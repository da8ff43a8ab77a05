"""Maps at an image's own size, and large images scored as overlapping tiles.

A detector sees its input resized to S x S (224 px for the embedded default), so a defect of a few
pixels in a 2,000 px photograph covers a fraction of one patch and its signal washes out. Scored as
overlapping crops of ``tile`` px, each resized to S, the same defect keeps ``(S / tile)`` of its pixels
per side instead of ``S / max(W, H)``. Each tile's map is resized back to the tile, and the tiles are
blended with :func:`tile_window` weights into one map at the image's size (:func:`stitch_tiles`).

``predict --tile`` and the evaluate stage's ``datasets.<name>.tile`` option both score through
:func:`tiled_map`, so the tiled maps an operator sees are the ones the tiled metrics were measured on.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

TILE_BATCH = 8
"""Tiles of one image scored in one call of the scorer: bounds the memory of a very large image."""


def map_top(detector: Any) -> float:
    """The upper end of a detector's map values: ``map_range`` of its detector.json (1 for the guide
    probability, 2 with ``fusion: self_dissimilarity``); 1 where the info does not say."""
    return float(detector.info.get("map_range", (0.0, 1.0))[1])


def map_at_size(amap: np.ndarray, size: tuple[int, int], top: float = 1.0) -> np.ndarray:
    """amap (S, S) float in [0, top] -> (H, W) float32 for ``size`` = (W, H), PIL order.

    PIL's bilinear resize of a float (mode ``F``) image: pixel centres aligned (output pixel j samples
    the source at (j + 0.5) * S / W - 0.5), with the filter widened when shrinking (antialiasing).
    Clipped to [0, top] (the interpolation of values in that range stays there but for rounding).
    """
    return np.clip(resized(amap, size), 0.0, top)


def resized(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """:func:`map_at_size` without the clipping, for values of any range (a fused decision's)."""
    image = Image.fromarray(np.ascontiguousarray(amap, dtype=np.float32))  # mode F
    if image.size != tuple(size):
        image = image.resize(tuple(size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def tile_origins(length: int, tile: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` at stride ``tile // 2``, the last
    flush with the end (so every pixel is covered; the last two may overlap by more than half)."""
    if length <= tile:
        return [0]
    stride = max(1, tile // 2)
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def tile_window(tile: int) -> np.ndarray:
    """(tile, tile) stitching weights: a separable tent, 1 at the centre and 0.1 at the edges, so a
    pixel takes most of its value from the tiles it sits deep inside (a tile's edge patches see the
    least context) and an image edge, covered by one tile, still has a weight."""
    ramp = 1.0 - 0.9 * np.abs(np.linspace(-1.0, 1.0, tile))
    return np.outer(ramp, ramp).astype(np.float64)


def stitch_tiles(size: tuple[int, int], tile: int, origins: Sequence[tuple[int, int]], maps: Sequence[np.ndarray],
                 top: float) -> np.ndarray:
    """The tiles' maps (each S x S, resized to ``tile`` px) -> one (H, W) float32 map for ``size`` = (W, H):
    per pixel the :func:`tile_window`-weighted mean of every tile covering it."""
    w, h = size
    total = np.zeros((h, w), np.float64)
    weight = np.zeros((h, w), np.float64)
    window = tile_window(tile)
    for (x, y), m in zip(origins, maps):
        th, tw = min(tile, h - y), min(tile, w - x)
        full = map_at_size(m, (tw, th), top).astype(np.float64)
        total[y:y + th, x:x + tw] += full * window[:th, :tw]
        weight[y:y + th, x:x + tw] += window[:th, :tw]
    return (total / weight).astype(np.float32)


def check_tile(tile) -> int:
    """``tile`` as an int of at least 2 pixels, else ValueError (bool refused: it is an int in Python)."""
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 2:
        raise ValueError(f"a tile must be an integer of at least 2 pixels, got {tile!r}")
    return int(tile)


def tile_boxes(size: tuple[int, int], tile: int) -> list[tuple[int, int, int, int]]:
    """The crops (left, top, right, bottom) of an image of ``size`` = (W, H) that :func:`tiled_map`
    scores, row by row: one crop, the whole image, when neither side exceeds ``tile``."""
    w, h = size
    return [(x, y, min(x + tile, w), min(y + tile, h)) for y in tile_origins(h, tile) for x in tile_origins(w, tile)]


def tiled_map(score: Callable[[list[Image.Image]], np.ndarray], image: Image.Image, tile: int,
              top: float = 1.0) -> tuple[np.ndarray, int]:
    """(H, W) float32 map of ``image`` from its tiles, and the number of tiles scored.

    ``score`` takes a list of PIL crops and returns their maps (n, S, S) in [0, ``top``] (a detector's
    ``predict`` maps). An image no larger than ``tile`` on both sides is one tile: its map is the
    whole image's, resized to its size, as the untiled path gives it.
    """
    tile = check_tile(tile)
    boxes = tile_boxes(image.size, tile)
    crops = [image.crop(box) for box in boxes]
    maps = np.concatenate([np.asarray(score(crops[j:j + TILE_BATCH]), np.float32)
                           for j in range(0, len(crops), TILE_BATCH)])
    if len(boxes) == 1:
        return map_at_size(maps[0], image.size, top), 1
    return stitch_tiles(image.size, tile, [b[:2] for b in boxes], maps, top), len(boxes)
