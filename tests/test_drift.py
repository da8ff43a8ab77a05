"""pipeline.cli.drift: metrics against a commit's, within tolerances measured across CPU kernel paths."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.cli import drift


def test_tolerance_key_pools_within_a_signal_group_and_across_categories():
    assert drift.tolerance_key("reports/a_to_b/metrics.json", "pixel_ap") == "metrics.json:top:pixel_ap"
    assert drift.tolerance_key("reports/a_to_b/metrics.json", "fused.guides+batch.pixel_ap") == "metrics.json:fused:pixel_ap"
    assert drift.tolerance_key("reports/x/per_category.json", "metal.controls.untrained_init.image_auroc") == \
        "per_category.json:controls:image_auroc"
    assert drift.tolerance_key("reports/x/per_category.json", "metal.image_auroc") == "per_category.json:top:image_auroc"
    assert drift.tolerance_key("reports/synth_b/sae.json", "n_dead") == "sae.json:top:n_dead"


def _diff(**metrics):
    return {"reports/r/metrics.json": {k: {"old": o, "new": n} for k, (o, n) in metrics.items()}}


def test_within_and_beyond_the_tolerance_and_exact():
    diff = _diff(pixel_ap=(0.50, 0.52), image_auroc=(0.90, 0.95), threshold_rule=("aux_f1_max", "aux_f1_max"),
                 n_images=(75, 75))
    tol = {"metrics.json:top:pixel_ap": 0.03, "metrics.json:top:image_auroc": 0.01}
    rows = {r["key"]: r for r in drift.compare(diff, tol)}
    assert rows["pixel_ap"]["ok"] and rows["pixel_ap"]["abs_diff"] == pytest.approx(0.02)
    assert not rows["image_auroc"]["ok"] and rows["image_auroc"]["tolerance"] == 0.01
    assert rows["threshold_rule"]["ok"] and rows["threshold_rule"]["tolerance"] is None
    assert rows["n_images"]["ok"] and rows["n_images"]["tolerance"] == drift.FLOOR  # none measured: the floor
    exact = {r["key"]: r for r in drift.compare(diff, tol, exact=True)}
    assert not exact["pixel_ap"]["ok"] and exact["n_images"]["ok"]


def test_a_text_value_or_an_untolerated_number_that_changed_fails():
    rows = {r["key"]: r for r in drift.compare(_diff(rule=("a", "b"), n_dead=(543, 544)), {})}
    assert not rows["rule"]["ok"] and not rows["n_dead"]["ok"]


def test_a_metrics_file_missing_on_one_side_is_an_error_not_a_move():
    missing = {"reports/r/metrics.json": {"pixel_ap": {"old": 0.5, "new": None}, "image_auroc": {"old": 0.9, "new": None}}}
    with pytest.raises(drift.DriftError, match="reports/r/metrics.json: no metrics in the workspace"):
        drift.compare(missing, {})
    gone = {"reports/r/metrics.json": {"pixel_ap": {"old": None, "new": 0.5}}}
    with pytest.raises(drift.DriftError, match="revision compared with"):
        drift.compare(gone, {})


def test_summary_names_what_is_beyond_and_the_closest_calls():
    rows = drift.compare(_diff(pixel_ap=(0.50, 0.52), image_auroc=(0.90, 0.95)),
                         {"metrics.json:top:pixel_ap": 0.04, "metrics.json:top:image_auroc": 0.01})
    lines = drift.summary_lines(rows, "HEAD", exact=False)
    assert lines[0] == "2 metrics against HEAD: 2 moved, 1 beyond their tolerance"
    assert any(l.startswith("  BEYOND reports/r/metrics.json image_auroc: 0.9 -> 0.95") for l in lines)
    assert any("pixel_ap: |diff| 0.02 = 50% of 0.04" in l for l in lines)


def test_tolerance_file_is_checked(tmp_path):
    bad = tmp_path / "k.json"
    bad.write_text(json.dumps({"tolerance": {"metrics.json:top:pixel_ap": -1}}))
    with pytest.raises(drift.DriftError, match="finite numbers >= 0"):
        drift.load_tolerances(bad)
    with pytest.raises(drift.DriftError, match="benchmarks/kernel_paths.py"):
        drift.load_tolerances(tmp_path / "absent.json")
    good = tmp_path / "g.json"
    good.write_text(json.dumps({"tolerance": {"metrics.json:top:pixel_ap": 0.04}}))
    assert drift.load_tolerances(good) == {"metrics.json:top:pixel_ap": 0.04}


def test_the_committed_tolerances_cover_the_headline_metrics():
    tol = drift.load_tolerances(drift.TOLERANCES)
    for key in ("metrics.json:top:image_auroc", "metrics.json:top:pixel_ap", "metrics.json:top:pixel_aupro",
                "sae.json:top:fvu"):
        assert key in tol


def test_text_quoting_numbers_matches_once_they_are_masked_unless_exact():
    reason = "no image scores at or above the threshold {} (25 images)"
    diff = _diff(why=(reason.format("6.60918"), reason.format("6.69604")), rule=("aux_f1_max", "aux_f1"))
    rows = {r["key"]: r for r in drift.compare(diff, {})}
    assert rows["why"]["ok"] and not rows["rule"]["ok"]
    assert not {r["key"]: r for r in drift.compare(diff, {}, exact=True)}["why"]["ok"]


def test_a_count_on_one_side_only_is_zero_on_the_other():
    diff = {"reports/synth_b/atoms.json": {"kinds.mixed": {"old": 1, "new": None}, "kinds.silent": {"old": 5, "new": 5}}}
    rows = {r["key"]: r for r in drift.compare(diff, {"atoms.json:kinds:mixed": 1.0})}
    assert rows["kinds.mixed"]["ok"] and rows["kinds.mixed"]["abs_diff"] == 1.0
    rows = {r["key"]: r for r in drift.compare(diff, {})}
    assert not rows["kinds.mixed"]["ok"]
    mixed = {"reports/r/metrics.json": {"x": {"old": 1.0, "new": "n/a"}, "y": {"old": 1.0, "new": 1.0}}}
    assert not {r["key"]: r for r in drift.compare(mixed, {"metrics.json:top:x": 5.0})}["x"]["ok"]


def test_an_unknown_revision_or_no_repository_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(drift.DriftError, match="not inside of a DVC repository"):
        drift.main(["--exact"])
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], check=True)
    with pytest.raises(drift.DriftError, match="no DVC metrics to compare with HEAD"):
        drift.main(["--exact"])
    (tmp_path / "m.json").write_text('{"a": 1}')
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: 'true'\n    metrics:\n      - m.json:\n"
                                        "          cache: false\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "m"], check=True)
    with pytest.raises(drift.DriftError, match="unknown Git revision 'nosuchrev'"):
        drift.main(["--exact", "--rev", "nosuchrev"])
    assert drift.main(["--exact"]) == 0  # the committed metric, unchanged
    (tmp_path / "m.json").write_text('{"a": 2}')
    assert drift.main(["--exact"]) == 1


def _values(tp, fp, p):
    """F1, precision, recall of tp true and fp false alarms among p anomalous images, by hand."""
    return {"f1": 2 * tp / (p + tp + fp) if p else None, "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / p if p else None}


def test_one_image_apart_against_hand_counted_decisions():
    # 15 anomalous and 10 good images; nothing flagged -> one defect flagged: one image changed side
    assert drift.one_image_apart(_values(0, 0, 15), _values(1, 0, 15), 25, 15)
    assert drift.one_image_apart(_values(0, 0, 15), _values(0, 1, 15), 25, 15)  # a false alarm: precision 0
    assert drift.one_image_apart(_values(8, 0, 15), _values(8, 1, 15), 25, 15)
    assert drift.one_image_apart(_values(8, 0, 15), _values(8, 0, 15), 25, 15)
    # two images, or a defect swapped for a good image, is two changes of side
    assert not drift.one_image_apart(_values(0, 0, 15), _values(2, 0, 15), 25, 15)
    assert not drift.one_image_apart(_values(8, 0, 15), _values(7, 1, 15), 25, 15)
    # precision 0 hides how many false alarms there were: 3 of them, then a defect flagged too
    assert drift.one_image_apart(_values(0, 3, 15), _values(1, 3, 15), 25, 15)
    # values no counts can give (recall 0.5 of 15 images), or a false alarm in a category of defects only
    assert not drift.one_image_apart(_values(0, 0, 15), {"f1": 0.5, "precision": 1.0, "recall": 0.5}, 25, 15)
    assert not drift.one_image_apart(_values(8, 0, 15), _values(8, 1, 15), 15, 15)
    # an all-good category has no recall or F1: only its false alarms move
    assert drift.one_image_apart(_values(0, 0, 0), _values(0, 1, 0), 10, 0)


def _decision_diff(old_counts, new_counts, p=15, n=10, prefix="fused.guides+batch."):
    """A run's per_category.json and metrics.json diffs whose decisions come from these counts."""
    per, means = {}, {}
    for category, (a, b) in {c: (old_counts[c], new_counts[c]) for c in old_counts}.items():
        per[f"{category}.n_images"] = {"old": p + n, "new": p + n}
        per[f"{category}.n_anomalous"] = {"old": p, "new": p}
        va, vb = _values(*a, p), _values(*b, p)
        for which in ("f1", "precision", "recall"):
            per[f"{category}.{prefix}image_{which}_at_rule_threshold"] = {"old": va[which], "new": vb[which]}
    for which in ("f1", "precision", "recall"):
        side = {s: [v[f"{c}.{prefix}image_{which}_at_rule_threshold"][s] for c in old_counts
                    for v in [per]] for s in ("old", "new")}
        means[f"{prefix}image_{which}_at_rule_threshold"] = {
            s: (sum(x for x in xs if x is not None) / len([x for x in xs if x is not None])
                if any(x is not None for x in xs) else None) for s, xs in side.items()}
    reason = f"{prefix}null_reasons.image_precision_at_rule_threshold"
    means[reason] = {"old": "undefined in every category; grass: no image scores at or above the threshold 6.6",
                     "new": None}
    return {"reports/r/per_category.json": per, "reports/r/metrics.json": means}


