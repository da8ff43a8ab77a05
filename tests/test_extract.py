"""The extract stage end to end on a tiny tree with random weights: contract, resume after a hard
kill at several points, and torchrun with 2 gloo processes equal to one process."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from pipeline.features import backbones
from pipeline.features import store
from pipeline.data.images import DatasetError, load_image, load_mask
from pipeline.data.tables import load_table
from pipeline.features.extract import WeightsError
from pipeline.stages import extract as extract_stage
from pipeline.stages import normals as normals_stage

ROOT = Path(__file__).resolve().parents[1]
ARRAYS = ("tokens", "cls", "masks", "labels", "category", "defect")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tree of 14 test images, random DINOv2-S/14 weights (as the weights stage writes them), params."""
    from tests.conftest import make_mvtec_tree

    tmp = tmp_path_factory.mktemp("extract")
    tree = make_mvtec_tree(tmp / "tree", n_good=3, n_bad=4)
    torch.manual_seed(0)
    native = timm.create_model("vit_small_patch14_dinov2", pretrained=False)
    save_file(native.state_dict(), tmp / "random.safetensors")
    record = backbones.materialize_weights("dinov2_vits14", str(tmp / "random.safetensors"), tmp / "weights")
    params = {
        "datasets": {"tiny": {"format": "mvtec", "root": str(tree)}},
        "data": {"splits": ["test"]},
        "backbone": {"name": "dinov2_vits14", "layer": -1, "image_size": 28},
        "extract": {"batch_size": 2, "chunk_images": 3, "num_workers": 1, "device": "cpu"},
    }
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp, tree, record


def stage_args(tmp, out):
    return ["--dataset", "tiny", "--weights", str(tmp / "weights" / "dinov2_vits14.safetensors"),
            "--out", str(out), "--params", str(tmp / "params.yaml")]


