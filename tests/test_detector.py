"""The detector against the evaluate stage and its load errors.

A tiny MVTec tree and a random-weight DINOv2-S/14 saved as safetensors are extracted by the extract
stage; the SAE and guides are built by hand (no fitting: equality does not need good guides); the
export and evaluate stages run; then ``Detector.load(...).predict`` on the same image files must give
evaluate's maps (max |Δ| ≤ 1e-5) and scores, per seed and for the mean of seeds, in every image-score mode.
"""

import json

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from pipeline.features import backbones
from pipeline.method import detector
from pipeline.evaluation import evaluate as evaluation
from pipeline.method import guides
from pipeline.method import sae
from pipeline.method import scoring
from pipeline.features import store
from pipeline.files import sha256_file
from pipeline.stages import evaluate as evaluate_stage
from pipeline.stages import export as export_stage
from pipeline.stages import extract as extract_stage
from tests.conftest import make_mvtec_tree

N_LATENTS, SEEDS, MODES = 64, (0, 1), ("max", "lse", "top_mean", "global")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("detector")
    make_mvtec_tree(tmp / "aux_tree", categories=("gamma",), n_good=3, n_bad=3, size=36, seed=1)
    make_mvtec_tree(tmp / "target_tree", categories=("alpha", "beta"), n_good=3, n_bad=4, size=40, seed=0)
    torch.manual_seed(0)
    save_file(timm.create_model("vit_small_patch14_dinov2", pretrained=False).state_dict(), tmp / "random.safetensors")
    backbones.materialize_weights("dinov2_vits14", str(tmp / "random.safetensors"), tmp / "weights")
    weights = tmp / "weights" / "dinov2_vits14.safetensors"
    params = {
        "datasets": {"aux": {"format": "mvtec", "root": str(tmp / "aux_tree")},
                     "target": {"format": "mvtec", "root": str(tmp / "target_tree")}},
        "data": {"splits": ["test"]},
        "backbone": {"name": "dinov2_vits14", "layer": -1, "image_size": 28},
        "extract": {"batch_size": 3, "chunk_images": 4, "num_workers": 0, "device": "cpu"},
    }
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    for name in ("aux", "target"):
        extract_stage.main(["--dataset", name, "--weights", str(weights), "--out", str(tmp / name),
                            "--params", str(tmp / "params.yaml")])
    aux = store.open_store(tmp / "aux")
    d = aux.tokens.shape[-1]
    g = torch.Generator().manual_seed(0)
    model = sae.TopKSAE(d, N_LATENTS, 8)
    with torch.no_grad():
        model.dictionary.copy_(torch.nn.functional.normalize(torch.randn(N_LATENTS, d, generator=g), dim=-1))
        model.encoder.copy_(model.dictionary)
    provenance = {k: aux.attrs[k] for k in ("backbone", "weights_sha256", "layer", "image_size", "dataset")}
    sae.save(model, tmp / "sae", torch.zeros(N_LATENTS, dtype=torch.bool), extra={"features": provenance})
    codes = torch.rand(len(SEEDS), 4, N_LATENTS, generator=g) * (torch.rand(len(SEEDS), 4, N_LATENTS, generator=g) < 0.3)
    training = {"variant": "l1", "guide_topk": 32, "init_mean": 0.1, "init_std": 0.01, "temperature": 0.07,
                "seeds": list(SEEDS)}
    guides.save(tmp / "guides", codes, {"training": training, "features": provenance,
                                        "sae_sha256": sha256_file(tmp / "sae" / "sae.safetensors"),
                                        "aux_store": guides.store_fingerprint(aux.attrs)})
    return tmp, weights, codes, model.dictionary.detach()


def write_params(tmp, mode):
    """``mode``: an image score, or ``<score>-fused`` for that score with ``fusion: self_dissimilarity``."""
    path = tmp / f"params_{mode}.yaml"
    score, fused = mode.removesuffix("-fused"), mode.endswith("-fused")
    path.write_text(yaml.safe_dump({"scoring": {"image_score": score, "fusion": "self_dissimilarity" if fused else "none",
                                                "blur_sigma": 1.5, "lse_temperature": 0.05, "top_fraction": 0.05},
                                    "evaluate": {"batch_images": 5, "curve_points": 20,
                                                 "overlays_per_category": 2, "device": "cpu"}}))
    return path


