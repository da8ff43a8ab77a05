"""Evaluation metrics, image and pixel level (docs/design.md#artifacts): numpy in, Python floats out.

    image_auroc, image_ap, f1_max   labels (N,) {0, 1}, scores (N,)          1 = anomalous
    f1_max_threshold, at_threshold  labels (N,), scores (N,)                 (a chosen image threshold)
    pixel_auroc, pixel_ap, aupro    masks (N, H, W) {0, 1}, maps (N, H, W)   1 = anomalous pixel

Image AUROC and AP and the curves are scikit-learn's; pixel AUROC, AP and AUPRO share one sort of all
pixels (:func:`pixel_metrics`; see :func:`_roc_pr_from_ranking` for why not scikit-learn), and the
tests compare them with scikit-learn and a slow AUPRO. AUPRO follows MVTec AD's definition: the ground-truth
regions are the 8-connected components of each image's mask (a region never spans two images);
for a threshold t

    PRO(t) = 1/R Σ_r |{p ∈ r : s_p ≥ t}| / |r|     (R regions over all images)
    FPR(t) = |{p normal : s_p ≥ t}| / N_normal      (normal = mask 0, over all images)

and AUPRO = ∫_0^L PRO d(FPR) / L (L = ``fpr_limit``, 0.3 by default) by the trapezoid rule on the curve
that starts at (0, 0) and has one point per distinct score, PRO at FPR = L linearly interpolated.

Every function validates its inputs and raises a ValueError that names the argument and its shape;
a metric that is undefined (a single class) raises too. :func:`compute_all` is the one entry point
that returns ``None`` for an undefined metric, with the reason in ``null_reasons``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

METRIC_KEYS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_aupro")
"""The keys of :func:`compute_all` and of ``metrics.json`` (docs/design.md#artifacts)."""

_IMAGE_KEYS = METRIC_KEYS[:3]
_PIXEL_KEYS = METRIC_KEYS[3:]

# 3x3 all-ones in the image plane, nothing across the image axis: ndimage.label on a (N, H, W) stack
# then finds each image's 8-connected components and never joins two images.
REGIONS_8 = np.zeros((3, 3, 3), dtype=bool)
REGIONS_8[1] = True


# --------------------------------------------------------------------------------------------------
# Validation


def _binary(name: str, a: Any) -> np.ndarray:
    """``a`` as a bool array; it must hold only 0 and 1 (or be bool)."""
    a = np.asarray(a)
    if a.dtype == bool:
        return a
    if a.dtype.kind not in "uif":
        raise ValueError(f"{name}: expected a numeric or bool array of 0/1, got dtype {a.dtype} (shape {a.shape})")
    bad = (a != 0) & (a != 1)
    if bad.any():
        examples = np.unique(a[bad])[:5].tolist()
        raise ValueError(f"{name}: must be binary {{0, 1}} (1 = anomalous); shape {a.shape} has "
                         f"{int(bad.sum())} other values, e.g. {examples}")
    return a != 0


def _finite(name: str, a: Any) -> np.ndarray:
    """``a`` as a real numeric array without NaN or inf."""
    a = np.asarray(a)
    if a.dtype.kind not in "uifb":
        raise ValueError(f"{name}: expected a real numeric array, got dtype {a.dtype} (shape {a.shape})")
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a)
        if bad.any():
            raise ValueError(f"{name}: shape {a.shape} contains {int(np.isnan(a).sum())} NaN and "
                             f"{int(np.isinf(a).sum())} inf values")
    return a


def image_inputs(labels: Any, scores: Any, scores_name: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels), np.asarray(scores)
    if labels.ndim != 1 or labels.shape != scores.shape or labels.size == 0:
        raise ValueError(f"labels {labels.shape} and {scores_name} {scores.shape}: expected two non-empty "
                         "arrays of the same shape (N,)")
    return _binary("labels", labels), _finite(scores_name, scores)


