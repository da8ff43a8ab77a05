"""Training-free baselines scored next to the learned guides: patch scores (N, L) from a
target's own tokens, no SAE, no guides, no auxiliary data, no labels.

- ``self_dissimilarity`` (single image, training-free): per patch 1 − cos(token, mean token of the same
  image). A patch unlike the rest of its image scores high.
- ``mutual`` (batch zero-shot, MuSc-style mutual scoring): it sees the other unlabelled target images of
  the same category, never labels. Per patch p of image i and every other image j of the category,
  d_j(p) = min over the patches q of j of (1 − cos(p, q)); the patch score is the mean of the k smallest
  d_j(p), k = max(1, ⌊fraction · (N − 1)⌋) with N images in the category (``neighbours.mutual_k``). A
  normal patch finds close patches in most other images, an anomalous one in few. Computed by
  :func:`pipeline.method.neighbours.mutual` (each pair of image blocks multiplied once), read here
  through :class:`ChunkRows` over the feature store, so no category's tokens are held at once.

  Distance: 1 − cosine, i.e. half the squared Euclidean distance of the L2-normalised tokens (the nearest
  patch is the same under either). MuSc's own code (``models/modules/_MSM.py``) takes the Euclidean
  distance (``torch.cdist``) of its aggregated, not normalised, patch features, and k = int(0.3 (N − 1))
  with no lower bound; we normalise so that the distance is on the same scale as the other cosines here,
  and keep k ≥ 1 so that a category of 2-4 images still has a score. MuSc's neighbourhood aggregation
  (LNAMD) and image re-scoring (RsCIN) are not part of this baseline. A category of one image has no
  mutual score (:data:`ONE_IMAGE`).
"""

from __future__ import annotations

from typing import Callable

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
ONE_IMAGE = "a category of one image: mutual scoring needs other unlabelled images of the category to compare with"


def self_dissimilarity(tokens: torch.Tensor) -> torch.Tensor:
    """tokens (B, L, d) -> patch scores (B, L) float32: 1 − cos(token, mean of its image's L tokens)."""
    tokens = tokens.float()
    mean = tokens.mean(dim=1, keepdim=True)  # (B, 1, d)
    return 1 - F.cosine_similarity(tokens, mean.expand_as(tokens), dim=-1, eps=1e-8)


TokenReader = Callable[[int, int], "np.ndarray | torch.Tensor"]
"""``read(i, j)`` -> tokens (j − i, L, d) of images [i, j) of one category, any float dtype (the store's
float16 as read; :func:`mutual_streamed` casts each block to float32)."""


class ChunkRows:
    """A :data:`TokenReader` over rows [start, stop) of a chunked array, e.g. one category of a feature
    store's tokens: ``read(i, j)`` returns rows [start + i, start + j).

    ``read_chunk(c)`` returns the rows of chunk ``c`` (``chunk_rows`` rows, fewer in the last chunk).
    Only the last chunk decoded is kept, so memory is one chunk however many rows the category holds,
    and reading the blocks of a category in order decodes each chunk once. ``check(values, first_row)``
    (e.g. ``FeatureStore.check_finite``) sees each chunk's rows inside [start, stop) the first time the
    chunk is decoded, so rows of a neighbouring category are never checked here.
    """

    def __init__(self, read_chunk: Callable[[int], np.ndarray], chunk_rows: int, start: int, stop: int,
                 check: Callable[[np.ndarray, int], None] | None = None) -> None:
        self.read_chunk, self.chunk_rows, self.start, self.stop, self.check = read_chunk, chunk_rows, start, stop, check
        self.cached: tuple[int, np.ndarray] | None = None
        self.checked: set[int] = set()

    def __len__(self) -> int:
        return self.stop - self.start

    def chunk(self, c: int) -> np.ndarray:
        """Rows of chunk ``c``, decoded unless it is the one kept."""
        if self.cached is None or self.cached[0] != c:
            self.cached = None  # drop the old chunk before decoding the next: one chunk in memory, not two
            values = self.read_chunk(c)
            if self.check is not None and c not in self.checked:
                lo, hi = max(self.start, c * self.chunk_rows), min(self.stop, (c + 1) * self.chunk_rows)
                self.check(values[lo - c * self.chunk_rows:hi - c * self.chunk_rows], lo)
                self.checked.add(c)
            self.cached = (c, values)
        return self.cached[1]

    def __call__(self, i: int, j: int) -> np.ndarray:
        """Rows [start + i, start + j) -> (j − i, ...) array."""
        if not 0 <= i < j <= len(self):
            raise ValueError(f"rows [{i}, {j}) outside the {len(self)} rows of this reader")
        a, b = self.start + i, self.start + j
        parts = []
        for c in range(a // self.chunk_rows, (b - 1) // self.chunk_rows + 1):
            base = c * self.chunk_rows
            parts.append(self.chunk(c)[max(a, base) - base:min(b, base + self.chunk_rows) - base])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