def export(tmp, weights, mode):
    out = tmp / f"export_{mode}" / "detector"
    export_stage.main(["--features", str(tmp / "aux"), "--sae", str(tmp / "sae"), "--guides", str(tmp / "guides"),
                       "--weights", str(weights), "--out", str(out), "--params", str(write_params(tmp, mode))])
    return out


def evaluate_maps(tmp, folder, mode, monkeypatch):
    """Run the evaluate stage; return {set name: (maps (N, S, S), scores (N,))} in store order, as it
    computed them (captured from the library function it calls), and its metrics.json."""
    calls = []
    original = evaluation.score_rows

    def spy(target, start, stop, *args, **kwargs):
        result = original(target, start, stop, *args, **{**kwargs, "keep_maps": True})
        calls.append((start, result))
        return result

    monkeypatch.setattr(evaluation, "score_rows", spy)
    out = tmp / f"report_{mode}"
    evaluate_stage.main(["--target", str(tmp / "target"), "--aux", str(tmp / "aux"), "--sae", str(tmp / "sae"),
                         "--guides", str(tmp / "guides"), "--detector", str(folder), "--out", str(out),
                         "--params", str(tmp / f"params_{mode}.yaml")])
    monkeypatch.undo()
    calls.sort(key=lambda c: c[0])
    names = calls[0][1].keys()
    return ({name: tuple(np.concatenate([c[1][name][i] for c in calls]) for i in (0, 1)) for name in names},
            json.loads((out / "metrics.json").read_text()))


def target_images(tmp):
    target = store.open_store(tmp / "target")
    root = tmp / "target_tree"
    return [Image.open(root / relpath) for relpath in target.attrs["paths"]]


@pytest.mark.parametrize("mode", [*MODES, "max-fused", "top_mean-fused"])
def test_predict_equals_evaluate(setup, mode, monkeypatch):
    tmp, weights, _, _ = setup
    folder = export(tmp, weights, mode)
    scored, result = evaluate_maps(tmp, folder, mode, monkeypatch)
    images = target_images(tmp)
    for seed, name in [(None, evaluation.ENSEMBLE), *((s, f"learned/{s}") for s in SEEDS)]:
        det = detector.Detector.load(folder, seed=seed)  # weights from detector.json's weights_path
        maps, scores = det.predict(images)
        want_maps, want_scores = scored[name]
        assert maps.shape == want_maps.shape == (len(images), 28, 28) and maps.dtype == np.float32
        assert np.abs(maps - want_maps).max() <= 1e-5, (mode, name)
        assert np.abs(scores - want_scores).max() <= 1e-5, (mode, name)
        assert 0.0 <= maps.min() and maps.max() <= (2.0 if mode.endswith("-fused") else 1.0)
    # the maps are not trivially equal: seeds differ, and the mean map is their mean
    assert np.abs(scored["learned/0"][0] - scored["learned/1"][0]).max() > 1e-3
    np.testing.assert_allclose(scored[evaluation.ENSEMBLE][0],
                               (scored["learned/0"][0] + scored["learned/1"][0]) / 2, atol=1e-7)
    assert result["image_score"] == mode.removesuffix("-fused") and set(result["seed_ensemble"]) == set(evaluation.KEYS)
    # the aux threshold is applied to the mean-of-seeds scores evaluate computed
    info = json.loads((folder / "detector.json").read_text())
    labels = store.open_store(tmp / "target").labels[:].astype(bool)
    alarm = scored[evaluation.ENSEMBLE][1] >= info["threshold"]
    assert result["aux_threshold"] == info["threshold"]
    if mode == "max":  # one category's recall by hand, against per_category.json
        per_category = json.loads((tmp / f"report_{mode}" / "per_category.json").read_text())
        rows = slice(0, 7)  # alpha: 3 good + 4 bad, first in the store
        hand = (alarm[rows] & labels[rows]).sum() / labels[rows].sum()
        assert per_category["alpha"]["image_recall_at_aux_threshold"] == pytest.approx(hand)


