"""The fit_guides stage on a small hand-built auxiliary store: NaN anywhere is refused before any file
is written, and the checkpoint records what evaluate checks (the SAE's hash, the store's fingerprint)."""

import hashlib
import json

import numpy as np
import pytest
import torch
import yaml

from pipeline.method import sae
from pipeline.features import store
from pipeline.errors import NonFiniteError
from pipeline.stages import fit_guides as fit_guides_stage
from tests.test_evaluate import ATTRS, D_IN, GRID, N_LATENTS, SIZE, make_store

FINGERPRINT = ("dataset", "inputs_sha256", "weights_sha256", "backbone", "layer", "image_size")


@pytest.fixture
def setup(tmp_path):
    g = np.random.default_rng(0)
    dictionary = np.linalg.qr(g.standard_normal((D_IN + 16, N_LATENTS)))[0][:D_IN].T
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    make_store(tmp_path / "aux", tmp_path / "aux_root", dictionary, ["a1"], [16], [0.5], 1)
    model = sae.TopKSAE(D_IN, N_LATENTS, 4)
    with torch.no_grad():
        model.dictionary.copy_(torch.tensor(dictionary, dtype=torch.float32))
        model.encoder.copy_(model.dictionary)
    sae.save(model, tmp_path / "sae", torch.zeros(N_LATENTS, dtype=torch.bool),
             extra={"features": {**ATTRS, "dataset": "aux"}})
    params = {"guides": {"epochs": 2, "batch_images": 4, "seeds": [0, 1], "ema_decay": 0.5, "device": "cpu"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def run(tmp, features="aux", sae_dir="sae"):
    fit_guides_stage.main(["--features", str(tmp / features), "--sae", str(tmp / sae_dir), "--out",
                           str(tmp / "guides"), "--report", str(tmp / "report"), "--params", str(tmp / "params.yaml")])


def poisoned_copy(tmp, name, index, value):
    """The aux store with ``name`` of image ``index`` set to ``value`` at one element."""
    src = store.open_store(tmp / "aux")
    layout = store.StoreLayout(src.n_images, GRID * GRID, D_IN, SIZE, src.chunk_images)
    dst = tmp / f"aux_{name}"
    group, pending = store.prepare(dst, layout, {k: v for k, v in src.attrs.items() if k not in ("schema", "complete")})
    for c in pending:
        arrays = src.read(c, list(layout.shapes()))
        start = layout.chunk_range(c)[0]
        if start <= index < start + len(arrays[name]):
            arrays[name][index - start].flat[3] = value
        store.write_chunk(group, layout, c, arrays)
    store.finalize(group, dst)
    return dst


@pytest.mark.parametrize("name, value", [("tokens", np.nan), ("cls", np.nan), ("tokens", -np.inf)])
def test_non_finite_aux_store_is_refused_naming_store_image_and_chunk(setup, name, value):
    bad = poisoned_copy(setup, name, 11, value)
    path = store.open_store(bad).attrs["paths"][11]
    with pytest.raises(NonFiniteError) as err:
        run(setup, features=bad.name)
    message = str(err.value)
    assert str(bad) in message and f"{name} of image 11 ({path})" in message and "chunk 1" in message
    assert not (setup / "guides").exists() and not (setup / "report").exists()


def test_nan_in_the_sae_dictionary_stops_fitting_before_anything_is_written(setup):
    import shutil

    from safetensors.torch import load_file, save_file

    # sae.save refuses NaN weights, so the damaged checkpoint is made by hand, as a bad disk would
    shutil.copytree(setup / "sae", setup / "sae_nan")
    tensors = load_file(str(setup / "sae_nan" / "sae.safetensors"))
    tensors["dictionary"][5, 0] = float("nan")
    save_file(tensors, str(setup / "sae_nan" / "sae.safetensors"))
    with pytest.raises(NonFiniteError, match=r"fit_guides seed 0: epoch 0, step 1: loss term"):
        run(setup, sae_dir="sae_nan")
    assert not (setup / "guides").exists() and not (setup / "report").exists()


def test_checkpoint_records_sae_hash_and_aux_fingerprint_and_reports_are_strict_json(setup):
    run(setup)
    config = json.loads((setup / "guides" / "config.json").read_text())
    assert config["sae_sha256"] == hashlib.sha256((setup / "sae" / "sae.safetensors").read_bytes()).hexdigest()
    attrs = store.open_store(setup / "aux").attrs
    assert config["aux_store"] == {k: attrs.get(k) for k in FINGERPRINT}
    assert config["aux_store"]["dataset"] == "aux" and config["aux_store"]["layer"] == ATTRS["layer"]

    def refuse(token):
        raise AssertionError(f"{token} is not JSON")
    summary = json.loads((setup / "report" / "guides.json").read_text(), parse_constant=refuse)
    assert set(summary["final_terms"]) == {"seed_0", "seed_1"}
    assert (setup / "report" / "guides_curve.csv").read_text().splitlines()[0].startswith("seed,epoch,step")
    assert (setup / "report" / "guides_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_aux_store_without_masks_is_refused_before_anything_is_written(setup):
    """A labels-only store: its all-zero masks would teach the guides "no defect"."""
    src = store.open_store(setup / "aux")
    layout = store.StoreLayout(src.n_images, GRID * GRID, D_IN, SIZE, src.chunk_images)
    attrs = {k: v for k, v in src.attrs.items() if k not in ("schema", "complete")}
    group, pending = store.prepare(setup / "aux_labels", layout, {**attrs, "categories_without_masks": ["a1"]})
    for c in pending:
        store.write_chunk(group, layout, c, src.read(c, list(layout.shapes())))
    store.finalize(group, setup / "aux_labels")
    with pytest.raises(store.StoreError) as err:
        run(setup, features="aux_labels")
    assert str(err.value) == (f"{setup / 'aux_labels'}: category a1 has labels but no masks (attr "
                              "categories_without_masks; its dataset has no ground_truth/ folder); fit_guides needs "
                              "pixel masks on the auxiliary set: add the masks, or use the dataset as a target only "
                              "(remove it from aux_datasets in params.yaml)")
    assert not (setup / "guides").exists() and not (setup / "report").exists()


@pytest.mark.parametrize("damage", ["truncated", "no config", "no folder", "config not json", "other shape"])
def test_a_damaged_sae_checkpoint_is_one_line_naming_the_file(setup, damage, capsys):
    from pipeline.launch import run as run_stage

    folder = setup / "sae"
    if damage == "truncated":
        data = (folder / "sae.safetensors").read_bytes()
        (folder / "sae.safetensors").write_bytes(data[: len(data) // 2])
        expected = "sae.safetensors: cannot be read as the SAE of config.json"
    elif damage == "no config":
        (folder / "config.json").unlink()
        expected = "config.json: no SAE checkpoint here (file missing)"
    elif damage == "no folder":
        folder = setup / "absent"
        expected = f"no SAE checkpoint here (no folder {folder})"
    elif damage == "config not json":
        (folder / "config.json").write_text("{\"d_in\": ")
        expected = "config.json: not an SAE config (JSONDecodeError"
    else:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "n_latents": config["n_latents"] * 2}))
        expected = "sae.safetensors: cannot be read as the SAE of config.json (Error(s) in loading state_dict"
    with pytest.raises(SystemExit) as exit_:
        run_stage(fit_guides_stage.main, ["--features", str(setup / "aux"), "--sae", str(folder), "--out",
                                          str(setup / "guides"), "--report", str(setup / "report"),
                                          "--params", str(setup / "params.yaml")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and expected in err and "Traceback" not in err, err
    assert "dvc repro train_sae@" in err
    assert not (setup / "guides").exists()


def test_guides_truncated_or_missing_are_one_line(setup):
    from pipeline.method import guides

    run(setup)
    data = (setup / "guides" / "guides.safetensors").read_bytes()
    (setup / "guides" / "guides.safetensors").write_bytes(data[:100])
    with pytest.raises(guides.GuidesError, match=r"guides.safetensors: no readable 'codes_per_seed'.*fit_guides@guides"):
        guides.load(setup / "guides")
    with pytest.raises(guides.GuidesError, match=r"no guides here"):
        guides.load(setup / "elsewhere")
