"""Benchmark: peak RSS and time of scoring one category at N and factor x N images, the streaming path
(the evaluate stage's) side by side with the old in-memory path, in one run.

    python benchmarks/evaluate_memory.py [--images 64] [--factor 4] [--size 224] [--grid 14] [--dim 384]
        [--batch 16] [--no-baselines | --baselines-only] [--repeats 1]

A synthetic store of one category (half the images anomalous, one rectangle each) is scored like the
evaluate stage scores a category: 3 guide sets (random (4, d) vectors, named ``learned/<seed>``, so the
seed ensemble is a 4th map) and the 2 training-free baselines, then the six metrics of each:

- ``old``: ``evaluation.score_rows`` and :func:`old_baseline_rows` (``baseline_rows`` without a sink:
  the category's tokens (N, L, d) float16 read at once, and ``mutual`` on a float32 copy of them,
  ``benchmarks/mutual.py:old_mutual``) keeping every map of the category, then ``metrics.compute_all``
  (one sort of all pixels) per scored set: what evaluate did before;
- ``new``: ``score_rows`` / ``baseline_rows`` with the stage's sink
  (:class:`pipeline.stages.evaluate.CategoryMaps`): each batch's maps go to sorted run files, the
  metrics come from merging them (``metrics_stream``); the baselines read tokens chunk by chunk and
  ``mutual`` in blocks of images (``baselines.mutual_streamed``).

Each case is a child process; its peak RSS comes from ``os.wait4`` (ru_maxrss of that child), its time
(scoring + metrics, store already built) from the child itself. Targets: growth of the new path's peak
RSS from N to factor x N < 15 %; old time / new time >= 0.8. ``--no-baselines`` measures the guide
sets alone, ``--baselines-only`` the baseline path alone (no guide sets). What still grows with N in the
new baseline path: ``mutual``'s (b·L, N) nearest-patch distances of one query block and its (N, L)
float32 scores (pipeline/method/baselines.py), a few MiB at these sizes.
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


def old_baseline_rows(target, start: int, stop: int, settings, batch_images: int, device) -> dict:
    """``evaluation.baseline_rows`` with no sink, but for ``old_mutual``: the
    whole category's tokens read at once, ``mutual`` on all of them in memory."""
    import torch

    from mutual import old_mutual
    from pipeline.method import baselines
    from pipeline.method import scoring

    grid, size = tuple(target.attrs["grid"]), target.masks.shape[-1]
    tokens = target.tokens[start:stop]  # (n, L, d) float16: mutual needs the whole category at once
    target.check_finite("tokens", tokens, start)
    n = len(tokens)
    patch = {baselines.SELF_DISSIMILARITY: np.concatenate([
        baselines.self_dissimilarity(torch.from_numpy(tokens[i:i + batch_images].astype(np.float32)).to(device)).cpu().numpy()
        for i in range(0, n, batch_images)])}
    reasons = {}
    if n >= 2:
        patch[baselines.MUTUAL] = old_mutual(torch.from_numpy(tokens), device=device)
    else:
        reasons[baselines.MUTUAL] = baselines.ONE_IMAGE
    out: dict = {name: (None, None, reason) for name, reason in reasons.items()}
    maps: dict = {name: [] for name in patch}
    modes: dict = {name: [] for name in patch}
    for i in range(0, n, batch_images):
        batch = {name: scoring.patch_maps(torch.from_numpy(values[i:i + batch_images]), grid, size,
                                          sigma=settings.blur_sigma) for name, values in patch.items()}
        for name, m in batch.items():
            modes[name].append(scoring.scores_by_mode(m, None, settings))
            maps[name].append(m)
    for name in patch:
        by_mode = {mode: None if modes[name][0][mode] is None else np.concatenate([b[mode] for b in modes[name]])
                   for mode in scoring.IMAGE_SCORES}
        out[name] = (np.concatenate(maps[name]), by_mode, None)
    return {name: out[name] for name in baselines.SETTINGS}


def child(mode: str, path: Path, batch: int, with_baselines: bool, scratch: Path, with_guides: bool = True) -> None:
    import torch

    from pipeline.evaluation import evaluate as evaluation
    from pipeline.evaluation import metrics
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
    if mode == "old":
        masks = target.masks[:]
        if vectors:
            for name, (maps, scores) in evaluation.score_rows(target, 0, n, vectors, settings, batch, device).items():
                out[name] = metrics.compute_all(labels, scores, masks, maps)
        if with_baselines:
            for name, entry in old_baseline_rows(target, 0, n, settings, batch, device).items():
                out[name] = evaluation.baseline_metrics(labels, masks, entry, "max")
    else:
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


def run_child(args: argparse.Namespace, mode: str, path: Path, scratch: Path) -> tuple[float, float, str]:
    """(peak RSS MiB, seconds, metrics line) of one child."""
    cmd = [sys.executable, __file__, "--child", mode, str(path), str(scratch), "--batch", str(args.batch)]
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
    parser.add_argument("--child", nargs=3, metavar=("MODE", "STORE", "SCRATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), args.batch, not args.no_baselines, Path(args.child[2]),
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
                for mode in ("old", "new"):
                    r, s, values = run_child(args, mode, tmp / f"store_{n}", tmp)
                    rss.setdefault((mode, n), []).append(r)
                    secs.setdefault((mode, n), []).append(s)
                    print(f"repeat {rep} {mode:3s} {n:5d} images: peak RSS {r:8.1f} MiB  {s:7.2f} s  aupro {values}",
                          flush=True)
    med = lambda v: float(np.median(v))  # noqa: E731
    small, large = sizes
    what = f"S={args.size}, L={args.grid ** 2}, d={args.dim}, batch {args.batch}, " + (
        "2 baselines only" if args.baselines_only else "3 guide sets + ensemble" + (
            "" if args.no_baselines else " + 2 baselines"))
    print(f"\n{what}")
    for mode in ("old", "new"):
        a, b = med(rss[mode, small]), med(rss[mode, large])
        print(f"{mode}: peak RSS {small} images {a:.1f} MiB | {large} images {b:.1f} MiB | growth {100 * (b / a - 1):+.1f} %")
    for n in sizes:
        print(f"{n} images: old {med(secs['old', n]):.2f} s, new {med(secs['new', n]):.2f} s, "
              f"old/new {med(secs['old', n]) / med(secs['new', n]):.2f} (target >= 0.8)")
    print("target: new growth < 15 %")


if __name__ == "__main__":
    main()
