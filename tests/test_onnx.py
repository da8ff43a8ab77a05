"""The detector as one ONNX graph: its maps and scores equal the torch detector's (random-weight DINOv2
at 28 px, the stores and detectors of tests/test_detector.py), for every image score; the blur equals
scipy's; predict --runtime onnxruntime writes what the torch path writes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from pipeline.cli import export_onnx
from pipeline.cli import predict as P
from pipeline.data.images import load_image
from pipeline.features import store
from pipeline.method import detector, onnx_graph
from tests.test_detector import export, setup  # noqa: F401  (setup is the module fixture)


@pytest.mark.parametrize("sigma", [0.7, 1.5, 4.0])
def test_the_blur_is_scipys_gaussian_filter(sigma):
    maps = np.random.default_rng(0).random((2, 28, 28)).astype(np.float32)
    got = onnx_graph.blur(torch.from_numpy(maps), onnx_graph.gaussian_kernel(sigma)).numpy()
    want = np.stack([gaussian_filter(m, sigma=sigma, mode="reflect") for m in maps])
    assert np.abs(got - want).max() <= 1e-6


def target_images(tmp):
    target = store.open_store(tmp / "target")
    return [tmp / "target_tree" / p for p in target.attrs["paths"]]


@pytest.mark.parametrize("mode", ["max", "top_mean", "lse", "global"])
def test_onnx_maps_and_scores_equal_the_torch_detectors(setup, mode, tmp_path):  # noqa: F811
    tmp, weights, _, _ = setup
    folder = export(tmp, weights, mode)
    export_onnx.main(["--detector", str(folder), "--out", str(tmp_path / "d.onnx"), "--weights", str(weights)])
    images = [load_image(p, 10**7) for p in target_images(tmp)]
    want_maps, want_scores = detector.Detector.load(folder, weights=weights).predict(images)
    runtime = onnx_graph.OnnxDetector(tmp_path / "d.onnx")
    maps, scores = runtime.predict(images)
    assert maps.shape == want_maps.shape == (len(images), 28, 28)
    assert np.abs(maps - want_maps).max() <= 1e-4
    assert np.abs(scores - want_scores).max() <= 1e-4
    assert runtime.threshold == pytest.approx(detector.read(folder)[0]["threshold"])
    assert runtime.meta["image_score"] == mode and int(runtime.meta["opset"]) == onnx_graph.OPSET


def test_predict_with_onnxruntime_decides_as_torch(setup, tmp_path):  # noqa: F811
    tmp, weights, _, _ = setup
    folder = export(tmp, weights, "max")
    export_onnx.main(["--detector", str(folder), "--out", str(tmp_path / "d.onnx"), "--weights", str(weights)])
    files = target_images(tmp)
    P.predict_files(files, detector.Detector.load(folder, weights=weights), tmp_path / "torch", P.Options())
    P.main([str(f) for f in files] + ["--detector", str(folder), "--runtime", "onnxruntime", "--onnx",
                                      str(tmp_path / "d.onnx"), "--out", str(tmp_path / "onnx")])
    summary = json.loads((tmp_path / "onnx" / "summary.json").read_text())
    assert summary["runtime"] == "onnxruntime" and "CPUExecutionProvider" in summary["providers"]
    with pytest.raises(P.PredictError, match="onnxruntime"):
        P.main([str(files[0]), "--detector", str(folder), "--runtime", "onnxruntime", "--batch", "--out",
                str(tmp_path / "x")])

    def table(out):
        with open(out / "scores.csv", newline="") as f:
            return {r["path"]: r for r in csv.DictReader(f)}

    a, b = table(tmp_path / "torch"), table(tmp_path / "onnx")
    assert a.keys() == b.keys()
    assert max(abs(float(a[k]["score"]) - float(b[k]["score"])) for k in a) <= 1e-4
    # the same decision wherever a score is not within 1e-4 of the threshold
    t = detector.read(folder)[0]["threshold"]
    assert all(a[k]["decision"] == b[k]["decision"] for k in a if abs(float(a[k]["score"]) - t) > 1e-4)


def test_a_file_that_is_not_a_detector_graph_is_refused(tmp_path):
    with pytest.raises(onnx_graph.OnnxError, match="no ONNX file"):
        onnx_graph.OnnxDetector(tmp_path / "none.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(onnx_graph.OnnxError, match="cannot load"):
        onnx_graph.OnnxDetector(tmp_path / "bad.onnx")
