"""Benchmark: the detector through onnxruntime against torch eager, images/s side by side.

    python benchmarks/onnx_speed.py --detector models/synth_a/detector [--image-sizes 224 448]
        [--batch 8] [--repeats 5] [--threads N]

Per image size: the same graph (:class:`pipeline.method.onnx_graph.ScoringGraph`: backbone to the block,
guide scoring, upsampling, blur, image score) run by torch eager and, exported, by onnxruntime's CPU
provider, on one batch of normalised inputs, interleaved repeat by repeat so machine noise hits both.
Prints images/s of each, the ratio (goal: onnxruntime >= 1.3 x torch on CPU), the graph's FLOPs per
image (torch's FlopCounterMode) and the fraction of this machine's measured fp32 matmul rate that each
path reaches: the faster of a 2048^3 matmul in torch and in onnxruntime (one MatMul node) on the same
threads, a practical peak, not the datasheet's (the two libraries' GEMMs can differ by 2x or more on a CPU).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from predict_throughput import detector_at

from pipeline.method import onnx_graph
from pipeline.method.detector import Detector


def matmul_gflops(threads: int, n: int = 2048, repeats: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def ort_matmul_gflops(threads: int, n: int = 2048, repeats: int = 3) -> float:
    """The rate of one n^3 fp32 MatMul node in onnxruntime's CPU provider (its MLAS GEMM)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
                              [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in ("a", "b")],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnx's newest IR can be ahead of what the pinned onnxruntime reads
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {k: np.random.default_rng(0).standard_normal((n, n), np.float32) for k in ("a", "b")}
    session.run(None, feeds)
    best = min(_timed(lambda: session.run(None, feeds)) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", required=True, type=Path)
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    import onnxruntime as ort
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    rates = {"torch": matmul_gflops(args.threads), "onnxruntime": ort_matmul_gflops(args.threads)}
    peak = max(rates.values())
    print(f"{args.threads} threads; fp32 matmul 2048^3: torch {rates['torch']:.1f} GFLOP/s, onnxruntime "
          f"{rates['onnxruntime']:.1f} GFLOP/s; the faster is the 'peak' below")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in args.image_sizes:
            folder = detector_at(args.detector, size, tmp)
            det = Detector.load(folder)
            graph = onnx_graph.ScoringGraph(det.backbone, det.vectors, det.settings, det.grid, det.image_size).eval()
            onnx_graph.export(folder, tmp / f"d{size}.onnx")
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            session = ort.InferenceSession(str(tmp / f"d{size}.onnx"), options, providers=["CPUExecutionProvider"])
            x = torch.randn(args.batch, 3, size, size)
            with FlopCounterMode(display=False) as counter:
                graph(x[:1])
            flops = counter.get_total_flops()
            want = graph(x)[0].numpy()
            got = session.run(["maps"], {"images": x.numpy()})[0]
            times = {"torch": [], "onnxruntime": []}
            for _ in range(args.repeats):
                times["torch"].append(_timed(lambda: graph(x)))
                times["onnxruntime"].append(_timed(lambda: session.run(None, {"images": x.numpy()})))
            rate = {k: args.batch / statistics.median(v) for k, v in times.items()}
            print(f"{size} px: {flops / 1e9:.2f} GFLOP/image; max |map difference| {np.abs(got - want).max():.2e}")
            for k, r in rate.items():
                print(f"  {k:12s} {r:7.2f} images/s  {100 * r * flops / 1e9 / peak:5.1f} % of the matmul peak")
            print(f"  onnxruntime / torch: x{rate['onnxruntime'] / rate['torch']:.2f}")


if __name__ == "__main__":
    main()
