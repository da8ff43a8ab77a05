"""Stages run as a user runs them (``python -m ...``): a user error is one ``error:`` line on stderr and
exit status 1; the traceback comes back with ``--verbose`` or ``PIPELINE_DEBUG=1``."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_module(module: str, args: list[str], debug: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PIPELINE_DEBUG", None)
    if debug:
        env["PIPELINE_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def fake_weights(tmp_path: Path) -> Path:
    """A weights file and the record the weights stage writes beside it (the bytes are never loaded:
    the errors below come before the model is built)."""
    weights = tmp_path / "dinov2_vits14.safetensors"
    weights.write_bytes(b"not really weights")
    record = {"backbone": "dinov2_vits14", "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
              "source": "test"}
    weights.with_suffix(".json").write_text(json.dumps(record))
    return weights


def extract_args(tmp_path: Path, params: dict | str, dataset: str = "ds") -> list[str]:
    path = tmp_path / "params.yaml"
    path.write_text(params if isinstance(params, str) else yaml.safe_dump(params))
    return ["--dataset", dataset, "--weights", str(fake_weights(tmp_path)), "--out", str(tmp_path / "out"),
            "--params", str(path)]


GOOD = {"datasets": {"ds": {"format": "mvtec", "root": "set-below"}}, "data": {"splits": ["test"]},
        "backbone": {"name": "dinov2_vits14", "image_size": 28}, "extract": {"device": "cpu"}}


def assert_one_error_line(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def params_with(tmp_path: Path) -> dict:
    """GOOD, a fresh copy, with a dataset root that does not exist."""
    params = json.loads(json.dumps(GOOD))
    params["datasets"]["ds"]["root"] = str(tmp_path / "no_such_dataset")
    return params


@pytest.mark.parametrize(
    "case, expected",
    [
        ("bad_key", ["backbone.layr: unknown key"]),
        ("unknown_dataset", ["--dataset 'nope' is not a key", "(known: ds)"]),
        ("missing_root", ["dataset root", "no_such_dataset does not exist"]),
        ("yaml_syntax", ["params.yaml, line", "YAML syntax error"]),
        ("bad_patch", ["backbone.image_size: 30 is not a multiple", "patch size 14"]),
    ],
)
def test_extract_user_errors_are_one_line(tmp_path, case, expected):
    dataset = "ds"
    params: dict | str = params_with(tmp_path)
    if case == "bad_key":
        params["backbone"]["layr"] = 3
    elif case == "unknown_dataset":
        dataset = "nope"
    elif case == "yaml_syntax":
        params = "datasets: {ds: [\n"
    elif case == "bad_patch":
        params["backbone"]["image_size"] = 30
    assert_one_error_line(run_module("pipeline.stages.extract", extract_args(tmp_path, params, dataset)),
                          *expected)


def test_weights_record_missing_is_one_line(tmp_path):
    args = extract_args(tmp_path, params_with(tmp_path))
    Path(args[args.index("--weights") + 1]).with_suffix(".json").unlink()
    assert_one_error_line(run_module("pipeline.stages.extract", args), "weights record not found")


@pytest.mark.parametrize("how", ["env", "flag"])
def test_debug_keeps_the_traceback(tmp_path, how):
    args = extract_args(tmp_path, params_with(tmp_path))
    result = run_module("pipeline.stages.extract", args + (["--verbose"] if how == "flag" else []),
                        debug=how == "env")
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "DatasetError: dataset root" in result.stderr


def test_preset_with_a_yaml_syntax_error_is_one_line(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("sae: {k: [\n")
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    result = run_module("pipeline.cli.preset", [str(preset), "--params", str(params), "--dry-run"])
    assert_one_error_line(result, "bad.yaml, line", "YAML syntax error")
    assert params.read_text() == (ROOT / "params.yaml").read_text()
