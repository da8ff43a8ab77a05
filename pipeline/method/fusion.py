"""Fusing the detector's signals: the guide map with the batch (mutual) and reference distances.

Rule: the geometric mean of the per-patch signals, each clipped at 0, then upsampled and blurred like
any map (:func:`pipeline.method.scoring.patch_maps`). Why this rule: a geometric mean ranks patches
by the sum of the signals' logarithms, so multiplying any one signal by a constant changes no ranking
and no metric. The signals live on unrelated scales (a probability in [0, 1], a cosine distance in
[0, 2] whose typical size depends on the backbone and the line), and the rule needs no weight, no
statistics of the batch and nothing fitted: predict can apply it to a single image exactly as evaluate
does. A patch scores high only where every signal calls it unusual.
"""

from __future__ import annotations

import torch

RULE = "geometric mean of the per-patch signals (each clipped at 0), then upsampled and blurred like a guide map"


def geometric(*signals: torch.Tensor) -> torch.Tensor:
    """Patch signals, each (B, L) -> (B, L) float32, the geometric mean of their values clipped at 0."""
    if not signals:
        raise ValueError("fusion needs at least one signal")
    shape = signals[0].shape
    for s in signals[1:]:
        if s.shape != shape:
            raise ValueError(f"fusion: signals of shapes {[tuple(t.shape) for t in signals]}")
    prod = torch.ones(shape, dtype=torch.float64, device=signals[0].device)
    for s in signals:
        prod = prod * s.double().clamp_min(0)
    return prod.pow(1.0 / len(signals)).float()
