"""pipeline.cli.results: tables from hand-written reports, clear errors, and the committed docs equal
what the committed reports give."""

import json
from pathlib import Path

from pipeline.cli import results

ROOT = Path(__file__).resolve().parent.parent


def write_run(reports: Path, name: str, **metrics) -> None:
    (reports / name).mkdir(parents=True)
    (reports / name / "metrics.json").write_text(json.dumps(metrics))


def test_the_headline_table_of_two_hand_written_runs(tmp_path):
    reports = tmp_path / "reports"
    write_run(reports, "a_to_b", aux="a", target="b", image_auroc=0.9, pixel_auroc=0.8, pixel_aupro=0.5,
              baselines={"mutual": {"image_auroc": 0.95, "pixel_auroc": 0.9, "pixel_aupro": 0.6}},
              fused={"guides+batch": {"image_auroc": 0.97, "pixel_auroc": 0.92, "pixel_aupro": 0.7}})
    write_run(reports, "a_to_c", aux="a", target="c", image_auroc=None, pixel_auroc=0.6, pixel_aupro=0.3,
              baselines={"mutual": {"image_auroc": None, "pixel_auroc": 0.7, "pixel_aupro": 0.4}})
    got = results.table(results.load_runs(reports), results.HEADLINE).splitlines()
    assert got[2] == "| a_to_b (a → b) | 0.900 | 0.800 | 0.500 | 0.950 | 0.900 | 0.600 | 0.970 | 0.920 | 0.700 |"
    assert got[3] == "| a_to_c (a → c) | – | 0.600 | 0.300 | – | 0.700 | 0.400 | – | – | – |"
    # means over the runs where a value is defined: (0.8 + 0.6) / 2 = 0.7, image AUROC only a_to_b's
    assert got[4] == ("| **mean over the runs where defined** | 0.900 | 0.700 | 0.400 | 0.950 | 0.800 | 0.500 "
                      "| 0.970 | 0.920 | 0.700 |")


def test_the_tiled_section_lists_only_the_runs_that_measured_it(tmp_path):
    reports = tmp_path / "reports"
    write_run(reports, "a_to_b", aux="a", target="b", image_auroc=0.9, pixel_auroc=0.8, pixel_aupro=0.5)
    write_run(reports, "a_to_c", aux="a", target="c", image_auroc=0.7, pixel_auroc=0.6, pixel_aupro=0.3, tiled={
        "tile": 224, "n_images": 10, "n_tiled": 8, "tiles_per_tiled_image": 10.0,
        "seconds_per_image": {"resized": 0.1, "tiled": 0.85},
        "resized": {"image_auroc": 0.7, "pixel_auroc": 0.6, "pixel_aupro": 0.3},
        "tiled": {"image_auroc": 0.65, "pixel_auroc": 0.8, "pixel_aupro": None}})
    page = results.render(results.load_runs(reports))
    section = page.split("## Large images: whole and tiled\n")[1].split("\n## ")[0]
    assert "a_to_c: 224 px tiles, 8 of 10 images tiled (10.0 tiles each), 0.10 s an image resized and 0.85 s tiled." \
        in section
    rows = [line for line in section.splitlines() if line.startswith("| a_")]
    assert rows == ["| a_to_c (a → c) | 0.700 | 0.600 | 0.300 | 0.650 | 0.800 | – |"]
    assert "whole and tiled" not in results.render({"a_to_b": results.load_runs(reports)["a_to_b"]})
    assert "the batch signal" not in section  # that run measured no batch paths


