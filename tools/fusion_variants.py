"""Fusion variants measured offline (README "Results on real defects"): for each run, the guide map, the
controls, self-dissimilarity and their products / means, from the models and stores a `dvc repro` left.
Image AUROC (max score), pixel AUROC and AUPRO, means over categories, per run and over runs. The maps
are the pipeline's (same patch probabilities, mean of seeds, upsampling and blur), so `learned` and
`learned*sd` equal the evaluate stage's seed_ensemble with fusion none / self_dissimilarity.

  python tools/fusion_variants.py ROOT [aux:target,...] [out.json]
  (ROOT: a checkout after `python -m pipeline.cli.preset configs/real.yaml && dvc repro`; NOMUT=1 skips mutual)
"""
import json
import os
import sys
from pathlib import Path
import numpy as np, torch
from pipeline.evaluation import evaluate as evaluation
from pipeline.method import baselines
from runs import load_run, map_metrics, patch_probs, seed_mean  # tools/runs.py (the script's folder is on sys.path)

root = Path(sys.argv[1])
runs = sys.argv[2].split(",") if len(sys.argv) > 2 else [
    "synth_a:synth_b", "synth_b:synth_a", "synth_a:kolektorsdd", "synth_b:kolektorsdd", "synth_a:bsdata", "synth_b:bsdata"]
dev = torch.device("cpu")

results = {}
for run in runs:
    a, t = run.split(":")
    det, vec, target = load_run(root, a, t, dev)
    grid, size = tuple(target.attrs["grid"]), target.masks.shape[-1]
    sigma, tau = det.settings.blur_sigma, det.settings.temperature
    no_masks = set(target.attrs.get("categories_without_masks", []))
    per = {}
    for cat, (s0, s1) in evaluation.category_ranges(target).items():
        labels = target.labels[s0:s1].astype(np.int64); masks = target.masks[s0:s1]
        tok = torch.from_numpy(target.tokens[s0:s1].astype(np.float32))
        sd = baselines.self_dissimilarity(tok)  # (n, L)
        learned = seed_mean(tok, vec, "learned", det.seeds, tau)
        unt = seed_mean(tok, vec, "untrained_init", det.seeds, tau)
        nos = patch_probs(tok, vec["no_sae/0"], tau)
        mut = torch.from_numpy(baselines.mutual(torch.from_numpy(target.tokens[s0:s1]), device=dev)) if not os.environ.get("NOMUT") else sd
        cen = tok - tok.mean(1, keepdim=True)
        learned_c = seed_mean(cen, vec, "learned", det.seeds, tau)
        nos_c = patch_probs(cen, vec["no_sae/0"], tau)
        cands = {
            "learned": learned, "untrained": unt, "no_sae": nos, "self_dissim": sd, "mutual": mut,
            "learned*sd": learned * sd, "untrained*sd": unt * sd, "no_sae*sd": nos * sd,
            "learned+sd": 0.5 * (learned + sd), "no_sae+sd": 0.5 * (nos + sd),
            "sqrt(l*sd)": (learned * sd).sqrt(),
            "learned_c": learned_c, "no_sae_c": nos_c, "learned_c*sd": learned_c * sd, "no_sae_c*sd": nos_c * sd,
        }
        for name, p in cands.items():
            per.setdefault(name, {})[cat] = map_metrics(p, labels, masks, grid, size, sigma, cat not in no_masks)
    out = {}
    for name, pc in per.items():
        mm = evaluation.mean_over_categories(pc)
        out[name] = (mm["image_auroc"], mm["pixel_auroc"], mm["pixel_aupro"])
    results[run] = out
    print(run, flush=True)
    for name, v in out.items():
        print(f"  {name:14s} " + " ".join("  —  " if x is None else f"{x:.3f}" for x in v), flush=True)
names = list(next(iter(results.values())))
print("\nmeans over runs (image AUROC over runs with it, pixel AUROC, AUPRO):")
for name in names:
    cols = [[r[name][k] for r in results.values() if r[name][k] is not None] for k in range(3)]
    print(f"  {name:14s} " + " ".join(f"{np.mean(c):.3f}" for c in cols))
json.dump(results, open(sys.argv[3] if len(sys.argv) > 3 else "fusion_variants.json", "w"), indent=1)
