"""Training-free baselines scored next to the learned guides (issue 12 §2): patch scores (N, L) from a
target's own tokens, no SAE, no guides, no auxiliary data, no labels.

- ``self_dissimilarity`` (single image, training-free): per patch 1 − cos(token, mean token of the same
  image). A patch unlike the rest of its image scores high.
- ``mutual`` (batch zero-shot, MuSc-style mutual scoring): it sees the other unlabelled target images of
  the same category, never labels. Per patch p of image i and every other image j of the category,
  d_j(p) = min over the patches q of j of (1 − cos(p, q)); the patch score is the mean of the k smallest
  d_j(p), k = max(1, ⌊fraction · (N − 1)⌋) with N images in the category (:func:`mutual_k`). A normal
  patch finds close patches in most other images, an anomalous one in few.

  Distance: 1 − cosine, i.e. half the squared Euclidean distance of the L2-normalised tokens (the nearest
  patch is the same under either). MuSc's own code (``models/modules/_MSM.py``) takes the Euclidean
  distance (``torch.cdist``) of its aggregated, not normalised, patch features, and k = int(0.3 (N − 1))
  with no lower bound; we normalise so that the distance is on the same scale as the other cosines here,
  and keep k ≥ 1 so that a category of 2-4 images still has a score. MuSc's neighbourhood aggregation
  (LNAMD) and image re-scoring (RsCIN) are not part of this baseline.

  Cost: N − 1 matmuls of (L, d) x (d, L) per image, O(N · L² · d), so the cost per image grows
  linearly with the category (``benchmarks/mutual.py`` prints it; on 2 CPU threads, d = 384: about
  1.0 ms per image per other image at 224 px, L = 256, and 14 ms at 448 px, L = 1024, so a category of
  100 images costs about 0.1 s and 1.4 s per image). Memory is bounded: query images are
  processed in blocks against reference images in blocks (:func:`block_images`), each block's
  similarities (b·L, b·L) are reduced at once to a (b·L, N) matrix of nearest-patch distances; no
  (N·L)² matrix is ever formed. A category of one image has no mutual score (:data:`ONE_IMAGE`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SELF_DISSIMILARITY = "self_dissimilarity"
MUTUAL = "mutual"
SETTINGS = {
    SELF_DISSIMILARITY: "single image, training-free: 1 - cos(patch token, mean token of its own image)",
    MUTUAL: "batch zero-shot: sees the other unlabelled target images of its category (never labels); "
            "mean of the smallest 30% of the nearest-patch distances (1 - cos) to each other image",
}
"""Each baseline's setting, written next to its metrics so nobody mistakes a batch method for a
single-image one."""
MUTUAL_FRACTION = 0.3
"""Fraction of the other images whose nearest-patch distances are averaged (MuSc's 30 %)."""
ONE_IMAGE = "a category of one image: mutual scoring needs other unlabelled images of the category to compare with"
BLOCK_ELEMENTS = 1 << 24
"""Similarities computed at once (64 MiB in float32): sets the block size of :func:`mutual`."""


def self_dissimilarity(tokens: torch.Tensor) -> torch.Tensor:
    """tokens (B, L, d) -> patch scores (B, L) float32: 1 − cos(token, mean of its image's L tokens)."""
    tokens = tokens.float()
    mean = tokens.mean(dim=1, keepdim=True)  # (B, 1, d)
    return 1 - F.cosine_similarity(tokens, mean.expand_as(tokens), dim=-1, eps=1e-8)


def mutual_k(n_other: int, fraction: float = MUTUAL_FRACTION) -> int:
    """How many of the ``n_other`` per-image distances are averaged: ⌊fraction · n_other⌋, at least 1.

    Computed in integers for fractions with up to 6 decimals, so 0.3 · 10 is 3, not 2 by a rounding error.
    """
    if n_other < 1:
        raise ValueError(f"mutual scoring needs at least one other image, got {n_other}")
    scaled = round(fraction * 1_000_000)
    return max(1, min(n_other, scaled * n_other // 1_000_000))


def block_images(length: int, n_images: int, elements: int = BLOCK_ELEMENTS) -> int:
    """Images per block so that one block of similarities, (b·L) x (b·L), holds at most ``elements``
    (at least 1 image, at most ``n_images``)."""
    return max(1, min(n_images, math.isqrt(elements) // length))


def mutual(tokens: torch.Tensor | np.ndarray, fraction: float = MUTUAL_FRACTION, *,
           device: torch.device | str = "cpu", elements: int = BLOCK_ELEMENTS) -> np.ndarray:
    """tokens (N, L, d) of one category -> patch scores (N, L) float32 (module docstring).

    Query images are taken ``b`` at a time (:func:`block_images`) against reference images ``b`` at a
    time; memory holds the category's normalised tokens (N, L, d) float32, one (b·L, b·L) block of
    cosines and the query block's (b·L, N) nearest-patch distances. The image's own column is set to
    +inf before the k smallest are taken, so an image never scores against itself.
    """
    tokens = torch.as_tensor(tokens)
    n, length, d = tokens.shape
    if n < 2:
        raise ValueError(ONE_IMAGE)
    k = mutual_k(n - 1, fraction)
    unit = F.normalize(tokens.to(device=device, dtype=torch.float32), dim=-1)  # (N, L, d)
    b = block_images(length, n, elements)
    out = torch.empty(n, length, dtype=torch.float32, device=unit.device)
    for qa in range(0, n, b):
        qb = min(qa + b, n)
        query = unit[qa:qb].reshape(-1, d)  # (bq·L, d)
        nearest = torch.empty(len(query), n, dtype=torch.float32, device=unit.device)  # (bq·L, N)
        for ra in range(0, n, b):
            rb = min(ra + b, n)
            cos = query @ unit[ra:rb].reshape(-1, d).T  # (bq·L, br·L)
            nearest[:, ra:rb] = 1 - cos.reshape(len(query), rb - ra, length).amax(dim=-1)
        for i in range(qa, qb):  # an image is no reference for itself
            nearest[(i - qa) * length:(i - qa + 1) * length, i] = math.inf
        smallest = torch.topk(nearest, k, dim=1, largest=False).values  # (bq·L, k)
        out[qa:qb] = smallest.mean(dim=1).reshape(qb - qa, length)
    return out.cpu().numpy()
