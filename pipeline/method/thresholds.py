"""Image-score thresholds that do not need a labelled target: from known-good images, or from the batch.

- :func:`threshold_from_normals`: the lowest threshold flagging at most a fraction ``far`` of the
  known-good images (``predict --threshold-from-normals``, and with reference normals each of them
  scored against the others);
- :func:`batch_threshold`: with only the batch, median + 3 scaled MADs of the batch's own scores.

An image is anomalous when ``score >= threshold``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from pipeline.errors import PipelineError


class ThresholdError(PipelineError, ValueError):
    """A threshold rule cannot be applied: no score, a non-finite one, or a rate outside [0, 1)."""


def check_rate(far: Any) -> float:
    """``far`` if it is a false-alarm rate in [0, 1), else a ThresholdError: the one check of ``--far``."""
    if isinstance(far, bool) or not (isinstance(far, (int, float)) and 0.0 <= far < 1.0):
        raise ThresholdError(f"--far must be a rate in [0, 1), got {far!r}")
    return far


def threshold_from_normals(scores: Sequence[float], far: float) -> tuple[float, int]:
    """The lowest threshold at which at most ``floor(far * n)`` of ``n`` known-good scores are flagged.

    Rule (an image is flagged when ``score >= threshold``): sort the scores from the highest,
    ``s(1) >= s(2) >= ... >= s(n)``; let ``k = floor(far * n)`` (``far * n`` rounded down, with a
    1e-9 allowance so that 0.1 * 10 gives 1); the threshold is the smallest float64 above ``s(k+1)``
    (``numpy.nextafter``). Flagged are then exactly the normals scoring above ``s(k+1)``: ``k`` of
    them when ``s(k) > s(k+1)``, fewer when scores tie at ``s(k+1)`` (every image of a tie is treated
    alike, so the whole tie passes). ``far = 0`` puts the threshold just above the highest normal.

    Args:
        scores: (n,) image scores of known-good images, n >= 1, finite.
        far: the false-alarm rate allowed on them, in [0, 1).

    Returns:
        (threshold, k): the threshold and the number of normals it may flag at most.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if s.size == 0:
        raise ThresholdError("threshold from normals: no known-good image was scored")
    if not np.isfinite(s).all():
        raise ThresholdError("threshold from normals: a known-good image's score is not finite")
    check_rate(far)
    k = int(math.floor(far * s.size + 1e-9))
    return float(np.nextafter(s[k], np.inf)), k


BATCH_RULE_MADS = 3.0
"""With the batch alone, an image is flagged when its fused score exceeds the batch's median by this
many (scaled) median absolute deviations."""


def batch_threshold(scores: np.ndarray) -> dict:
    """The threshold of the batch alone: median + 3 · 1.4826 · MAD of the set's fused image scores
    (1.4826 · MAD estimates the standard deviation of the good parts' scores when most of the set is
    good, the assumption batch scoring makes itself)."""
    median = float(np.median(scores))
    mad = 1.4826 * float(np.median(np.abs(scores - median)))
    return {"value": median + BATCH_RULE_MADS * mad, "source": "batch",
            "rule": f"median + {BATCH_RULE_MADS:g} x 1.4826 x MAD of this run's fused image scores (assumes most "
                    "images scored together are good); pass --normals or --threshold for another",
            "median": median, "mad_scaled": mad}


PIXEL_LEVELS = 65535
"""A map's values are binned at the resolution of the map PNGs predict writes: ``top`` / 65535."""


class PixelF1:
    """The pixel threshold with the highest F1 over a labelled set's maps, streamed batch by batch.

    Map values in [0, ``top``] are binned into levels ``b = floor(v / top · 65535)`` (the 16-bit map
    PNG's resolution); a pixel is flagged at level ``b`` when its own level is ``>= b``, i.e. when its
    value is ``>= b · top / 65535`` up to that resolution. Per level it counts defect and good pixels;
    :meth:`best` returns the level of the highest F1 (the highest level on ties: the fewest flagged
    pixels for the same F1) and its threshold ``b · top / 65535``. Memory is two arrays of 65,536 counts,
    whatever the set's size.
    """

    def __init__(self, top: float = 1.0):
        if not (math.isfinite(top) and top > 0):
            raise ThresholdError(f"map range top must be a positive number, got {top!r}")
        self.top = float(top)
        self.positive = np.zeros(PIXEL_LEVELS + 1, np.int64)
        self.negative = np.zeros(PIXEL_LEVELS + 1, np.int64)

    def levels(self, maps: np.ndarray) -> np.ndarray:
        return np.clip(np.floor(np.asarray(maps, np.float64) / self.top * PIXEL_LEVELS), 0, PIXEL_LEVELS).astype(np.int64)

    def add(self, maps: np.ndarray, masks: np.ndarray) -> None:
        """maps (B, S, S) and masks (B, S, S) {0, 1} of the same pixels."""
        maps, masks = np.asarray(maps), np.asarray(masks)
        if maps.shape != masks.shape:
            raise ThresholdError(f"maps {maps.shape} and masks {masks.shape} differ in shape")
        if not np.isfinite(maps).all():
            raise ThresholdError("a map holds NaN or Inf: no pixel threshold can be chosen on it")
        levels, defect = self.levels(maps).ravel(), masks.ravel() > 0
        self.positive += np.bincount(levels[defect], minlength=PIXEL_LEVELS + 1)
        self.negative += np.bincount(levels[~defect], minlength=PIXEL_LEVELS + 1)

    def best(self) -> tuple[float, float]:
        """(pixel F1-max, its threshold); a ThresholdError when the set has no defect or no good pixel."""
        total = int(self.positive.sum())
        if total == 0 or int(self.negative.sum()) == 0:
            raise ThresholdError("the pixel threshold needs both defect and good pixels in the labelled set")
        tp = np.cumsum(self.positive[::-1])[::-1]  # pixels at level >= b
        fp = np.cumsum(self.negative[::-1])[::-1]
        f1 = 2 * tp / (2 * tp + fp + (total - tp))
        best = int(np.flatnonzero(f1 == f1.max())[-1])
        return float(f1[best]), best * self.top / PIXEL_LEVELS
