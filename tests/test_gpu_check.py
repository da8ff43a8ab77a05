"""benchmarks/gpu_check.sh's CPU path: the same code as on a GPU, at tiny shapes."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_tiny_cpu_path_prints_every_field():
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny",
                             "--steps", "1"], capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = {line.split()[0]: dict(f.split("=", 1) for f in line.split()[1:])
             for line in result.stdout.splitlines() if "=" in line and not line.startswith("==")}
    assert set(lines) == {"device", "extract", "sae_step", "guides_step", "evaluate"}
    number = re.compile(r"^\d+(\.\d+)?$")
    assert lines["device"]["name"] == "cpu" and lines["device"]["shapes"] == "tiny"
    # tiny shapes: DINOv3 ViT-S/16 at 32 px is a 2x2 grid of 384-wide tokens
    assert (lines["extract"]["tokens"], lines["extract"]["d"]) == ("4", "384")
    assert number.match(lines["extract"]["images_per_s"]) and float(lines["extract"]["images_per_s"]) > 0
    assert float(lines["sae_step"]["tokens_per_s"]) > 0 and number.match(lines["sae_step"]["tflops"])
    assert lines["sae_step"]["batch_tokens"] == "8"  # 2 images x 4 tokens
    assert (lines["sae_step"]["peak_tflops"], lines["sae_step"]["peak_fraction"]) == ("n/a", "n/a")  # no peak for a CPU
    assert float(lines["guides_step"]["images_per_s"]) > 0 and float(lines["evaluate"]["images_per_s"]) > 0


def test_sae_step_flops_by_hand():
    """B 8, d 1024, n 4096, k 32, k_aux 512 (dense AuxK, 512/4096 >= 0.1): 4·B·d·n + 6·B·k·d + 6·B·n·d."""
    assert gpu_check.sae_step_flops(8, 1024, 4096, 32, 512) == 134_217_728 + 1_572_864 + 201_326_592
    # k_aux 16 of 4096 gathers rows instead: 6·B·k_aux·d
    assert gpu_check.sae_step_flops(8, 1024, 4096, 32, 16) == 134_217_728 + 1_572_864 + 786_432


def test_peak_table_matches_names_in_order(monkeypatch):
    import torch

    for name, peak in (("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("Some Future GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert gpu_check.peak_tflops(torch.device("cuda")) == peak, name
    assert gpu_check.peak_tflops(torch.device("cpu")) is None
