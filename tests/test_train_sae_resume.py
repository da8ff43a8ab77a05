"""The train_sae stage end to end on a tiny store: what it writes into git-tracked outputs is the same on
every run and machine, and a killed run resumes to the very weights an uninterrupted run ends with."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.method import resume, sae
from pipeline.features import store
from pipeline.stages import train_sae

N_IMAGES, N_TOKENS, DIM, CHUNK = 24, 16, 16, 4
SAE = {"n_latents": 32, "k": 4, "k_aux": 8, "auxk_coef": 0.03125, "dead_tokens": 64, "lr": 0.003,
       "betas": [0.5, 0.999], "batch_images": 2, "epochs": 3, "buffer_tokens": 50, "decoder_bias": False,
       "seed": 0, "device": "cpu"}
"""12 batches of 32 tokens an epoch; dead_tokens 64 lets latents die within a few steps, so the AuxK
path and the dead-latent counters take part in what must survive a restart."""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small are fastest on one thread, and a busy machine's cores slow a pool of spinning
    threads to a crawl; restored afterwards for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_store(path: Path, seed: int = 0, inputs_sha256: str = "1" * 64) -> Path:
    """A complete store of N_IMAGES x N_TOKENS tokens of width DIM: sparse combinations of 8 directions."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((8, DIM))
    layout = store.StoreLayout(N_IMAGES, N_TOKENS, DIM, mask_size=4, chunk_images=CHUNK)
    attrs = {"dataset": "tiny", "backbone": "none", "weights_sha256": "0" * 64, "layer": -1, "image_size": 4,
             "grid": [4, 4], "inputs_sha256": inputs_sha256}

    def chunk(start, stop):
        n = stop - start
        coef = rng.uniform(0, 2, (n, N_TOKENS, 8)) * (rng.random((n, N_TOKENS, 8)) < 0.3)
        return {"tokens": (coef @ atoms).astype(np.float16)}

    store.write(path, layout, attrs, chunk)
    return path


def write_params(path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump({"sae": {**SAE, **changes}}))
    return path


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("store") / "features")


def stage_args(features: Path, run: Path, params: Path, *extra: str) -> list[str]:
    return ["--features", str(features), "--out", str(run / "sae"), "--report", str(run / "reports"),
            "--params", str(params), *extra]


def test_tracked_reports_hold_no_timing_and_repeat_byte_for_byte(tiny_store, tmp_path):
    """sae.json is a DVC metric in git: a measured speed in it would dirty a fresh clone's tree."""
    params = write_params(tmp_path / "params.yaml")
    for name in ("one", "two"):
        train_sae.main(stage_args(tiny_store, tmp_path / name, params))
    summary = json.loads((tmp_path / "one/reports/sae.json").read_text())
    assert not [k for k in summary if "per_s" in k or "time" in k or "second" in k], summary
    assert summary["tokens_seen"] == 3 * N_IMAGES * N_TOKENS and summary["epochs"] == 3
    for tracked in ("reports/sae.json", "reports/sae_curve.csv", "reports/sae_curve.png", "sae/config.json",
                    "sae/sae.safetensors"):
        assert (tmp_path / "one" / tracked).read_bytes() == (tmp_path / "two" / tracked).read_bytes(), tracked
    assert str(tmp_path) not in (tmp_path / "one/sae/config.json").read_text()  # no machine paths either


# ----------------------------------------------------------------------------------------------------
# Resuming: the library loop


class Killed(Exception):
    """Stands for a SIGKILL at a chosen point of a save (the subprocess test below kills for real)."""


TRAIN = dict(tokens_per_image=N_TOKENS, batch_images=2, epochs=3, lr=3e-3, betas=(0.5, 0.999), k_aux=8,
             auxk_coef=1 / 32, dead_tokens=64, buffer_tokens=50, seed=0)


def tokens_in_memory(seed: int = 0):
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((8, DIM))
    coef = rng.uniform(0, 2, (N_IMAGES, N_TOKENS, 8)) * (rng.random((N_IMAGES, N_TOKENS, 8)) < 0.3)
    tokens = (coef @ atoms).astype(np.float16)
    return (lambda c: tokens[c * CHUNK : (c + 1) * CHUNK]), N_IMAGES // CHUNK


