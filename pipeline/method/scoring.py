"""Anomaly maps and image scores from guide vectors (docs/design.md#the-method, evaluation).

map   = Gaussian blur (σ, per image) of the anomaly probability of :func:`guides.local_probabilities`
        (``fusion: self_dissimilarity``: of the patch probability times the patch's self-dissimilarity,
        1 − cos(token, mean token of its image), upsampled like the probability; see :func:`anomaly_maps`)
score = max of the map (default) | log-sum-exp at a temperature | mean of the top fraction of pixels
        | the global-guide probability (softmax of the CLS-to-global-guide cosines)

:func:`score_tokens` is the one place a map is computed from tokens: the evaluate stage (through
:mod:`pipeline.evaluation.evaluate`), the export stage and :class:`pipeline.method.detector.Detector` all call it, so
their maps agree for the same tokens. Several guide seeds are combined by :func:`mean_of_seeds`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from pipeline.method import baselines
from pipeline.method import guides as G

IMAGE_SCORES = ("max", "lse", "top_mean", "global")
FUSIONS = ("none", "self_dissimilarity")
"""How the guide map is combined with the training-free self-dissimilarity (:func:`anomaly_maps`)."""


@dataclass(frozen=True)
class ScoreSettings:
    """How tokens become a map and a map an image score (params ``evaluate`` + the guides' τ)."""

    temperature: float = 0.07
    """Softmax temperature of the local cosines (the guides were fitted with it)."""
    blur_sigma: float = 4.0
    """σ in pixels of S of the per-image Gaussian blur."""
    image_score: str = "max"
    """One of :data:`IMAGE_SCORES`."""
    lse_temperature: float = 0.01
    top_fraction: float = 0.01
    fusion: str = "none"
    """One of :data:`FUSIONS`."""


def anomaly_maps(tokens: torch.Tensor, guide_vectors: torch.Tensor, grid: tuple[int, int], size: int, *,
                 temperature: float, sigma: float, fusion: str = "none") -> np.ndarray:
    """tokens (B, L, d), guide vectors (4, d) in :data:`guides.ROWS` order -> maps (B, S, S) float32.

    ``fusion``: ``none``, the anomaly probability p (in [0, 1]); ``self_dissimilarity``, per patch
    p · (1 − cos(token, mean token of the same image)) (in [0, 2]), then upsampled exactly as p is
    (:func:`patch_maps`). The product is high only where the guides call a patch anomalous *and* the
    patch differs from the rest of its own image: the guides bring what anomalies look like, the
    self-dissimilarity cancels what a whole image shares (a texture, a lighting, a domain the guides
    were never fitted on). It has no weight to tune, and each factor is computed per image, so the
    detector stays a single-image method.

    The blur runs on each image's 2-D map alone (``gaussian_filter`` per image, σ in pixels of S), so
    no image's scores leak into its neighbour's in the batch.
    """
    return patch_maps(patch_signal(tokens, guide_vectors, temperature=temperature, fusion=fusion), grid, size,
                      sigma=sigma)


def patch_signal(tokens: torch.Tensor, guide_vectors: torch.Tensor, *, temperature: float,
                 fusion: str = "none") -> torch.Tensor:
    """tokens (B, L, d), guide vectors (4, d) -> the per-patch values (B, L) float32 that
    :func:`anomaly_maps` upsamples: the anomaly probability, times the self-dissimilarity with ``fusion``
    ``self_dissimilarity``. Bilinear upsampling acts on each channel alone, so upsampling this equals
    upsampling the two-channel probabilities and taking the anomalous one."""
    probs = G.patch_probabilities(tokens, guide_vectors[G.NORMAL_LOCAL], guide_vectors[G.ANOMALY_LOCAL],
                                  temperature)[..., 1].float()
    if fusion == "none":
        return probs
    if fusion == "self_dissimilarity":
        return probs * baselines.self_dissimilarity(tokens)
    raise ValueError(f"scoring.fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")


def blur_maps(maps: np.ndarray, sigma: float) -> np.ndarray:
    """maps (B, S, S) -> (B, S, S) float32, each image blurred on its own (σ in pixels of S; 0: none)."""
    if sigma > 0:
        maps = np.stack([gaussian_filter(m, sigma=sigma, mode="reflect") for m in maps])
    return maps.astype(np.float32, copy=False)


def patch_maps(values: torch.Tensor, grid: tuple[int, int], size: int, *, sigma: float) -> np.ndarray:
    """Patch scores (B, L) -> maps (B, S, S) float32: bilinear upsampling of the (gh, gw) grid to S x S
    exactly as :func:`guides.local_probabilities` upsamples the guide probabilities (``align_corners``
    False), then :func:`blur_maps`. Bilinear interpolation acts on each channel alone, so a score map
    made here and a guide map of the same patch values agree pixel for pixel."""
    b, length = values.shape
    gh, gw = grid
    if length != gh * gw:
        raise ValueError(f"patch scores have {length} patches but the grid is {gh}x{gw}")
    up = F.interpolate(values.float().reshape(b, 1, gh, gw), size=(size, size), mode="bilinear", align_corners=False)
    return blur_maps(up[:, 0].cpu().numpy(), sigma)


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
            raise ValueError("scoring.image_score 'global' needs the global-guide probabilities")
        return np.asarray(global_probs, dtype=np.float64)
    raise ValueError(f"scoring.image_score must be one of {', '.join(IMAGE_SCORES)}, got {mode!r}")


def score_tokens(tokens: torch.Tensor, cls: torch.Tensor, guide_vectors: torch.Tensor, grid: tuple[int, int],
                 size: int, settings: ScoreSettings) -> tuple[np.ndarray, np.ndarray]:
    """tokens (B, L, d), cls (B, d), guide vectors (4, d) -> maps (B, S, S) float32 (in [0, 1], or [0, 2]
    with ``settings.fusion`` ``self_dissimilarity``) and the
    global-guide probabilities (B,) float32 (:func:`anomaly_maps`, :func:`global_probability`)."""
    maps = anomaly_maps(tokens, guide_vectors, grid, size, temperature=settings.temperature, sigma=settings.blur_sigma,
                        fusion=settings.fusion)
    return maps, global_probability(cls, guide_vectors)


def mean_of_seeds(maps: np.ndarray, global_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """maps (n_seeds, B, S, S), global probabilities (n_seeds, B) -> their means over the seeds,
    (B, S, S) float32 and (B,) float32.

    The seeds' maps are averaged first and the image score is then taken of the mean map (not the mean
    of the seeds' image scores): one map is what a user sees, and its score should be that map's.
    """
    maps, global_probs = np.asarray(maps), np.asarray(global_probs)
    if maps.ndim != 4 or global_probs.shape != maps.shape[:2]:
        raise ValueError(f"maps {maps.shape} and global probabilities {global_probs.shape}: expected "
                         "(n_seeds, B, S, S) and (n_seeds, B)")
    return maps.mean(axis=0, dtype=np.float32), global_probs.mean(axis=0, dtype=np.float32)


GLOBAL_WITHOUT_CLS_GUIDE = ("the global image score is the CLS token's probability under the global guides; "
                            "this scoring has no CLS guide, so it has no global score (its map-based modes are "
                            "under image_by_score)")
"""The null reason of the ``global`` mode for scores without global guides (the baselines)."""


def scores_by_mode(maps: np.ndarray, global_probs: np.ndarray | None, settings: ScoreSettings) -> dict[str, np.ndarray | None]:
    """maps (B, S, S), global probabilities (B,) or None -> {mode: image scores (B,) float64} for every
    mode of :data:`IMAGE_SCORES`; ``global`` is None without global probabilities (no CLS guide)."""
    return {mode: None if mode == "global" and global_probs is None else
            image_scores(maps, mode, lse_temperature=settings.lse_temperature, top_fraction=settings.top_fraction,
                         global_probs=global_probs)
            for mode in IMAGE_SCORES}


def score_images(maps: np.ndarray, global_probs: np.ndarray, settings: ScoreSettings) -> np.ndarray:
    """maps (B, S, S), global probabilities (B,) -> image scores (B,) float64 by ``settings.image_score``."""
    return image_scores(maps, settings.image_score, lse_temperature=settings.lse_temperature,
                        top_fraction=settings.top_fraction, global_probs=global_probs)