def run_child(tmp, out, crash="none", wait=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "tests" / "extract_worker.py"), crash, "--", *stage_args(tmp, out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        output, _ = proc.communicate(timeout=300)
        return proc.returncode, output
    return proc


@pytest.fixture(scope="module")
def reference(setup):
    tmp, _, _ = setup
    out = tmp / "reference"
    extract_stage.main(stage_args(tmp, out))
    return store.open_store(out)


def assert_same_store(path, reference):
    got = store.open_store(path)
    for name in ARRAYS:
        np.testing.assert_array_equal(got.group[name][:], reference.group[name][:], err_msg=name)
    assert got.attrs == reference.attrs


def test_store_follows_the_contract(setup, reference):
    tmp, tree, record = setup
    samples = load_table("mvtec", tree)
    attrs = reference.attrs
    assert attrs["complete"] is True and attrs["schema"] == store.SCHEMA
    assert attrs["backbone"] == "dinov2_vits14" and attrs["layer"] == 12 and attrs["image_size"] == 28
    assert attrs["grid"] == [2, 2] and attrs["weights_sha256"] == record["sha256"]
    assert attrs["paths"] == [s.relpath for s in samples] and attrs["categories"] == ["alpha", "beta"]
    n = len(samples)
    assert reference.tokens.shape == (n, 4, 384) and reference.tokens.dtype == np.float16
    assert reference.tokens.chunks == (3, 4, 384) and reference.cls.shape == (n, 384)
    assert reference.masks.shape == (n, 28, 28) and reference.masks.dtype == np.uint8
    np.testing.assert_array_equal(reference.labels[:], [s.label for s in samples])
    np.testing.assert_array_equal(reference.category[:], [attrs["categories"].index(s.category) for s in samples])
    # masks: nearest-resized ground truth; normal images all zero
    for i, s in enumerate(samples):
        expected = load_mask(s.mask, load_image(s.image).size, resize_to=28)
        np.testing.assert_array_equal(reference.masks[i], expected)
    # tokens are the backbone's output on the preprocessed image, stored in fp16
    bb = backbones.create_backbone("dinov2_vits14", image_size=28, weights=tmp / "weights" / "dinov2_vits14.safetensors")
    x = torch.stack([backbones.image_transform(bb)(load_image(s.image)) for s in samples[:2]])
    with torch.inference_mode():
        tokens, cls = bb(x)
    np.testing.assert_allclose(reference.tokens[:2].astype(np.float32), tokens.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(reference.cls[:2].astype(np.float32), cls.numpy(), rtol=2e-3, atol=2e-3)


def test_reader_refuses_other_config(setup, reference):
    with pytest.raises(store.StoreError, match="attr 'image_size'"):
        store.open_store(reference.path, expect={"backbone": "dinov2_vits14", "image_size": 56})


def test_rerun_of_complete_store_writes_nothing(setup, reference):
    tmp, _, _ = setup
    before = {p: p.stat().st_mtime_ns for p in reference.path.rglob("*") if p.is_file()}
    extract_stage.main(stage_args(tmp, reference.path))
    after = {p: p.stat().st_mtime_ns for p in reference.path.rglob("*") if p.is_file()}
    assert before == after


@pytest.mark.parametrize("crash", ["after:1", "inside:2", "after:4"])
def test_killed_run_resumes_to_the_same_store(setup, reference, crash):
    tmp, _, _ = setup
    out = tmp / f"crash-{crash.replace(':', '-')}"
    code, output = run_child(tmp, out, crash)
    assert code == 137, output
    with pytest.raises(store.StoreError, match="incomplete"):
        store.open_store(out)
    code, output = run_child(tmp, out)
    assert code == 0, output
    done_before = int(crash.split(":")[1])
    assert f"resuming, {done_before} of 5 chunks already written" in output
    assert_same_store(out, reference)


def test_sigkill_at_a_random_moment_resumes(setup, reference):
    tmp, _, _ = setup
    out = tmp / "sigkill"
    proc = run_child(tmp, out, wait=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((out / "_done" / "c").glob("*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    code, output = run_child(tmp, out)
    assert code == 0, output
    assert_same_store(out, reference)


def test_changed_images_restart_the_store(setup, reference, tmp_path):
    tmp, tree, _ = setup
    out = tmp_path / "store"
    extract_stage.main(stage_args(tmp, out))
    victim = tree / "alpha" / "test" / "good" / "000.png"
    original = victim.read_bytes()
    try:
        img = np.asarray(load_image(victim)).copy()
        img[0, 0] ^= 255
        from PIL import Image

        Image.fromarray(img).save(victim)
        extract_stage.main(stage_args(tmp, out))
        changed = store.open_store(out)
        assert changed.attrs["inputs_sha256"] != reference.attrs["inputs_sha256"]
    finally:
        victim.write_bytes(original)


def test_torchrun_two_ranks_equal_one_process(setup, reference):
    tmp, _, _ = setup
    out = tmp / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline.stages.extract", *stage_args(tmp, out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[rank 1]" in result.stderr  # both ranks really ran
    assert_same_store(out, reference)


def test_weights_record_mismatch_is_refused(setup, tmp_path):
    tmp, _, _ = setup
    weights = tmp_path / "dinov2_vits14.safetensors"
    weights.write_bytes((tmp / "weights" / "dinov2_vits14.safetensors").read_bytes())
    record = json.loads((tmp / "weights" / "dinov2_vits14.json").read_text())
    (tmp_path / "dinov2_vits14.json").write_text(json.dumps({**record, "sha256": "0" * 64}))
    args = stage_args(tmp, tmp_path / "out")
    args[args.index("--weights") + 1] = str(weights)
    with pytest.raises(WeightsError, match="sha256"):
        extract_stage.main(args)


def _tree_with_empty_mask(setup, tmp_path, allow_empty):
    tmp, tree, _ = setup
    copy = tmp_path / "tree"
    shutil.copytree(tree, copy)
    victim = copy / "beta" / "ground_truth" / "scratch" / "002_mask.png"
    Image.new("L", Image.open(victim).size, 0).save(victim)
    params = yaml.safe_load((tmp / "params.yaml").read_text())
    params["datasets"]["tiny"]["root"] = str(copy)
    params["data"]["allow_empty_masks"] = allow_empty
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = stage_args(tmp, tmp_path / "out")
    args[args.index("--params") + 1] = str(tmp_path / "params.yaml")
    return args


def test_empty_mask_is_refused_at_extract_in_one_line(setup, tmp_path):
    """Raised in a DataLoader worker (num_workers 1): the message is the loader's own, not torch's
    "Caught DatasetError in DataLoader worker process 0" with the worker's traceback in it."""
    with pytest.raises(DatasetError) as err:
        extract_stage.main(_tree_with_empty_mask(setup, tmp_path, allow_empty=False))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("mask ") and "002_mask.png of an anomalous image is empty" in msg


def test_allowed_empty_mask_is_extracted_and_logged(setup, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.features.extract"):
        extract_stage.main(_tree_with_empty_mask(setup, tmp_path, allow_empty=True))
    got = store.open_store(tmp_path / "out")
    i = got.attrs["paths"].index("beta/test/scratch/002.png")
    assert got.group["labels"][i] == 1 and not got.group["masks"][i].any()
    assert "1 anomalous image(s) have no anomalous pixel at 28x28" in caplog.text
    assert "beta/test/scratch/002.png" in caplog.text


# ------------------------------------------------------------------------------------------------
# --out that this pipeline did not write is refused and left as it was.


def _snapshot(path):
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def test_out_folder_with_a_users_file_is_refused_in_one_line(setup, tmp_path):
    tmp, _, _ = setup
    out = tmp_path / "some" / "folder"
    out.mkdir(parents=True)
    (out / "NOTES.txt").write_text("mine")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "pipeline.stages.extract", *stage_args(tmp, out)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "NOTES.txt" in last and "1 entry" in last, result.stderr[-3000:]
    assert _snapshot(out) == {"NOTES.txt": b"mine"}


def test_out_equal_to_the_dataset_root_is_refused(setup, tmp_path):
    tmp, tree, _ = setup
    root = tmp_path / "tree"
    shutil.copytree(tree, root)
    params = yaml.safe_load((tmp / "params.yaml").read_text())
    params["datasets"]["tiny"]["root"] = str(root)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    before = _snapshot(root)
    args = stage_args(tmp, root)
    args[args.index("--params") + 1] = str(tmp_path / "params.yaml")
    with pytest.raises(store.StoreError, match=r"not a feature store.*alpha, beta"):
        extract_stage.main(args)
    assert _snapshot(root) == before


def test_empty_out_folder_is_used(setup, reference, tmp_path):
    tmp, _, _ = setup
    (tmp_path / "out").mkdir()
    extract_stage.main(stage_args(tmp, tmp_path / "out"))
    assert_same_store(tmp_path / "out", reference)


# ------------------------------------------------------------------------------------------------
# a folder target with labels but no masks extracts and evaluates (image metrics only)


def _labels_only_target(setup, tmp_path, categories, without_masks):
    """Extract a folder tree whose categories ``without_masks`` have no ground_truth/ folder."""
    from tests.conftest import make_mvtec_tree

    tmp, _, _ = setup
    root = make_mvtec_tree(tmp_path / "line", categories=categories, n_good=3, n_bad=4, seed=1)
    for category in without_masks:
        shutil.rmtree(root / category / "ground_truth")
    params = yaml.safe_load((tmp / "params.yaml").read_text())
    params["datasets"] = {"line": {"format": "folder", "root": str(root)}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "features"
    extract_stage.main(["--dataset", "line", "--weights", str(tmp / "weights" / "dinov2_vits14.safetensors"),
                        "--out", str(out), "--params", str(tmp_path / "params.yaml")])
    return store.open_store(out)


def _fitted_on(reference, tmp_path):
    """A seeded random SAE and guide codes recorded as fitted on ``reference`` (the aux store), as
    fit_guides writes them: evaluate checks the provenance, not the quality."""
    from pipeline.method import guides
    from pipeline.method import sae
    from pipeline.files import sha256_file

    torch.manual_seed(0)
    d, n_latents = reference.tokens.shape[-1], 64
    model = sae.TopKSAE(d, n_latents, 8)
    provenance = {k: reference.attrs[k] for k in ("backbone", "weights_sha256", "layer", "image_size", "dataset")}
    sae.save(model, tmp_path / "sae", torch.zeros(n_latents, dtype=torch.bool), extra={"features": provenance})
    training = {"variant": "l1", "guide_topk": 8, "init_mean": 0.1, "init_std": 0.01, "temperature": 0.07, "seeds": [0]}
    codes = torch.rand(1, 4, n_latents, generator=torch.Generator().manual_seed(0))
    guides.save(tmp_path / "guides", codes, {"training": training, "features": provenance,
                                             "sae_sha256": sha256_file(tmp_path / "sae" / "sae.safetensors"),
                                             "aux_store": guides.store_fingerprint(reference.attrs)})
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({"scoring": {"blur_sigma": 1.0},
                                                      "evaluate": {"device": "cpu", "overlays_per_category": 2}}))


def _evaluate(reference, target, tmp_path):
    """export (the detector evaluate scores through), then evaluate, as dvc.yaml runs them."""
    from pipeline.stages import evaluate as evaluate_stage
    from pipeline.stages import export as export_stage

    out, detector = tmp_path / "report", tmp_path / "detector"
    fitted = ["--sae", str(tmp_path / "sae"), "--guides", str(tmp_path / "guides"),
              "--params", str(tmp_path / "eval.yaml")]
    export_stage.main(["--features", str(reference.path), "--weights", str(tmp_path / "unused.safetensors"),
                       "--out", str(detector), *fitted])
    evaluate_stage.main(["--target", str(target.path), "--aux", str(reference.path), "--detector", str(detector),
                         "--out", str(out), *fitted])
    return (json.loads((out / "metrics.json").read_text()), json.loads((out / "per_category.json").read_text()), out)


def test_a_target_without_masks_extracts_and_evaluates_to_image_metrics_only(setup, reference, tmp_path):
    target = _labels_only_target(setup, tmp_path, ("line",), ("line",))
    assert target.attrs["categories_without_masks"] == ["line"]
    labels = target.labels[:]
    assert labels.sum() == 4 and len(labels) == 7  # anomalous by their folder, with no mask file
    assert not target.masks[:].any()  # stored as zeros, which the attr says are no ground truth
    _fitted_on(reference, tmp_path)
    result, per_category, out = _evaluate(reference, target, tmp_path)
    for key in ("image_auroc", "image_ap", "image_f1_max"):
        assert 0.0 <= result[key] <= 1.0 and per_category["line"][key] == result[key], key
    for key in ("pixel_auroc", "pixel_ap", "pixel_aupro"):
        assert result[key] is None and per_category["line"][key] is None, key
        assert per_category["line"]["null_reasons"][key] == "the target has no masks (labels only)"
        assert result["null_reasons"][key] == "undefined in every category; line: the target has no masks (labels only)"
    assert result["null_reasons"]["pixel_curves"] == ("plots/pixel_roc.csv and plots/pixel_pr.csv are empty: "
                                                     "the target has no masks (labels only)")
    assert (out / "plots" / "pixel_roc.csv").read_text().splitlines() == ["fpr,tpr,threshold"]
    assert (out / "plots" / "pixel_pr.csv").read_text().splitlines() == ["recall,precision,threshold"]
    assert len((out / "plots" / "image_roc.csv").read_text().splitlines()) > 2


def test_a_category_without_masks_stays_out_of_the_pixel_metrics(setup, reference, tmp_path):
    """One category with masks, one without: pixel metrics come from the first alone (the second's
    zero masks counted as normal pixels would change them)."""
    target = _labels_only_target(setup, tmp_path, ("line", "press"), ("line",))
    assert target.attrs["categories_without_masks"] == ["line"]
    _fitted_on(reference, tmp_path)
    result, per_category, out = _evaluate(reference, target, tmp_path)
    assert per_category["line"]["pixel_auroc"] is None and per_category["press"]["pixel_auroc"] is not None
    assert result["pixel_auroc"] == per_category["press"]["pixel_auroc"]
    assert "pixel_curves" not in result.get("null_reasons", {})
    # the pooled pixel curve is press's alone (every pixel is sampled at this size): at the lowest
    # threshold every pixel is flagged, so the PR curve's last precision is press's anomalous fraction
    press = target.category[:] == target.attrs["categories"].index("press")
    last = (out / "plots" / "pixel_pr.csv").read_text().splitlines()[-1].split(",")
    assert float(last[0]) == 1.0 and float(last[1]) == pytest.approx(target.masks[:][press].mean())


def test_a_store_with_masks_everywhere_has_no_categories_without_masks_attr(reference):
    """Absent, not []: the stores extracted before the attr existed stay valid (and are not redone)."""
    assert "categories_without_masks" not in reference.attrs


# ------------------------------------------------------------------------------------------------
# stage normals@D: the train split's good images, the few-shot reference pool


def test_train_good_store_holds_the_train_images_and_names_the_categories_without(setup, reference, tmp_path):
    from pipeline.data.tables import NO_TRAIN
    from pipeline.evaluation import target_scores

    tmp, tree, _ = setup
    root = tmp_path / "tree"
    shutil.copytree(tree, root)
    # alpha's train/good: its own 000.png and a copy of its test/good/001.png; beta has no train split
    shutil.copy(root / "alpha/test/good/001.png", root / "alpha/train/good/001.png")
    shutil.rmtree(root / "beta/train")
    params = yaml.safe_load((tmp / "params.yaml").read_text())
    params["datasets"]["tiny"]["root"] = str(root)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = stage_args(tmp, tmp_path / "normals")
    args[args.index("--params") + 1] = str(tmp_path / "params.yaml")
    normals_stage.main(args)

    pool = store.open_store(tmp_path / "normals")
    assert pool.attrs["paths"] == ["alpha/train/good/000.png", "alpha/train/good/001.png"]
    assert pool.attrs["splits"] == ["train"] and pool.attrs["train_good_missing"] == {"beta": NO_TRAIN}
    assert pool.attrs["train_good_counts"] == {"alpha": 2} and pool.attrs["train_good_drawn"] == {"alpha": [0, 1]}
    assert (pool.labels[:] == 0).all()
    # the same image gives the same tokens as in the test store (up to the batch it was run in)
    same = reference.attrs["paths"].index("alpha/test/good/001.png")
    np.testing.assert_allclose(pool.tokens[1].astype(np.float32), reference.tokens[same].astype(np.float32),
                               atol=2e-3)
    # the pool is refused against a store of another dataset root, taken against its own target
    target = store.open_store(_copy_with_root(reference.path, tmp_path / "target", str(root)))
    got, missing = target_scores.open_pool(tmp_path / "normals", target)
    assert got.n_images == 2 and missing == {"beta": NO_TRAIN}
    with pytest.raises(target_scores.TargetScoresError, match="root"):
        target_scores.open_pool(tmp_path / "normals", reference)

    # only the images some draw can pick are extracted: one k of 1 and one seed draw one of alpha's two
    from pipeline.method.neighbours import draws

    params["neighbours"] = {"reference_k": [1], "reference_seeds": [0]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    one = stage_args(tmp, tmp_path / "one")
    one[one.index("--params") + 1] = str(tmp_path / "params.yaml")
    normals_stage.main(one)
    subset = store.open_store(tmp_path / "one")
    picked = int(draws(2, 1, [0])[0][0])
    assert subset.attrs["paths"] == [f"alpha/train/good/{picked:03d}.png"]
    assert subset.attrs["train_good_counts"] == {"alpha": 2} and subset.attrs["train_good_drawn"] == {"alpha": [picked]}
    np.testing.assert_array_equal(subset.tokens[0], pool.tokens[picked])

    # once no category has a train split, the same out holds only the record of why
    shutil.rmtree(root / "alpha/train")
    normals_stage.main(args)
    assert sorted(p.name for p in (tmp_path / "normals").iterdir()) == [store.NORMALS_ABSENT]
    assert target_scores.open_pool(tmp_path / "normals", target) == (None, {"alpha": NO_TRAIN, "beta": NO_TRAIN})
    normals_stage.main(args)  # a second run replaces its own record
    assert sorted(p.name for p in (tmp_path / "normals").iterdir()) == [store.NORMALS_ABSENT]

    # a folder of the user's given as --out is refused and left as it was, record or store of ours or not
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (mine / store.NORMALS_ABSENT).write_text("{}")
    theirs = stage_args(tmp, mine)
    theirs[theirs.index("--params") + 1] = str(tmp_path / "params.yaml")
    with pytest.raises(store.StoreError, match="refusing to overwrite"):
        normals_stage.main(theirs)
    assert sorted(p.name for p in mine.iterdir()) == [store.NORMALS_ABSENT, "notes.txt"]


def _copy_with_root(src, dest, root):
    """A copy of the store at ``src`` whose attrs name another dataset root (as if extracted from there)."""
    shutil.copytree(src, dest)
    meta = json.loads((dest / "zarr.json").read_text())
    meta["attributes"]["root"] = root
    (dest / "zarr.json").write_text(json.dumps(meta))
    return dest
