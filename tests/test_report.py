"""report.py: paths that cannot leave their folder, JSON that is always JSON, files written whole."""

import json
import math

import pytest

from pipeline.evaluation import report
from pipeline.errors import NonFiniteError, PipelineError


@pytest.mark.parametrize("name", ["bottle", "pcb1", "metal_nut", "a b", "..x", "x..", "é"])
def test_report_path_joins_plain_names(tmp_path, name):
    path = report.report_path(tmp_path / "overlays", name, ".png")
    assert path == tmp_path / "overlays" / f"{name}.png"
    assert path.parent == tmp_path / "overlays"


@pytest.mark.parametrize("name", ["", ".", "..", "../../PWNED", "a/b", "/etc/passwd", "a\\b", "..\\x", "a\0b"])
def test_report_path_refuses_names_that_leave_or_blur_the_folder(tmp_path, name):
    with pytest.raises(PipelineError) as err:
        report.report_path(tmp_path / "overlays", name, ".png")
    assert isinstance(err.value, report.ReportError)
    assert repr(name) in str(err.value) and str(tmp_path / "overlays") in str(err.value)


@pytest.mark.parametrize("data, key", [
    ({"image_auroc": 0.5, "controls": {"no_sae": {"pixel_auroc": math.nan}}}, "controls.no_sae.pixel_auroc"),
    ({"final_terms": {"seed_0": {"focal": math.inf}}}, "final_terms.seed_0.focal"),
    ({"curve": [{"loss": 1.0}, {"loss": -math.inf}]}, "curve[1].loss"),
])
def test_write_json_refuses_non_finite_naming_file_and_key_and_keeps_the_old_file(tmp_path, data, key):
    path = tmp_path / "metrics.json"
    path.write_text('{"previous": 1}\n')
    with pytest.raises(NonFiniteError) as err:
        report.write_json(path, data)
    assert str(path) in str(err.value) and f"key {key} " in str(err.value)
    assert json.loads(path.read_text()) == {"previous": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left behind


def test_write_json_writes_strict_json_with_nulls(tmp_path):
    path = tmp_path / "deep" / "m.json"
    report.write_json(path, {"a": None, "b": [1, 2.5], "c": {"d": "x"}})
    assert path.read_text() == '{\n  "a": null,\n  "b": [\n    1,\n    2.5\n  ],\n  "c": {\n    "d": "x"\n  }\n}\n'


def test_write_csv_header_only_with_fieldnames_and_refuses_without(tmp_path):
    report.write_csv(tmp_path / "roc.csv", [], ["fpr", "tpr", "threshold"])
    assert (tmp_path / "roc.csv").read_bytes() == b"fpr,tpr,threshold\r\n"  # csv's own line ends, as before
    report.write_csv(tmp_path / "pr.csv", [{"recall": 0.0, "precision": 1.0, "threshold": None}])
    assert (tmp_path / "pr.csv").read_text().splitlines() == ["recall,precision,threshold", "0.0,1.0,"]
    with pytest.raises(ValueError, match="no rows to write"):
        report.write_csv(tmp_path / "x.csv", [])
    assert not (tmp_path / "x.csv").exists()


def test_write_bytes_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "f.png"
    path.write_bytes(b"old")
    report.write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    with pytest.raises(TypeError):
        report.write_bytes(path, object())  # fails while writing the temp file
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.png"]


def test_figures_render_to_png_bytes_with_an_undefined_curve():
    curves = {"image": {"roc": [], "pr": []},
              "pixel": {"roc": [{"fpr": 0.0, "tpr": 0.0}, {"fpr": 1.0, "tpr": 1.0}],
                        "pr": [{"recall": 1.0, "precision": 0.5}, {"recall": 0.0, "precision": 1.0}]}}
    data = report.png_bytes(report.roc_pr_figure(curves, "t"))
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
