"""train_sae and fit_guides under ``torchrun --nproc_per_node 2`` (gloo, CPU) against one process that
streams the same global batches (``--shards 2``): equal up to float32 rounding, and only rank 0 writes.

The tolerance. Both runs compute the same sums in float32 in different orders: one process sums a
step's B rows serially, two ranks sum B/2 rows each and add the two partial sums in the all-reduce.
The worst-case error bound of either order is γ_n·Σ|aᵢ| with γ_n ≈ n·u (u = 2⁻²⁴, n ≤ B), so the
2-rank run's distance to the exact (real-number) trajectory is bounded like the 1-process run's own.
We measure that distance with a float64 run of the same steps (e64 = max |W32 − W64|, same stream,
same Adam), and by the triangle inequality |W_2rank − W_1proc| ≤ |W_2rank − W64| + |W_1proc − W64|,
about 2·e64; TOL_FACTOR 8 leaves a factor 4 because e64 is one sample of the error, not its bound
(Adam divides by √v, so a gradient element near cancellation can turn a rounding difference into a
larger step). e64 itself must be tiny (< 1e-4), so the tolerance cannot become vacuous, and a run on
another stream (``--shards 1``) must fall far outside it, so the comparison can fail.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.method import distributed
from pipeline.method import guides
from pipeline.features import stream
from pipeline.method import sae
from pipeline.features import store
from pipeline.stages import fit_guides as fit_guides_stage
from pipeline.stages import train_sae as train_sae_stage

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES, GRID, DIM, CHUNK, SIZE = 22, 4, 16, 4, 8
"""6 chunks, the last of 2 images: shard 1 runs out of tokens before shard 0, so rank 1 has steps
with no rows and still takes part in every reduction."""
SAE = {"n_latents": 32, "k": 4, "k_aux": 8, "auxk_coef": 0.03125, "dead_tokens": 64, "lr": 0.003,
       "betas": [0.5, 0.999], "batch_images": 4, "epochs": 2, "buffer_tokens": 64, "decoder_bias": False,
       "seed": 0, "device": "cpu"}
GUIDES = {"epochs": 2, "batch_images": 4, "seeds": [0], "ema_decay": 0.5, "device": "cpu"}
TOL_FACTOR = 8.0

AUDIT = '''
import os, runpy, sys
root, rank = os.environ["AUDIT_ROOT"], os.environ.get("RANK", "0")
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def hook(event, args):
    path = str(args[0]) if args else ""
    if not path.startswith(root):
        return
    if event == "open" and ((args[1] is not None and set(str(args[1])) & set("wax+")) or (args[2] or 0) & WRITE):
        print(f"AUDIT rank={rank} write {path}", file=sys.stderr, flush=True)
    elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.unlink"):
        print(f"AUDIT rank={rank} {event} {path}", file=sys.stderr, flush=True)
sys.addaudithook(hook)
module = sys.argv.pop(1)
sys.argv[0] = module
runpy.run_module(module, run_name="__main__", alter_sys=True)
'''
"""Runs a stage with an audit hook that names every file a rank opens for writing, renames, creates or
deletes under AUDIT_ROOT: the evidence that rank 1 writes nothing (and that rank 0's writes are seen)."""


def write_store(path: Path) -> Path:
    """Tokens: sparse combinations of 8 directions; masks: a square on odd images, labelled anomalous."""
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((8, DIM))
    layout = store.StoreLayout(N_IMAGES, GRID * GRID, DIM, mask_size=SIZE, chunk_images=CHUNK)
    attrs = {"dataset": "tiny", "backbone": "none", "weights_sha256": "0" * 64, "layer": -1, "image_size": SIZE,
             "grid": [GRID, GRID], "inputs_sha256": "1" * 64}

    def chunk(start, stop):
        n = stop - start
        coef = rng.uniform(0, 2, (n, GRID * GRID, 8)) * (rng.random((n, GRID * GRID, 8)) < 0.3)
        labels = (np.arange(start, stop) % 2).astype(np.uint8)
        masks = np.zeros((n, SIZE, SIZE), np.uint8)
        masks[labels == 1, 2:5, 3:6] = 1
        return {"tokens": (coef @ atoms).astype(np.float16), "masks": masks, "labels": labels,
                "defect": labels.astype(np.int16)}

    store.write(path, layout, attrs, chunk)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    write_store(tmp / "features")
    (tmp / "params.yaml").write_text(yaml.safe_dump({"sae": SAE, "guides": GUIDES}))
    (tmp / "audit.py").write_text(AUDIT)
    return tmp


def sae_args(tmp: Path, run: str, *extra: str) -> list[str]:
    return ["--features", str(tmp / "features"), "--out", str(tmp / run / "sae"), "--report",
            str(tmp / run / "reports"), "--params", str(tmp / "params.yaml"), "--checkpoint-minutes", "0", *extra]


def guides_args(tmp: Path, run: str, sae_run: str, *extra: str) -> list[str]:
    return ["--features", str(tmp / "features"), "--sae", str(tmp / sae_run / "sae"), "--out",
            str(tmp / run / "guides"), "--report", str(tmp / run / "reports"), "--params", str(tmp / "params.yaml"),
            *extra]


def torchrun(tmp: Path, module: str, args: list[str]) -> str:
    """Two gloo ranks of ``module`` under the audit hook; returns stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "AUDIT_ROOT": str(tmp)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp / "audit.py"), module, *args, "--shards", "2"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[rank 1]" in result.stderr  # both ranks really ran
    return result.stderr


@pytest.fixture(scope="module")
def runs(setup):
    """The SAE and guides by one process with --shards 2 and by 2 ranks; the 2-rank guides are fitted on
    the 1-process SAE, so their comparison sees the guides' own rounding only."""
    tmp = setup
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_sae_stage.main(sae_args(tmp, "one", "--shards", "2"))
        fit_guides_stage.main(guides_args(tmp, "one", "one", "--shards", "2"))
        train_sae_stage.main(sae_args(tmp, "serial"))  # --shards 1: another stream, the control
    finally:
        torch.set_num_threads(threads)
    logs = {"sae": torchrun(tmp, "pipeline.stages.train_sae", sae_args(tmp, "two")),
            "guides": torchrun(tmp, "pipeline.stages.fit_guides", guides_args(tmp, "two", "one"))}
    return tmp, logs


class Float64Inputs(sae.TopKSAE):
    """Takes the float32 batches the stream yields and computes in float64 (the reference run)."""

    def forward(self, x):
        return super().forward(x.double())


def float64_reference(tmp: Path) -> dict[str, torch.Tensor]:
    """The 1-process ``--shards 2`` SAE run again in float64: same init, stream and steps."""
    features = store.open_store(tmp / "features")
    cfg = SAE
    model = Float64Inputs(DIM, cfg["n_latents"], cfg["k"], generator=torch.Generator().manual_seed(cfg["seed"])).double()
    sae.train(model, lambda c: features.read(c)["tokens"], features.n_chunks, tokens_per_image=GRID * GRID,
              batch_images=cfg["batch_images"], epochs=cfg["epochs"], lr=cfg["lr"], betas=tuple(cfg["betas"]),
              k_aux=cfg["k_aux"], auxk_coef=cfg["auxk_coef"], dead_tokens=cfg["dead_tokens"],
              buffer_tokens=cfg["buffer_tokens"], seed=cfg["seed"], shards=2)
    return {"dictionary": model.dictionary.detach(), "encoder": model.encoder.detach()}


def max_diff(a: dict, b: dict, keys) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)


