"""The export stage on a small hand-built store (tests/test_evaluate.make_store), and the dvc.yaml
artifact entries that make its output findable by `dvc artifacts get` / dvc.api.artifacts_show."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.method import detector
from pipeline.method import guides
from pipeline.method import sae
from pipeline.files import sha256_file
from pipeline.stages import export as export_stage
from tests.test_evaluate import ATTRS, D_IN, N_LATENTS, fingerprint, make_store
from tests.test_metrics import brute_f1_threshold

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    g = np.random.default_rng(0)
    dictionary = g.standard_normal((N_LATENTS, D_IN))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    aux = make_store(tmp / "aux", tmp / "aux_root", dictionary, ["a1", "a2"], [12, 10], [0.5, 0.4], 1)
    make_store(tmp / "normal_only", tmp / "n_root", dictionary, ["a1"], [6], [0.0], 2)
    model = sae.TopKSAE(D_IN, N_LATENTS, 4)
    with torch.no_grad():
        model.dictionary.copy_(torch.tensor(dictionary, dtype=torch.float32))
    provenance = {**ATTRS, "dataset": "aux"}
    sae.save(model, tmp / "sae", torch.zeros(N_LATENTS, dtype=torch.bool), extra={"features": provenance})
    codes = torch.tensor(g.random((3, 4, N_LATENTS)) * (g.random((3, 4, N_LATENTS)) < 0.4), dtype=torch.float32)
    training = {"variant": "l1", "guide_topk": 32, "init_mean": 0.1, "init_std": 0.01, "temperature": 0.1,
                "seeds": [3, 5, 8]}
    guides.save(tmp / "guides", codes, {"training": training, "features": provenance,
                                        "sae_sha256": sha256_file(tmp / "sae" / "sae.safetensors"),
                                        "aux_store": fingerprint(aux.attrs)})
    (tmp / "params.yaml").write_text(yaml.safe_dump({
        "scoring": {"image_score": "top_mean", "blur_sigma": 1.0, "top_fraction": 0.1},
        "evaluate": {"batch_images": 4, "device": "cpu"}}))
    return tmp, codes, torch.tensor(dictionary, dtype=torch.float32)


def export(tmp, features="aux", out="models/aux/detector", guides_dir="guides"):
    export_stage.main(["--features", str(tmp / features), "--sae", str(tmp / "sae"), "--guides", str(tmp / guides_dir),
                       "--weights", "models/backbones/dinov2_vits14.safetensors", "--out", str(tmp / out),
                       "--params", str(tmp / "params.yaml")])
    return tmp / out


def test_detector_files_follow_the_contract(setup):
    tmp, codes, dictionary = setup
    folder = export(tmp)
    assert sorted(p.name for p in folder.iterdir()) == ["atoms.safetensors", "detector.json", "detector.safetensors"]
    info, vectors = detector.read(folder)
    assert set(detector.REQUIRED) <= set(info) and info["format"] == "spg-detector/1"
    assert info["weights_path"] == "models/backbones/dinov2_vits14.safetensors"
    assert info["weights_sha256"] == "abc" and info["backbone"] == "dinov2_vits14" and info["layer"] == 12
    assert info["grid"] == [4, 4] and info["image_size"] == 16 and info["map_range"] == [0.0, 1.0]
    assert info["temperature"] == 0.1 and info["image_score"] == "top_mean" and info["top_fraction"] == 0.1
    assert info["seeds"] == [3, 5, 8] and info["threshold_rule"] == "aux_f1_max"
    assert info["sae_sha256"] == sha256_file(tmp / "sae" / "sae.safetensors")
    assert info["guides"]["sha256"] == sha256_file(tmp / "guides" / "guides.safetensors")
    assert info["aux"]["dataset"] == "aux" and info["aux"]["store"]["weights_sha256"] == "abc"
    # the decoded guides: c·D per seed, rows in guides.ROWS order
    assert vectors.shape == (3, 4, D_IN) and vectors.dtype == torch.float32
    torch.testing.assert_close(vectors, codes @ dictionary, rtol=0, atol=1e-6)
    # the atoms: exactly those with a non-zero code somewhere, their rows, and the codes on them
    from pipeline.method.atoms import DetectorAtoms

    atoms = DetectorAtoms.load(folder, vectors)
    used = [j for j in range(codes.shape[-1]) if (codes[..., j] != 0).any()]
    assert atoms.index.tolist() == used
    torch.testing.assert_close(atoms.dictionary, dictionary[used], rtol=0, atol=0)
    torch.testing.assert_close(atoms.codes, codes[..., used].float(), rtol=0, atol=0)


def test_threshold_is_the_f1_max_of_the_detectors_own_aux_scores(setup):
    """Independently of the stage's code path: the Detector scores the aux tokens, a brute force picks
    the threshold."""
    tmp, _, _ = setup
    folder = export(tmp)
    det = detector.Detector.load(folder, with_backbone=False)
    from pipeline.features import store

    aux = store.open_store(tmp / "aux")
    _, scores = det.maps_from_tokens(aux.tokens[:].astype(np.float32), aux.cls[:].astype(np.float32))
    labels = aux.labels[:]
    f1, threshold = brute_f1_threshold(labels, scores)
    assert det.threshold == pytest.approx(threshold, abs=1e-7)
    assert det.info["threshold_aux"]["image_f1"] == pytest.approx(f1)
    assert det.info["threshold_aux"]["n_images"] == 22 and det.info["threshold_aux"]["n_anomalous"] == int(labels.sum())


def test_aux_without_anomalies_is_refused_and_writes_nothing(setup):
    tmp, _, _ = setup
    from pipeline.features import store

    # guides "fitted" on the normal-only store, so provenance passes and the one-class check refuses
    codes, config = guides.load(tmp / "guides")
    normal = store.open_store(tmp / "normal_only")
    guides.save(tmp / "guides_normal", codes, {**{k: v for k, v in config.items() if k != "rows"},
                                               "aux_store": fingerprint(normal.attrs)})
    with pytest.raises(detector.DetectorError, match=r"normal_only: only one class \(0 anomalous, 6 normal images\)"):
        export(tmp, features="normal_only", out="none/detector", guides_dir="guides_normal")
    assert not (tmp / "none").exists()


def test_guides_of_another_sae_are_refused(setup):
    tmp, _, _ = setup
    saved = (tmp / "sae" / "sae.safetensors").read_bytes()
    model, dead, config = sae.load(tmp / "sae")
    try:
        with torch.no_grad():
            model.dictionary[0] = -model.dictionary[0]
        sae.save(model, tmp / "sae", dead, extra={"features": config["features"]})
        with pytest.raises(guides.GuidesError, match="re-run fit_guides"):
            export(tmp, out="other/detector")
    finally:
        (tmp / "sae" / "sae.safetensors").write_bytes(saved)
    assert not (tmp / "other").exists()


def test_dvc_yaml_declares_one_artifact_per_embedded_aux():
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    artifacts = dvc_yaml["artifacts"]
    auxes = sorted(params["aux_datasets"])  # the datasets export runs for
    assert sorted(artifacts) == [f"detector-{a}" for a in auxes]
    for a in auxes:
        entry = artifacts[f"detector-{a}"]
        assert entry["path"] == f"models/{a}/detector" and entry["type"] == "model" and entry["desc"]
        assert f"aux-{a}" in entry["labels"] and f"backbone-{params['backbone']['name']}" in entry["labels"]
        # the path is the export stage's output
        assert "models/${item}/detector" in dvc_yaml["stages"]["export"]["do"]["outs"]


def test_artifacts_show_finds_the_detector(tmp_path):
    """dvc.api.artifacts_show resolves a registered version (a GTO annotated tag) to the path."""
    import dvc.api

    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-C", str(tmp_path)]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True, timeout=120)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    subprocess.run([*git, "tag", "-a", "detector-synth_a@v0.1.0", "-m", "register"], check=True)
    found = dvc.api.artifacts_show("detector-synth_a", repo=str(tmp_path))
    assert found["path"] == "models/synth_a/detector"
