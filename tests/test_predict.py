"""pipeline.cli.predict against a small fake detector that keeps the Detector contract.

The fake's map of an image is a horizontal ramp scaled by the image's mean red: map[y, x] = r * x / (S - 1)
with r = mean(R) / 255 of the decoded RGB image, and its score is the map's maximum, r. So a uniform
image with red value v scores exactly v / 255, and the map's values are known by hand everywhere.
The real Detector is exercised in tests/test_predict_real.py.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import predict as P
from pipeline.errors import NonFiniteError

S = 16


class FakeDetector:
    """The contract's ``predict``/``threshold``/``info``/``image_size``, with hand-known outputs."""

    def __init__(self, threshold: float | None = 0.5, size: int = S, nan_for_red: int | None = None):
        self.threshold = threshold
        self.image_size = size
        self.seeds = [0]
        self.info = {"format": "spg-detector/1", "backbone": "fake", "threshold": threshold,
                     "threshold_rule": "fake rule", "image_size": size}
        self.batches: list[int] = []
        self.nan_for_red = nan_for_red

    def predict(self, images):
        self.batches.append(len(images))
        ramp = np.arange(self.image_size, dtype=np.float64) / (self.image_size - 1)
        maps, scores = [], []
        for im in images:
            assert im.mode == "RGB"  # the project's own conversion ran before the detector
            red = np.asarray(im)[..., 0]
            r = float(red.mean()) / 255
            if self.nan_for_red is not None and int(red[0, 0]) == self.nan_for_red:
                r = math.nan
            maps.append(np.tile(ramp * r, (self.image_size, 1)).astype(np.float32))
            scores.append(r)
        return np.stack(maps), np.asarray(scores, dtype=np.float64)


def solid(path: Path, size=(20, 12), red=255, mode="RGB", fmt=None) -> Path:
    """A uniform image of ``size`` (W, H) whose decoded red value is ``red``."""
    w, h = size
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = red
    Image.fromarray(rgb).convert(mode).save(path, format=fmt)
    return path


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------
# Outputs