def pixel_inputs(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    masks, maps = np.asarray(masks), np.asarray(maps)
    if masks.ndim != 3 or masks.size == 0:
        raise ValueError(f"masks: expected a non-empty (N, H, W) array, got shape {masks.shape}")
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape}: shapes differ; expected both (N, H, W)")
    return _binary("masks", masks), _finite("maps", maps)


def one_class_reason(positive: Any, unit: str) -> str | None:
    """Why a ranking metric of ``positive`` (any shape, {0, 1} or bool; 1 = anomalous) is undefined, or
    None when both classes occur. ``unit`` names the entries (``images``, ``pixels``)."""
    positive = np.asarray(positive)
    n_pos = int(np.count_nonzero(positive))
    if 0 < n_pos < positive.size:
        return None
    return f"only one class ({n_pos} anomalous, {positive.size - n_pos} normal {unit})"


def _two_classes(name: str, positive: np.ndarray, unit: str) -> None:
    """Raise when the bool array ``positive`` is all True or all False (the metric is undefined)."""
    reason = one_class_reason(positive, unit)
    if reason:
        raise ValueError(f"{name} {positive.shape}: {reason}; the metric is undefined")


# --------------------------------------------------------------------------------------------------
# Image level


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve. labels (N,) {0, 1}, scores (N,) higher = more anomalous."""
    labels, scores = image_inputs(labels, scores)
    _two_classes("labels", labels, "images")
    return float(roc_auc_score(labels, scores))


def image_ap(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (scikit-learn's step-wise area under the PR curve). labels (N,), scores (N,)."""
    labels, scores = image_inputs(labels, scores)
    _two_classes("labels", labels, "images")
    return float(average_precision_score(labels, scores))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """max over thresholds t of 2 P R / (P + R), predicting anomalous where score ≥ t (0 where P + R = 0).

    labels (N,) {0, 1}, scores (N,). The thresholds are every distinct score (scikit-learn's PR curve).
    """
    labels, scores = image_inputs(labels, scores)
    _two_classes("labels", labels, "images")
    precision, recall, _ = precision_recall_curve(labels, scores)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def f1_max_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(F1-max, its threshold): the image threshold t that maximises F1 when score ≥ t is anomalous.

    labels (N,) {0, 1}, scores (N,). The candidates are every distinct score (as :func:`f1_max`, whose
    value the first element equals). Where several thresholds reach the same F1, the highest one is
    returned (the fewest alarms for the same F1). Two classes are required (ValueError otherwise).
    """
    labels, scores = image_inputs(labels, scores)
    _two_classes("labels", labels, "images")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # scikit-learn's last point (recall 0, precision 1) has no threshold; its F1 is 0 and never the max
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = np.flatnonzero(f1 == f1.max())[-1]  # thresholds ascend: the last tie is the highest threshold
    return float(f1[best]), float(thresholds[best])


THRESHOLD_KEYS = ("image_f1_at_aux_threshold", "image_precision_at_aux_threshold", "image_recall_at_aux_threshold")
"""The keys of :func:`at_threshold`: a fixed threshold's F1, precision and recall over images."""
RULE_KEYS = ("image_f1_at_rule_threshold", "image_precision_at_rule_threshold", "image_recall_at_rule_threshold")
"""The same for the threshold a mode's own label-free rule chooses (:mod:`pipeline.method.thresholds`)."""