def test_the_tiled_batch_table_lists_the_runs_with_the_batch_paths(tmp_path):
    reports = tmp_path / "reports"
    paths = {p: {"image_auroc": 0.1 * i, "pixel_auroc": 0.5 + 0.1 * i, "pixel_aupro": 0.2 + 0.1 * i}
             for i, p in enumerate(("resized", "tiled", "batch", "resized+batch", "tiled+batch"), start=1)}
    write_run(reports, "a_to_c", aux="a", target="c", image_auroc=0.7, pixel_auroc=0.6, pixel_aupro=0.3, tiled={
        "tile": 224, "n_images": 10, "n_tiled": 8, "tiles_per_tiled_image": 10.0, **paths})
    section = results.render(results.load_runs(reports)).split("## Large images: whole and tiled\n")[1]
    section = section.split("\n## ")[0]
    assert "| batch I-AUROC | batch P-AUROC | batch AUPRO | resized+batch I-AUROC" in section
    rows = [line for line in section.splitlines() if line.startswith("| a_")]
    assert rows == ["| a_to_c (a → c) | 0.100 | 0.600 | 0.300 | 0.200 | 0.700 | 0.400 |",
                    "| a_to_c (a → c) | 0.300 | 0.800 | 0.500 | 0.400 | 0.900 | 0.600 | 0.500 | 1.000 | 0.700 |"]


def test_readme_block_is_replaced_and_check_reports_stale_files(tmp_path, capsys):
    reports = tmp_path / "reports"
    write_run(reports, "a_to_b", aux="a", target="b", image_auroc=0.5, pixel_auroc=0.5, pixel_aupro=0.5)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results.BEGIN}\nold numbers\n{results.END}\noutro\n")
    out = tmp_path / "results.md"
    args = ["--reports", str(reports), "--out", str(out), "--readme", str(readme)]
    assert results.main([*args, "--check"]) == 1
    assert "differs from what the reports" in capsys.readouterr().err
    assert results.main(args) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old numbers" not in text
    assert "| a_to_b (a → b) | 0.500 |" in text and out.read_text().startswith("# Results")
    assert results.main([*args, "--check"]) == 0
    (reports / "a_to_b" / "metrics.json").write_text(json.dumps({"image_auroc": 0.6, "pixel_auroc": 0.5,
                                                                 "pixel_aupro": 0.5}))
    assert results.main([*args, "--check"]) == 1  # a changed report makes the docs stale


def test_garbled_or_missing_reports_are_clear_errors(tmp_path, capsys):
    assert results.main(["--reports", str(tmp_path), "--readme", ""]) == 2
    assert "no <run>/metrics.json" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.json").write_text("{not json")
    assert results.main(["--reports", str(tmp_path), "--readme", ""]) == 2
    assert "not a readable metrics.json" in capsys.readouterr().err


def test_the_committed_docs_equal_what_the_committed_reports_give():
    assert results.main(["--reports", str(ROOT / "reports"), "--out", str(ROOT / "docs" / "results.md"),
                         "--readme", str(ROOT / "README.md"), "--check"]) == 0


def test_the_atoms_table_of_a_hand_written_atoms_json(tmp_path):
    reports = tmp_path / "reports"
    write_run(reports, "a_to_b", aux="a", target="b", image_auroc=0.5, pixel_auroc=0.5, pixel_aupro=0.5)
    (reports / "a" / "atoms.json").parent.mkdir(parents=True)
    (reports / "a" / "atoms.json").write_text(json.dumps({
        "active_atoms": [{"anomaly_local": 100, "normal_local": 10}, {"anomaly_local": 200, "normal_local": 30}],
        "concentration": {"per_seed": [{"top_1": 0.1, "top_5": 0.2, "top_10": 0.3, "top_50": 0.6},
                                       {"top_1": 0.3, "top_5": 0.4, "top_10": 0.5, "top_50": 0.8}]},
        "kinds": {"specific": 3, "mixed": 1}}))
    rendered = results.render(results.load_runs(reports), results.load_atoms(reports))
    assert "| a | 150 | 20 | 0.200 | 0.300 | 0.400 | 0.700 | 3 / 0 / 1 / 0 |" in rendered.splitlines()
    assert "Atoms behind the score" not in results.render(results.load_runs(reports), {})
