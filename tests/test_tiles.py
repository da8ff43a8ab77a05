"""predict --tile: a small defect in a large image, which the resized path misses and the tiled path
finds, with a fake detector whose map is the image's redness (so what each path sees is known)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import predict as P
from pipeline.method import scoring

S = 16


class RednessDetector:
    """map = mean red / 255 over each of the S x S cells of the (resized) image; score = the map's max."""

    threshold = 0.5
    image_size = S
    seeds = [0]
    info = {"format": "spg-detector/1", "backbone": "fake", "threshold": 0.5, "threshold_rule": "fake"}
    settings = scoring.ScoreSettings(temperature=0.07, blur_sigma=0.0, image_score="max", lse_temperature=0.05,
                                     top_fraction=0.05)

    def predict(self, images):
        maps = []
        for im in images:
            red = np.asarray(im.resize((S * 4, S * 4), Image.Resampling.BOX), np.float64)[..., 0] / 255
            maps.append(red.reshape(S, 4, S, 4).mean(axis=(1, 3)).astype(np.float32))
        maps = np.stack(maps)
        return maps, maps.max(axis=(1, 2)).astype(np.float64)


def test_tile_origins_cover_the_image():
    assert P.tile_origins(10, 16) == [0]
    assert P.tile_origins(40, 16) == [0, 8, 16, 24]
    assert P.tile_origins(41, 16) == [0, 8, 16, 24, 25]


def test_stitching_a_constant_gives_the_constant():
    maps = [np.full((S, S), 0.3, np.float32)] * 4
    got = P.stitch_tiles((24, 24), 16, [(0, 0), (8, 0), (0, 8), (8, 8)], maps, 1.0)
    assert got.shape == (24, 24) and np.allclose(got, 0.3)


def test_a_small_defect_in_a_large_image_is_missed_resized_and_found_tiled(tmp_path):
    rgb = np.zeros((256, 320, 3), np.uint8)
    rgb[100:104, 200:204, 0] = 255  # a 4 x 4 red defect in a 320 x 256 image
    path = tmp_path / "in" / "big.png"
    path.parent.mkdir()
    Image.fromarray(rgb).save(path)
    det = RednessDetector()
    resized = P.predict_files([path], det, tmp_path / "resized", P.Options())
    tiled = P.predict_files([path], det, tmp_path / "tiled", P.Options(tile=16))
    assert resized["n_anomalous"] == 0 and tiled["n_anomalous"] == 1
    with open(tmp_path / "tiled" / "scores.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["score"]) == pytest.approx(1.0)  # at native resolution the defect fills its cells
    values = np.asarray(Image.open(tmp_path / "tiled" / row["map"]), np.float64) / P.MAP_SCALE
    assert values.shape == (256, 320)
    y, x = np.unravel_index(np.argmax(values), values.shape)
    assert 100 <= y < 104 and 200 <= x < 204
    assert values[:90].max() < 0.05  # nothing far from it lights up
    assert tiled["tile"]["size"] == 16


def test_tile_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(P.PredictError, match="--tile"):
        P.Options(tile=1)
    with pytest.raises(P.PredictError, match="--batch"):
        P.Options(tile=16, batch=True)
    with pytest.raises(P.PredictError, match="--explain"):
        P.Options(tile=16, explain=True)
