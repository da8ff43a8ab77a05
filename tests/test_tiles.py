"""predict --tile: a small defect in a large image, which the resized path misses and the tiled path
finds, with a fake detector whose map is the image's redness (so what each path sees is known)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
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


# --- the evaluate stage's dataset option tile: both paths measured on the same masks -------------------

def _write_line(root, n_good=3, n_bad=3):
    """An mvtec-layout category of 320 x 256 images: good ones carry a broad faint red haze (40 of 255
    over 48 x 48 px), anomalous ones a 4 x 4 full-red spot and its mask. Resized to the fake detector's
    16 x 16 cells the haze outweighs the spot (0.157 against 0.05), so the resized path ranks every
    anomalous image below every good one; in 32 px tiles the spot fills whole cells (1.0)."""
    from pipeline.data.tables import load_table

    for i in range(n_good):
        rgb = np.zeros((256, 320, 3), np.uint8)
        rgb[40 + 30 * i:88 + 30 * i, 60:108, 0] = 40
        (root / "plate/test/good").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(root / f"plate/test/good/{i:03d}.png")
    for i in range(n_bad):
        rgb = np.zeros((256, 320, 3), np.uint8)
        mask = np.zeros((256, 320), np.uint8)
        y, x = 50 + 60 * i, 100 + 50 * i
        rgb[y:y + 4, x:x + 4, 0] = 255
        mask[y:y + 4, x:x + 4] = 255
        (root / "plate/test/spot").mkdir(parents=True, exist_ok=True)
        (root / "plate/ground_truth/spot").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(root / f"plate/test/spot/{i:03d}.png")
        Image.fromarray(mask).save(root / f"plate/ground_truth/spot/{i:03d}_mask.png")
    return load_table("mvtec", root)


def test_tiled_metrics_find_what_the_resized_path_misses_and_equal_the_in_memory_metrics(tmp_path):
    from pipeline.evaluation import metrics, tiled

    samples = _write_line(tmp_path / "line")
    det = RednessDetector()
    block = tiled.tiled_metrics(det, samples, 32, grid=64, scratch=tmp_path, max_pixels=10**8)
    assert block["resized"]["image_auroc"] == 0.0 and block["tiled"]["image_auroc"] == 1.0
    assert block["tiled"]["pixel_aupro"] > block["resized"]["pixel_aupro"]
    assert block["n_images"] == 6 and block["n_tiled"] == 6
    assert block["tiles_per_tiled_image"] == len(P.tile_origins(320, 32)) * len(P.tile_origins(256, 32)) == 19 * 15
    # the streamed per-image adds equal metrics.compute_all on the whole category's arrays, made here
    # with PIL directly: the map's bilinear resize and "any defect pixel under the cell"
    for path in tiled.PATHS:
        maps, scores, masks = _grid_reference(det, samples, path)
        want = metrics.compute_all(np.array([s.label for s in samples]), scores, masks, maps.astype(np.float32))
        got = block["per_category"]["plate"][path]
        for key in metrics.METRIC_KEYS:
            assert got[key] == pytest.approx(want[key], abs=1e-9), (path, key)


def test_tiled_metrics_refuse_a_global_score_and_images_that_are_not_the_stores(tmp_path):
    from dataclasses import replace

    from pipeline.evaluation import tiled

    samples = _write_line(tmp_path / "line", 1, 1)
    det = RednessDetector()
    det.settings = replace(det.settings, image_score="global")
    with pytest.raises(tiled.TiledError, match="global"):
        tiled.tiled_metrics(det, samples, 32, grid=64, scratch=tmp_path, max_pixels=10**8)
    with pytest.raises(ValueError, match="tile"):
        tiled.tiled_metrics(RednessDetector(), samples, 1, grid=64, scratch=tmp_path, max_pixels=10**8)
    tiled.check_samples(samples, [s.relpath for s in samples], "store")
    with pytest.raises(tiled.TiledError, match="first difference at image 1"):
        tiled.check_samples(samples, [samples[0].relpath, "plate/test/good/999.png"], "store")


def _grid_reference(det, samples, path, grid=64):
    """Each image's map of one guide path at the grid, its image score and its grid mask, made with PIL
    directly: the map's bilinear resize and "any defect pixel under the cell" (320 x 256 images)."""
    from pipeline.data.images import load_image, load_mask
    from pipeline.method import tiles

    masks, maps, scores = [], [], []
    for s in samples:
        image = load_image(s.image)
        if path == "resized":
            m, sc = det.predict([image])
            m, sc = m[0], sc[0]
        else:
            m, _ = tiles.tiled_map(lambda crops: det.predict(crops)[0], image, 32)
            sc = m.max()
        maps.append(np.asarray(Image.fromarray(m.astype(np.float32)).resize((grid, grid), Image.Resampling.BILINEAR)))
        mask = load_mask(s.mask, image.size)
        masks.append(mask.reshape(grid, 256 // grid, grid, 320 // grid).max(axis=(1, 3)))
        scores.append(sc)
    return np.stack(maps).astype(np.float64), np.array(scores), np.stack(masks)


def test_the_batch_paths_equal_the_fusion_rule_on_the_whole_categorys_grid_maps(tmp_path):
    """The streamed batch paths against the rule written out on the whole category at once: the batch
    map upsampled (align_corners False, no blur here) then resized to the grid; each signal (the guide
    as its logit) standardised over all the category's grid pixels; their mean; the fused image score
    the max of the standardised batch patch scores' map."""
    import torch.nn.functional as F

    from pipeline.evaluation import metrics, tiled

    samples = _write_line(tmp_path / "line")
    det = RednessDetector()
    mutual = np.random.default_rng(0).random((6, 64)).astype(np.float32)  # 8 x 8 patches an image
    block = tiled.tiled_metrics(det, samples, 32, grid=64, scratch=tmp_path, max_pixels=10**8,
                                batch=tiled.Batch(scores={"plate": mutual}, grid=(8, 8), size=32))
    assert list(tmp_path.glob("tiled-*")) == []  # the kept maps went with their category

    def up(values):
        t = torch.from_numpy(values.astype(np.float32)).reshape(-1, 1, 8, 8)
        return F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False)[:, 0].numpy()

    def z(x):
        return (x - x.mean()) / x.std()

    b = np.stack([np.asarray(Image.fromarray(m).resize((64, 64), Image.Resampling.BILINEAR)) for m in up(mutual)])
    labels = np.array([s.label for s in samples])
    decided = up(((mutual.astype(np.float64) - mutual.mean(dtype=np.float64)) / mutual.std(dtype=np.float64)))
    for path in tiled.PATHS:
        g, _, masks = _grid_reference(det, samples, path)
        p = np.clip(g, 1e-6, 1 - 1e-6)
        fused = (z(np.log(p) - np.log1p(-p)) + z(b.astype(np.float64))) / 2
        want = metrics.compute_all(labels, decided.max(axis=(1, 2)), masks, fused.astype(np.float32))
        got = block["per_category"]["plate"][f"{path}+batch"]
        for key in metrics.METRIC_KEYS:
            assert got[key] == pytest.approx(want[key], abs=1e-6), (path, key)
    want = metrics.compute_all(labels, up(mutual).max(axis=(1, 2)), masks, b)
    for key in metrics.METRIC_KEYS:
        assert block["per_category"]["plate"]["batch"][key] == pytest.approx(want[key], abs=1e-9), key
        assert block["batch"][key] == block["per_category"]["plate"]["batch"][key]


def test_a_batch_that_knows_the_defect_lifts_the_fused_paths_and_a_lone_image_has_none(tmp_path):
    from pipeline.evaluation import tiled
    from pipeline.evaluation.metrics import METRIC_KEYS
    from pipeline.method import neighbours

    samples = _write_line(tmp_path / "line")
    solo = tmp_path / "line/solo/test/good"
    solo.mkdir(parents=True)
    Image.fromarray(np.zeros((256, 320, 3), np.uint8)).save(solo / "000.png")
    from pipeline.data.tables import load_table
    samples = load_table("mvtec", tmp_path / "line")
    plate = [s for s in samples if s.category == "plate"]
    # the batch signal: 1 on the 8 x 8 patches under each anomalous image's spot, 0 elsewhere
    mutual = np.zeros((len(plate), 64), np.float32)
    for i, s in enumerate(plate):
        if s.label:
            mask = np.asarray(Image.open(s.mask)) > 0
            mutual[i] = mask.reshape(8, 32, 8, 40).any(axis=(1, 3)).reshape(-1)
    block = tiled.tiled_metrics(RednessDetector(), samples, 32, grid=64, scratch=tmp_path, max_pixels=10**8,
                                batch=tiled.Batch(scores={"plate": mutual, "solo": None}, grid=(8, 8), size=32))
    got = block["per_category"]["plate"]
    assert got["batch"]["image_auroc"] == 1.0 and got["resized+batch"]["image_auroc"] == 1.0
    assert got["resized+batch"]["pixel_aupro"] > got["resized"]["pixel_aupro"] + 0.05
    assert got["tiled"]["pixel_auroc"] == 1.0 and got["tiled+batch"]["pixel_auroc"] > 0.999  # coarse, not wrong
    lone = block["per_category"]["solo"]
    for path in tiled.BATCH_PATHS:
        assert all(lone[path][k] is None for k in METRIC_KEYS)
        assert lone[path]["null_reasons"]["pixel_auroc"] == neighbours.ONE_IMAGE
        assert block[path]["image_auroc"] == got[path]["image_auroc"]  # the mean over the defined category
    with pytest.raises(tiled.TiledError, match="categories"):
        tiled.tiled_metrics(RednessDetector(), samples, 32, grid=64, scratch=tmp_path, max_pixels=10**8,
                            batch=tiled.Batch(scores={"plate": mutual}, grid=(8, 8), size=32))
    with pytest.raises(tiled.TiledError, match="5 rows of batch scores for 6 images"):
        tiled.tiled_metrics(RednessDetector(), samples, 32, grid=64, scratch=tmp_path, max_pixels=10**8,
                            batch=tiled.Batch(scores={"plate": mutual[:5], "solo": None}, grid=(8, 8), size=32))


@pytest.mark.parametrize("where", ["whole", "tile"])
def test_tiled_metrics_refuse_a_map_that_is_not_finite(tmp_path, where):
    from pipeline.errors import NonFiniteError
    from pipeline.evaluation import tiled

    samples = _write_line(tmp_path / "line", 1, 1)

    class Broken(RednessDetector):
        def predict(self, images):
            maps, scores = super().predict(images)
            # a whole image is 320 x 256, a tile 32 x 32: break one path only
            if (where == "whole") == (images[0].size == (320, 256)):
                maps[0, 3, 3] = np.nan
            return maps, scores

    with pytest.raises(NonFiniteError, match=f"{'resized' if where == 'whole' else 'tiled'} map"):
        tiled.tiled_metrics(Broken(), samples, 32, grid=64, scratch=tmp_path, max_pixels=10**8)


@pytest.mark.parametrize("bad", [True, 1, 2.5, "448"])
def test_a_dataset_tile_that_is_not_an_integer_of_two_pixels_is_refused(bad):
    from pipeline.config import ConfigError, DatasetConfig

    assert DatasetConfig(format="mvtec", root="x", tile=448).tile == 448
    with pytest.raises(ConfigError, match="tile"):
        DatasetConfig(format="mvtec", root="x", tile=bad)


def test_the_evaluate_stage_measures_a_target_with_the_option_and_refuses_another_root(tmp_path, monkeypatch):
    """The stage's glue: the target's files listed from its params entry, checked against the store's
    paths, scored by the detector it loads with the weights given (here the fake one)."""
    from types import SimpleNamespace

    from pipeline.config import load_params
    from pipeline.evaluation import tiled
    from pipeline.method import detector
    from pipeline.stages import evaluate as stage

    samples = _write_line(tmp_path / "line", 2, 2)
    (tmp_path / "params.yaml").write_text(
        f"datasets:\n  line: {{format: mvtec, root: {tmp_path / 'line'}, tile: 32}}\n  other: {{format: mvtec, root: x}}\n"
        "evaluate: {tiled_grid: 64}\n")
    params = load_params(tmp_path / "params.yaml", ["datasets", "evaluate", "data"])
    target = SimpleNamespace(path=tmp_path / "features/line", attrs={
        "dataset": "line", "format": "mvtec", "root": str(tmp_path / "line"), "splits": ["test"],
        "paths": [s.relpath for s in samples]})
    loaded = []
    monkeypatch.setattr(detector.Detector, "load",
                        classmethod(lambda cls, folder, **kw: loaded.append((folder, kw["weights"])) or RednessDetector()))
    args = SimpleNamespace(detector=tmp_path / "det", weights=tmp_path / "w.safetensors", out=tmp_path / "report")
    assert stage.tiled_option(params, target, tmp_path / "params.yaml") == 32
    block = stage.score_tiled(params, target, args, 32, "cpu")
    assert loaded == [(tmp_path / "det", tmp_path / "w.safetensors")]
    assert block["tiled"]["image_auroc"] == 1.0 and block["resized"]["image_auroc"] == 0.0 and block["grid"] == 64
    assert [p.name for p in args.out.iterdir()] == []  # the run files went with their scratch folder
    assert "batch" not in block  # no batch signal given: the guide paths only

    # the batch signal comes from the neighbours stage's arrays where the run has them, a category's rows
    from pipeline.evaluation import target_scores
    rows = np.random.default_rng(1).random((len(samples) + 1, 64)).astype(np.float32)
    rows[-1] = np.nan  # a category of one image has no mutual scores
    target.masks, target.attrs["grid"] = np.zeros((len(samples) + 1, 32, 32), np.uint8), [8, 8]
    batch = stage.tiled_batch(target, {"plate": (0, len(samples)), "solo": (len(samples), len(samples) + 1)},
                              {target_scores.MUTUAL: rows}, "cpu")
    assert batch.grid == (8, 8) and batch.size == 32 and batch.scores["solo"] is None
    np.testing.assert_array_equal(batch.scores["plate"], rows[:len(samples)])
    block = stage.score_tiled(params, target, args, 32, "cpu", batch=tiled.Batch({"plate": batch.scores["plate"]},
                                                                                 batch.grid, batch.size))
    assert block["batch"]["pixel_auroc"] is not None and block["tiled+batch"]["image_auroc"] is not None

    other = SimpleNamespace(path=target.path, attrs={**target.attrs, "dataset": "other"})
    assert stage.tiled_option(params, other, tmp_path / "params.yaml") is None  # no tile: not measured
    moved = SimpleNamespace(path=target.path, attrs={**target.attrs, "root": str(tmp_path / "elsewhere")})
    with pytest.raises(tiled.TiledError, match="re-run the extract stage"):
        stage.tiled_option(params, moved, tmp_path / "params.yaml")
    fewer = SimpleNamespace(path=target.path, attrs={**target.attrs, "paths": target.attrs["paths"][:-1]})
    with pytest.raises(tiled.TiledError, match="not the feature store's"):
        stage.score_tiled(params, fewer, args, 32, "cpu")
