"""Pixel AUROC, AP and AUPRO of one category in bounded memory: :func:`metrics.compute_all`'s values
(to float rounding of the sums, < 1e-12) without ever holding a category's maps.

:func:`metrics.pixel_metrics` sorts all pixels of a category at once: 8 bytes per pixel per scored set
on top of the float32 maps themselves, so a category of 540 images at 448 px took 7.8 GB. Here:

1. :meth:`PixelStream.add` takes the maps of a batch of images with their masks, turns every pixel
   into the same uint64 word as :func:`metrics._sorted_descending` (high half: the score's float32
   bits mapped to a key that decreases with the score; low half: the pixel's ground-truth region id,
   0 = normal), sorts the batch's words and appends them to a run file on disk. Regions are the
   8-connected components of each image's mask (:func:`label_regions`): a region never spans two
   images, so labelling batch by batch and numbering on gives the reference's regions.
2. :meth:`PixelStream.result` merges the sorted runs (:func:`merge_runs`: a k-way merge in blocks,
   at most ``fan_in`` runs at once, more runs merged in passes on disk first) and walks the merged
   order once, block by block, reading every threshold (the last pixel of each run of equal keys,
   groups of equal keys merged across blocks and runs) exactly as :func:`metrics._roc_pr_from_ranking`
   and :func:`metrics._pro_from_ranking` do: the same counts, the same sequential PRO sum, the trapezoid
   areas accumulated block by block.

Memory: one batch's words while adding; while merging ``block_words`` words of run buffers plus the
merged block (a few times 8 x ``block_words`` bytes), whatever the number of images. Disk: 8 bytes per
pixel per stream in ``folder`` while it is open (twice that during a merge pass); :meth:`close`
deletes the stream's files. Only float32 maps (or maps float32 holds exactly) are accepted: the maps
of :mod:`pipeline.method.scoring` are float32.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from scipy import ndimage

from pipeline.evaluation import metrics

BLOCK_WORDS = 1 << 22
"""Words (8 bytes each) of run buffers held at once while merging: 32 MiB."""
FAN_IN = 64
"""Runs merged at once; more runs are first merged in groups of this many, in passes on disk."""


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """masks (b, H, W) bool -> (region ids (b, H, W) uint32, 0 = normal, 1..r; r) with the 8-connected
    components of each image's mask numbered in C order, as :func:`metrics._regions` numbers them."""
    labelled, n = ndimage.label(masks, structure=metrics.REGIONS_8)
    return labelled.astype(np.uint32, copy=False), int(n)


def score_words(maps: np.ndarray, region_ids: np.ndarray) -> np.ndarray:
    """maps (...) float32, region ids (...) uint32 -> words (size,) uint64 whose ascending order is the
    descending order of the scores (:func:`metrics._sorted_descending`'s words): high half the score's
    key, low half the region id. Equal high halves ⇔ equal scores (-0.0 and +0.0 included)."""
    bits = np.add(maps.reshape(-1), np.float32(0)).view(np.uint32)  # + 0: -0.0 -> +0.0
    np.bitwise_xor(bits, np.uint32(0x7FFFFFFF), out=bits, where=bits < np.uint32(0x80000000))
    return (bits.astype(np.uint64) << np.uint64(32)) | region_ids.reshape(-1).astype(np.uint64)


def merge_runs(path: Path, runs: list[tuple[int, int]], block_words: int = BLOCK_WORDS,
               fan_in: int = FAN_IN) -> Iterator[np.ndarray]:
    """Yield the words of the sorted ``runs`` of file ``path`` ((offset, length) in words, uint64
    little-endian) in ascending order, in blocks; every block's words are >= the previous block's.

    More than ``fan_in`` runs are first merged ``fan_in`` at a time into a new file next to ``path``
    (deleted when done), as often as needed. Each run gets a buffer of ``block_words // runs`` words
    (at least 1); a step emits every buffered word <= the smallest of the buffers' last words (all
    of them precede every word not yet emitted) and refills the buffers it emptied.
    """
    if fan_in < 2:
        raise ValueError(f"fan_in: must be >= 2, got {fan_in}")
    passes = 0
    while len(runs) > fan_in:
        passes += 1
        merged = path.with_name(f"{path.name}.pass{passes}")
        new_runs, offset = [], 0
        with open(merged, "wb") as out:
            for g in range(0, len(runs), fan_in):
                length = 0
                for block in _merge(path, runs[g:g + fan_in], block_words):
                    block.tofile(out)
                    length += block.size
                new_runs.append((offset, length))
                offset += length
        if passes > 1:
            path.unlink()  # an intermediate file of ours; the caller's own file stays
        path, runs = merged, new_runs
    try:
        yield from _merge(path, runs, block_words)
    finally:
        if passes:
            path.unlink(missing_ok=True)