def test_decisions_one_image_per_category_apart_pass_and_two_do_not():
    # what the held-out kernel path did: one image of one category crossed the rule threshold
    moved = drift.compare(_decision_diff({"grass": (0, 0), "gravel": (0, 0)}, {"grass": (1, 0), "gravel": (0, 0)}), {})
    assert all(r["ok"] for r in moved), [r for r in moved if not r["ok"]]
    by = {r["key"]: r["by"] for r in moved if r["file"].endswith("metrics.json")}
    assert by["fused.guides+batch.image_precision_at_rule_threshold"] == "one image per category"
    assert by["fused.guides+batch.null_reasons.image_precision_at_rule_threshold"] == "one image per category"
    lines = drift.summary_lines(moved, "HEAD", exact=False)
    assert lines[0].endswith("0 beyond their tolerance") and "one image per category apart" in lines[1]
    # two images in one category: that category and the run's mean fail; the other category passes
    rows = drift.compare(_decision_diff({"grass": (0, 0), "gravel": (0, 0)}, {"grass": (2, 0), "gravel": (0, 0)}), {})
    bad = {(r["file"], r["key"]) for r in rows if not r["ok"]}
    assert ("reports/r/per_category.json", "grass.fused.guides+batch.image_recall_at_rule_threshold") in bad
    assert ("reports/r/metrics.json", "fused.guides+batch.image_recall_at_rule_threshold") in bad
    assert not any(k.startswith("gravel.") for _, k in bad)
    # --exact takes no such excuse
    assert not all(r["ok"] for r in drift.compare(
        _decision_diff({"grass": (0, 0)}, {"grass": (1, 0)}), {}, exact=True))


def test_decisions_need_the_category_sizes_equal_on_both_sides():
    diff = _decision_diff({"grass": (0, 0)}, {"grass": (1, 0)})
    diff["reports/r/per_category.json"]["grass.n_anomalous"] = {"old": 15, "new": 16}
    rows = drift.compare(diff, {})
    assert not all(r["ok"] for r in rows if "rule_threshold" in r["key"])
    del diff["reports/r/per_category.json"]["grass.n_anomalous"]
    rows = drift.compare(diff, {})
    assert not all(r["ok"] for r in rows if "rule_threshold" in r["key"])


def test_float_rounding_below_the_floor_passes_and_a_count_does_not():
    # what another CPU did to a training-free baseline that no forced path had moved so far
    rows = {r["key"]: r for r in drift.compare(_diff(**{"baselines.mutual.pixel_ap": (0.6956363, 0.6956377),
                                                        "baselines.mutual.image_auroc": (0.9, 0.9001),
                                                        "n_images": (75, 76)}), {})}
    assert rows["baselines.mutual.pixel_ap"]["ok"]
    assert not rows["baselines.mutual.image_auroc"]["ok"] and not rows["n_images"]["ok"]