def fresh_model():
    return sae.TopKSAE(DIM, 32, 4, generator=torch.Generator().manual_seed(0))


def assert_same_run(model, stats, ref_model, ref_stats):
    for key, value in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert stats.curve == ref_stats.curve and stats.tokens_seen == ref_stats.tokens_seen


@pytest.fixture(scope="module")
def uninterrupted():
    read, n = tokens_in_memory()
    model = fresh_model()
    stats = sae.train(model, read, n, **TRAIN)
    assert stats.tokens_seen == 3 * N_IMAGES * N_TOKENS and len(stats.curve) == 4  # 36 steps, a row every 10
    assert stats.curve[-1]["dead"] > 0  # latents die, so the counters and AuxK matter after a restart
    return model, stats


class KilledAt(resume.TrainCheckpoint):
    """Saves after every step and "dies" at step ``kill_at``: right after that step's save (``after``),
    between writing its tensors and its JSON, or half-way through writing its tensors."""

    def __init__(self, folder, key, kill_at: int, where: str = "after") -> None:
        super().__init__(folder, key, every_steps=1)
        self.kill_at, self.where, self.dying = kill_at, where, False

    def save(self, model, opt, state):
        self.dying = state.step == self.kill_at
        super().save(model, opt, state)
        if self.dying:
            raise Killed