def test_global_mode_scores_are_the_mean_of_the_seeds_global_probabilities(setup):
    tmp, weights, codes, dictionary = setup
    folder = tmp / "export_global" / "detector"
    if not folder.exists():
        folder = export(tmp, weights, "global")
    det = detector.Detector.load(folder, with_backbone=False)
    target = store.open_store(tmp / "target")
    tokens, cls = target.tokens[:].astype(np.float32), target.cls[:].astype(np.float32)
    _, scores = det.maps_from_tokens(tokens, cls)
    by_hand = np.mean([scoring.global_probability(torch.from_numpy(cls), codes[i] @ dictionary) for i in range(2)], axis=0)
    np.testing.assert_allclose(scores, by_hand, atol=1e-6)


def test_load_errors_name_what_to_run(setup, tmp_path):
    tmp, weights, _, _ = setup
    folder = export(tmp, weights, "max")
    with pytest.raises(detector.DetectorError, match=r"dvc repro export@synth_x.*dvc pull"):
        detector.Detector.load(tmp_path / "models" / "synth_x" / "detector")
    with pytest.raises(detector.DetectorError, match=r"not found; run `dvc repro weights` \(or `dvc pull`\)"):
        detector.Detector.load(folder, weights=tmp_path / "absent.safetensors")
    other = tmp_path / "other.safetensors"
    other.write_bytes(weights.read_bytes() + b"\0")
    recorded = json.loads((folder / "detector.json").read_text())["weights_sha256"]
    with pytest.raises(detector.DetectorError) as err:
        detector.Detector.load(folder, weights=other)
    assert recorded in str(err.value) and sha256_file(other) in str(err.value)
    with pytest.raises(detector.DetectorError, match=r"no guide seed 7; it has seeds \[0, 1\]"):
        detector.Detector.load(folder, seed=7, with_backbone=False)
    # a detector.json of another format, or vectors that do not fit its seeds
    bad = tmp_path / "bad" / "detector"
    bad.mkdir(parents=True)
    info = json.loads((folder / "detector.json").read_text())
    (bad / "detector.json").write_text(json.dumps({**info, "format": "spg-detector/0"}))
    (bad / "detector.safetensors").write_bytes((folder / "detector.safetensors").read_bytes())
    with pytest.raises(detector.DetectorError, match="format 'spg-detector/0'.*export@bad"):
        detector.Detector.load(bad, with_backbone=False)
    (bad / "detector.json").write_text(json.dumps({**info, "seeds": [0, 1, 2]}))
    with pytest.raises(detector.DetectorError, match=r"3 seed\(s\)"):
        detector.Detector.load(bad, with_backbone=False)


def test_evaluate_refuses_a_detector_with_other_settings_or_guides(setup, tmp_path):
    tmp, weights, _, _ = setup
    folder = export(tmp, weights, "lse")
    argv = ["--target", str(tmp / "target"), "--aux", str(tmp / "aux"), "--sae", str(tmp / "sae"),
            "--guides", str(tmp / "guides"), "--detector", str(folder), "--out", str(tmp_path / "out"),
            "--params", str(write_params(tmp_path, "max"))]
    with pytest.raises(detector.DetectorError, match=r"image_score is 'lse' but scoring.image_score .* is 'max'.*export@"):
        evaluate_stage.main(argv)
    argv[argv.index("--params") + 1] = str(write_params(tmp_path, "lse-fused"))
    with pytest.raises(detector.DetectorError, match=r"fusion is 'none' but scoring.fusion .* is 'self_dissimilarity'"):
        evaluate_stage.main(argv)
    # a detector.json written before the option existed scored the guide map alone
    info = json.loads((folder / "detector.json").read_text())
    old = tmp_path / "old" / "detector"
    detector.save(old, detector.read(folder)[1], {k: v for k, v in info.items() if k != "fusion"})
    assert detector.Detector.load(old, with_backbone=False).settings.fusion == "none"
    argv[argv.index("--params") + 1] = str(write_params(tmp_path, "lse"))
    info = json.loads((folder / "detector.json").read_text())
    moved = tmp_path / "m" / "detector"
    detector.save(moved, detector.read(folder)[1], {**info, "guides": {**info["guides"], "sha256": "0" * 64}})
    argv[argv.index("--detector") + 1] = str(moved)
    argv[argv.index("--params") + 1] = str(write_params(tmp_path, "lse"))
    with pytest.raises(detector.DetectorError, match="guides with sha256 0000"):
        evaluate_stage.main(argv)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key,value", [("temperature", "hot"), ("temperature", -1.0), ("layer", 99),
                                       ("backbone", "resnet50"), ("map_range", [0, "big"]), ("blur_sigma", None),
                                       ("image_size", -28), ("grid", [2]), ("image_score", "mean"), ("seeds", "all"),
                                       ("top_fraction", 2.0), ("threshold", "high")])