def at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float,
                 keys: tuple[str, str, str] = THRESHOLD_KEYS) -> dict[str, Any]:
    """F1, precision and recall of the decisions ``score >= threshold`` (anomalous), keyed by
    ``keys`` (:data:`THRESHOLD_KEYS` or :data:`RULE_KEYS`), with ``null_reasons`` for those the data leave undefined.

    labels (N,) {0, 1}, scores (N,). precision = TP / (TP + FP), None when no image reaches the
    threshold; recall = TP / (TP + FN) and F1 = 2 TP / (2 TP + FP + FN), None when there is no anomalous
    image (a set of normal images has no recall; its false alarms show in the precision).
    """
    labels, scores = image_inputs(labels, scores)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold: must be finite, got {threshold}")
    alarm = scores >= threshold
    tp = int(np.count_nonzero(alarm & labels))
    fp = int(np.count_nonzero(alarm & ~labels))
    fn = int(np.count_nonzero(~alarm & labels))
    f1_key, precision_key, recall_key = keys
    out: dict[str, Any] = dict.fromkeys(keys)
    reasons: dict[str, str] = {}
    if tp + fp:
        out[precision_key] = tp / (tp + fp)
    else:
        reasons[precision_key] = f"no image scores at or above the threshold {threshold:.6g} ({labels.size} images)"
    if tp + fn:
        out[recall_key] = tp / (tp + fn)
        out[f1_key] = 2 * tp / (2 * tp + fp + fn)
    else:
        reason = f"no anomalous images in this category ({labels.size} images, all normal)"
        reasons[recall_key] = reasons[f1_key] = reason
    out["null_reasons"] = reasons
    return out


OPERATOR_KEYS = ("good_passed_at_full_recall", "good_passed_at_1pct_miss")
"""The operator's view of a set's image scores (:func:`operator_view`)."""
MISS_RATE = 0.01


def operator_view(labels: np.ndarray, scores: np.ndarray, miss_rate: float = MISS_RATE) -> dict[str, Any]:
    """The fraction of good images passed (scored below the threshold) at two thresholds an operator sets
    from the defects, with ``null_reasons`` where the data leave them undefined (one class only).

    - ``good_passed_at_full_recall``: the threshold is the lowest anomalous score, so every defect is
      caught (an image is flagged when ``score >= threshold``);
    - ``good_passed_at_1pct_miss``: sort the n anomalous scores upwards, ``a(0) <= a(1) <= ...``, let
      ``k = floor(miss_rate · n)``; the threshold is ``a(k)``, so at most k defects (those below it) are
      missed; with fewer than 100 anomalous images k is 0 and this equals the full-recall figure.
    """
    labels, scores = image_inputs(labels, scores)
    out: dict[str, Any] = dict.fromkeys(OPERATOR_KEYS)
    reason = one_class_reason(labels, "images")
    if reason:
        out["null_reasons"] = dict.fromkeys(OPERATOR_KEYS, reason)
        return out
    anomalous, good = np.sort(scores[labels]), scores[~labels]
    k = int(math.floor(miss_rate * anomalous.size + 1e-9))
    out["good_passed_at_full_recall"] = float(np.mean(good < anomalous[0]))
    out["good_passed_at_1pct_miss"] = float(np.mean(good < anomalous[k]))
    out["null_reasons"] = {}
    return out


def _thin(n: int, max_points: int) -> np.ndarray:
    """At most ``max_points`` evenly spaced indices of range(n), first and last included."""
    return np.unique(np.linspace(0, n - 1, min(n, max_points)).round().astype(np.int64))


def _threshold(t: float) -> float | None:
    return float(t) if math.isfinite(t) else None


def curves(labels: np.ndarray, scores: np.ndarray, max_points: int = 200,
           unit: str = "images") -> dict[str, list[dict[str, float | None]]]:
    """ROC and PR curves as row lists for ``dvc plots``, thinned to at most ``max_points`` rows each.

    labels (N,) {0, 1}, scores (N,); ``unit`` names what the N entries are (``images``, or ``pixels``
    for flattened masks and maps), for the error when there is one class only. Returns ``{"roc": [{fpr, tpr, threshold}], "pr": [{recall,
    precision, threshold}]}``, both ordered from the highest threshold to the lowest; the first and
    last point of each curve are always kept. The curves' end points that no score realises (ROC's
    (0, 0), PR's (recall 0, precision 1)) have ``threshold`` None, as JSON has no infinity.
    """
    labels, scores = image_inputs(labels, scores)
    _two_classes("labels", labels, unit)
    if max_points < 2:
        raise ValueError(f"max_points: must be >= 2 to keep both end points, got {max_points}")
    fpr, tpr, roc_t = roc_curve(labels, scores, drop_intermediate=False)
    precision, recall, pr_t = precision_recall_curve(labels, scores)
    # scikit-learn orders the PR curve by increasing threshold; flip it to match the ROC curve. Its
    # last point (recall 0, precision 1) has no threshold.
    precision, recall, pr_t = precision[::-1], recall[::-1], np.concatenate(([np.inf], pr_t[::-1]))
    roc = [{"fpr": float(fpr[i]), "tpr": float(tpr[i]), "threshold": _threshold(roc_t[i])}
           for i in _thin(len(fpr), max_points)]
    pr = [{"recall": float(recall[i]), "precision": float(precision[i]), "threshold": _threshold(pr_t[i])}
          for i in _thin(len(recall), max_points)]
    return {"roc": roc, "pr": pr}


