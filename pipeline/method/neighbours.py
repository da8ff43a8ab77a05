"""Nearest-patch scoring: the batch signal (mutual scoring), the reference signal (known-good patches) and
the coreset that bounds a reference bank.

Distance throughout: 1 − cos between L2-normalised patch tokens (half the squared Euclidean distance of
the unit vectors, so the nearest patch is the same under either).

``mutual`` (batch, MuSc-style). Per patch p of image i and every other image j of the set,
d_j(p) = min over the patches q of j of (1 − cos(p, q)); the patch score is the mean of the k smallest
d_j(p), k = max(1, ⌊fraction · (N − 1)⌋). A normal patch finds close patches in most other images, an
anomalous one in few. One cosine block of images (I, J) gives both directions: the rows reduced over
J's patches are I's distances to each image of J, the columns reduced over I's patches are J's
distances to each image of I, so each pair of image blocks is multiplied once (J ≥ I) instead of twice.
The reverse direction of a pair is kept until J's block is finished: at most about N²·L/4 float32
values (N images of L patches; the middle block row holds the most), e.g. 300 MB for 540 images at
448 px, 19 MB for 135 at 224.

``reference`` (few-shot). Per patch, the distance to its nearest patch in a bank of known-good patches
(AnomalyDINO-style). :func:`coreset` chooses a bounded bank by greedy k-centre selection (PatchCore):
each pick is the patch farthest from every patch picked so far, so the bank covers the normal patches
with the smallest largest gap.

``precision``: ``float32`` reproduces the obviously correct loops to 1e-5. ``bfloat16`` multiplies the
normalised tokens in bfloat16 (about 3× the float32 matmul speed on CPUs with AVX512-BF16 and on GPUs)
only to *choose* each nearest patch; the distance to the chosen patch is then recomputed in float32 from
the float32 tokens (one dot product per patch and image, L times less work than the matmul). A score
differs from float32 only where rounding makes bfloat16 choose another patch of a near tie, and then by
less than the tie's width (``benchmarks/neighbours.py`` prints the largest difference measured on the
same tokens; rounding the cosines themselves would move a score by up to ~4e-3 near cos 1).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.draws import draws  # noqa: F401  (the few-shot draws, used beside the distances)

PRECISIONS = ("float32", "bfloat16")
MUTUAL_FRACTION = 0.3
"""Fraction of the other images whose nearest-patch distances are averaged (MuSc's 30 %)."""
BLOCK_ELEMENTS = 1 << 24
"""Cosines computed at once (64 MiB in float32): sets the images per block."""
ONE_IMAGE = "a set of one image: mutual scoring needs other unlabelled images to compare with"

TokenReader = Callable[[int, int], "np.ndarray | torch.Tensor"]
"""``read(i, j)`` -> tokens (j − i, L, d) of images [i, j), any float dtype (cast per block)."""


def mutual_k(n_other: int, fraction: float = MUTUAL_FRACTION) -> int:
    """How many of the ``n_other`` per-image distances are averaged: ⌊fraction · n_other⌋, at least 1.

    Computed in integers for fractions with up to 6 decimals, so 0.3 · 10 is 3, not 2 by a rounding error.
    """
    if n_other < 1:
        raise ValueError(f"mutual scoring needs at least one other image, got {n_other}")
    scaled = round(fraction * 1_000_000)
    return max(1, min(n_other, scaled * n_other // 1_000_000))


def block_images(length: int, n_images: int, elements: int = BLOCK_ELEMENTS) -> int:
    """Images per block so that one block of cosines, (b·L) x (b·L), holds at most ``elements`` (at
    least 1 image, at most ``n_images``)."""
    return max(1, min(n_images, math.isqrt(elements) // length))


def _check_precision(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return torch.float32 if precision == "float32" else torch.bfloat16


def unit_rows(values: np.ndarray | torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """Tokens (..., d) of any float dtype -> L2-normalised (rows, d) in ``dtype`` on ``device``; the norm
    is taken in float32 whatever the storage dtype."""
    t = torch.as_tensor(values).to(device=device, dtype=torch.float32)
    return F.normalize(t.reshape(-1, t.shape[-1]), dim=-1, eps=1e-8).to(dtype)


def mutual(read: TokenReader, n_images: int, length: int, fraction: float = MUTUAL_FRACTION, *,
           device: torch.device | str = "cpu", precision: str = "float32", elements: int = BLOCK_ELEMENTS,
           block: int | None = None, symmetric: bool = True) -> np.ndarray:
    """Tokens of ``n_images`` images of ``length`` patches read through ``read`` -> mutual patch scores
    (N, L) float32 (module docstring).

    Blocks of ``b`` images (``block``, by default :func:`block_images`): for each block row I, the
    blocks J ≥ I are read and multiplied once; I's distances to J's images are complete at once, J's
    distances to I's images wait in a list until row J. ``read`` is never asked for more than ``b``
    images; an image never scores against itself.

    ``symmetric=False`` multiplies every pair twice, once from each side, and keeps nothing between
    rows: twice the work, memory O(b·L·N) instead of O(N²·L), for a set too large for the waiting list.
    """
    n = n_images
    if n < 2:
        raise ValueError(ONE_IMAGE)
    dtype = _check_precision(precision)
    k = mutual_k(n - 1, fraction)
    b = block_images(length, n, elements) if block is None else max(1, min(n, block))
    starts = list(range(0, n, b))

    def unit(i: int, j: int) -> _Block:
        values = torch.as_tensor(read(i, j))
        if values.ndim != 3 or tuple(values.shape[:2]) != (j - i, length):
            raise ValueError(f"mutual: the reader gave {tuple(values.shape)} for images [{i}, {j}), "
                             f"expected ({j - i}, {length}, d)")
        return _Block(unit_rows(values, device, torch.float32), dtype)

    # waiting[J]: (column start, (bJ·L, bI) distances) of earlier rows I for block J
    waiting: dict[int, list[tuple[int, torch.Tensor]]] = {s: [] for s in starts}
    out = np.empty((n, length), dtype=np.float32)
    for qa in starts:
        qb = min(qa + b, n)
        query = unit(qa, qb)  # (bq·L, d)
        parts = waiting.pop(qa)
        for ra in (starts[starts.index(qa):] if symmetric else starts):
            rb = min(ra + b, n)
            reference = query if ra == qa else unit(ra, rb)
            forward, backward = _block_nearest(query, reference, qb - qa, rb - ra, length,
                                               both=symmetric and ra != qa)
            parts.append((ra, forward))
            if backward is not None:
                waiting[ra].append((qa, backward))
            del reference
        parts.sort(key=lambda p: p[0])
        nearest = torch.cat([p for _, p in parts], dim=1)  # (bq·L, N)
        del parts
        for i in range(qa, qb):  # an image is no reference for itself
            nearest[(i - qa) * length:(i - qa + 1) * length, i] = math.inf
        smallest = torch.topk(nearest, k, dim=1, largest=False).values
        out[qa:qb] = smallest.mean(dim=1).reshape(qb - qa, length).cpu().numpy()
    return out


class _Block:
    """The unit tokens (rows, d) of a block of images in float32 and, for a half precision, the rows
    augmented so that one matmul gives distances: [x, 1] · [−y, 1] = 1 − cos(x, y). Rounding a distance
    near 0 to bfloat16 costs far less than rounding a cosine near 1, so the nearest patch is chosen
    with ~2^-9 relative error of its distance instead of ~2^-9 absolute."""

    def __init__(self, exact: torch.Tensor, dtype: torch.dtype) -> None:
        self.exact, self.half = exact, dtype != torch.float32
        if self.half:
            one = torch.ones(len(exact), 1, device=exact.device)
            self.as_query = torch.cat([exact, one], dim=1).to(dtype)
            self.as_reference = torch.cat([-exact, one], dim=1).to(dtype)

    def __len__(self) -> int:
        return len(self.exact)

    def rows(self, a: int, b: int) -> "_Block":
        """Rows [a, b) as a block of their own: views, no copy."""
        part = _Block.__new__(_Block)
        part.exact, part.half = self.exact[a:b], self.half
        if self.half:
            part.as_query, part.as_reference = self.as_query[a:b], self.as_reference[a:b]
        return part

    def distances(self, reference: "_Block") -> torch.Tensor:
        """(rows, reference rows) 1 − cos, in this block's precision."""
        if self.half:
            return self.as_query @ reference.as_reference.T
        return 1 - self.exact @ reference.exact.T


def _block_nearest(query: _Block, reference: _Block, bq: int, br: int, length: int,
                   both: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Nearest-patch distances of one block pair: (bq·L, br) from each query patch to each reference
    image and, with ``both``, (br·L, bq) from each reference patch to each query image; float32.

    In float32 the distance block is reduced directly (read twice, never copied). In a half precision it
    only chooses the nearest patch, whose distance is then recomputed from the float32 tokens.
    """
    dist = query.distances(reference)  # (bq·L, br·L)
    rows = dist.view(len(query), br, length)
    if not query.half:
        forward = rows.amin(dim=-1)
    else:
        pick = rows.argmin(dim=-1) + torch.arange(br, device=dist.device)[None] * length  # (bq·L, br)
        forward = 1 - torch.einsum("pd,pjd->pj", query.exact, reference.exact[pick])
    backward = None
    if both:
        cols = dist.view(bq, length, len(reference))
        if not query.half:
            backward = cols.amin(dim=1).T  # (br·L, bq)
        else:
            pick = cols.argmin(dim=1) + torch.arange(bq, device=dist.device)[:, None] * length  # (bq, br·L)
            backward = (1 - torch.einsum("qrd,rd->qr", query.exact[pick], reference.exact)).T
    return forward, backward


def coreset(bank: np.ndarray | torch.Tensor, size: int, *, seed: int = 0, device: torch.device | str = "cpu",
            chunk: int = 1 << 14) -> np.ndarray:
    """Indices of ``size`` rows of ``bank`` (M, d) chosen by greedy k-centre selection on the unit
    vectors (distance 1 − cos), sorted; every row when ``size`` ≥ M.

    The first pick is row ``seed % M``; each next pick is the row farthest from the picks so far
    (ties: the lowest index). O(size · M · d) work, O(M) memory beyond the bank.
    """
    m = len(bank)
    if size >= m:
        return np.arange(m)
    if size < 1:
        raise ValueError(f"coreset size {size}: at least 1")
    units = unit_rows(bank, device, torch.float32)
    gap = torch.full((m,), math.inf, device=units.device)
    picks = [seed % m]
    for _ in range(size - 1):
        last = units[picks[-1]]
        for a in range(0, m, chunk):
            gap[a:a + chunk] = torch.minimum(gap[a:a + chunk], 1 - units[a:a + chunk] @ last)
        gap[picks[-1]] = -math.inf  # a pick is never picked again, even where rounding leaves it above 0
        picks.append(int(torch.argmax(gap)))
    return np.sort(np.asarray(picks, dtype=np.int64))


def reference(tokens: np.ndarray | torch.Tensor, bank: np.ndarray | torch.Tensor, *,
              device: torch.device | str = "cpu", precision: str = "float32",
              elements: int = BLOCK_ELEMENTS) -> torch.Tensor:
    """Patch tokens (B, L, d) and a bank of normal patches (M, d) -> (B, L) float32: per patch, 1 − cos
    to its nearest bank patch. The bank is multiplied in blocks of at most ``elements`` cosines; in
    bfloat16 each block only chooses its nearest patch, whose cosine is recomputed in float32."""
    dtype = _check_precision(precision)
    t = torch.as_tensor(tokens)
    if t.ndim != 3:
        raise ValueError(f"reference: tokens {tuple(t.shape)}, expected (B, L, d)")
    bsz, length, _ = t.shape
    query = _Block(unit_rows(t, device, torch.float32), dtype)
    units = _Block(unit_rows(bank, device, torch.float32), dtype)
    if len(units) == 0:
        raise ValueError("reference: the bank holds no patch")
    best = torch.full((len(query),), math.inf, device=query.exact.device)
    step = max(1, elements // max(1, len(query)))
    for a in range(0, len(units), step):
        dist = query.distances(units.rows(a, a + step))
        if not query.half:
            best = torch.minimum(best, dist.amin(dim=1))
        else:
            pick = dist.argmin(dim=1) + a
            best = torch.minimum(best, 1 - (query.exact * units.exact[pick]).sum(dim=1))
    return best.reshape(bsz, length)


def against(query: np.ndarray | torch.Tensor, read: TokenReader, n_images: int, fraction: float = MUTUAL_FRACTION, *,
            device: torch.device | str = "cpu") -> np.ndarray:
    """query (q, L, d) tokens of images outside a batch -> (q, L) float32: each patch scored as :func:`mutual`
    scores a batch image, against the ``n_images`` batch images ``read(i, j)`` gives: per batch image the
    distance (1 − cos) to its nearest patch, then the mean of the ⌊fraction · n⌋ smallest. Float32; the
    batch is read one image at a time (q is a handful of references)."""
    if n_images < 1:
        raise ValueError("scoring against a batch needs at least one batch image")
    q = torch.as_tensor(query)
    count, length = q.shape[:2]
    units = unit_rows(q, device, torch.float32)
    nearest = torch.empty((count * length, n_images), dtype=torch.float32, device=device)
    for j in range(n_images):
        other = unit_rows(torch.as_tensor(read(j, j + 1))[0], device, torch.float32)
        nearest[:, j] = 1 - (units @ other.T).amax(dim=1)
    k = mutual_k(n_images, fraction)
    return nearest.topk(k, dim=1, largest=False).values.mean(dim=1).reshape(count, length).cpu().numpy()