def test_two_ranks_train_the_sae_of_one_process_within_float32_rounding(runs):
    tmp, _ = runs
    one, two = (load_file(str(tmp / r / "sae" / "sae.safetensors")) for r in ("one", "two"))
    serial = load_file(str(tmp / "serial" / "sae" / "sae.safetensors"))
    keys = ("dictionary", "encoder")
    e64 = max_diff(one, float64_reference(tmp), keys)
    tol = TOL_FACTOR * e64
    drift = max_diff(one, two, keys)
    print(f"SAE: |1 proc - float64| {e64:.3g}, |2 ranks - 1 proc| {drift:.3g}, tolerance {tol:.3g}, "
          f"|--shards 1 - --shards 2| {max_diff(one, serial, keys):.3g}")
    assert 0 < e64 < 1e-4
    assert drift <= tol
    assert max_diff(one, serial, keys) > 100 * tol  # another stream is far outside: the test can fail
    assert torch.equal(one["dead_mask"], two["dead_mask"])
    r1, r2 = (json.loads((tmp / r / "reports" / "sae.json").read_text()) for r in ("one", "two"))
    assert r1["tokens_seen"] == r2["tokens_seen"] == SAE["epochs"] * N_IMAGES * GRID * GRID
    assert r1["n_dead"] == r2["n_dead"] and abs(r1["fvu"] - r2["fvu"]) < 1e-5
    c1, c2 = (json.loads((tmp / r / "sae" / "config.json").read_text()) for r in ("one", "two"))
    assert c1 == c2 and c1["shards"] == 2
    assert not (tmp / "two" / "sae.resume").exists()  # rank 0 removed its snapshot