# --------------------------------------------------------------------------------------------------
# Pixel level


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """AUROC over all pixels of all images. masks (N, H, W) {0, 1}, maps (N, H, W)."""
    masks, maps = pixel_inputs(masks, maps)
    _two_classes("masks", masks, "pixels")
    return _roc_pr_from_ranking(_ranking(masks, maps, regions=False))[0]


def pixel_ap(masks: np.ndarray, maps: np.ndarray) -> float:
    """Average precision over all pixels of all images. masks (N, H, W) {0, 1}, maps (N, H, W)."""
    masks, maps = pixel_inputs(masks, maps)
    _two_classes("masks", masks, "pixels")
    return _roc_pr_from_ranking(_ranking(masks, maps, regions=False))[1]


def pixel_metrics(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> dict[str, float]:
    """pixel_auroc, pixel_ap and pixel_aupro (up to ``fpr_limit``) from one sort of all pixels.

    masks (N, H, W) {0, 1}, maps (N, H, W); the same values as :func:`pixel_auroc`, :func:`pixel_ap`
    and :func:`aupro` called one by one.
    """
    masks, maps = pixel_inputs(masks, maps)
    _two_classes("masks", masks, "pixels")
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit: must be in (0, 1], got {fpr_limit}")
    ranking = _ranking(masks, maps, regions=True)
    auroc, ap = _roc_pr_from_ranking(ranking)
    fpr, pro = _pro_from_ranking(ranking, fpr_limit)
    return {"pixel_auroc": auroc, "pixel_ap": ap, "pixel_aupro": partial_area(fpr, pro, fpr_limit) / fpr_limit}


def _roc_pr_from_ranking(ranking: _Ranking) -> tuple[float, float]:
    """(AUROC, AP) of pixels ranked by score, highest first (:func:`_ranking`).

    Not scikit-learn's roc_auc_score / average_precision_score, deliberately: each sorts all pixels
    again (an argsort plus gathers) after np.unique over the labels and the scores to check their
    type, so AUROC, AP and AUPRO of one category sorted every pixel several times; here the one sort
    that AUPRO needs serves all three. Measured: ``benchmarks/pixel_metrics.py`` 8.8x (60 maps of
    448², 1.17 s vs 10.15 s); the default evaluate@synth_a_to_synth_b stage went from 26-28 s to 12 s.
    The tests compare the values with scikit-learn's.

    Each distinct score is one threshold; at the end of its run of equal keys, TP = anomalous pixels
    so far and FP = the others. AUROC is the trapezoid area of the ROC curve from
    (0, 0); AP = Σ (R_i − R_{i−1}) P_i over the thresholds, scikit-learn's definition.
    """
    n, ends = ranking.keys.size, ranking.ends
    n_pos = ranking.region_at.size
    tp = np.searchsorted(ranking.region_at, ends, side="right")
    fp = ends + 1 - tp
    auroc = np.trapezoid(np.concatenate(([0], tp)) / n_pos, np.concatenate(([0], fp)) / (n - n_pos))
    ap = np.dot(np.diff(tp, prepend=0), tp / (ends + 1)) / n_pos
    return float(auroc), float(ap)


def partial_area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """∫_{x[0]}^{x_max} y dx by the trapezoid rule on the points (x, y), y at x_max linearly interpolated.

    x (M,) non-decreasing with x[0] < x_max <= x[-1]; y (M,). A run of equal x (a vertical step) adds no
    area; at a step exactly at x_max the interpolation takes its first (lowest-x-index) point.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or len(x) < 2:
        raise ValueError(f"x {x.shape} and y {y.shape}: expected two arrays of the same shape (M,), M >= 2")
    if not x[0] < x_max <= x[-1]:
        raise ValueError(f"x_max {x_max}: must lie in (x[0], x[-1]] = ({x[0]}, {x[-1]}]")
    i = int(np.searchsorted(x, x_max, side="left"))  # first point with x >= x_max; x[i - 1] < x_max
    x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
    y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
    return float(np.trapezoid(y[:i], x[:i]) + (x_max - x0) * (y0 + y_at) / 2)


def _regions(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Ground-truth regions: (pixel index, region id) of every anomalous pixel, and the region count R.

    masks (N, H, W) bool. Pixel indices index ``masks.reshape(-1)``, ascending; region ids are 1..R, the
    8-connected components of each image's mask, numbered over all images.
    """
    pixels = np.flatnonzero(masks)
    with_regions = masks.any(axis=(1, 2))  # label only those images: normal ones hold half the pixels
    labelled, n_regions = ndimage.label(masks[with_regions], structure=REGIONS_8)
    # Same C order as ``pixels``: dropping all-zero images removes no anomalous pixel.
    region_ids = labelled[labelled != 0]
    return pixels, region_ids, int(n_regions)


def _sorted_descending(maps: np.ndarray, pixels: np.ndarray, region_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All pixels sorted by score, highest first: (score keys, region ids) in that order.

    Equal score keys ⇔ equal scores (all that the caller compares); region id 0 = normal pixel.

    Fast path (scores that float32 holds exactly): one ``np.sort`` of uint64 words whose high half is
    the score's float32 bit pattern mapped to an unsigned key that decreases with the score and whose
    low half is the region id. It is several times faster than an argsort of the scores plus the gather
    it needs. Other scores (float64 that float32 would round): an argsort.
    """
    scores = maps.reshape(-1)
    if scores.dtype != np.float32:
        as_f32 = scores.astype(np.float32)
        if not np.array_equal(as_f32, scores):
            order = np.argsort(scores)[::-1]
            region_of = np.zeros(scores.size, dtype=np.uint32)
            region_of[pixels] = region_ids
            return scores[order], region_of[order]
        scores = as_f32
    n = scores.size
    # ``+ 0`` turns -0.0 into +0.0, so equal scores have equal bits (NaN was rejected by validation).
    bits = np.add(scores, np.float32(0)).view(np.uint32)
    # Non-negative floats order as their bits; x ^ 0x7FFFFFFF reverses that and stays below 2^31.
    # Negative floats' bits grow as the value falls and are all >= 2^31: already descending.
    np.bitwise_xor(bits, np.uint32(0x7FFFFFFF), out=bits, where=bits < np.uint32(0x80000000))
    words = np.empty(n, dtype="<u8")
    halves = words.view("<u4").reshape(n, 2)  # [:, 0] low half, [:, 1] high half, on any platform
    halves[:, 1] = bits
    del bits
    halves[:, 0] = 0
    halves[pixels, 0] = region_ids
    words.sort()
    return halves[:, 1], halves[:, 0]


def pro_curve(masks: np.ndarray, maps: np.ndarray, fpr_stop: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve, (fpr (M,), pro (M,)) float64, from (0, 0), one point per distinct score, descending.

    masks (N, H, W) {0, 1}, maps (N, H, W). The curve stops at the first point with fpr >= ``fpr_stop``
    (points beyond cannot change an area up to it). Needs at least one region and one normal pixel.

    One sort of all pixels by score replaces a loop over thresholds: walking the sorted pixels, each
    normal pixel adds 1/N_normal to FPR and each pixel of region r adds 1/(R |r|) to PRO; the curve is
    read at the last position of each run of equal scores, so every distinct score is one threshold.
    Cumulative sums run over the R-region pixels only (the normal count at a position is the position
    minus the region pixels before it), so no float array of all pixels is ever made.
    """
    masks, maps = pixel_inputs(masks, maps)
    _two_classes("masks", masks, "pixels")
    if not 0 < fpr_stop <= 1:
        raise ValueError(f"fpr_stop: must be in (0, 1], got {fpr_stop}")
    return _pro_from_ranking(_ranking(masks, maps, regions=True), fpr_stop)


class _Ranking(NamedTuple):
    """All pixels sorted by score, highest first, and what every pixel metric reads off that order."""

    keys: np.ndarray
    """Score keys in sorted order; equal keys ⇔ equal scores (:func:`_sorted_descending`)."""
    regions: np.ndarray
    """Region id of each sorted pixel; 0 = normal."""
    n_regions: int
    region_at: np.ndarray
    """Sorted positions of the anomalous pixels, ascending."""
    ends: np.ndarray
    """Last sorted position of each distinct score: one threshold each, highest score first."""


def _ranking(masks: np.ndarray, maps: np.ndarray, regions: bool) -> _Ranking:
    """Sort all pixels by score once (:func:`_sorted_descending`) for AUROC, AP and the PRO curve.

    With ``regions`` the ids are the 8-connected ground-truth regions 1..R (what AUPRO needs);
    without, every anomalous pixel has id 1 (enough for AUROC and AP, and no labelling).
    """
    if regions:
        pixels, region_ids, n_regions = _regions(masks)
    else:
        pixels = np.flatnonzero(masks)
        region_ids, n_regions = np.ones(pixels.size, dtype=np.uint32), 1
    keys, sorted_regions = _sorted_descending(maps, pixels, region_ids)
    ends = np.append(np.flatnonzero(keys[1:] != keys[:-1]), keys.size - 1)
    return _Ranking(keys, sorted_regions, n_regions, np.flatnonzero(sorted_regions), ends)


def _pro_from_ranking(ranking: _Ranking, fpr_stop: float) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve of :func:`pro_curve` from pixels already ranked by :func:`_ranking`."""
    keys, regions, n_regions, region_at = ranking.keys, ranking.regions, ranking.n_regions, ranking.region_at
    n = keys.size
    n_normal = n - region_at.size
    weight = np.zeros(n_regions + 1)
    weight[1:] = 1.0 / (n_regions * np.bincount(regions[region_at], minlength=n_regions + 1)[1:])
    pro_cum = np.concatenate(([0.0], np.cumsum(weight[regions[region_at]])))  # PRO after j region pixels

    # Stop at the end of the run that holds the k-th normal pixel, k the least count with k/N > fpr_stop.
    k = min(n_normal, math.floor(fpr_stop * n_normal) + 1)
    normals_before = region_at - np.arange(region_at.size)  # normal pixels ahead of each region pixel
    stop = k - 1 + int(np.searchsorted(normals_before, k, side="left"))
    # the thresholds up to the end of the run of equal scores that holds ``stop``
    ends = ranking.ends[: int(np.searchsorted(ranking.ends, stop, side="left")) + 1]
    region_upto = np.searchsorted(region_at, ends, side="right")  # region pixels at positions <= end
    fpr = (ends + 1 - region_upto) / n_normal
    pro = pro_cum[region_upto]
    return np.concatenate(([0.0], fpr)), np.concatenate(([0.0], pro))


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to FPR = ``fpr_limit`` (MVTec AD), in [0, 1].

    masks (N, H, W) {0, 1}, maps (N, H, W). AUPRO = ∫_0^L PRO d(FPR) / L, trapezoid rule, PRO at L
    interpolated between the two curve points around it (see the module docstring for PRO and FPR).
    A constant map scores L / 2 (0.15 at L = 0.3): its one threshold jumps from (0, 0) to (1, 1), so
    PRO = FPR along the curve.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit: must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(masks, maps, fpr_stop=fpr_limit)
    return partial_area(fpr, pro, fpr_limit) / fpr_limit


# --------------------------------------------------------------------------------------------------
# Everything for one category


NO_MASKS_REASON = "the target has no masks (labels only)"
"""The ``null_reasons`` entry of a pixel metric when the target has labels but no masks."""


def compute_all(labels: np.ndarray, image_scores: np.ndarray, masks: np.ndarray,
                maps: np.ndarray, *, has_masks: bool = True) -> dict[str, Any]:
    """The six metrics of :data:`METRIC_KEYS` for one category, and ``null_reasons``.

    labels (N,) {0, 1}, image_scores (N,), masks (N, H, W) {0, 1}, maps (N, H, W). A metric that the
    data leave undefined (a category without normal or without anomalous images; masks without
    anomalous or without normal pixels) is None, and ``null_reasons[key]`` says why. ``has_masks``
    False (a target with labels but no masks: its ``masks`` are zeros that say nothing) makes the
    pixel metrics None with the reason :data:`NO_MASKS_REASON`; the image metrics are computed as
    usual. Invalid inputs raise a ValueError.
    """
    labels, image_scores = image_inputs(labels, image_scores, "image_scores")
    masks, maps = pixel_inputs(masks, maps)
    if masks.shape[0] != labels.shape[0]:
        raise ValueError(f"labels {labels.shape} and masks {masks.shape}: expected one mask per image")
    out: dict[str, Any] = dict.fromkeys(METRIC_KEYS)
    reasons: dict[str, str] = {}

    n_bad = int(np.count_nonzero(labels))
    if n_bad == 0 or n_bad == labels.size:
        reason = (f"no {'anomalous' if n_bad == 0 else 'normal'} images in this category "
                  f"({labels.size} images, all {'normal' if n_bad == 0 else 'anomalous'})")
        reasons.update(dict.fromkeys(_IMAGE_KEYS, reason))
    else:
        out["image_auroc"] = image_auroc(labels, image_scores)
        out["image_ap"] = image_ap(labels, image_scores)
        out["image_f1_max"] = f1_max(labels, image_scores)

    n_bad_px = int(np.count_nonzero(masks))
    if not has_masks:
        reasons.update(dict.fromkeys(_PIXEL_KEYS, NO_MASKS_REASON))
    elif n_bad_px == 0 or n_bad_px == masks.size:
        reason = (f"no {'anomalous' if n_bad_px == 0 else 'normal'} pixels in the masks of this category "
                  f"({masks.shape[0]} masks)")
        reasons.update(dict.fromkeys(_PIXEL_KEYS, reason))
    else:
        out.update(pixel_metrics(masks, maps))

    out["null_reasons"] = reasons
    return out


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """The three image metrics of :data:`METRIC_KEYS` for one category and ``null_reasons``, exactly as
    :func:`compute_all` gives them (None with the same reason without normal or anomalous images).
    labels (N,) {0, 1}, scores (N,)."""
    labels, scores = image_inputs(labels, scores)
    n_bad = int(np.count_nonzero(labels))
    if n_bad == 0 or n_bad == labels.size:
        reason = (f"no {'anomalous' if n_bad == 0 else 'normal'} images in this category "
                  f"({labels.size} images, all {'normal' if n_bad == 0 else 'anomalous'})")
        return {**dict.fromkeys(_IMAGE_KEYS), "null_reasons": dict.fromkeys(_IMAGE_KEYS, reason)}
    return {"image_auroc": image_auroc(labels, scores), "image_ap": image_ap(labels, scores),
            "image_f1_max": f1_max(labels, scores), "null_reasons": {}}
