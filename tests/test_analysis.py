"""The research analyses: importing one runs nothing, each has a main whose --help exits 0, and the
fusion-rule candidates equal values worked by hand."""

from __future__ import annotations

import importlib
import pkgutil

import numpy as np
import pytest

import analysis

MODULES = sorted(m.name for m in pkgutil.iter_modules(analysis.__path__))


def test_there_are_analyses():
    assert {"fusion_rules", "guide_directions"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_an_analysis_runs_nothing_on_import_and_has_a_main(name, capsys):
    module = importlib.import_module(f"analysis.{name}")
    assert capsys.readouterr().out == ""  # no work (and no printing) at import
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0 and "usage" in capsys.readouterr().out


def test_fusion_rule_candidates_by_hand():
    from analysis.fusion_rules import rules

    guide = np.array([[0.5, 0.9], [0.1, 0.5]])
    batch = np.array([[1.0, 4.0], [2.0, 3.0]])
    got = rules(guide, batch)
    np.testing.assert_allclose(got["geometric"], np.sqrt(guide * batch), rtol=1e-6)
    # ranks over the four patches: guide (0.5 ties at 2.5), batch 1..4; divided by 4
    np.testing.assert_allclose(got["rankmean"], (np.array([[2.5, 4], [1, 2.5]]) + np.array([[1, 4], [2, 3]])) / 8)
    z = (batch - batch.mean()) / batch.std()
    np.testing.assert_allclose(got["zmean_w0.5"], 0.5 * (guide - guide.mean()) / guide.std() + 0.5 * z, atol=1e-9)
    # the guide's logit: log(p / (1 - p)) = 0, log 9, -log 9, 0; mean 0, std sqrt(2 log^2 9 / 4)
    zl = np.array([[0.0, 1.0], [-1.0, 0.0]]) * np.sqrt(2)
    zb = np.array([[-3.0, 3.0], [-1.0, 1.0]]) / np.sqrt(5)  # batch mean 2.5, std sqrt(1.25)
    np.testing.assert_allclose(got["gate"], (zl / (1 + np.exp(-zb)) + zb) / 2, atol=1e-6)
    w = (np.sqrt(2) * 3 / np.sqrt(5) + np.sqrt(2) * 1 / np.sqrt(5)) / 4  # mean of zl * zb over the 4 patches
    np.testing.assert_allclose(got["agree"], (w * zl + zb) / (1 + w), atol=1e-6)
    np.testing.assert_allclose(got["zmin"], np.minimum(zl, zb), atol=1e-6)


def test_image_rule_candidates_by_hand():
    from analysis.image_rules import image_rules

    # two images of four pixels each (maps (2, 2, 2))
    guide = np.array([[[0.1, 0.9], [0.2, 0.3]], [[0.5, 0.4], [0.6, 0.7]]])
    batch = np.array([[[1.0, 2.0], [5.0, 3.0]], [[4.0, 1.0], [2.0, 6.0]]])
    fused = np.array([[[0.0, 3.0], [1.0, 2.0]], [[9.0, 1.0], [2.0, 3.0]]])
    got = image_rules(guide, batch, fused)
    np.testing.assert_allclose(got["fused_max"], [3, 9])
    np.testing.assert_allclose(got["batch_max"], [5, 6])
    np.testing.assert_allclose(got["guide_max"], [0.9, 0.7])
    np.testing.assert_allclose(got["batch_at_fused_peak"], [2, 4])  # the batch where the fused map peaks
    # top 10 % of 4 pixels rounds to 0, kept at 1 pixel: the same as the peak
    np.testing.assert_allclose(got["batch_in_fused_top0.1"], [2, 4])
    np.testing.assert_allclose(got["batch_top0.1"], [5, 6])


def test_sparsity_table_by_hand(tmp_path, capsys):
    import json

    import yaml

    from analysis import sparsity

    def setting(name, variant, l1, k, active, top10, runs):
        folder = tmp_path / "sweep" / name
        (folder / "synth_a").mkdir(parents=True)
        (folder / "params.yaml").write_text(yaml.safe_dump({"guides": {"variant": variant, "l1_coef": l1,
                                                                       "guide_topk": k}}))
        (folder / "synth_a" / "atoms.json").write_text(json.dumps({
            "active_atoms": [{"anomaly_local": a, "normal_local": 2 * a} for a in active],
            "concentration": {"per_seed": [{"top_1": t / 2, "top_10": t} for t in top10]}}))
        for run, (img, pix) in runs.items():
            (folder / run).mkdir()
            (folder / run / "metrics.json").write_text(json.dumps({"image_auroc": img, "image_auroc_std": 0.01,
                                                                   "pixel_auroc": pix, "pixel_auroc_std": 0.02}))

    setting("a", "l1", 0.001, 32, [300, 100], [0.2, 0.4], {"synth_a_to_x": (0.9, 0.8), "synth_a_to_y": (None, 0.6)})
    setting("b", "topk", 0.001, 8, [8, 8], [1.0, 1.0], {"synth_a_to_x": (0.7, 0.9), "synth_a_to_y": (None, 0.7)})
    assert sparsity.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out")]) == 0
    rows = {r["setting"]: r for r in sparsity.table(tmp_path / "sweep")}
    assert rows["l1 0.001"]["active_anomaly_local"] == 200 and rows["l1 0.001"]["active_normal_local"] == 400
    assert rows["l1 0.001"]["top_10"] == pytest.approx(0.3) and rows["topk 8"]["top_1"] == pytest.approx(0.5)
    # image AUROC over the run where it is defined, pixel over both
    assert rows["l1 0.001"]["mean_image_auroc"] == pytest.approx(0.9)
    assert rows["topk 8"]["mean_pixel_auroc"] == pytest.approx(0.8)
    assert "| topk 8 | 8 / 16 | 0.50 / 1.00 | 0.700 (0.010) | 0.800 (0.020) |" in capsys.readouterr().out
    assert (tmp_path / "out" / "sparsity.csv").read_text().count("\n") == 3


def test_subsampled_mutual_by_hand():
    """Three images of unit 2-d patches: image 0's patch (1, 0) is at distance 0 from image 1's (1, 0)
    and 1 from image 2's (0, 1); with two references k = max(1, ⌊0.3 · 2⌋) = 1, the smaller counts."""
    import torch

    from analysis.tiled_mutual import fused, subsampled_mutual

    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    bags = [torch.stack([e0]), torch.stack([e0, -e0]), torch.stack([e1])]
    got = subsampled_mutual(bags, references=2)
    assert torch.allclose(got[0], torch.tensor([0.0]))          # nearest in image 1: itself
    assert torch.allclose(got[1], torch.tensor([0.0, 1.0]))     # -e0: 2 from image 0, 1 from image 2 (e1)
    assert torch.allclose(got[2], torch.tensor([1.0]))          # e1 is 1 from every patch of 0 and 1
    # one reference: each image against one other, drawn with the seed; an image never its own reference
    one = subsampled_mutual(bags, references=1, seed=3)
    assert all(v.shape == b.shape[:1] for v, b in zip(one, bags))
    assert float(one[2][0]) == 1.0
    with pytest.raises(ValueError, match="other"):
        subsampled_mutual(bags[:1], references=1)
    # the grid-pixel rule: logits 0, 0, ±ln 3 and batch 0, 0, ∓1 standardise to 0, 0, ±√2 and 0, 0, ∓√2,
    # which cancel; the batch alone in agreement gives their mean √2
    probability = np.array([[0.5, 0.5], [0.75, 0.25]], np.float32)
    assert np.allclose(fused(probability, np.array([[0.0, 0.0], [-1.0, 1.0]], np.float32)), 0.0, atol=1e-6)
    agree = fused(probability, np.array([[0.0, 0.0], [1.0, -1.0]], np.float32))
    assert np.allclose(agree, [[0, 0], [np.sqrt(2), -np.sqrt(2)]], atol=1e-5)


def test_tiled_mutual_summary_by_hand():
    from analysis.tiled_mutual import summary

    def m(i, p, a):
        return {"image_auroc": i, "pixel_auroc": p, "pixel_aupro": a}

    per = {"x": {"tiled_batch": m(0.9, 0.8, 0.7), "resized_batch": m(0.5, 0.5, 0.5), "a:tiled": m(0.1, 0.2, 0.3),
                 "a:tiled+tiled_batch": m(None, 0.6, 0.4), "seconds": {"tokens_per_image": 1.0}},
           "y": {"tiled_batch": m(0.7, 0.6, 0.5), "resized_batch": m(0.5, 0.5, 0.5), "a:tiled": m(0.3, 0.4, 0.5),
                 "a:tiled+tiled_batch": m(None, 0.8, 0.6), "seconds": {"tokens_per_image": 1.0}}}
    lines = summary([{"dataset": "d", "per_category": per}]).splitlines()
    # means over the two categories; a metric undefined in both is a dash
    assert lines[2] == ("| a → d | 0.200 | 0.300 | 0.400 | 0.500 | 0.500 | 0.500 | 0.800 | 0.700 | 0.600 "
                        "| – | 0.700 | 0.500 |")
    assert lines[3].startswith("| **mean over the runs where defined** | 0.200 | 0.300 | 0.400 |")
