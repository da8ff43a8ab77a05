"""Benchmark: peak RSS and time of scoring one category at N and factor x N images as the evaluate
stage scores it, in one run: the growth of the peak with N.

    python benchmarks/evaluate_memory.py [--images 64] [--factor 4] [--size 224] [--grid 14] [--dim 384]
        [--batch 16] [--no-baselines | --baselines-only] [--repeats 1]

A synthetic store of one category (half the images anomalous, one rectangle each) is scored with 3
guide sets (random (4, d) vectors, named ``learned/<seed>``, so the seed ensemble is a 4th map) and the
2 training-free baselines, through the stage's sink (:class:`pipeline.stages.evaluate.CategoryMaps`):
each batch's maps go to sorted run files and the metrics come from merging them (``metrics_stream``);
the baselines read tokens chunk by chunk. Each case is a child process; its peak RSS comes from
``os.wait4`` (ru_maxrss of that child), its time (scoring + metrics, store already built) from the
child itself. Target: peak RSS growth from N to factor x N < 15 %. The in-memory path this replaced was
measured against it and retired (figures in docs/reliability.md, "Memory").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(path: Path, batch: int, with_baselines: bool, scratch: Path, with_guides: bool = True) -> None:
    import torch

    from pipeline.evaluation import evaluate as evaluation
    from pipeline.evaluation import metrics_stream
    from pipeline.method import scoring
    from pipeline.features import store
    from pipeline.stages.evaluate import CategoryMaps, overlay_pick

    torch.set_grad_enabled(False)
    target = store.open_store(path)
    n, d = target.n_images, target.tokens.shape[-1]
    g = torch.Generator().manual_seed(0)
    vectors = {f"learned/{s}": torch.randn(4, d, generator=g) for s in range(3 if with_guides else 0)}
    settings = scoring.ScoreSettings(blur_sigma=4.0)
    device = torch.device("cpu")
    labels = target.labels[:].astype(np.int64)
    start = time.perf_counter()
    out = {}
    sink = CategoryMaps(target, 0, scratch, has_masks=True, overlay_set="learned/0" if vectors else None,
                        overlay_pick=overlay_pick(labels, 6), sample_fraction=0.01, rng=np.random.default_rng(0))
    try:
        scored = evaluation.score_rows(target, 0, n, vectors, settings, batch, device, keep_maps=False,
                                       sink=sink) if vectors else {}
        for name, (_, scores) in scored.items():
            out[name] = sink.streams[name].metrics(labels, scores)
        if with_baselines:
            for name, entry in evaluation.baseline_rows(target, 0, n, settings, batch, device, sink=sink).items():
                out[name] = evaluation.baseline_metrics(labels, None, entry, "max", pixels=sink.streams.get(name))
    finally:
        sink.close()
    seconds = time.perf_counter() - start
    auroc = {k: round(v["pixel_aupro"], 12) for k, v in out.items()}
    print(f"RESULT {seconds:.4f} {auroc}", flush=True)
    del metrics_stream


def run_child(args: argparse.Namespace, path: Path, scratch: Path) -> tuple[float, float, str]:
    """(peak RSS MiB, seconds, metrics line) of one child."""
    cmd = [sys.executable, __file__, "--child", str(path), str(scratch), "--batch", str(args.batch)]
    if args.no_baselines:
        cmd.append("--no-baselines")
    if args.baselines_only:
        cmd.append("--baselines-only")
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {os.waitstatus_to_exitcode(status)}")
    line = next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))
    _, seconds, values = line.split(" ", 2)
    return usage.ru_maxrss / 1024, float(seconds), values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--size", type=int, default=224, help="S, the maps' side")
    parser.add_argument("--grid", type=int, default=14, help="patch grid side (L = grid^2 tokens)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batch", type=int, default=16, help="evaluate.batch_images")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--no-baselines", action="store_true", help="the guide sets alone")
    which.add_argument("--baselines-only", action="store_true", help="the 2 training-free baselines alone")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", nargs=2, metavar=("STORE", "SCRATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.batch, not args.no_baselines, Path(args.child[1]),
              with_guides=not args.baselines_only)
        return

    from _stores import build_store

    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:  # on the work disk: run files must not land in a tmpfs
        tmp = Path(tmp)
        sizes = (args.images, args.images * args.factor)
        for n in sizes:
            build_store(tmp / f"store_{n}", n, args.grid * args.grid, args.dim, chunk_images=args.batch, seed=0,
                        mask_size=args.size, anomalous_fraction=0.5)
        rss, secs = {}, {}
        for rep in range(args.repeats):
            for n in sizes:
                r, s, values = run_child(args, tmp / f"store_{n}", tmp)
                rss.setdefault(n, []).append(r)
                secs.setdefault(n, []).append(s)
                print(f"repeat {rep} {n:5d} images: peak RSS {r:8.1f} MiB  {s:7.2f} s  aupro {values}", flush=True)
    med = lambda v: float(np.median(v))  # noqa: E731
    small, large = sizes
    what = f"S={args.size}, L={args.grid ** 2}, d={args.dim}, batch {args.batch}, " + (
        "2 baselines only" if args.baselines_only else "3 guide sets + ensemble" + (
            "" if args.no_baselines else " + 2 baselines"))
    print(f"\n{what}")
    a, b = med(rss[small]), med(rss[large])
    print(f"peak RSS {small} images {a:.1f} MiB | {large} images {b:.1f} MiB | growth {100 * (b / a - 1):+.1f} %")
    for n in sizes:
        print(f"{n} images: {med(secs[n]):.2f} s, {1000 * med(secs[n]) / n:.1f} ms per image")
    print("target: growth < 15 %")


if __name__ == "__main__":
    main()
