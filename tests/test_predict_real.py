"""``python -m pipeline.predict`` against the real Detector (pipeline/method/detector.py).

The detector folder is written with ``pipeline.method.detector.save`` from the contract's keys (random guide
vectors (n_seeds, 4, d)), over a random-weight DINOv2-S/14 at 28 px, so the test needs no DVC run and no
download. ``layer`` is the resolved block (12 of 12), as the feature store and the export stage record it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file


from pipeline.cli import predict as P  # noqa: E402
from pipeline.data.images import load_image  # noqa: E402
from pipeline.method import detector  # noqa: E402
from pipeline.method.detector import Detector  # noqa: E402
from pipeline.files import sha256_file  # noqa: E402
from pipeline.launch import run  # noqa: E402

SIZE, GRID, DIM = 28, 2, 384


def write_detector(root: Path) -> Path:
    """models/bench/detector under ``root`` over random backbone weights at models/backbones/w.safetensors."""
    import timm

    torch.manual_seed(0)
    weights = root / "models" / "backbones" / "w.safetensors"
    weights.parent.mkdir(parents=True)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    folder = root / "models" / "bench" / "detector"
    vectors = torch.randn(2, 4, DIM, generator=torch.Generator().manual_seed(1))
    info = {
        "format": "spg-detector/1", "backbone": "dinov2_vits14", "weights_sha256": sha256_file(weights),
        "weights_path": "models/backbones/w.safetensors", "layer": 12, "image_size": SIZE, "grid": [GRID, GRID],
        "temperature": 0.07, "blur_sigma": 1.0, "image_score": "max", "lse_temperature": 0.01,
        "top_fraction": 0.01, "threshold": 0.5, "threshold_rule": "f1_max on the auxiliary set", "seeds": [0, 1],
        "map_range": [0, 1], "aux": {"dataset": "bench", "fingerprint": "0" * 64}, "sae_sha256": "0" * 64,
        "guides": {"seeds": [0, 1]},
    }
    detector.save(folder, vectors, info)
    return folder


def test_predict_cli_with_the_real_detector(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = write_detector(tmp_path)
    rng = np.random.default_rng(0)
    images = tmp_path / "line"
    images.mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 256, (33, 21), dtype=np.uint8)).save(images / "b.jpg")
    (images / "c.png").write_text("not an image")

    run(P.main, ["--detector", str(folder), str(images), "--out", "out", "--device", "cpu", "--batch-size", "1"])
    with open(tmp_path / "out" / "scores.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in table] == ["a.png", "b.jpg"]
    detector = Detector.load(folder, device="cpu")
    pil = [load_image(images / "a.png"), load_image(images / "b.jpg")]
    maps, scores = detector.predict(pil)
    assert maps.shape == (2, SIZE, SIZE)
    for r, image, amap, score in zip(table, pil, maps, scores):
        assert float(r["score"]) == pytest.approx(float(score), abs=1e-6)
        assert r["decision"] == ("anomalous" if float(r["score"]) >= 0.5 else "normal")
        png = np.asarray(Image.open(tmp_path / "out" / r["map"])).astype(np.float64) / P.MAP_SCALE
        assert png.shape == (image.size[1], image.size[0])
        np.testing.assert_allclose(png, P.map_at_size(amap, image.size), atol=1e-4)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_scored"] == 2 and summary["n_skipped"] == 1
    assert summary["detector"]["weights_sha256"] == sha256_file(tmp_path / "models" / "backbones" / "w.safetensors")
    assert summary["threshold"]["source"] == "detector" and summary["threshold"]["value"] == 0.5

    # absent weights and an absent detector: one error line that says what to run
    (tmp_path / "models" / "backbones" / "w.safetensors").rename(tmp_path / "elsewhere.safetensors")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(P.main, ["--detector", str(folder), str(images), "--out", "out2", "--device", "cpu"])
    assert exit_info.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ") and ("dvc repro weights" in line or "dvc pull" in line)
    with pytest.raises(SystemExit):
        run(P.main, ["--detector", "models/none/detector", str(images), "--out", "out3", "--device", "cpu"])
    assert "export@" in capsys.readouterr().err.strip().splitlines()[-1]
