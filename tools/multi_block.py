"""Maps from several blocks, averaged ("which block(s)"), measured offline before building it.

Each ROOT is a checkout after `python -m pipeline.cli.preset configs/real.yaml && dvc repro` with a different
`backbone.layer` (same image size, so the same patch grid). For every run and every method (learned guides,
the two controls, the two baselines) this scores the per-patch maps of each root alone and the mean of the
roots' per-patch maps (each block keeps its own SAE and guides; the baselines are averaged the same way), with
the pipeline's own upsampling, blur, image score (`max`) and metric code. Image AUROC, pixel AUROC and AUPRO,
means over categories, per run and over runs.

  python tools/multi_block.py ROOT [ROOT ...] [--runs aux:target,...] [--out out.json]
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

from pipeline.method import baselines
from pipeline.evaluation import evaluate as evaluation
from runs import load_run, map_metrics, patch_probs, seed_mean  # tools/runs.py (the script's folder is on sys.path)

RUNS = "synth_a:synth_b,synth_b:synth_a,synth_a:kolektorsdd,synth_b:kolektorsdd,synth_a:bsdata,synth_b:bsdata"
ap = argparse.ArgumentParser()
ap.add_argument("roots", nargs="+", type=Path)
ap.add_argument("--runs", default=RUNS)
ap.add_argument("--out", default="multi_block.json")
args = ap.parse_args()
dev = torch.device("cpu")


baseline_cache: dict = {}


def patch_scores(root: Path, a: str, t: str) -> tuple[dict, object, dict]:
    """Per category: {method: (n, L) patch scores} for run a -> t in one root."""
    det, vec, target = load_run(root, a, t, dev)
    tau = det.settings.temperature
    out = {}
    for cat, (s0, s1) in evaluation.category_ranges(target).items():
        tok = torch.from_numpy(target.tokens[s0:s1].astype(np.float32))
        key = (str(root), t, cat)
        if key not in baseline_cache:
            baseline_cache[key] = {
                "self_dissimilarity": baselines.self_dissimilarity(tok),
                "mutual": torch.from_numpy(baselines.mutual(torch.from_numpy(target.tokens[s0:s1]), device=dev)),
            }
        out[cat] = {
            "learned": seed_mean(tok, vec, "learned", det.seeds, tau),
            "untrained_init": seed_mean(tok, vec, "untrained_init", det.seeds, tau),
            "no_sae": patch_probs(tok, vec["no_sae/0"], tau),
            **baseline_cache[key],
        }
    return out, target, det.settings


results = {}
for run in args.runs.split(","):
    a, t = run.split(":")
    per_root = [patch_scores(r, a, t) for r in args.roots]
    target, settings = per_root[0][1], per_root[0][2]
    grid, size = tuple(target.attrs["grid"]), target.masks.shape[-1]
    no_masks = set(target.attrs.get("categories_without_masks", []))
    variants = {f"block[{r.resolve().name}]": [i] for i, r in enumerate(args.roots)}
    variants["mean"] = list(range(len(args.roots)))
    per: dict = {}
    for cat, (s0, s1) in evaluation.category_ranges(target).items():
        labels = target.labels[s0:s1].astype(np.int64)
        masks = target.masks[s0:s1]
        for vname, idx in variants.items():
            for method in per_root[0][0][cat]:
                p = torch.stack([per_root[i][0][cat][method] for i in idx]).mean(0)
                per.setdefault(vname, {}).setdefault(method, {})[cat] = map_metrics(
                    p, labels, masks, grid, size, settings.blur_sigma, cat not in no_masks)
    results[run] = {
        v: {
            meth: [evaluation.mean_over_categories(pc)[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro")]
            for meth, pc in d.items()
        }
        for v, d in per.items()
    }
    print(run, flush=True)
    for v, d in results[run].items():
        print(f"  {v}")
        for meth, vals in d.items():
            print(f"    {meth:18s} " + " ".join("  —  " if x is None else f"{x:.3f}" for x in vals), flush=True)

print("\nmeans over runs (image AUROC over runs with good images, pixel AUROC, AUPRO):")
first = next(iter(results.values()))
for v, d in first.items():
    for meth in d:
        cols = [[r[v][meth][k] for r in results.values() if r[v][meth][k] is not None] for k in range(3)]
        print(f"  {v:14s} {meth:18s} " + " ".join(f"{np.mean(c):.3f}" for c in cols))
Path(args.out).write_text(json.dumps(results, indent=1))