def dying_writes(monkeypatch, checkpoint: KilledAt) -> None:
    """Make ``resume._write_atomic`` die where ``checkpoint.where`` says, during the dying save."""
    write = resume._write_atomic

    def write_or_die(path, data):
        tensors = path.suffix == ".safetensors"
        if checkpoint.dying and tensors and checkpoint.where == "inside tensors":
            path.with_name(path.name + ".partial").write_bytes(data[: len(data) // 2])
            raise Killed
        write(path, data)
        if checkpoint.dying and tensors and checkpoint.where == "between tensors and json":
            raise Killed

    monkeypatch.setattr(resume, "_write_atomic", write_or_die)


@pytest.mark.parametrize("kill_at, where", [(5, "after"), (12, "after"), (17, "after"), (36, "after"),
                                            (17, "between tensors and json"), (17, "inside tensors")])
def test_a_run_killed_after_any_step_resumes_to_the_uninterrupted_weights(kill_at, where, uninterrupted, tmp_path,
                                                                          monkeypatch):
    """Steps 5 and 17 are mid-epoch (12 batches an epoch), 12 the end of the first epoch, 36 the last
    step; a kill during a save leaves the previous snapshot (step kill_at - 1), whole."""
    read, n = tokens_in_memory()
    killed = KilledAt(tmp_path / "ckpt", {"any": "key"}, kill_at, where)
    with monkeypatch.context() as patch:
        dying_writes(patch, killed)
        with pytest.raises(Killed):
            sae.train(fresh_model(), read, n, **TRAIN, checkpoint=killed)
    saved = json.loads((tmp_path / "ckpt/train_state.json").read_text())
    assert saved["state"]["step"] == (kill_at if where == "after" else kill_at - 1)

    resumed_from = resume.TrainCheckpoint(tmp_path / "ckpt", {"any": "key"}, every_s=1e9)
    model = fresh_model()
    stats = sae.train(model, read, n, **TRAIN, checkpoint=resumed_from)
    assert_same_run(model, stats, *uninterrupted)
    resumed_from.remove()
    assert not (tmp_path / "ckpt").exists()


def test_a_snapshot_with_another_key_is_ignored_and_replaced(uninterrupted, tmp_path, caplog):
    read, n = tokens_in_memory()
    with pytest.raises(Killed):
        sae.train(fresh_model(), read, n, **TRAIN,
                  checkpoint=KilledAt(tmp_path / "ckpt", {"sae": {"k": 8, "lr": 0.1}, "store": "x"}, kill_at=3))
    stale = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert stale == ["train_state.000000003.safetensors", "train_state.json"]
    model = fresh_model()
    with caplog.at_level("WARNING", logger="pipeline.method.sae"):
        stats = sae.train(model, read, n, **TRAIN, checkpoint=resume.TrainCheckpoint(
            tmp_path / "ckpt", {"sae": {"k": 4, "lr": 0.1}, "store": "x"}, every_steps=7))
    assert "not resuming" in caplog.text and "sae.k 8 -> 4" in caplog.text
    assert_same_run(model, stats, *uninterrupted)  # started afresh: the stale weights were not used
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["train_state.000000035.safetensors",
                                                                      "train_state.json"]


@pytest.mark.parametrize("field, delta", [("tokens_seen", 1000), ("epoch", 1)])
def test_a_snapshot_whose_json_was_edited_is_not_resumed(field, delta, uninterrupted, tmp_path, caplog):
    read, n = tokens_in_memory()
    with pytest.raises(Killed):
        sae.train(fresh_model(), read, n, **TRAIN, checkpoint=KilledAt(tmp_path / "ckpt", {"any": "key"}, kill_at=17))
    path = tmp_path / "ckpt" / "train_state.json"
    meta = json.loads(path.read_text())
    meta["state"][field] += delta
    path.write_text(json.dumps(meta, indent=1))
    model = fresh_model()
    with caplog.at_level("WARNING"):
        stats = sae.train(model, read, n, **TRAIN,
                          checkpoint=resume.TrainCheckpoint(tmp_path / "ckpt", {"any": "key"}, every_s=1e9))
    assert "its state is not the one saved with train_state.000000017.safetensors" in caplog.text
    assert_same_run(model, stats, *uninterrupted)  # afresh: the tracked counters are the true ones


def test_only_files_it_wrote_are_deleted_and_a_foreign_snapshot_name_is_refused(tmp_path):
    read, n = tokens_in_memory()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "NOTES.txt").write_text("mine")
    (folder / "train_state.000000001.safetensors").write_bytes(b"not a snapshot")
    checkpoint = resume.TrainCheckpoint(folder, {"k": 1}, every_steps=5)
    sae.train(fresh_model(), read, n, **TRAIN, checkpoint=checkpoint)
    assert (folder / "train_state.000000035.safetensors").is_file()
    checkpoint.remove()
    assert sorted(p.name for p in folder.iterdir()) == ["NOTES.txt", "train_state.000000001.safetensors"]
    (folder / "train_state.json").write_text('{"a": "file of someone else"}')
    with pytest.raises(resume.CheckpointError, match="train_state.json: not a training snapshot"):
        sae.train(fresh_model(), read, n, **TRAIN, checkpoint=resume.TrainCheckpoint(folder, {"k": 1}, every_steps=5))
    checkpoint.remove()
    assert (folder / "train_state.json").read_text() == '{"a": "file of someone else"}'


# ----------------------------------------------------------------------------------------------------
# Resuming: the stage, killed for real


TRACKED_BYTES = ("sae/config.json", "reports/sae.json", "reports/sae_curve.csv")


def read_outputs(run: Path) -> dict:
    from safetensors.torch import load_file

    return {"tensors": load_file(str(run / "sae/sae.safetensors")),
            **{name: (run / name).read_bytes() for name in TRACKED_BYTES}}


def assert_same_outputs(run: Path, reference: Path) -> None:
    got, want = read_outputs(run), read_outputs(reference)
    assert got["tensors"].keys() == want["tensors"].keys()
    for key, value in want["tensors"].items():
        assert torch.equal(got["tensors"][key], value), key
    for name in TRACKED_BYTES:
        assert got[name] == want[name], name


def test_the_stage_killed_mid_run_resumes_to_the_uninterrupted_result(tiny_store, tmp_path, caplog):
    """SIGKILL lands wherever the stage happens to be (often inside a save) once it has saved a few
    snapshots; the rerun resumes and writes the same tensors, bit for bit, and the same reports."""
    import os
    import signal
    import subprocess
    import sys
    import time

    params = write_params(tmp_path / "params.yaml", epochs=20)  # 240 steps: it cannot finish before the kill
    ckpt = tmp_path / "ckpt"
    train_sae.main(stage_args(tiny_store, tmp_path / "reference", params, "--checkpoint-dir", str(tmp_path / "c0")))

    # One thread, as this process runs (the fixture above): the same arithmetic in both.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(train_sae.__file__).parents[2])}
    child = subprocess.Popen([sys.executable, "-m", "pipeline.stages.train_sae",
                              *stage_args(tiny_store, tmp_path / "run", params, "--checkpoint-dir", str(ckpt),
                                          "--checkpoint-minutes", "0")],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        step = -1
        while child.poll() is None and step < 3:
            try:
                step = json.loads((ckpt / "train_state.json").read_text())["state"]["step"]
            except (OSError, ValueError):  # not written yet
                time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        _, err = child.communicate()
    assert child.returncode == -signal.SIGKILL, f"the stage ended before the kill: {err.decode()[-2000:]}"
    assert not (tmp_path / "run/sae/sae.safetensors").exists() and (ckpt / "train_state.json").is_file()

    with caplog.at_level("INFO", logger="pipeline.method.sae"):
        train_sae.main(stage_args(tiny_store, tmp_path / "run", params, "--checkpoint-dir", str(ckpt)))
    assert "resuming training at epoch" in caplog.text
    assert_same_outputs(tmp_path / "run", tmp_path / "reference")
    assert not ckpt.exists()  # deleted once the model is saved


@pytest.mark.parametrize("change", ["param", "store"])
def test_the_stage_does_not_resume_a_snapshot_of_other_params_or_another_store(change, tiny_store, tmp_path,
                                                                               monkeypatch, caplog):
    params = write_params(tmp_path / "params.yaml")
    ckpt = tmp_path / "ckpt"
    original = resume.TrainCheckpoint.save

    def save_then_die(self, model, opt, state):
        original(self, model, opt, state)
        if state.step == 5:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(resume.TrainCheckpoint, "save", save_then_die)
        with pytest.raises(Killed):
            train_sae.main(stage_args(tiny_store, tmp_path / "killed", params, "--checkpoint-dir", str(ckpt),
                                      "--checkpoint-minutes", "0"))
    assert json.loads((ckpt / "train_state.json").read_text())["state"]["step"] == 5

    features, expected = tiny_store, "sae.lr 0.003 -> 0.002"
    if change == "param":
        params = write_params(tmp_path / "params.yaml", lr=0.002)
    else:  # the same tokens, so only the store's fingerprint tells the snapshot apart
        features = write_store(tmp_path / "other_store", inputs_sha256="2" * 64)
        expected = f"store.inputs_sha256 '{'1' * 64}' -> '{'2' * 64}'"
    with caplog.at_level("WARNING", logger="pipeline.method.sae"):
        train_sae.main(stage_args(features, tmp_path / "rerun", params, "--checkpoint-dir", str(ckpt)))
    assert "not resuming" in caplog.text and expected in caplog.text
    train_sae.main(stage_args(features, tmp_path / "fresh", params, "--checkpoint-dir", str(tmp_path / "c2")))
    assert_same_outputs(tmp_path / "rerun", tmp_path / "fresh")


def test_a_non_finite_token_stops_the_stage_naming_the_store_and_image(tmp_path, capsys):
    import zarr

    from pipeline.errors import NonFiniteError
    from pipeline.launch import run

    features = write_store(tmp_path / "features")
    zarr.open_group(str(features), mode="r+")["tokens"][9, 3, 0] = np.inf
    args = stage_args(features, tmp_path / "run", write_params(tmp_path / "params.yaml"))
    with pytest.raises(NonFiniteError, match=r"features: tokens of image 9, chunk 2"):
        train_sae.main(args)
    with pytest.raises(SystemExit):  # and as a user sees it: one line, no traceback
        run(train_sae.main, args)
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {features}: tokens of image 9")