def test_a_detector_json_with_a_bad_value_is_refused_naming_the_key(setup, tmp_path, key, value):
    import json
    import shutil

    tmp, weights, _, _ = setup
    folder = tmp_path / "detector"
    shutil.copytree(export(tmp, weights, "max"), folder)
    info = json.loads((folder / "detector.json").read_text())
    info[key] = value
    (folder / "detector.json").write_text(json.dumps(info))
    with pytest.raises(detector.DetectorError, match=rf"detector.json: {key} "):
        detector.Detector.load(folder, weights=weights)


@pytest.mark.parametrize("key,value", [("layer", 11), ("threshold", 0.5), ("temperature", 0.5), ("blur_sigma", 0.0)])
def test_a_detector_json_edited_to_another_valid_value_is_refused(setup, tmp_path, key, value):
    # each value passes check_info (a real block, a finite threshold, positive temperature): only the
    # settings hash recorded at export tells the edit from what export wrote
    import shutil

    tmp, weights, _, _ = setup
    folder = tmp_path / "detector"
    shutil.copytree(export(tmp, weights, "max"), folder)
    info = json.loads((folder / "detector.json").read_text())
    assert info[key] != value
    detector.Detector.load(folder, with_backbone=False)  # as exported: loads
    (folder / "detector.json").write_text(json.dumps({**info, key: value}, indent=2))
    with pytest.raises(detector.DetectorError, match="its settings were changed after export.*predict --threshold"):
        detector.Detector.load(folder, with_backbone=False)
    # re-serialised without an edit (another indent, key order): still the same settings
    (folder / "detector.json").write_text(json.dumps(dict(reversed(list(info.items())))))
    detector.Detector.load(folder, with_backbone=False)


def test_another_detectors_vectors_of_the_same_shape_are_refused(setup, tmp_path):
    import shutil

    tmp, weights, _, _ = setup
    folder = tmp_path / "detector"
    shutil.copytree(export(tmp, weights, "max"), folder)
    _, vectors = detector.read(folder)
    swapped = vectors.flip(0).contiguous()  # seed 1's guides under seed 0's name: same shape, all finite
    from safetensors.torch import save_file

    save_file({"vectors": swapped}, str(folder / "detector.safetensors"))
    with pytest.raises(detector.DetectorError, match="detector.safetensors: sha256 .* another export"):
        detector.Detector.load(folder, with_backbone=False)


def test_a_detector_exported_before_the_integrity_key_still_loads(setup, tmp_path):
    import shutil

    tmp, weights, _, _ = setup
    folder = tmp_path / "detector"
    shutil.copytree(export(tmp, weights, "max"), folder)
    info = json.loads((folder / "detector.json").read_text())
    assert set(info[detector.INTEGRITY]) == {"vectors_sha256", "settings_sha256"}
    del info[detector.INTEGRITY]
    info["threshold"] = 0.25  # unchecked: nothing records what it was
    (folder / "detector.json").write_text(json.dumps(info))
    assert detector.Detector.load(folder, with_backbone=False).threshold == 0.25