def test_outputs_have_original_size_and_map_values_round_trip(tmp_path):
    a = solid(tmp_path / "in" / "wide.png", size=(40, 24))
    b = solid(tmp_path / "in" / "tall.jpg", size=(23, 30), fmt="PNG")  # content PNG, name .jpg: PIL reads it
    out = tmp_path / "out"
    summary = P.predict_files([tmp_path / "in"], FakeDetector(threshold=0.5), out)

    table = rows(out / "scores.csv")
    assert [r["path"] for r in table] == [str(b), str(a)]  # sorted walk: tall.jpg, wide.png
    assert list(table[0]) == list(P.SCORE_COLUMNS)
    for r, (w, h) in zip(table, [(23, 30), (40, 24)]):
        assert float(r["score"]) == 1.0 and r["decision"] == "anomalous" and float(r["seconds"]) > 0
        m = Image.open(out / r["map"])
        assert m.mode == "I;16" and m.size == (w, h)
        values = np.asarray(m).astype(np.float64) / P.MAP_SCALE
        # by hand: upscaling, output pixel j samples the S-wide ramp at (j + 0.5) * S / w - 0.5, clamped
        j = np.arange(w)
        expected = np.clip((j + 0.5) * S / w - 0.5, 0, S - 1) / (S - 1)
        for y in (0, h // 2, h - 1):
            np.testing.assert_allclose(values[y], expected, atol=1 / P.MAP_SCALE)
        o = Image.open(out / r["overlay"])
        assert o.mode == "RGB" and o.size == (w, h)
    assert {r["map"] for r in table} == {"maps/tall.jpg.png", "maps/wide.png.png"}
    written = json.loads((out / "summary.json").read_text())
    assert written == summary
    assert summary["n_scored"] == 2 and summary["n_anomalous"] == 2 and summary["n_skipped"] == 0
    assert summary["detector"]["backbone"] == "fake" and "65535" in summary["maps"]["value"]
    assert summary["threshold"] == {"value": 0.5, "source": "detector", "rule": "fake rule"}
    assert rows(out / "skipped.csv") == [] and (out / "skipped.csv").read_text().strip() == "path,input,reason"


def test_overlays_are_written_for_flagged_images_unless_all_are_asked_for(tmp_path):
    """By default only the images decided anomalous get an overlay (the costliest write); every image
    keeps its map, and scores.csv leaves ``overlay`` empty for the others. ``overlays="all"`` writes one
    for each."""
    bad = solid(tmp_path / "in" / "bad.png", red=255)    # score 1.0 >= 0.5: anomalous
    good = solid(tmp_path / "in" / "good.png", red=51)   # score 0.2: normal
    out = tmp_path / "out"
    summary = P.predict_files([tmp_path / "in"], FakeDetector(threshold=0.5), out)
    table = {r["path"]: r for r in rows(out / "scores.csv")}
    assert table[str(bad)]["decision"] == "anomalous" and table[str(good)]["decision"] == "normal"
    assert table[str(bad)]["overlay"] == "overlays/bad.png.jpg" and (out / "overlays" / "bad.png.jpg").is_file()
    assert table[str(good)]["overlay"] == "" and not (out / "overlays" / "good.png.jpg").exists()
    assert all((out / r["map"]).is_file() for r in table.values())
    assert summary["overlays"]["written_for"] == "flagged"
    page = (out / "report.html").read_text()
    assert "row.overlay || row.map" in page  # the page shows the map where no overlay was written

    out_all = tmp_path / "out_all"
    P.predict_files([tmp_path / "in"], FakeDetector(threshold=0.5), out_all, overlays="all")
    assert sorted(p.name for p in (out_all / "overlays").iterdir()) == ["bad.png.jpg", "good.png.jpg"]
    assert all(r["overlay"] for r in rows(out_all / "scores.csv"))
    with pytest.raises(P.PredictError, match="--overlays must be one of flagged, all"):
        P.Options(overlays="some")


def test_overlays_are_jpeg_by_default_and_png_exactly_when_asked(tmp_path):
    """The default overlay is a JPEG within a few levels of the exact overlay (what the PNG holds, pixel
    for pixel); maps stay 16-bit PNGs either way, with the map's exact values."""
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    yy, xx = np.mgrid[0:48, 0:64]  # smooth, as photos are (JPEG's loss on pixel noise is larger)
    Image.fromarray(np.stack([60 + 2 * xx, 80 + 2 * yy, 150 + 0 * xx], -1).astype(np.uint8)).save(image)
    det = FakeDetector(threshold=0.5)
    ramp = np.linspace(0.0, 1.0, S, dtype=np.float32)
    det.predict = lambda images: (np.tile(ramp, (len(images), S, 1)), np.full(len(images), 1.0))
    jpeg = P.predict_files([image], det, tmp_path / "jpeg")
    png = P.predict_files([image], det, tmp_path / "png", overlay_format="png")
    assert jpeg["overlays"]["format"] == f"JPEG, quality {P.JPEG_QUALITY}" and png["overlays"]["format"] == "PNG"
    with Image.open(tmp_path / "jpeg" / "overlays" / "a.png.jpg") as f:
        assert f.format == "JPEG"
        lossy = np.asarray(f.convert("RGB"), np.float64)
    with Image.open(tmp_path / "png" / "overlays" / "a.png.png") as f:
        assert f.format == "PNG"
        exact = np.asarray(f.convert("RGB"), np.float64)
    expected = np.asarray(P.overlay(Image.open(image), P.map_at_size(np.tile(ramp, (S, 1)), (64, 48)), 0.5),
                          np.float64)
    assert (exact == expected).all()
    assert lossy.shape == exact.shape and 0 < np.abs(lossy - exact).mean() < 6
    for out in ("jpeg", "png"):
        with Image.open(tmp_path / out / "maps" / "a.png.png") as f:
            assert f.format == "PNG" and np.asarray(f).dtype == np.uint16
            np.testing.assert_array_equal(np.asarray(f), np.rint(P.map_at_size(np.tile(ramp, (S, 1)), (64, 48))
                                                                 * P.MAP_SCALE).astype(np.uint16))
    with pytest.raises(P.PredictError, match="--overlay-format must be one of jpeg, png"):
        P.Options(overlay_format="gif")


def test_fused_detector_maps_keep_values_above_one(tmp_path):
    """A detector exported with ``fusion: self_dissimilarity`` has map_range [0, 2]: its maps and image
    scores go above 1. The map PNG stores value / 2, the overlay's colours span 0 to 2, and its outline is
    drawn at the detector's threshold in map units (before: maps clipped at 1, so a threshold of 1.5
    outlined nothing and every value above 1 was lost)."""
    image = solid(tmp_path / "in" / "a.png", size=(S, S), red=255)
    det = FakeDetector(threshold=1.5)
    det.info["map_range"] = [0.0, 2.0]
    ramp = 2 * np.arange(S, dtype=np.float32) / (S - 1)  # 0 .. 2 along x
    det.predict = lambda images: (np.tile(ramp, (len(images), S, 1)), np.full(len(images), 2.0))
    summary = P.predict_files([image], det, tmp_path / "out", overlay_format="png")
    values = np.asarray(Image.open(tmp_path / "out" / "maps" / "a.png.png")).astype(np.float64) * 2 / P.MAP_SCALE
    np.testing.assert_allclose(values, np.tile(ramp, (S, 1)), atol=2 / P.MAP_SCALE)
    over = np.asarray(Image.open(tmp_path / "out" / "overlays" / "a.png.png"))
    assert (over == 255).all(axis=-1).any()  # the outline of the region map >= 1.5
    assert summary["maps"]["range"] == [0, 2.0] and "x 2" in summary["maps"]["value"]
    # a plain detector (no map_range, or [0, 1]) is written as before: probability = pixel / 65535
    assert P.map_top(FakeDetector()) == 1.0


def test_shrunk_map_keeps_a_constant_value(tmp_path):
    # downscaling (S=16 -> 10 x 7) averages neighbours: a constant map stays that constant exactly
    image = solid(tmp_path / "small.png", size=(10, 7), red=51)
    det = FakeDetector(size=S)
    det.predict = lambda images: (np.full((len(images), S, S), 0.2, np.float32), np.full(len(images), 0.2))
    P.predict_files([image], det, tmp_path / "out")
    m = np.asarray(Image.open(tmp_path / "out" / "maps" / "small.png.png"))
    assert m.shape == (7, 10) and m.dtype == np.uint16
    assert (m == round(0.2 * 65535)).all()


def test_overlay_outlines_the_thresholded_region():
    image = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
    full = np.zeros((30, 40), np.float32)
    full[10:20, 5:25] = 0.9  # the region at threshold 0.5
    out = np.asarray(P.overlay(image, full, 0.5))
    white = (out == 255).all(axis=-1)
    # 1-pixel outline (longer side 40 < 450): the region's border pixels, nothing inside or outside it
    expected = np.zeros_like(white)
    expected[10:20, 5:25] = True
    expected[11:19, 6:24] = False
    np.testing.assert_array_equal(white, expected)
    # elsewhere: half image (black), half jet colour of the value (PIL's blend: within one level)
    jet0 = P._jet_lut()[0]
    np.testing.assert_allclose(out[0, 0], 0.5 * jet0.astype(np.float64), atol=1)


def slow_overlay(image: Image.Image, full: np.ndarray, threshold: float, top: float = 1.0) -> np.ndarray:
    """The overlay's rule in float numpy over the whole image: the reference for :func:`P.overlay`."""
    from scipy.ndimage import minimum_filter

    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    colour = P._jet_lut()[np.rint(np.clip(full, 0, top) * (255 / top)).astype(np.uint8)].astype(np.float64)
    out = (1 - P.OVERLAY_ALPHA) * rgb + P.OVERLAY_ALPHA * colour
    region = full >= threshold
    width = max(1, round(max(region.shape) / 300))
    inner = minimum_filter(region.astype(np.uint8), size=2 * width + 1, mode="nearest").astype(bool)
    out[region & ~inner] = 255
    return out


@pytest.mark.parametrize("threshold", [0.05, 0.5, 0.95, 2.0])
def test_overlay_equals_the_float_reference_on_a_photo_sized_image(threshold):
    """Random photo-like image and smooth map (regions touching the image's edges, several blobs, none at
    2.0): the outline is exactly the reference's, every other pixel within one level."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (600, 901, 3), dtype=np.uint8))  # longer side 901: width 3
    smooth = gaussian_filter(rng.random((600, 901)), 25)
    full = ((smooth - smooth.min()) / (smooth.max() - smooth.min())).astype(np.float32)
    got = np.asarray(P.overlay(image, full, threshold)).astype(np.float64)
    want = slow_overlay(image, full, threshold)
    white = (want == 255).all(axis=-1) & (full >= threshold)
    np.testing.assert_array_equal((got == 255).all(axis=-1) & (full >= threshold), white)
    assert np.abs(got - want).max() <= 1


def test_decisions_at_the_threshold_and_the_override(tmp_path):
    # red 128 scores exactly 128/255 = the threshold: score >= threshold is anomalous
    for red in (127, 128, 200):
        solid(tmp_path / "in" / f"r{red}.png", red=red)
    summary = P.predict_files([tmp_path / "in"], FakeDetector(threshold=0.9), tmp_path / "out", threshold=128 / 255)
    got = {Path(r["path"]).name: (float(r["score"]), r["decision"]) for r in rows(tmp_path / "out" / "scores.csv")}
    assert got == {"r127.png": (127 / 255, "normal"), "r128.png": (128 / 255, "anomalous"),
                   "r200.png": (200 / 255, "anomalous")}
    assert summary["threshold"]["source"] == "override" and summary["threshold"]["value"] == 128 / 255
    assert summary["threshold"]["detector_threshold"] == 0.9
    assert (summary["n_anomalous"], summary["n_normal"]) == (2, 1)
    # the detector's own threshold, 0.9, flags none of them
    summary = P.predict_files([tmp_path / "in"], FakeDetector(threshold=0.9), tmp_path / "out2")
    assert (summary["n_anomalous"], summary["n_normal"]) == (0, 3)


def test_threshold_errors(tmp_path):
    image = solid(tmp_path / "a.png")
    with pytest.raises(P.PredictError, match="no threshold"):
        P.predict_files([image], FakeDetector(threshold=None), tmp_path / "out")
    with pytest.raises(P.PredictError, match="not both"):
        P.predict_files([image], FakeDetector(), tmp_path / "out", threshold=0.5, normals=[tmp_path])
    with pytest.raises(P.PredictError, match="finite"):
        P.predict_files([image], FakeDetector(), tmp_path / "out", threshold=math.nan)


def test_batches_stream_and_a_non_finite_score_names_the_image(tmp_path):
    for i in range(7):
        solid(tmp_path / "in" / f"{i}.png", red=10 * i)
    det = FakeDetector()
    P.predict_files([tmp_path / "in"], det, tmp_path / "out", batch_size=3)
    assert det.batches == [3, 3, 1]
    with pytest.raises(NonFiniteError, match="4.png"):
        P.predict_files([tmp_path / "in"], FakeDetector(nan_for_red=40), tmp_path / "out2", batch_size=3)


# ---------------------------------------------------------------------------------------------------
# Bad files and modes


def test_bad_files_are_skipped_with_a_reason_and_the_batch_goes_on(tmp_path):
    folder = tmp_path / "in"
    solid(folder / "a_good.png", size=(10, 10))
    noise = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)  # 144 pixels
    Image.fromarray(noise).save(tmp_path / "whole.png")
    full = (tmp_path / "whole.png").read_bytes()
    (folder / "b_truncated.png").write_bytes(full[: len(full) // 2])
    (folder / "c_text.png").write_text("this is not an image\n")
    solid(folder / "d_bomb.png", size=(30, 20))  # 600 pixels, over max_pixels=200
    Image.fromarray(np.ones((8, 8), np.float32)).save(folder / "e_float.tif")  # mode F: refused
    solid(folder / "f_good.png", size=(12, 9), red=30)
    summary = P.predict_files([folder], FakeDetector(), tmp_path / "out", batch_size=2, max_pixels=200)
    scored = [Path(r["path"]).name for r in rows(tmp_path / "out" / "scores.csv")]
    assert scored == ["a_good.png", "f_good.png"]
    skipped = {Path(r["path"]).name: r for r in rows(tmp_path / "out" / "skipped.csv")}
    assert set(skipped) == {"b_truncated.png", "c_text.png", "d_bomb.png", "e_float.tif"}
    assert all(r["input"] == "images" for r in skipped.values())
    assert "cannot decode" in skipped["b_truncated.png"]["reason"]
    assert "cannot decode" in skipped["c_text.png"]["reason"]
    assert "600 pixels, over the limit --max-pixels = 200; pass a larger --max-pixels" in skipped["d_bomb.png"]["reason"]
    assert "params.yaml" not in skipped["d_bomb.png"]["reason"]  # predict has no params file to edit
    assert "'F'" in skipped["e_float.tif"]["reason"]
    assert (summary["n_inputs"], summary["n_scored"], summary["n_skipped"]) == (6, 2, 4)


def test_an_animated_gif_is_scored_on_its_first_frame_and_said_so(tmp_path, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    frames = [Image.fromarray(np.full((12, 20, 3), (red, 0, 0), np.uint8)) for red in (204, 51, 102)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    solid(folder / "still.png", red=51)
    with caplog.at_level("WARNING"):
        # named explicitly: .gif is not an extension a folder is searched for, a named file is always tried
        summary = P.predict_files([folder / "anim.gif", folder / "still.png"], FakeDetector(), tmp_path / "out",
                                  batch_size=2)
    scores = {Path(r["path"]).name: float(r["score"]) for r in rows(tmp_path / "out" / "scores.csv")}
    assert scores["anim.gif"] == pytest.approx(204 / 255, abs=2 / 255)  # the first frame, not 51 or 102
    assert summary["first_frame_only"]["files"] == {str(folder / "anim.gif"): 3}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["first_frame_only"]["files"] == \
        {str(folder / "anim.gif"): 3}
    assert any("anim.gif holds 3 frames: only the first is scored" in r.getMessage() for r in caplog.records)
    assert not any("still.png" in r.getMessage() for r in caplog.records)


def test_modes_are_converted_by_the_project_rules(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.full((9, 11), 128, np.uint8)).save(folder / "grey.png")  # mode L
    rgba = np.zeros((9, 11, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent: the colour is kept, not composited
    Image.fromarray(rgba).save(folder / "rgba.png")
    Image.fromarray(np.full((9, 11), 0x3412, np.uint16)).save(folder / "deep.png")  # I;16: top 8 bits, 0x34
    pal = Image.new("P", (11, 9), 1)
    pal.putpalette([0, 0, 0, 77, 0, 0] + [0] * 762)
    pal.save(folder / "palette.png")
    solid(folder / "photo.jpg", size=(11, 9), red=255, fmt="JPEG")
    P.predict_files([folder], FakeDetector(), tmp_path / "out")
    got = {Path(r["path"]).name: float(r["score"]) for r in rows(tmp_path / "out" / "scores.csv")}
    assert got["grey.png"] == 128 / 255
    assert got["rgba.png"] == 200 / 255
    assert got["deep.png"] == 0x34 / 255
    assert got["palette.png"] == 77 / 255
    assert abs(got["photo.jpg"] - 1.0) < 0.02  # JPEG is lossy
    for name in got:
        assert Image.open(tmp_path / "out" / "maps" / f"{name}.png").size == (11, 9)


# ---------------------------------------------------------------------------------------------------
# Inputs


def test_folders_globs_and_files_with_same_stems(tmp_path, monkeypatch):
    root = tmp_path / "line"
    solid(root / "a" / "x.png")
    solid(root / "a" / "x.jpg", fmt="PNG")
    solid(root / "b" / "x.png")
    solid(root / "b" / "sub" / "y.PNG")
    solid(root / "c" / "z.bmp")
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "a" / ".DS_Store").write_bytes(b"\0\1")
    (root / "a" / "Thumbs.db").write_bytes(b"\0\1")
    solid(root / "a" / ".hidden" / "h.png")
    monkeypatch.chdir(tmp_path)
    # a folder, a glob (quoted: expanded by predict) matching a file and a folder, a file named twice,
    # and a pattern that matches nothing
    inputs = ["line/a", "line/b/*", "line/c/z.bmp", "line/a/x.png", "line/none/*.png"]
    summary = P.predict_files(inputs, FakeDetector(), Path("out"))
    table = rows(tmp_path / "out" / "scores.csv")
    # argument order; within an argument sorted (the glob's matches: b/sub, then b/x.png)
    assert [r["path"] for r in table] == ["line/a/x.jpg", "line/a/x.png", "line/b/sub/y.PNG", "line/b/x.png",
                                          "line/c/z.bmp"]
    assert [r["map"] for r in table] == ["maps/a/x.jpg.png", "maps/a/x.png.png", "maps/b/sub/y.PNG.png",
                                         "maps/b/x.png.png", "maps/c/z.bmp.png"]
    assert [r["overlay"] for r in table] == [m.replace("maps/", "overlays/")[:-4] + ".jpg"
                                             for m in (r["map"] for r in table)]
    for r in table:
        assert (tmp_path / "out" / r["map"]).is_file() and (tmp_path / "out" / r["overlay"]).is_file()
    assert summary["unmatched"] == ["line/none/*.png"]


def test_the_output_folder_is_never_an_input(tmp_path):
    solid(tmp_path / "line" / "x.png")
    out = tmp_path / "line" / "predictions"
    P.predict_files([tmp_path / "line"], FakeDetector(), out)
    summary = P.predict_files([tmp_path / "line", str(tmp_path / "line" / "**" / "*.png")], FakeDetector(), out)
    assert [Path(r["path"]).name for r in rows(out / "scores.csv")] == ["x.png"]
    assert summary["n_inputs"] == 1


def test_an_empty_input_set_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(P.PredictError, match="no image to score"):
        P.predict_files([tmp_path / "empty"], FakeDetector(), tmp_path / "out")
    with pytest.raises(P.PredictError, match="no image to score"):
        P.predict_files([str(tmp_path / "nowhere" / "*.png")], FakeDetector(), tmp_path / "out")
    with pytest.raises(P.PredictError, match="does not exist"):
        P.predict_files([tmp_path / "missing.png"], FakeDetector(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_relative_names_never_collide_or_leave_the_folder(tmp_path):
    files = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "a" / ".." / "b" / "y.png"]
    assert P.relative_names(files) == [("a", "x.png"), ("b", "x.png"), ("b", "y.png")]
    assert P.relative_names([tmp_path / "one.png"]) == [("one.png",)]
    assert P.output_path(tmp_path / "maps", ("a", "x.png")) == tmp_path / "maps" / "a" / "x.png.png"
    with pytest.raises(P.PipelineError, match="path separator"):
        P.output_path(tmp_path / "maps", ("a", "x\\..\\..\\y.png"))


# ---------------------------------------------------------------------------------------------------
# Threshold from known-good images


def test_threshold_from_normals_by_hand():
    scores = [0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40, 0.45, 0.50, 0.90]
    # n = 10, far 0.1: k = 1; the threshold is just above the second highest, 0.50: only 0.90 flagged
    t, k = P.threshold_from_normals(scores, 0.1)
    assert k == 1 and t == np.nextafter(0.50, 1) and t > 0.50
    assert sum(s >= t for s in scores) == 1
    # far 0.25: k = floor(2.5) = 2, just above the third highest (0.45): 0.50 and 0.90 flagged
    t, k = P.threshold_from_normals(scores, 0.25)
    assert k == 2 and sum(s >= t for s in scores) == 2
    # far 0: nothing flagged, the threshold sits just above the highest
    t, k = P.threshold_from_normals(scores, 0.0)
    assert k == 0 and t == np.nextafter(0.90, 1) and sum(s >= t for s in scores) == 0
    # a tie at s(k+1): the whole tie passes, so fewer than k are flagged
    tied = [0.1] * 7 + [0.5, 0.9, 0.9]
    t, k = P.threshold_from_normals(tied, 0.1)
    assert k == 1 and sum(s >= t for s in tied) == 0
    t, k = P.threshold_from_normals(tied, 0.2)
    assert k == 2 and sum(s >= t for s in tied) == 2
    for far in (-0.1, 1.0, math.nan):
        with pytest.raises(P.ThresholdError, match="--far"):
            P.threshold_from_normals(scores, far)


def test_predict_with_threshold_from_normals(tmp_path):
    normals = tmp_path / "normals"
    for i in range(10):
        solid(normals / f"n{i}.png", red=10 * (i + 1))  # scores 10/255 ... 100/255
    (normals / "broken.png").write_text("not a png")  # skipped, not counted among the normals
    for red in (90, 91, 100, 101):
        solid(tmp_path / "in" / f"r{red}.png", red=red)
    summary = P.predict_files([tmp_path / "in"], FakeDetector(threshold=0.01), tmp_path / "out",
                              normals=[normals], far=0.1)
    th = summary["threshold"]
    assert th["source"] == "normals" and th["k"] == 1 and th["n_normals"] == 10 and th["n_normals_skipped"] == 1
    assert th["value"] == np.nextafter(90 / 255, 1) and th["n_normals_flagged"] == 1 and th["far_on_normals"] == 0.1
    got = {Path(r["path"]).name: r["decision"] for r in rows(tmp_path / "out" / "scores.csv")}
    assert got == {"r90.png": "normal", "r91.png": "anomalous", "r100.png": "anomalous", "r101.png": "anomalous"}
    skipped = rows(tmp_path / "out" / "skipped.csv")
    assert [(Path(r["path"]).name, r["input"]) for r in skipped] == [("broken.png", "normals")]
    with pytest.raises(P.PredictError, match="no image"):
        P.predict_files([tmp_path / "in"], FakeDetector(), tmp_path / "out", normals=[tmp_path / "in" / "*.jpg"])


@pytest.mark.parametrize("flag, value, message", [("--far", "1.5", "--far must be a rate"),
                                                  ("--far", "-0.01", "--far must be a rate"),
                                                  ("--batch-size", "0", "--batch-size must be a positive"),
                                                  ("--writers", "0", "--writers must be a positive"),
                                                  ("--max-pixels", "0", "--max-pixels must be a positive"),
                                                  ("--threshold", "inf", "--threshold must be a finite")])
def test_the_command_refuses_a_bad_option_before_loading_the_detector(tmp_path, flag, value, message):
    # the detector folder does not exist: an error about it would mean the options were checked too late
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    with pytest.raises(P.PredictError, match=message):
        P.main([str(image), "--detector", str(tmp_path / "no_detector"), "--out", str(tmp_path / "out"),
                flag, value])
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused_before_the_detector_loads(tmp_path):
    image = solid(tmp_path / "in" / "a.png")
    (tmp_path / "afile").write_text("mine")
    for out in (tmp_path / "afile", tmp_path / "afile" / "below"):
        with pytest.raises(P.PredictError, match="is a file"):
            P.main([str(image), "--detector", str(tmp_path / "no_detector"), "--out", str(out)])
        with pytest.raises(P.PredictError, match="is a file"):
            P.predict_files([image], FakeDetector(), out)
    assert (tmp_path / "afile").read_text() == "mine"


def test_inputs_all_inside_out_are_named_as_such(tmp_path):
    solid(tmp_path / "in" / "a.png")
    with pytest.raises(P.PredictError, match="inside --out"):
        P.predict_files([tmp_path / "in"], FakeDetector(), tmp_path / "in")


def test_exif_orientation_is_honoured_as_viewers_do(tmp_path):
    stored = np.zeros((150, 300, 3), np.uint8)
    stored[:, :50, 0] = 255  # a red band on the stored image's left: on top once rotated for display
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": shown 150 wide, 300 tall
    path = tmp_path / "in" / "phone.jpg"
    path.parent.mkdir()
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    out = tmp_path / "out"
    summary = P.predict_files([path], FakeDetector(), out, P.Options(overlays="all"))
    overlay = Image.open(out / "overlays" / "phone.jpg.jpg")
    assert overlay.size == Image.open(out / "maps" / "phone.jpg.png").size == (150, 300)
    red = np.asarray(overlay.convert("RGB"), np.float64)[..., 0]
    assert red[:40].mean() > red[-100:].mean() + 50  # the band is at the top, as a viewer shows it
    assert "EXIF" in summary["orientation"]


# ---------------------------------------------------------------------------------------------------
# Stopped runs: the images finished before a Ctrl-C or a full disk keep their rows


class StopsAtBatch(FakeDetector):
    """A FakeDetector whose ``predict`` raises ``error`` on its ``at``-th call (1-based)."""

    def __init__(self, at: int, error: BaseException):
        super().__init__(threshold=0.5)
        self.at, self.error, self.calls = at, error, 0

    def predict(self, images):
        self.calls += 1
        if self.calls == self.at:
            raise self.error
        return super().predict(images)


def _five_images(tmp_path):
    return [solid(tmp_path / "in" / f"{i}.png", red=50 * i + 10) for i in range(5)]


def test_ctrl_c_keeps_the_rows_of_the_images_already_written(tmp_path):
    files = _five_images(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        P.predict_files([tmp_path / "in"], StopsAtBatch(4, KeyboardInterrupt()), out, batch_size=1)
    table = rows(out / "scores.csv")
    # batches 1-3 were scored; the third's files were written while the fourth was being scored
    assert [r["path"] for r in table] == [str(f) for f in files[:3]]
    for r, f in zip(table, files):
        assert float(r["score"]) == pytest.approx((50 * files.index(f) + 10) / 255)
        assert (out / r["map"]).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False and "interrupted" in summary["stopped"]
    assert summary["n_scored"] == 3 and summary["n_inputs"] == 5
    assert (out / "skipped.csv").is_file()


def test_a_full_disk_is_one_error_and_the_finished_rows_stay(tmp_path, monkeypatch):
    import errno

    files = _five_images(tmp_path)
    out = tmp_path / "out"
    real = P._write_png
    written = []

    def fill_up(path, image):
        if len(written) == 2:  # the third map: no space left
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        real(path, image)

    monkeypatch.setattr(P, "_write_png", fill_up)
    with pytest.raises(P.PredictError, match=r"No space left on device.*after 2 of 5 image"):
        P.predict_files([tmp_path / "in"], FakeDetector(threshold=2.0), out, batch_size=1, writers=1)
    table = rows(out / "scores.csv")
    assert [r["path"] for r in table] == [str(f) for f in files[:2]]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False and "No space left" in summary["stopped"] and summary["n_scored"] == 2


def test_a_complete_run_says_so(tmp_path):
    _five_images(tmp_path)
    summary = P.predict_files([tmp_path / "in"], FakeDetector(threshold=0.5), tmp_path / "out", batch_size=2)
    assert summary["complete"] is True and summary["stopped"] is None and summary["n_scored"] == 5


def test_the_command_turns_ctrl_c_into_exit_130_and_one_line(monkeypatch, capsys):
    def interrupted(argv=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "main", interrupted)
    monkeypatch.setattr("sys.argv", ["spg-predict"])
    with pytest.raises(SystemExit) as stop:
        P.console()
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip() == "error: interrupted"


# ---------------------------------------------------------------------------------------------------
# The output folder: predict's own, one run at a time, nothing written outside it


def test_a_users_own_files_of_predicts_names_are_not_replaced(tmp_path):
    solid(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.csv").write_text("my own table\n")
    with pytest.raises(P.PredictError, match=r"holds scores.csv, which predict did not write"):
        P.predict_files([tmp_path / "in"], FakeDetector(), out)
    assert (out / "scores.csv").read_text() == "my own table\n"
    assert sorted(p.name for p in out.iterdir()) == ["scores.csv"]
    # a folder of the user's notes beside nothing of predict's names is fine, and a second run into
    # predict's own folder (the marker) replaces its files
    (out / "scores.csv").unlink()
    (out / "notes.txt").write_text("keep")
    P.predict_files([tmp_path / "in"], FakeDetector(), out)
    P.predict_files([tmp_path / "in"], FakeDetector(), out)
    assert (out / P.MARKER).is_file() and (out / "notes.txt").read_text() == "keep"
    assert len(rows(out / "scores.csv")) == 1


def test_an_earlier_runs_folder_without_the_marker_is_still_predicts(tmp_path):
    solid(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    P.predict_files([tmp_path / "in"], FakeDetector(), out)
    (out / P.MARKER).unlink()  # as a folder written before the marker existed
    P.predict_files([tmp_path / "in"], FakeDetector(), out)
    assert len(rows(out / "scores.csv")) == 1


def test_an_input_named_inside_out_is_never_overwritten(tmp_path):
    # an earlier run's folder, then a user's image copied into its maps/ and named explicitly: the
    # other input's map would be out/maps/x.png, that very file
    out = tmp_path / "ov"
    solid(tmp_path / "first" / "z.png")
    P.predict_files([tmp_path / "first"], FakeDetector(), out)
    mine = solid(out / "maps" / "x.png", red=7)
    before = mine.read_bytes()
    solid(out.parent / "x", red=200, fmt="PNG")
    other = out.parent / "x"
    P.predict_files([mine, other], FakeDetector(), out)
    assert mine.read_bytes() == before
    assert rows(out / "scores.csv") == []
    (skip,) = rows(out / "skipped.csv")
    assert skip["path"] == str(other) and "never written over" in skip["reason"]


def test_a_second_predict_into_a_locked_folder_is_refused(tmp_path):
    import fcntl
    import os

    solid(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / P.MARKER, os.O_RDWR | os.O_CREAT)
    os.write(fd, b'{"pid": 4242, "started": "then"}')
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running predict holds it
    try:
        with pytest.raises(P.PredictError, match=r"another predict \(pid 4242, started then\) is writing"):
            P.predict_files([tmp_path / "in"], FakeDetector(), out)
        assert not (out / "scores.csv").exists()
    finally:
        os.close(fd)
    P.predict_files([tmp_path / "in"], FakeDetector(), out)  # the lock went with its holder
    assert len(rows(out / "scores.csv")) == 1


def test_symlinked_output_folders_are_refused_or_skipped(tmp_path):
    solid(tmp_path / "in" / "a" / "1.png")
    solid(tmp_path / "in" / "b" / "2.png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / P.MARKER).write_text("{}")
    (out / "maps").symlink_to(elsewhere)
    with pytest.raises(P.PredictError, match=r"maps is a symbolic link"):
        P.predict_files([tmp_path / "in"], FakeDetector(), out)
    (out / "maps").unlink()
    (out / "maps").mkdir()
    (out / "maps" / "a").symlink_to(elsewhere)  # deeper: that image is skipped, the other scored
    P.predict_files([tmp_path / "in"], FakeDetector(), out)
    assert list(elsewhere.iterdir()) == []
    assert [Path(r["path"]).name for r in rows(out / "scores.csv")] == ["2.png"]
    skipped = rows(out / "skipped.csv")
    assert [Path(r["path"]).name for r in skipped] == ["1.png"] and "symbolic link" in skipped[0]["reason"]


def test_an_output_name_that_is_another_inputs_folder_is_skipped_not_a_crash(tmp_path):
    solid(tmp_path / "in" / "x.png")
    solid(tmp_path / "in" / "x.png.png" / "y.png")
    out = tmp_path / "out"
    P.predict_files([tmp_path / "in"], FakeDetector(), out)
    assert [Path(r["path"]).name for r in rows(out / "scores.csv")] == ["y.png"]
    assert (out / "maps" / "x.png.png" / "y.png.png").is_file()
    skipped = rows(out / "skipped.csv")
    assert [Path(r["path"]).name for r in skipped] == ["x.png"] and "is the folder where" in skipped[0]["reason"]
    # taken on disk by an earlier run: a folder where the file goes
    solid(tmp_path / "in2" / "x.png.png" / "y.png")
    P.predict_files([tmp_path / "in2"], FakeDetector(), out)
    solid(tmp_path / "in3" / "x.png")
    P.predict_files([tmp_path / "in3"], FakeDetector(), out)
    assert rows(out / "scores.csv") == [] and "is a folder" in rows(out / "skipped.csv")[0]["reason"]
