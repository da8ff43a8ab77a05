import json

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline.evaluation import metrics

EIGHT = np.ones((3, 3), dtype=bool)
FOUR = ndimage.generate_binary_structure(2, 1)


def reference_aupro(masks, maps, fpr_limit=0.3, structure=EIGHT):
    """Obviously correct and slow: every distinct score is a threshold, FPR and PRO by boolean masks."""
    masks, maps = np.asarray(masks) != 0, np.asarray(maps)
    regions = []
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=structure)
        for r in range(1, n + 1):
            region = np.zeros(masks.shape, dtype=bool)
            region[i] = labelled == r
            regions.append(region)
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fpr = (pred & normal).sum() / normal.sum()
        pro = np.mean([(pred & region).sum() / region.sum() for region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (f0, p0), (f1, p1) in zip(points, points[1:]):
        if f1 <= fpr_limit:
            area += (f1 - f0) * (p0 + p1) / 2
        else:  # the segment that crosses fpr_limit: PRO there by linear interpolation
            p = p0 + (p1 - p0) * (fpr_limit - f0) / (f1 - f0)
            area += (fpr_limit - f0) * (p0 + p) / 2
            break
    return area / fpr_limit


def random_case(seed, kind, n=7, h=18, w=23):
    """Masks: normal images, one or two rectangles or discs of several sizes; maps: blurred noise + signal."""
    g = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        for _ in range([0, 0, 1, 1, 2][g.integers(5)] if i > 0 else 2):  # image 0 always has two shapes
            if g.random() < 0.5:
                y, x = g.integers(0, h - 1), g.integers(0, w - 1)
                masks[i, y : y + g.integers(1, 7), x : x + g.integers(1, 9)] = 1
            else:
                cy, cx, r = g.uniform(0, h), g.uniform(0, w), g.uniform(0.8, 4)
                masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    if masks.all(axis=(1, 2)).all() or not masks.any():
        raise AssertionError("degenerate random case")
    maps = ndimage.gaussian_filter(g.standard_normal((n, h, w)), sigma=(0, 1, 1))
    maps += g.uniform(0.5, 2, (n, 1, 1)) * ndimage.gaussian_filter(masks.astype(float), sigma=(0, 1, 1))
    if kind == "float32":
        maps = maps.astype(np.float32)  # the fast (packed-key sort) path
    elif kind == "ties":
        maps = (np.round(maps * 3) / 3).astype(np.float32)  # few distinct scores, -0.0 and 0.0 among them
    # "float64": values float32 cannot hold, the argsort path
    return masks, maps


# --------------------------------------------------------------------------------------------------
# AUPRO


def test_aupro_hand_worked():
    # Image A, region r1 = {(0,0), (0,1)}      Image B, region r2 = {(2,2)}
    #   .9* .1* .1                               .1 .1 .1
    #   .8  .1  .1                               .1 .1 .1
    #   .1  .1  .1                               .1 .5 .7*       (* = region pixel)
    # R = 2 regions, 15 normal pixels. Distinct scores, highest first:
    #   t=.9: FPR 0     PRO (1/2 + 0)/2 = .25
    #   t=.8: FPR 1/15  PRO .25          (normal A(1,0))
    #   t=.7: FPR 1/15  PRO (1/2 + 1)/2 = .75
    #   t=.5: FPR 2/15  PRO .75          (normal B(2,1))
    #   t=.1: FPR 1     PRO 1            (ties between normal and region pixels)
    # Area from 0 to 0.3: 1/15 * .25 + 0 (vertical) + 1/15 * .75
    #   + last segment (2/15, .75)-(1, 1) cut at .3, PRO(.3) = .75 + .25 * (.3 - 2/15) / (13/15) = .75 + 5/104:
    #   (.3 - 2/15) * (.75 + .75 + 5/104) / 2 = 1/6 * 161/104 / 2 = 161/1248
    # total = 1/15 + 161/1248 = 1221/6240; / 0.3 = 407/624
    a = [[0.9, 0.1, 0.1], [0.8, 0.1, 0.1], [0.1, 0.1, 0.1]]
    b = [[0.1, 0.1, 0.1], [0.1, 0.1, 0.1], [0.1, 0.5, 0.7]]
    masks = np.zeros((2, 3, 3), dtype=np.uint8)
    masks[0, 0, :2] = 1
    masks[1, 2, 2] = 1
    maps = np.array([a, b])
    for m in (maps, maps.astype(np.float32)):  # argsort path and packed-key path
        assert abs(metrics.aupro(masks, m) - 407 / 624) < 1e-9
        fpr, pro = metrics.pro_curve(masks, m)
        np.testing.assert_allclose(fpr, [0, 0, 1 / 15, 1 / 15, 2 / 15, 1])
        np.testing.assert_allclose(pro, [0, 0.25, 0.25, 0.75, 0.75, 1])


@pytest.mark.parametrize("kind", ["float64", "float32", "ties"])
@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_slow_reference(seed, kind):
    masks, maps = random_case(seed, kind)
    assert abs(metrics.aupro(masks, maps) - reference_aupro(masks, maps)) < 1e-6


@pytest.mark.parametrize("fpr_limit", [0.01, 0.3, 1.0])
def test_aupro_matches_reference_at_other_limits(fpr_limit):
    masks, maps = random_case(11, "ties")
    expected = reference_aupro(masks, maps, fpr_limit=fpr_limit)
    assert abs(metrics.aupro(masks, maps, fpr_limit=fpr_limit) - expected) < 1e-6


def test_aupro_perfect_and_constant_maps():
    masks, _ = random_case(3, "float32")
    assert metrics.aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0, abs=1e-12)
    # one threshold: (0, 0) -> (1, 1); area of PRO = FPR up to 0.3 is 0.045, / 0.3 = 0.15
    assert metrics.aupro(masks, np.full(masks.shape, 0.7, np.float32)) == pytest.approx(0.15, abs=1e-12)
    assert metrics.aupro(masks, np.zeros(masks.shape), fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)


def test_aupro_regions_are_8_connected_per_image():
    # (0,1) and (1,2) touch only diagonally: one region {(0,0), (0,1), (1,2)} with 8-connectivity,
    # two ({(0,0), (0,1)} and {(1,2)}) with 4-connectivity.
    masks = np.zeros((2, 4, 4), dtype=np.uint8)
    masks[0, 0, :2] = 1
    masks[0, 1, 2] = 1
    masks[1, 3, 3] = 1
    maps = np.full(masks.shape, 0.1, np.float32)
    maps[0, 1, 2], maps[0, 0, 0], maps[0, 3, 0], maps[1, 3, 3], maps[1, 0, 0] = 0.9, 0.6, 0.8, 0.7, 0.5
    value = metrics.aupro(masks, maps)
    assert abs(value - reference_aupro(masks, maps, structure=EIGHT)) < 1e-9
    assert abs(value - reference_aupro(masks, maps, structure=FOUR)) > 1e-3
    # a region never spans two images: the last row of image 0 and the first of image 1 do not join
    stacked = np.zeros((2, 2, 2), dtype=np.uint8)
    stacked[0, 1, 0] = stacked[1, 0, 0] = 1
    smaps = np.zeros((2, 2, 2), np.float32)
    smaps[0, 1, 0], smaps[0, 0, 1] = 1.0, 0.5
    assert abs(metrics.aupro(stacked, smaps) - reference_aupro(stacked, smaps)) < 1e-9


# --------------------------------------------------------------------------------------------------
# Image and pixel AUROC / AP / F1


def pairwise_auroc(labels, scores):
    """Obviously correct and slow: P(anomalous score > normal score) + 1/2 P(equal), over all pairs."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(float(p > n) + 0.5 * float(p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def threshold_ap(labels, scores):
    """Obviously correct and slow: Σ over distinct scores t (descending) of (R(t) − R(previous t)) · P(t),
    predicting anomalous where score ≥ t (the step-wise area, no interpolation)."""
    ap, last_recall = 0.0, 0.0
    for t in np.unique(scores)[::-1]:
        pred = scores >= t
        tp = (pred & (labels == 1)).sum()
        recall, precision = tp / (labels == 1).sum(), tp / pred.sum()
        ap += (recall - last_recall) * precision
        last_recall = recall
    return ap


def test_image_auroc_and_ap_hand_worked_with_ties():
    labels = np.array([1, 0, 1, 0, 1, 0])
    scores = np.array([0.9, 0.7, 0.7, 0.3, 0.2, 0.1])  # one tie across classes, at 0.7
    # AUROC by pairs (anomalous 0.9, 0.7, 0.2 vs normal 0.7, 0.3, 0.1; a tie counts 1/2):
    #   0.9 beats all 3; 0.7 ties 0.7, beats 0.3 and 0.1 -> 2.5; 0.2 beats 0.1 -> 1; (3 + 2.5 + 1) / 9.
    #   Breaking the tie either way would give 7/9 or 6/9.
    assert metrics.image_auroc(labels, scores) == pytest.approx(13 / 18, abs=1e-12)
    # AP, thresholds 0.9, 0.7, 0.3, 0.2, 0.1 -> (TP, FP) = (1, 0), (2, 1), (2, 2), (3, 2), (3, 3):
    #   recall 1/3 at precision 1, 2/3 at 2/3, no step at 0.3, 1 at 3/5, no step at 0.1
    #   1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/5 = 34/45
    assert metrics.image_ap(labels, scores) == pytest.approx(34 / 45, abs=1e-12)
    # the slow references below give the hand-worked values, so they can be trusted on random data
    assert pairwise_auroc(labels, scores) == pytest.approx(13 / 18) and threshold_ap(labels, scores) == pytest.approx(34 / 45)


@pytest.mark.parametrize("seed", range(3))
def test_image_auroc_and_ap_equal_slow_references(seed):
    g = np.random.default_rng(seed)
    labels = g.integers(0, 2, 120)
    scores = np.round(g.normal(labels * 0.8, 1.0), 1)  # rounded: many ties, within and across classes
    assert metrics.image_auroc(labels, scores) == pytest.approx(pairwise_auroc(labels, scores), abs=1e-12)
    assert metrics.image_ap(labels, scores) == pytest.approx(threshold_ap(labels, scores), abs=1e-12)


@pytest.mark.parametrize("kind", ["float64", "float32", "ties"])
@pytest.mark.parametrize("seed", range(3))
def test_pixel_metrics_from_one_sort_equal_sklearn_and_the_slow_aupro(seed, kind):
    masks, maps = random_case(seed + 5, kind)
    auroc = roc_auc_score(masks.ravel(), maps.ravel())
    ap = average_precision_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(auroc, abs=1e-12)
    assert metrics.pixel_ap(masks, maps) == pytest.approx(ap, abs=1e-12)
    together = metrics.pixel_metrics(masks, maps)
    assert together["pixel_auroc"] == pytest.approx(auroc, abs=1e-12)
    assert together["pixel_ap"] == pytest.approx(ap, abs=1e-12)
    assert together["pixel_aupro"] == metrics.aupro(masks, maps)
    assert abs(together["pixel_aupro"] - reference_aupro(masks, maps)) < 1e-6


def test_pixel_auroc_and_ap_hand_worked():
    # scores 0.9 (anomalous), 0.8 (normal), 0.8 (anomalous), 0.1 (normal): thresholds 0.9, 0.8, 0.1
    masks = np.array([[[1, 0], [1, 0]]], dtype=np.uint8)
    maps = np.array([[[0.9, 0.8], [0.8, 0.1]]], dtype=np.float32)
    # ROC (0,0) -> (0, 1/2) -> (1/2, 1) -> (1, 1): area 1/2 * (1/2 + 1) / 2 + 1/2 * 1 = 0.875
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(0.875, abs=1e-12)
    # AP: recall 1/2 at precision 1, then recall 1 at precision 2/3: 1/2 * 1 + 1/2 * 2/3 = 5/6
    assert metrics.pixel_ap(masks, maps) == pytest.approx(5 / 6, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_f1_max_equals_brute_force(seed):
    g = np.random.default_rng(seed)
    labels = g.integers(0, 2, 120)
    scores = np.round(g.normal(labels, 1.0), 1)
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & (labels == 1))
        if tp:
            p, r = tp / pred.sum(), tp / labels.sum()
            best = max(best, 2 * p * r / (p + r))
    assert metrics.f1_max(labels, scores) == pytest.approx(best, abs=1e-12)


def test_curves_are_thinned_with_end_points():
    g = np.random.default_rng(1)
    labels = g.integers(0, 2, 1000)
    scores = g.normal(labels, 1.0)
    c = metrics.curves(labels, scores, max_points=50)
    json.dumps(c, allow_nan=False)  # plain JSON for dvc plots
    for name, x, y in (("roc", "fpr", "tpr"), ("pr", "recall", "precision")):
        rows = c[name]
        assert 2 <= len(rows) <= 50
        assert rows[0][x] == 0 and rows[-1][x] == 1 and rows[0]["threshold"] is None
        assert all(a[x] <= b[x] for a, b in zip(rows, rows[1:]))
    assert c["roc"][-1]["tpr"] == 1 and c["pr"][0]["precision"] == 1
    small = metrics.curves([0, 1, 1], [0.1, 0.4, 0.9])
    assert len(small["roc"]) == 4 and len(small["pr"]) == 4  # nothing to thin


# --------------------------------------------------------------------------------------------------
# compute_all and validation


def test_compute_all_values_and_single_class_reasons():
    masks, maps = random_case(2, "float32")
    labels = masks.any(axis=(1, 2)).astype(np.uint8)
    scores = maps.max(axis=(1, 2))
    out = metrics.compute_all(labels, scores, masks, maps)
    assert set(out) == set(metrics.METRIC_KEYS) | {"null_reasons"} and out["null_reasons"] == {}
    assert out["pixel_aupro"] == metrics.aupro(masks, maps)
    assert out["image_auroc"] == metrics.image_auroc(labels, scores)

    bad = labels == 1  # a category with anomalous images only
    out = metrics.compute_all(labels[bad], scores[bad], masks[bad], maps[bad])
    for key in ("image_auroc", "image_ap", "image_f1_max"):
        assert out[key] is None and "no normal images" in out["null_reasons"][key]
    assert isinstance(out["pixel_aupro"], float) and "pixel_aupro" not in out["null_reasons"]

    good = ~bad  # normal images only: nothing is defined
    out = metrics.compute_all(labels[good], scores[good], masks[good], maps[good])
    assert all(out[key] is None for key in metrics.METRIC_KEYS)
    assert "no anomalous images" in out["null_reasons"]["image_auroc"]
    assert "no anomalous pixels" in out["null_reasons"]["pixel_aupro"]

    full = np.ones_like(masks)
    out = metrics.compute_all(np.ones_like(labels), scores, full, maps)
    assert "no normal pixels" in out["null_reasons"]["pixel_auroc"]


def _inputs():
    masks, maps = random_case(4, "float32")
    return masks.any(axis=(1, 2)).astype(int), maps.max(axis=(1, 2)), masks, maps


@pytest.mark.parametrize("corrupt, match", [
    (lambda l, s, m, p: (l, s, m, p[:, :, :-1]), r"maps \(7, 18, 22\) and masks \(7, 18, 23\)"),
    (lambda l, s, m, p: (l, s, m * 255, p), r"masks: must be binary"),
    (lambda l, s, m, p: (l, s, m[0], p[0]), r"masks: expected .*\(18, 23\)"),
    (lambda l, s, m, p: (l, s, m, np.where(m == 1, np.nan, p)), r"maps: .* NaN"),
    (lambda l, s, m, p: (l, np.where(l == 1, np.nan, s), m, p), r"image_scores: .* NaN"),
    (lambda l, s, m, p: (l * 2, s, m, p), r"labels: must be binary"),
    (lambda l, s, m, p: (l[:-1], s[:-1], m, p), r"labels \(6,\) and masks \(7, 18, 23\)"),
    (lambda l, s, m, p: (l, s[:-1], m, p), r"labels \(7,\) and image_scores \(6,\)"),
])
def test_compute_all_rejects_bad_inputs(corrupt, match):
    with pytest.raises(ValueError, match=match):
        metrics.compute_all(*corrupt(*_inputs()))


def test_single_metrics_reject_undefined_and_bad_arguments():
    _, _, masks, maps = _inputs()
    with pytest.raises(ValueError, match="masks .*only one class"):
        metrics.aupro(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="labels .*only one class"):
        metrics.image_auroc(np.ones(5), np.arange(5.0))
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(masks, maps, fpr_limit=0)
    with pytest.raises(ValueError, match="max_points"):
        metrics.curves([0, 1], [0.2, 0.3], max_points=1)


def test_curves_count_pixels_as_pixels_when_one_class():
    """The pooled pixel curve of a target without anomalies said '... normal images'."""
    with pytest.raises(ValueError, match=r"labels \(12544,\): only one class \(0 anomalous, 12544 normal pixels\)"):
        metrics.curves(np.zeros(12544, np.uint8), np.linspace(0, 1, 12544), unit="pixels")
    with pytest.raises(ValueError, match=r"only one class \(3 anomalous, 0 normal images\)"):
        metrics.curves(np.ones(3, np.uint8), np.arange(3.0))
    assert metrics.one_class_reason(np.zeros((2, 4, 4), bool), "pixels") == "only one class (0 anomalous, 32 normal pixels)"
    assert metrics.one_class_reason([0, 1, 0], "images") is None


# ----------------------------------------------------------------------------------------------------
# The auxiliary threshold (F1-max and its threshold) and how a fixed threshold transfers


def brute_f1_threshold(labels, scores):
    """Slow and obvious: every distinct score as threshold, F1 by counting; ties -> the highest threshold."""
    labels = np.asarray(labels).astype(bool)
    best = (-1.0, None)
    for t in np.unique(scores):
        alarm = scores >= t
        tp, fp, fn = np.sum(alarm & labels), np.sum(alarm & ~labels), np.sum(~alarm & labels)
        f1 = 2 * tp / (2 * tp + fp + fn)
        if f1 >= best[0]:  # ascending t: a tie moves to the higher threshold
            best = (f1, float(t))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_f1_max_threshold_equals_brute_force(seed):
    g = np.random.default_rng(seed)
    n = int(g.integers(4, 40))
    labels = np.zeros(n, np.uint8)
    labels[g.choice(n, int(g.integers(1, n)), replace=False)] = 1
    # coarse scores: many ties, so the tie rule is exercised
    scores = np.round(g.random(n) + 0.4 * labels, 1 if seed % 2 else 3)
    f1, threshold = metrics.f1_max_threshold(labels, scores)
    want_f1, want_threshold = brute_f1_threshold(labels, scores)
    assert f1 == pytest.approx(want_f1, abs=1e-12) and threshold == want_threshold
    assert f1 == pytest.approx(metrics.f1_max(labels, scores), abs=1e-12)
    # the threshold realises the F1 it claims
    assert metrics.at_threshold(labels, scores, threshold)["image_f1_at_aux_threshold"] == pytest.approx(f1)


def test_f1_max_threshold_hand_worked_and_tie_rule():
    # scores 0.1 0.4 0.35 0.8, labels 0 0 1 1: t = 0.35 gives TP 2, FP 1 -> F1 0.8; t = 0.8 gives TP 1 -> 2/3
    assert metrics.f1_max_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == (pytest.approx(0.8), 0.35)
    # a tie: t = 0.9 (TP 1, FN 1) and t = 0.1 (TP 2, FP 2) both give F1 2/3; the higher threshold is kept
    labels, scores = np.array([1, 0, 0, 1]), np.array([0.9, 0.8, 0.7, 0.1])
    assert metrics.f1_max_threshold(labels, scores) == (pytest.approx(2 / 3), 0.9)
    assert brute_f1_threshold(labels, scores) == (pytest.approx(2 / 3), 0.9)
    with pytest.raises(ValueError, match="only one class"):
        metrics.f1_max_threshold([0, 0], [0.1, 0.2])


def test_at_threshold_tells_precision_from_recall():
    """A hand-worked case where the two differ: scores 0.9 (normal), 0.8, 0.7 (anomalous) reach 0.5;
    anomalous 0.1 and 0.2 do not. TP 2, FP 1, FN 2: precision 2/3, recall 1/2, F1 2·2 / (4 + 1 + 2)."""
    got = metrics.at_threshold(np.array([0, 1, 1, 1, 1]), np.array([0.9, 0.8, 0.7, 0.1, 0.2]), 0.5)
    assert got["image_precision_at_aux_threshold"] == pytest.approx(2 / 3)
    assert got["image_recall_at_aux_threshold"] == pytest.approx(1 / 2)
    assert got["image_f1_at_aux_threshold"] == pytest.approx(4 / 7)


def test_at_threshold_hand_worked_and_nulls():
    labels, scores = np.array([0, 0, 1, 1, 1]), np.array([0.1, 0.6, 0.5, 0.7, 0.2])
    got = metrics.at_threshold(labels, scores, 0.5)  # alarms: 0.6 (FP), 0.5 (TP), 0.7 (TP); 0.2 missed
    assert got["image_precision_at_aux_threshold"] == pytest.approx(2 / 3)
    assert got["image_recall_at_aux_threshold"] == pytest.approx(2 / 3)
    assert got["image_f1_at_aux_threshold"] == pytest.approx(4 / 6)
    assert got["null_reasons"] == {}
    # normal images only: recall and F1 undefined; precision 0 (every alarm false)
    normal = metrics.at_threshold([0, 0, 0], [0.1, 0.6, 0.9], 0.5)
    assert normal["image_recall_at_aux_threshold"] is None and normal["image_f1_at_aux_threshold"] is None
    assert normal["image_precision_at_aux_threshold"] == 0.0
    assert "no anomalous images" in normal["null_reasons"]["image_recall_at_aux_threshold"]
    # nothing reaches the threshold: precision undefined, recall and F1 0
    quiet = metrics.at_threshold([0, 1], [0.1, 0.2], 0.5)
    assert quiet["image_precision_at_aux_threshold"] is None and quiet["image_recall_at_aux_threshold"] == 0.0
    assert quiet["image_f1_at_aux_threshold"] == 0.0
    assert "at or above the threshold 0.5" in quiet["null_reasons"]["image_precision_at_aux_threshold"]
    with pytest.raises(ValueError, match="threshold"):
        metrics.at_threshold([0, 1], [0.1, 0.2], float("nan"))


@pytest.mark.parametrize("fpr_limit", [0.02, 0.3, 1.0])
def test_pixel_metrics_aupro_follows_its_integration_limit(fpr_limit):
    """pixel_metrics' AUPRO (the one-sort path) against the slow reference at each limit, so a limit
    dropped or fixed at 0.3 on the way to the curve or the area shows."""
    masks, maps = random_case(5, "ties")
    got = metrics.pixel_metrics(masks, maps, fpr_limit=fpr_limit)["pixel_aupro"]
    assert abs(got - reference_aupro(masks, maps, fpr_limit=fpr_limit)) < 1e-6
    assert abs(reference_aupro(masks, maps, fpr_limit=fpr_limit) - reference_aupro(masks, maps, fpr_limit=0.3)) > 1e-3 \
        or fpr_limit == 0.3


def test_operator_view_by_hand():
    from pipeline.evaluation.metrics import operator_view

    # lowest defect score 0.4: good 0.1 passes, 0.5 and 0.9 are flagged
    got = operator_view(np.array([0, 0, 0, 1, 1]), np.array([0.1, 0.5, 0.9, 0.4, 0.8]))
    assert got["good_passed_at_full_recall"] == pytest.approx(1 / 3)
    assert got["good_passed_at_1pct_miss"] == pytest.approx(1 / 3)  # 2 defects: k = 0, no miss allowed
    # 100 defects scoring 1..100: one may be missed, so the threshold is 2; goods 1.5 and 1.9 pass, 2.5 not
    labels = np.r_[np.zeros(3), np.ones(100)].astype(int)
    scores = np.r_[1.5, 1.9, 2.5, np.arange(1, 101)].astype(float)
    got = operator_view(labels, scores)
    assert got["good_passed_at_full_recall"] == 0.0 and got["good_passed_at_1pct_miss"] == pytest.approx(2 / 3)
    none = operator_view(np.ones(4, int), np.arange(4.0))
    assert none["good_passed_at_full_recall"] is None and "0 normal" in none["null_reasons"]["good_passed_at_1pct_miss"]
