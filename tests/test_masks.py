"""Pixel decisions: the pixel threshold chosen on the auxiliary set (pipeline/method/thresholds.PixelF1,
export), and predict's defect masks and regions (pipeline/cli/predict.regions_of)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score

from pipeline.cli import predict as P
from pipeline.method import detector
from pipeline.method.thresholds import PIXEL_LEVELS, PixelF1, ThresholdError
from tests.test_detector import export, setup  # noqa: F401  (setup is the module fixture)
from tests.test_predict import FakeDetector, solid


def slow_pixel_f1(maps, masks, top=1.0):
    """Every level present in the maps tried with scikit-learn's F1: the best, highest level on ties."""
    levels = np.clip(np.floor(np.asarray(maps, np.float64) / top * PIXEL_LEVELS), 0, PIXEL_LEVELS).ravel()
    truth = np.asarray(masks).ravel() > 0
    best = (-1.0, None)
    for b in np.unique(levels):
        f1 = f1_score(truth, levels >= b)
        if f1 >= best[0]:
            best = (f1, b)
    return best[0], best[1] * top / PIXEL_LEVELS


def test_pixel_f1_equals_trying_every_level():
    rng = np.random.default_rng(0)
    masks = rng.random((6, 9, 9)) < 0.15
    maps = np.clip(0.3 * masks + rng.random((6, 9, 9)) * 0.7, 0, 1).astype(np.float32)
    pixels = PixelF1()
    pixels.add(maps[:4], masks[:4])  # streamed in two batches
    pixels.add(maps[4:], masks[4:])
    f1, threshold = pixels.best()
    want_f1, want_threshold = slow_pixel_f1(maps, masks)
    assert f1 == pytest.approx(want_f1, abs=1e-12) and threshold == want_threshold


def test_pixel_f1_by_hand_and_its_refusals():
    pixels = PixelF1(top=2.0)
    # defect pixels 1.0 and 2.0, good 0.5: every level above 0.5's and up to 1.0's separates them (F1 1);
    # the highest is 1.0's, floor(1.0 / 2 * 65535) = 32767, i.e. the threshold 32767 * 2 / 65535
    pixels.add(np.array([[[1.0, 2.0, 0.5]]]), np.array([[[1, 1, 0]]]))
    assert pixels.best() == (1.0, 32767 * 2 / 65535)
    with pytest.raises(ThresholdError, match="both defect and good"):
        only_good = PixelF1()
        only_good.add(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)))
        only_good.best()
    with pytest.raises(ThresholdError, match="NaN"):
        PixelF1().add(np.full((1, 2, 2), np.nan), np.zeros((1, 2, 2)))


def test_regions_by_hand():
    full = np.zeros((6, 8), np.float32)
    full[1:3, 1:4] = 0.8  # a 2 x 3 block
    full[2, 2] = 0.95
    full[3, 4] = 0.7  # touches the block's corner: the same region through an 8-neighbour
    full[5, 7] = 0.9  # a lone pixel
    mask, regions = P.regions_of(full, 0.5)
    assert [r["area_px"] for r in regions] == [7, 1]
    first = regions[0]
    assert (first["x0"], first["y0"], first["x1"], first["y1"]) == (1, 1, 5, 4)
    assert first["peak"] == pytest.approx(0.95) and first["mean"] == pytest.approx((5 * 0.8 + 0.95 + 0.7) / 7)
    mask, regions = P.regions_of(full, 0.5, min_area=2)
    assert [r["region"] for r in regions] == [1] and not mask[5, 7] and mask.sum() == 7


def test_predict_writes_masks_and_regions_of_flagged_images(tmp_path):
    flagged = solid(tmp_path / "in" / "red.png", size=(40, 24), red=255)  # ramp 0 -> 1 left to right
    passed = solid(tmp_path / "in" / "dark.png", size=(40, 24), red=60)  # score 0.235 < 0.5
    det = FakeDetector(threshold=0.5)
    det.info["pixel_threshold"] = 0.6
    out = tmp_path / "out"
    summary = P.predict_files([flagged, passed], det, out, P.Options())
    assert summary["pixel_threshold"]["source"] == "detector" and summary["n_regions"] == 1
    with open(out / "scores.csv", newline="") as f:
        table = {row["path"]: row for row in csv.DictReader(f)}
    assert table[str(passed)]["mask"] == "" and not (out / "masks" / "dark.png.png").exists()
    mask = np.asarray(Image.open(out / table[str(flagged)]["mask"])) > 0
    values = np.asarray(Image.open(out / table[str(flagged)]["map"]), np.float64) / P.MAP_SCALE
    assert mask.shape == (24, 40)
    clear = np.abs(values - 0.6) > 2 / P.MAP_SCALE  # away from the threshold the PNG's rounding cannot matter
    assert np.array_equal(mask[clear], values[clear] >= 0.6)
    with open(out / "regions.csv", newline="") as f:
        (region,) = list(csv.DictReader(f))
    x0 = int(np.argmax(mask[0]))  # the ramp: one band from x0 to the right edge, every row
    assert (int(region["x0"]), int(region["y0"]), int(region["x1"]), int(region["y1"])) == (x0, 0, 40, 24)
    assert int(region["area_px"]) == mask.sum() == 24 * (40 - x0)
    assert float(region["peak"]) == pytest.approx(values.max(), abs=1e-4)


def test_predict_refuses_bad_pixel_options(tmp_path):
    for bad in ({"pixel_threshold": float("nan")}, {"min_region_area": 0}):
        with pytest.raises(P.PredictError, match="pixel-threshold|min-region-area"):
            P.Options(**bad)


def test_export_pixel_threshold_is_the_f1_max_of_the_detectors_own_aux_maps(setup):  # noqa: F811
    from pipeline.features import store

    tmp, weights, _, _ = setup
    folder = export(tmp, weights, "max")
    info = json.loads((folder / "detector.json").read_text())
    det = detector.Detector.load(folder, with_backbone=False)
    aux = store.open_store(tmp / "aux")
    maps, _ = det.maps_from_tokens(aux.tokens[:].astype(np.float32), aux.cls[:].astype(np.float32))
    f1, threshold = slow_pixel_f1(maps, aux.masks[:])
    assert info["pixel_threshold"] == threshold and info["threshold_aux"]["pixel_f1"] == pytest.approx(f1)
    assert info["pixel_threshold_rule"] == "aux_pixel_f1_max"
