"""Export a detector as one ONNX graph (:mod:`pipeline.method.onnx_graph`), for lines without Python.

    python -m pipeline.cli.export_onnx --detector models/synth_a/detector [--out FILE] [--weights W] [--opset 18]
    spg-export-onnx ...

Writes ``<detector>/detector.onnx`` by default, atomically; ``predict --runtime onnxruntime`` scores
through it. The graph's maps and scores equal the torch detector's to 1e-4 (tests/test_onnx.py).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger("pipeline.cli.export_onnx")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", required=True, type=Path, help="models/<A>/detector")
    parser.add_argument("--out", type=Path, default=None, help="the ONNX file (default <detector>/detector.onnx)")
    parser.add_argument("--weights", type=Path, default=None, help="backbone weights (default: detector.json's)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    args = parser.parse_args(argv)
    from pipeline.launch import setup_logging
    from pipeline.method import onnx_graph

    setup_logging()
    out = args.out if args.out is not None else args.detector / "detector.onnx"
    t0 = time.perf_counter()
    meta = onnx_graph.export(args.detector, out, weights=args.weights, opset=args.opset or onnx_graph.OPSET)
    log.info("%s -> %s (opset %s, %s px, image score %s) in %.1f s", args.detector, out, meta["opset"],
             meta["image_size"], meta["image_score"], time.perf_counter() - t0)


def console() -> None:
    """The ``spg-export-onnx`` command: :func:`main` with errors as one line."""
    from pipeline.launch import run

    run(main)


if __name__ == "__main__":
    console()
