"""The train_sae stage end to end on a tiny store: what it writes into git-tracked outputs is the same on
every run and machine, and a killed run resumes to the very weights an uninterrupted run ends with."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import store
from pipeline.stages import train_sae

N_IMAGES, N_TOKENS, DIM, CHUNK = 24, 16, 16, 4
SAE = {"n_latents": 32, "k": 4, "k_aux": 8, "auxk_coef": 0.03125, "dead_tokens": 64, "lr": 0.003,
       "betas": [0.5, 0.999], "batch_images": 2, "epochs": 3, "buffer_tokens": 50, "decoder_bias": False,
       "seed": 0, "device": "cpu"}
"""12 batches of 32 tokens an epoch; dead_tokens 64 lets latents die within a few steps, so the AuxK
path and the dead-latent counters take part in what must survive a restart."""


def write_store(path: Path, seed: int = 0) -> Path:
    """A complete store of N_IMAGES x N_TOKENS tokens of width DIM: sparse combinations of 8 directions."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((8, DIM))
    layout = store.StoreLayout(N_IMAGES, N_TOKENS, DIM, mask_size=4, chunk_images=CHUNK)
    attrs = {"dataset": "tiny", "backbone": "none", "weights_sha256": "0" * 64, "layer": -1, "image_size": 4,
             "grid": [4, 4], "inputs_sha256": "1" * 64}
    group, pending = store.prepare(path, layout, attrs)
    for chunk in pending:
        start, stop = layout.chunk_range(chunk)
        n = stop - start
        coef = rng.uniform(0, 2, (n, N_TOKENS, 8)) * (rng.random((n, N_TOKENS, 8)) < 0.3)
        tokens = (coef @ atoms).astype(np.float16)
        store.write_chunk(group, layout, chunk, {
            "tokens": tokens, "cls": tokens.mean(axis=1), "masks": np.zeros((n, 4, 4), np.uint8),
            "images": np.zeros((n, 4, 4, 3), np.uint8), "labels": np.zeros(n, np.uint8),
            "category": np.zeros(n, np.int16), "defect": np.zeros(n, np.int16)})
    store.finalize(group, path)
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
    for tracked in ("reports/sae.json", "reports/sae_curve.csv", "sae/config.json", "sae/sae.safetensors"):
        assert (tmp_path / "one" / tracked).read_bytes() == (tmp_path / "two" / tracked).read_bytes(), tracked
    assert str(tmp_path) not in (tmp_path / "one/sae/config.json").read_text()  # no machine paths either
