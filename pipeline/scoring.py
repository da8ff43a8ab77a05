"""Anomaly maps and image scores from guide vectors (DESIGN §5, evaluation).

map   = Gaussian blur (σ, per image) of the anomaly probability of :func:`guides.local_probabilities`
score = max of the map (default) | log-sum-exp at a temperature | mean of the top fraction of pixels
        | the global-guide probability (softmax of the CLS-to-global-guide cosines)
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from pipeline import guides as G

IMAGE_SCORES = ("max", "lse", "top_mean", "global")


def anomaly_maps(tokens: torch.Tensor, guide_vectors: torch.Tensor, grid: tuple[int, int], size: int, *,
                 temperature: float, sigma: float) -> np.ndarray:
    """tokens (B, L, d), guide vectors (4, d) in :data:`guides.ROWS` order -> maps (B, S, S) float32.

    The blur runs on each image's 2-D map alone (``gaussian_filter`` per image, σ in pixels of S), so
    no image's scores leak into its neighbour's in the batch.
    """
    probs = G.local_probabilities(tokens, guide_vectors[G.NORMAL_LOCAL], guide_vectors[G.ANOMALY_LOCAL],
                                  grid, size, temperature)[:, 1]
    maps = probs.float().cpu().numpy()
    if sigma > 0:
        maps = np.stack([gaussian_filter(m, sigma=sigma, mode="reflect") for m in maps])
    return maps.astype(np.float32, copy=False)


def global_probability(cls: torch.Tensor, guide_vectors: torch.Tensor) -> np.ndarray:
    """cls (B, d) -> (B,) probability of 'anomalous' from the global guides' cosines (no temperature)."""
    logits = G.global_logits(cls, guide_vectors[G.NORMAL_GLOBAL], guide_vectors[G.ANOMALY_GLOBAL])
    return logits.softmax(dim=-1)[:, 1].float().cpu().numpy()


def image_scores(maps: np.ndarray, mode: str = "max", *, lse_temperature: float = 0.01,
                 top_fraction: float = 0.01, global_probs: np.ndarray | None = None) -> np.ndarray:
    """maps (B, S, S) -> (B,) image scores by ``mode`` (one of :data:`IMAGE_SCORES`).

    ``lse``: T · log mean exp(map / T), a soft maximum that tends to ``max`` as T → 0 and to the mean
    as T → ∞. ``top_mean``: mean of the ``top_fraction`` highest pixels (at least one).
    """
    flat = maps.reshape(len(maps), -1).astype(np.float64)
    if mode == "max":
        return flat.max(axis=1)
    if mode == "lse":
        m = flat.max(axis=1, keepdims=True)  # shift for a stable log-sum-exp
        return (m[:, 0] + lse_temperature * np.log(np.exp((flat - m) / lse_temperature).mean(axis=1)))
    if mode == "top_mean":
        k = max(1, int(round(top_fraction * flat.shape[1])))
        return np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:].mean(axis=1)
    if mode == "global":
        if global_probs is None:
            raise ValueError("evaluate.image_score 'global' needs the global-guide probabilities")
        return np.asarray(global_probs, dtype=np.float64)
    raise ValueError(f"evaluate.image_score must be one of {', '.join(IMAGE_SCORES)}, got {mode!r}")
