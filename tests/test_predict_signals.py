"""predict with the batch and with reference normals, on the real detector path (random-weight DINOv2
at 28 px, the stores and detector of tests/test_detector.py's fixture).

- ``--batch`` equals what the evaluate stage computed for ``guides+batch`` on the same category (maps
  to 1e-4, scores to 1e-5): evaluate reads tokens from the store, predict runs the backbone on the files.
- ``--normals`` equals a slow computation written out here: 1 − cos to the nearest reference patch by
  a loop, the guide probability's logit and both z-scored with numpy over the scored images.
- The thresholds: the references' rule (each against the others, at --far) and the batch rule
  (median + 3 · 1.4826 · MAD) against values worked from the scores.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from pipeline.cli import predict as P
from pipeline.cli import reference as reference_cli
from pipeline.evaluation import evaluate as evaluation
from pipeline.evaluation import metrics
from pipeline.features import store
from pipeline.method import detector, scoring
from pipeline.stages import evaluate as evaluate_stage
from tests.test_detector import export, setup  # noqa: F401  (setup is the module fixture)
from tests.test_reference import nearest_by_loop

ALPHA = slice(0, 7)  # the first category of the target store: 3 good then 4 anomalous images


def files_of(tmp, rows):
    target = store.open_store(tmp / "target")
    paths = target.attrs["paths"]
    return [tmp / "target_tree" / p for p in (paths[rows] if isinstance(rows, slice) else [paths[i] for i in rows])]


def planned(files):
    return [(f, (f.parent.name, f.name)) for f in files]


def maps_of(together, files, batch=3):
    class B:  # the one attribute the second pass's scorer reads
        def __init__(self, paths):
            self.paths = paths

    out = [together.scorer(B(files[i:i + batch])) for i in range(0, len(files), batch)]
    return np.concatenate([m for m, *_ in out]), np.concatenate([s for _, s, *_ in out])


def test_batch_mode_equals_evaluates_guides_plus_batch(setup, monkeypatch):  # noqa: F811
    tmp, weights, _, _ = setup
    folder = export(tmp, weights, "max")
    captured, original = {}, evaluation.fused_rows

    def spy(target, start, stop, *args, sink=None, **kwargs):
        def tee(row, maps):
            captured.setdefault(start, []).append((row, maps["guides+batch"].copy()))
            if sink is not None:
                sink(row, maps)
        result = original(target, start, stop, *args, sink=tee, **kwargs)
        captured[("scores", start)] = result["guides+batch"]["max"]
        return result

    monkeypatch.setattr(evaluation, "fused_rows", spy)
    evaluate_stage.main(["--target", str(tmp / "target"), "--aux", str(tmp / "aux"), "--sae", str(tmp / "sae"),
                         "--guides", str(tmp / "guides"), "--detector", str(folder), "--out", str(tmp / "rep_batch"),
                         "--params", str(tmp / "params_max.yaml")])
    monkeypatch.undo()
    want_maps = np.concatenate([m for _, m in sorted(captured[0], key=lambda c: c[0])])
    files = files_of(tmp, ALPHA)
    det = detector.Detector.load(folder)
    together = P.score_together(planned(files), det, None, P.Options(batch=True, batch_size=3), lambda *a: None)
    maps, scores = maps_of(together, files)
    assert maps.shape == want_maps.shape == (7, 28, 28)
    assert np.abs(maps - want_maps).max() <= 1e-4
    assert np.abs(scores - captured[("scores", 0)]).max() <= 1e-5
    assert together.names == ["guides", "batch"]
    # the batch rule, by hand from the scores
    median = np.median(scores)
    assert together.threshold["source"] == "batch"
    assert together.threshold["value"] == pytest.approx(median + 3 * 1.4826 * np.median(np.abs(scores - median)))


def by_hand(tmp, folder, normal_rows, scored_rows):
    """Fused maps of the scored rows against the normal rows' patches, from the store's tokens, and
    their image scores: the max of the reference distance's map alone, standardised (the decision
    leaves the guide out)."""
    target = store.open_store(tmp / "target")
    det = detector.Detector.load(folder, with_backbone=False)
    tokens = target.tokens[:].astype(np.float32)
    bank = tokens[normal_rows].reshape(-1, tokens.shape[-1])
    ref = np.stack([nearest_by_loop(tokens[i], bank) for i in scored_rows])
    vectors = {f"learned/{s}": det.vectors[i] for i, s in enumerate(det.seeds)}
    vectors["no_sae/0"] = det.vectors[0]
    guide = evaluation.guide_signals(target, 0, target.n_images, vectors, det.settings, 4, torch.device("cpu"))["guides"]
    p = np.clip(guide[scored_rows].astype(np.float64), 1e-6, 1 - 1e-6)
    z = lambda v: (v - v.mean()) / v.std()  # noqa: E731
    fused = (z(np.log(p) - np.log1p(-p)) + z(ref)) / 2
    maps_of = lambda v: scoring.patch_maps(torch.from_numpy(v).float(), det.grid, det.image_size,  # noqa: E731
                                           sigma=det.settings.blur_sigma)
    return maps_of(fused), maps_of(z(ref)).reshape(len(scored_rows), -1).max(axis=1)


def test_reference_mode_equals_the_slow_computation_and_sets_its_threshold_on_the_references(setup, tmp_path):  # noqa: F811
    tmp, weights, _, _ = setup
    folder = export(tmp, weights, "max")
    normal_rows, scored_rows = [0, 1], [2, 3, 4, 5, 6]
    det = detector.Detector.load(folder)
    opts = P.Options(reference_normals=tuple(map(str, files_of(tmp, normal_rows))), batch_size=2, far=0.0)
    reference = P.reference_of(det, opts, tmp_path / "out", lambda *a: None)
    files = files_of(tmp, scored_rows)
    together = P.score_together(planned(files), det, reference, opts, lambda *a: None)
    maps, scores = maps_of(together, files)
    want, want_scores = by_hand(tmp, folder, normal_rows, scored_rows)
    assert np.abs(maps - want).max() <= 1e-4
    assert np.abs(scores - want_scores).max() <= 1e-4
    # the threshold: each reference scored against the other's patches, on this run's scale; far 0
    # puts it just above the higher of the two
    th = together.threshold
    assert th["source"] == "reference" and th["n_normals"] == 2 and th["n_normals_flagged"] == 0
    assert th["value"] == np.nextafter(th["normal_score_range"][1], np.inf)
    assert together.names == ["guides", "reference"]


def test_the_command_with_normals_and_batch_and_a_saved_reference(setup, tmp_path):  # noqa: F811
    tmp, weights, _, _ = setup
    folder = export(tmp, weights, "max")
    normals = [str(f) for f in files_of(tmp, [0, 1])]
    inputs = [str(f) for f in files_of(tmp, slice(2, 7))]
    P.main([*inputs, "--detector", str(folder), "--out", str(tmp_path / "a"), "--normals", *normals, "--batch",
            "--batch-size", "2"])
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["signals"] == ["guides", "reference", "batch"] and summary["threshold"]["source"] == "reference"
    rows = list(csv.DictReader((tmp_path / "a" / "scores.csv").open()))
    assert [r["path"] for r in rows] == inputs
    assert all((r["decision"] == "anomalous") == (float(r["score"]) >= summary["threshold"]["value"]) for r in rows)
    # a detector that carries the reference scores the same without --normals
    reference_cli.main(["--detector", str(folder), "--normals", *normals, "--out", str(tmp_path / "line")])
    P.main([*inputs, "--detector", str(tmp_path / "line"), "--out", str(tmp_path / "b"), "--batch",
            "--batch-size", "2"])
    again = list(csv.DictReader((tmp_path / "b" / "scores.csv").open()))
    assert [float(r["score"]) for r in again] == pytest.approx([float(r["score"]) for r in rows], abs=1e-6)
    # a bank subsampled to 3 of the 2 x 4 = 8 reference patches (a 2 x 2 grid at 28 px) says so
    P.main([*inputs, "--detector", str(folder), "--out", str(tmp_path / "c"), "--normals", *normals,
            "--max-patches", "3"])
    small = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert small["threshold"]["reference"]["n_patches"] == 3
    with pytest.raises(P.PredictError, match="not both"):
        P.main([*inputs, "--detector", str(folder), "--out", str(tmp_path / "d"), "--normals", *normals,
                "--threshold-from-normals", *normals])


def test_evaluates_few_shot_rule_decides_as_predict_with_the_same_references(setup):  # noqa: F811
    tmp, weights, _, _ = setup
    folder = export(tmp, weights, "max")
    normal_rows, scored_rows = [0, 1], [2, 3, 4, 5, 6]
    det = detector.Detector.load(folder)
    opts = P.Options(reference_normals=tuple(map(str, files_of(tmp, normal_rows))), batch_size=2, far=0.01)
    files = files_of(tmp, scored_rows)
    together = P.score_together(planned(files), det, P.reference_of(det, opts, tmp / "nowhere", lambda *a: None),
                                opts, lambda *a: None)
    # evaluate's side, from the store: the reference distances of the scored rows (NaN on the references)
    target = store.open_store(tmp / "target")
    tokens = target.tokens[:7].astype(np.float32)
    bank = tokens[normal_rows].reshape(-1, tokens.shape[-1])
    reference = np.full((1, 7, tokens.shape[1]), np.nan, dtype=np.float32)
    for i in scored_rows:
        reference[0, i] = nearest_by_loop(tokens[i], bank)
    vectors = {f"learned/{s}": det.vectors[i] for i, s in enumerate(det.seeds)}
    vectors["no_sae/0"] = det.vectors[0]
    signals = evaluation.guide_signals(target, 0, 7, vectors, det.settings, 4, torch.device("cpu"))
    labels = target.labels[:7].astype(np.int64)
    got = evaluation.few_shot_metrics(labels, target.masks[:7], signals, reference, None, det.grid, det.settings,
                                      tokens_of=lambda rows: tokens[rows])["guides+reference"][0]
    want = metrics.at_threshold(labels[scored_rows], together.scores, together.threshold["value"],
                                keys=metrics.RULE_KEYS)
    for key in metrics.RULE_KEYS:
        assert got[key] == pytest.approx(want[key]), key
    # and with one reference there is no rule: null with the reason
    one = reference.copy()
    one[0, 1] = one[0, 2]
    single = evaluation.few_shot_metrics(labels, target.masks[:7], signals, one, None, det.grid, det.settings,
                                         tokens_of=lambda rows: tokens[rows])["guides+reference"][0]
    assert single["image_f1_at_rule_threshold"] is None
    assert "one reference image" in single["null_reasons"]["image_f1_at_rule_threshold"]
