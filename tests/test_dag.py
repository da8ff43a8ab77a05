"""Which stages the DAG holds: train_sae and fit_guides exist only for the datasets in
``aux_datasets``; a dataset that is only a target gets extract and evaluate, nothing more.

The stage list is DVC's own (`dvc stage list` in a temporary git + DVC repository holding copies of
the repository's dvc.yaml and params.yaml), so the test sees what `dvc repro` would run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_params, parse

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo(tmp_path):
    """A git + DVC repository with the project's dvc.yaml and params.yaml (nothing else is needed to
    list stages)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_CONFIG_NOSYSTEM": "1"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, env=env, timeout=60)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True, env=env, timeout=120)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def stage_list(repo: Path) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], cwd=repo,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_a_target_only_dataset_adds_one_extract_one_normals_one_neighbours_and_one_evaluate(repo):
    before = stage_list(repo)
    # the repository's own DAG: every aux has its SAE and guides, and nothing else does
    params = load_params(repo / "params.yaml")
    fitted = {s.split("@")[1] for s in before if s.split("@")[0] in ("train_sae", "fit_guides")}
    assert fitted == {r.aux for r in params.runs.values()} == set(params.aux_datasets)

    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["datasets"]["line7"] = {"format": "folder", "root": "data/line7"}
    raw["runs"]["synth_a_to_line7"] = {"aux": "synth_a", "target": "line7"}
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    load_params(repo / "params.yaml")  # the new params are valid as they stand (line7 is no aux)

    after = stage_list(repo)
    assert len(after) == len(set(after))  # no stage twice
    assert sorted(set(after) - set(before)) == ["evaluate@synth_a_to_line7", "extract@line7", "neighbours@line7", "normals@line7"]
    assert set(before) <= set(after)


def test_a_second_run_sharing_an_aux_adds_no_fitting_stage(repo):
    """Two runs with one aux: still one train_sae and one fit_guides for it (iterating over runs
    would have made two)."""
    before = stage_list(repo)
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["datasets"]["line7"] = {"format": "folder", "root": "data/line7"}
    raw["runs"]["synth_b_to_line7"] = {"aux": "synth_b", "target": "line7"}
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    after = stage_list(repo)
    assert sorted(set(after) - set(before)) == ["evaluate@synth_b_to_line7", "extract@line7", "neighbours@line7", "normals@line7"]
    assert [s for s in after if s.startswith("train_sae@")] == ["train_sae@synth_a", "train_sae@synth_b"]


def test_a_run_whose_aux_is_not_in_aux_datasets_is_a_config_error_naming_it():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["datasets"]["line7"] = {"format": "folder", "root": "data/line7"}
    raw["runs"]["line7_to_synth_a"] = {"aux": "line7", "target": "synth_a"}
    with pytest.raises(ConfigError) as err:
        parse(raw)
    assert str(err.value) == ("runs.line7_to_synth_a.aux: 'line7' is not listed in aux_datasets (listed: "
                              "synth_a, synth_b); add it (aux_datasets: [synth_a, synth_b, line7]) so that "
                              "its train_sae and fit_guides stages exist")