def test_two_ranks_fit_the_guides_of_one_process_within_float32_rounding(runs):
    """No float64 guides run exists (the loop casts its inputs to float32), so the guides' tolerance is
    the SAE's argument with its own scale: codes move by at most lr per Adam step, and a rounding
    difference of relative size n·u in the summed gradient (n = images x pixels of a batch) moves
    them by about lr·n·u per step: steps · lr · n · u, times 8 as above."""
    tmp, _ = runs
    one, two = (guides.load(tmp / r / "guides")[0] for r in ("one", "two"))
    steps = GUIDES["epochs"] * -(-N_IMAGES // GUIDES["batch_images"])
    n = GUIDES["batch_images"] * SIZE * SIZE
    tol = TOL_FACTOR * steps * 1e-2 * n * 2.0**-24  # guides.lr default 1e-2
    drift = float((one - two).abs().max())
    print(f"guides: |2 ranks - 1 proc| {drift:.3g}, tolerance {tol:.3g}")
    assert drift <= tol
    assert torch.equal(one > 0, two > 0)  # the same latents are active
    t1, t2 = (json.loads((tmp / r / "reports" / "guides.json").read_text())["final_terms"]["seed_0"]
              for r in ("one", "two"))
    assert t1.keys() == t2.keys() and all(abs(t1[k] - t2[k]) < 1e-5 for k in t1)


@pytest.mark.parametrize("stage", ["sae", "guides"])
def test_only_rank_0_writes(runs, stage):
    _, logs = runs
    audit = [line for line in logs[stage].splitlines() if "AUDIT" in line]
    assert not [line for line in audit if "rank=1" in line]
    # config.json: written through Python's open (safetensors writes from Rust, unseen by the hook)
    folder = "/two/sae/" if stage == "sae" else "/two/guides/"
    assert any("rank=0" in line and folder in line and "config.json" in line for line in audit), audit


def test_shards_must_be_a_multiple_of_the_processes():
    with pytest.raises(distributed.DistributedError, match="--shards 3 must be a positive multiple of the 2"):
        distributed.check_shards(3, 2, 64, "sae.batch_images x tokens")
    with pytest.raises(distributed.DistributedError, match="cannot be split over 4 shards"):
        distributed.check_shards(4, 1, 3, "guides.batch_images")


def test_more_shards_than_chunks_is_refused_before_training(setup):
    # a shard with no chunk adds no rows, so the steps would silently shrink below batch_images
    n_chunks = -(-N_IMAGES // CHUNK)
    with pytest.raises(distributed.DistributedError, match=rf"--shards {n_chunks + 1} is more than the store's "
                                                           rf"{n_chunks} chunks"):
        train_sae_stage.main(sae_args(setup, "too_many", "--shards", str(n_chunks + 1)))
    assert not (setup / "too_many").exists()
    train_sae_stage.main(sae_args(setup, "for_guides"))
    with pytest.raises(distributed.DistributedError, match=rf"more than the store's {n_chunks} chunks"):
        fit_guides_stage.main(guides_args(setup, "too_many", "for_guides", "--shards", str(n_chunks + 1)))
    assert not (setup / "too_many").exists()


def test_one_process_with_shards_steps_through_the_union_of_the_shard_streams(setup):
    """--shards 2 in one process: every token once per epoch, in global steps of batch_tokens rows
    (the last ones smaller, once one shard has run out)."""
    features = store.open_store(setup / "features")
    read = lambda c: features.read(c)["tokens"]
    steps = list(stream.local_token_steps(read, features.n_chunks, 64, 64, np.random.default_rng(0), shards=2))
    everything = np.concatenate([np.asarray(read(c), np.float32).reshape(-1, DIM) for c in range(features.n_chunks)])
    got = np.concatenate(steps)
    assert len(got) == len(everything)
    assert sorted(map(bytes, got)) == sorted(map(bytes, everything))
    assert all(len(s) == 64 for s in steps[:5]) and all(len(s) <= 64 for s in steps)
