"""Every stage on the device it is asked for.

The tiny DAG (extract -> train_sae -> fit_guides -> export -> evaluate, through the stages' own
``main``) runs once per device of :func:`tests.devices.devices`: ``cpu`` everywhere, ``cuda`` (marker
``cuda``) only where torch sees a GPU, else it is skipped with the reason. The CPU run checks the test
itself; only a run on a GPU machine (``benchmarks/gpu_check.sh``) is evidence for CUDA.
"""

import json
import math

import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

from pipeline.features import backbones
from pipeline.evaluation import evaluate as evaluation
from pipeline.method import guides
from pipeline.method import sae
from pipeline.features import store
from pipeline.errors import PipelineError
from pipeline.launch import DeviceError, resolve_device
from pipeline.stages import evaluate as evaluate_stage
from pipeline.stages import export as export_stage
from pipeline.stages import extract as extract_stage
from pipeline.stages import fit_guides as fit_guides_stage
from pipeline.stages import train_sae as train_sae_stage
from tests.devices import assert_on, devices

TINY = {
    "data": {"splits": ["test"]},
    "backbone": {"name": "dinov2_vits14", "layer": -1, "image_size": 28},
    "extract": {"batch_size": 4, "chunk_images": 4, "num_workers": 0},
    "sae": {"n_latents": 64, "k": 4, "epochs": 2, "buffer_tokens": 512, "dead_tokens": 500, "batch_images": 4},
    "guides": {"epochs": 2, "seeds": [0, 1], "batch_images": 4},
    "evaluate": {"overlays_per_category": 2, "curve_points": 20, "batch_images": 4},
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny MVTec tree and random DINOv2-S/14 weights, as the weights stage writes them."""
    from tests.conftest import make_mvtec_tree

    tmp = tmp_path_factory.mktemp("cuda")
    tree = make_mvtec_tree(tmp / "tree", n_good=3, n_bad=4)
    torch.manual_seed(0)
    save_file(timm.create_model("vit_small_patch14_dinov2", pretrained=False).state_dict(), tmp / "random.safetensors")
    backbones.materialize_weights("dinov2_vits14", str(tmp / "random.safetensors"), tmp / "weights")
    return tmp, tree, tmp / "weights" / "dinov2_vits14.safetensors"


def run_dag(tmp, tree, weights_file, device: str):
    """The five stages with ``device`` in every section; returns the run's folder (run once per device
    and module: the cuda test compares with the cpu run, made here if the cpu test did not run)."""
    out = tmp / device
    if (out / "eval" / "metrics.json").exists():
        return out
    params = {"datasets": {"tiny": {"format": "mvtec", "root": str(tree)}},
              **{k: ({**v, "device": device} if k in ("extract", "sae", "guides", "evaluate") else v)
                 for k, v in TINY.items()}}
    out.mkdir(exist_ok=True)
    p = out / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    feats, model, gd, det = out / "features", out / "sae", out / "guides", out / "detector"
    extract_stage.main(["--dataset", "tiny", "--weights", str(weights_file), "--out", str(feats), "--params", str(p)])
    train_sae_stage.main(["--features", str(feats), "--out", str(model), "--report", str(out / "reports"),
                          "--params", str(p), "--checkpoint-dir", str(out / "resume")])
    fit_guides_stage.main(["--features", str(feats), "--sae", str(model), "--out", str(gd),
                           "--report", str(out / "reports"), "--params", str(p)])
    export_stage.main(["--features", str(feats), "--sae", str(model), "--guides", str(gd),
                       "--weights", str(weights_file), "--out", str(det), "--params", str(p)])
    evaluate_stage.main(["--target", str(feats), "--aux", str(feats), "--sae", str(model), "--guides", str(gd),
                         "--detector", str(det), "--out", str(out / "eval"), "--params", str(p)])
    return out


@pytest.mark.parametrize("device", devices())
def test_tiny_dag_runs_on_the_device_and_keeps_the_stored_dtypes(weights, device):
    tmp, tree, weights_file = weights
    out = run_dag(tmp, tree, weights_file, device)
    features = store.open_store(out / "features")
    # the store keeps fp16 whatever the autocast dtype on the device; checkpoints are fp32 safetensors
    assert features.tokens.dtype == np.float16 and features.cls.dtype == np.float16
    saved = load_file(str(out / "sae" / "sae.safetensors"))
    assert {k: v.dtype for k, v in saved.items()} == {"dictionary": torch.float32, "encoder": torch.float32,
                                                     "dead_mask": torch.bool}
    assert load_file(str(out / "guides" / "guides.safetensors"))["codes_per_seed"].dtype == torch.float32
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["n_images"] == 14 and all(
        metrics[k] is None or math.isfinite(metrics[k]) for k in ("image_auroc", "pixel_auroc"))

    # the library calls the stages make, on the device: everything they return or keep lives there
    model, dead, _ = sae.load(out / "sae", device)
    assert_on((model, dead), device)
    codes = guides.GuideCodes(model.shape.n_latents, dead, generator=torch.Generator().manual_seed(0)).to(device)
    assert_on((codes, codes.effective()), device)
    on_cpu = sae.load(out / "sae")[0]
    fvu, mask = sae.evaluate(on_cpu, lambda c: features.read(c, ("tokens",))["tokens"], features.n_chunks,
                             device=torch.device(device))
    assert math.isfinite(fvu)
    assert_on((on_cpu, mask), device)
    vectors = evaluation.guide_sets(torch.zeros(1, 4, model.shape.d_in, device=device), [0],
                                    model.dictionary.detach(), dead, {"variant": "l1", "guide_topk": 4,
                                                                      "init_mean": 0.1, "init_std": 0.01},
                                    features, torch.device(device))
    assert_on(vectors, device)

    if device == "cuda":  # the GPU's tokens (bf16 autocast, stored fp16) against the CPU's
        cpu = store.open_store(run_dag(tmp, tree, weights_file, "cpu") / "features")
        a, b = (torch.from_numpy(s.tokens[:].astype(np.float32)).flatten(0, 1) for s in (features, cpu))
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        # bf16 keeps 8 bits of mantissa: per token the directions agree closely, never exactly
        assert float(cos.mean()) > 0.99 and float(cos.min()) > 0.9, (float(cos.mean()), float(cos.min()))


def test_cuda_without_a_gpu_is_a_pipeline_error(monkeypatch):
    """``device: cuda`` on a machine without one: a one-line PipelineError (the stages print it, no
    traceback), still a RuntimeError for callers that caught that before."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError) as err:
        resolve_device("cuda")
    assert isinstance(err.value, PipelineError) and isinstance(err.value, RuntimeError)
    assert str(err.value) == "device is 'cuda' but torch sees no CUDA device"
    assert resolve_device("auto") == torch.device("cpu")


def test_a_device_name_torch_would_misread_is_refused_naming_the_choices(monkeypatch, tmp_path):
    from pipeline.cli import predict
    from pipeline.launch import DistInfo

    with pytest.raises(DeviceError, match=r"device 'tpu' is not one of auto, cpu, cuda, cuda:N"):
        resolve_device("tpu")
    # predict names the option and the choices, before any detector is read
    with pytest.raises(PipelineError, match=r"--device tpu: device 'tpu' is not one of auto, cpu, cuda"):
        predict.main([str(tmp_path), "--detector", str(tmp_path / "no_detector"), "--out", str(tmp_path / "out"),
                      "--device", "tpu"])
    # with one GPU seen: cuda:0 is that GPU, cuda:1 is refused rather than run on cuda:0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=r"'cuda:1' but torch sees 1 CUDA device\(s\), cuda:0 to cuda:0"):
        resolve_device("cuda:1")
    assert resolve_device("cuda", DistInfo(rank=1, world_size=2, local_rank=1)) == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="under torchrun"):
        resolve_device("cuda:0", DistInfo(rank=1, world_size=2, local_rank=1))
