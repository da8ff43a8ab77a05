"""Training-free baselines scored next to the learned guides: patch scores (N, L) from a
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
  100 images costs about 0.1 s and 1.4 s per image). Memory does not hold the category's tokens
  :func:`mutual_streamed` reads them through a reader (:data:`TokenReader`, e.g. a
  :class:`ChunkRows` over the feature store), b images at a time (:func:`block_images`). Per query
  block of b images it reads every reference block of b images again (float16 from the store, cast and
  normalised per block), reduces each (b·L, b·L) block of cosines at once to the query block's
  (b·L, N) nearest-patch distances, then to the mean of the k smallest. Peak memory: two token blocks
  (b, L, d) float32, one (b·L, b·L) block of cosines (at most :data:`BLOCK_ELEMENTS`), the (b·L, N)
  distances (O(b·L·N): bounded per query block, 16 KiB per image of the category at b·L = 4096) and
  the (N, L) float32 result; never an (N, L, d) token array nor an (N·L)² matrix. A category of one
  image has no mutual score (:data:`ONE_IMAGE`).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

# one definition of k, the block size and their constants for both mutual implementations
from pipeline.method.neighbours import BLOCK_ELEMENTS, MUTUAL_FRACTION, block_images, mutual_k  # noqa: F401

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


def mutual(tokens: torch.Tensor | np.ndarray, fraction: float = MUTUAL_FRACTION, *,
           device: torch.device | str = "cpu", elements: int = BLOCK_ELEMENTS) -> np.ndarray:
    """tokens (N, L, d) of one category, in memory -> patch scores (N, L) float32 (module docstring).

    :func:`mutual_streamed` over slices of ``tokens`` (the same blocks, the same result).
    """
    n, length, _ = tokens.shape
    return mutual_streamed(lambda i, j: tokens[i:j], n, length, fraction, device=device, elements=elements)


def mutual_streamed(read: TokenReader, n_images: int, length: int, fraction: float = MUTUAL_FRACTION, *,
                    device: torch.device | str = "cpu", elements: int = BLOCK_ELEMENTS,
                    block: int | None = None) -> np.ndarray:
    """Tokens of one category of ``n_images`` images of ``length`` patches, read through ``read``
    (:data:`TokenReader`) -> patch scores (N, L) float32 (module docstring).

    Query images are taken ``b`` at a time (``block``, by default :func:`block_images`) against
    reference images ``b`` at a time, each reference block read again for every query block, so
    ``read`` is never asked for more than ``b`` images and no (N, L, d) array is ever held. Memory: the
    query and one reference block (b, L, d) float32, one (b·L, b·L) block of cosines, the query block's
    (b·L, N) nearest-patch distances (O(b·L·N)) and the (N, L) result. The image's own column is set to
    +inf before the k smallest are taken, so an image never scores against itself.
    """
    n = n_images
    if n < 2:
        raise ValueError(ONE_IMAGE)
    k = mutual_k(n - 1, fraction)
    b = block_images(length, n, elements) if block is None else max(1, min(n, block))

    def unit(i: int, j: int) -> torch.Tensor:
        """Images [i, j), L2-normalised float32 on ``device``, as ((j − i)·L, d)."""
        values = torch.as_tensor(read(i, j))
        if values.ndim != 3 or tuple(values.shape[:2]) != (j - i, length):
            raise ValueError(f"mutual: the reader gave {tuple(values.shape)} for images [{i}, {j}), "
                             f"expected ({j - i}, {length}, d)")
        return F.normalize(values.to(device=device, dtype=torch.float32), dim=-1).reshape((j - i) * length, -1)

    out = np.empty((n, length), dtype=np.float32)
    for qa in range(0, n, b):
        qb = min(qa + b, n)
        query = unit(qa, qb)  # (bq·L, d)
        nearest = torch.empty(len(query), n, dtype=torch.float32, device=query.device)  # (bq·L, N)
        for ra in range(0, n, b):
            rb = min(ra + b, n)
            reference = query if ra == qa else unit(ra, rb)  # (br·L, d): the query block is its own diagonal
            cos = query @ reference.T  # (bq·L, br·L)
            nearest[:, ra:rb] = 1 - cos.reshape(len(query), rb - ra, length).amax(dim=-1)
            del reference, cos
        for i in range(qa, qb):  # an image is no reference for itself
            nearest[(i - qa) * length:(i - qa + 1) * length, i] = math.inf
        smallest = torch.topk(nearest, k, dim=1, largest=False).values  # (bq·L, k)
        out[qa:qb] = smallest.mean(dim=1).reshape(qb - qa, length).cpu().numpy()
    return out