def _merge(path: Path, runs: list[tuple[int, int]], block_words: int) -> Iterator[np.ndarray]:
    if not runs:
        return
    per_run = max(1, block_words // len(runs))
    with open(path, "rb") as f:
        def read(r: int) -> np.ndarray:
            # a plain read (not a memmap, whose resident file pages would count as this process's memory)
            f.seek(8 * pos[r])
            count = min(per_run, end[r] - pos[r])
            pos[r] += count
            return np.fromfile(f, dtype="<u8", count=count)

        pos = [offset for offset, _ in runs]
        end = [offset + length for offset, length in runs]
        buffers = [read(r) for r in range(len(runs))]
        while True:
            live = [r for r in range(len(runs)) if buffers[r].size]
            if not live:
                return
            cutoff = min(buffers[r][-1] for r in live)
            parts = []
            for r in live:
                take = int(np.searchsorted(buffers[r], cutoff, side="right"))
                parts.append(buffers[r][:take])
                buffers[r] = buffers[r][take:] if take < buffers[r].size else read(r)
            block = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
            block.sort()
            yield block


class PixelStream:
    """One category's pixels under one scoring, added batch by batch; :meth:`result` gives
    :func:`metrics.compute_all`'s three pixel metrics and their null reasons (module docstring).

    ``rank=False`` (a target without masks): maps and masks are only validated and counted. Run files
    are ``folder/<name>.u64``: ``name`` must be unique among the open streams of ``folder``.
    """

    def __init__(self, folder: Path, name: str = "stream", *, rank: bool = True, block_words: int | None = None,
                 fan_in: int | None = None):
        self.path = Path(folder) / f"{name}.u64"
        # None: the module's BLOCK_WORDS and FAN_IN as they are now (a test can shrink them for the stage)
        self.rank = rank
        self.block_words = BLOCK_WORDS if block_words is None else block_words
        self.fan_in = FAN_IN if fan_in is None else fan_in
        self.runs: list[tuple[int, int]] = []
        self.region_sizes: list[np.ndarray] = []  # per batch: pixels of each of its regions
        self.n_images = self.n_pixels = self.n_anomalous = self.n_regions = 0
        self.shape: tuple[int, int] | None = None
        self._file = open(self.path, "wb") if rank else None

    def add(self, masks: np.ndarray, maps: np.ndarray, regions: tuple[np.ndarray, int] | None = None) -> None:
        """masks (b, H, W) {0, 1}, maps (b, H, W) float32: the next b images of the category.

        ``regions``: :func:`label_regions` of these masks when the caller has it (several streams of
        one batch share one labelling); else it is computed here. Invalid inputs raise a ValueError
        as :func:`metrics.compute_all` does.
        """
        masks, maps = metrics.pixel_inputs(masks, maps)
        if self.shape is not None and maps.shape[1:] != self.shape:
            raise ValueError(f"maps {maps.shape}: expected images of {self.shape} like the earlier batches")
        self.shape = maps.shape[1:]
        if maps.dtype != np.float32:
            as_f32 = maps.astype(np.float32)
            if not np.array_equal(as_f32, maps):
                raise ValueError(f"maps: dtype {maps.dtype} that float32 does not hold exactly; the streaming "
                                 "metrics rank float32 scores (metrics.compute_all takes any)")
            maps = as_f32
        n_anomalous = int(np.count_nonzero(masks))
        self.n_images += maps.shape[0]
        self.n_pixels += maps.size
        self.n_anomalous += n_anomalous
        if not self.rank:
            return
        labelled, n = regions if regions is not None else label_regions(masks)
        ids = labelled.astype(np.uint32, copy=True)
        ids[ids != 0] += np.uint32(self.n_regions)  # number on from the earlier batches' regions
        self.region_sizes.append(np.bincount(labelled.reshape(-1), minlength=n + 1)[1:])
        self.n_regions += n
        words = score_words(maps, ids)
        words.sort()
        offset = sum(length for _, length in self.runs)
        words.tofile(self._file)
        self.runs.append((offset, words.size))

    def metrics(self, labels: np.ndarray, image_scores: np.ndarray, *, has_masks: bool = True) -> dict[str, Any]:
        """:func:`compute_all` of these pixels: the six metrics and ``null_reasons``."""
        return compute_all(labels, image_scores, self, has_masks=has_masks)

    def one_class_reason(self) -> str | None:
        """compute_all's null reason of the pixel metrics with one class of pixels, else None."""
        if 0 < self.n_anomalous < self.n_pixels:
            return None
        return (f"no {'anomalous' if self.n_anomalous == 0 else 'normal'} pixels in the masks of this category "
                f"({self.n_images} masks)")

    def result(self, fpr_limit: float = 0.3) -> dict[str, float]:
        """{pixel_auroc, pixel_ap, pixel_aupro} as :func:`metrics.pixel_metrics` (both classes needed)."""
        if not self.rank:
            raise ValueError("this stream was opened with rank=False (no masks): it has no pixel metrics")
        if self.one_class_reason():
            raise ValueError(f"masks: {self.one_class_reason()}; the metric is undefined")
        if not 0 < fpr_limit <= 1:
            raise ValueError(f"fpr_limit: must be in (0, 1], got {fpr_limit}")
        self._file.flush()
        n_pos, n_neg, n_regions = self.n_anomalous, self.n_pixels - self.n_anomalous, self.n_regions
        sizes = np.concatenate(self.region_sizes)
        weight = np.zeros(n_regions + 1)
        weight[1:] = 1.0 / (n_regions * sizes)  # metrics._pro_from_ranking's 1 / (R |r|)
        walk = _Walk(n_pos, n_neg, weight, fpr_limit)
        for block in merge_runs(self.path, self.runs, self.block_words, self.fan_in):
            walk.block(block)
        walk.finish()
        return {"pixel_auroc": float(walk.auroc), "pixel_ap": float(walk.ap_sum / n_pos),
                "pixel_aupro": float(walk.pro_area / fpr_limit)}

    def close(self) -> None:
        """Delete the run file (ours); the stream cannot be used afterwards."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> PixelStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Walk:
    """The thresholds of the merged order, block by block, and the sums of AUROC, AP and the PRO area.

    A threshold is the last position of a run of equal keys; a block's last position is held back
    (``pending``) until the next block shows whether its key goes on. At each threshold: TP = region
    pixels so far, FP = position + 1 − TP, PRO = the sequential sum of the region pixels' weights.
    """

    def __init__(self, n_pos: int, n_neg: int, weight: np.ndarray, fpr_limit: float):
        self.n_pos, self.n_neg, self.weight, self.limit = n_pos, n_neg, weight, fpr_limit
        self.seen = self.tp = 0
        self.pro = 0.0
        self.pending: tuple[int, int, int, float] | None = None  # (key, tp, position, pro) of the last pixel
        self.prev_tp, self.prev_x, self.prev_y = 0, 0.0, 0.0  # last threshold (ROC x = FPR, y = TPR)
        self.auroc = self.ap_sum = 0.0
        self.pro_x, self.pro_y, self.pro_area, self.pro_done = 0.0, 0.0, 0.0, False

    def block(self, words: np.ndarray) -> None:
        halves = words.view("<u4").reshape(-1, 2)  # [:, 0] region id, [:, 1] key (little-endian words)
        keys, regions = halves[:, 1], halves[:, 0]
        is_region = regions != 0
        tp_local = np.cumsum(is_region, dtype=np.int64)  # region pixels of this block up to each position
        # sequential sum of the weights on from the earlier blocks': exactly metrics' np.cumsum over all
        pro = np.cumsum(np.concatenate(([self.pro], self.weight[regions[is_region]])))
        ends = np.flatnonzero(keys[1:] != keys[:-1])
        points = []
        if self.pending is not None and self.pending[0] != int(keys[0]):
            points.append(np.array([self.pending[1:]], dtype=np.float64).T)  # the last block's last key ended
        local_tp = tp_local[ends]
        points.append(np.stack([self.tp + local_tp, self.seen + ends, pro[local_tp]]).astype(np.float64))
        self._points(np.concatenate(points, axis=1) if len(points) > 1 else points[0])
        last = words.size - 1
        self.pending = (int(keys[last]), self.tp + int(tp_local[last]), self.seen + last, float(pro[-1]))
        self.tp += int(tp_local[last])
        self.seen += words.size
        self.pro = float(pro[-1])

    def finish(self) -> None:
        if self.pending is not None:
            self._points(np.array([self.pending[1:]], dtype=np.float64).T)
            self.pending = None

    def _points(self, p: np.ndarray) -> None:
        """p (3, M): TP, position, PRO of M thresholds in order (float64 holds the counts exactly)."""
        if p.shape[1] == 0:
            return
        tp, position, pro = p[0], p[1], p[2]
        fp = position + 1 - tp
        # metrics._roc_pr_from_ranking: np.trapezoid over (FPR, TPR) from (0, 0), and
        # AP = Σ (TP_i − TP_{i−1}) · TP_i / (position_i + 1), over n_pos at the end
        x = np.concatenate(([self.prev_x], fp / self.n_neg))
        y = np.concatenate(([self.prev_y], tp / self.n_pos))
        self.auroc += float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))
        self.ap_sum += float(np.dot(np.diff(np.concatenate(([self.prev_tp], tp))), tp / (position + 1)))
        self.prev_x, self.prev_y, self.prev_tp = x[-1], y[-1], tp[-1]
        if self.pro_done:
            return
        # metrics.partial_area on the PRO curve: trapezoids up to the first point with FPR >= L, the
        # PRO at L interpolated between it and the point before
        fpr = fp / self.n_neg
        px, py = np.concatenate(([self.pro_x], fpr)), np.concatenate(([self.pro_y], pro))
        i = int(np.searchsorted(px, self.limit, side="left"))  # px[0] < L always (it was checked)
        if i == px.size:
            self.pro_area += float(np.sum(np.diff(px) * (py[1:] + py[:-1]) / 2.0))
            self.pro_x, self.pro_y = px[-1], py[-1]
            return
        self.pro_area += float(np.sum(np.diff(px[:i]) * (py[1:i] + py[:i - 1]) / 2.0))
        x0, x1, y0, y1 = px[i - 1], px[i], py[i - 1], py[i]
        y_at = y0 + (y1 - y0) * (self.limit - x0) / (x1 - x0)
        self.pro_area += (self.limit - x0) * (y0 + y_at) / 2
        self.pro_done = True


def compute_all(labels: np.ndarray, image_scores: np.ndarray, pixels: PixelStream, *,
                has_masks: bool = True, fpr_limit: float = 0.3) -> dict[str, Any]:
    """:func:`metrics.compute_all` with the maps and masks already added to ``pixels``: the six metrics
    of :data:`metrics.METRIC_KEYS` and ``null_reasons``, the same values and the same reasons.
    labels (N,) {0, 1}, image_scores (N,); ``pixels`` holds the same N images."""
    if pixels.n_images != np.asarray(labels).shape[0]:
        raise ValueError(f"labels {np.asarray(labels).shape} and {pixels.n_images} images of maps: expected one "
                         "map per image")
    labels, image_scores = metrics.image_inputs(labels, image_scores, "image_scores")
    image = metrics.image_metrics(labels, image_scores)
    out: dict[str, Any] = {k: image[k] for k in metrics.METRIC_KEYS[:3]}
    reasons = dict(image["null_reasons"])
    pixel_keys = metrics.METRIC_KEYS[3:]
    reason = metrics.NO_MASKS_REASON if not has_masks else pixels.one_class_reason()
    if reason:
        out.update(dict.fromkeys(pixel_keys))
        reasons.update(dict.fromkeys(pixel_keys, reason))
    else:
        out.update(pixels.result(fpr_limit))
    out["null_reasons"] = reasons
    return out


def scratch_folder(parent: Path) -> Path:
    """A new empty folder for run files under ``parent`` (created), named so nobody takes it for output."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".metrics-runs-", dir=parent))

