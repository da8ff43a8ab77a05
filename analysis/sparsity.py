"""Does "a small set of atoms" hold, and what does a sparser guide cost? The sparsity–accuracy table.

One folder per guide setting, each a copy of a run's reports (``<A>/atoms.json``, ``<run>/metrics.json``)
and its ``params.yaml``, as the loop in docs/experiments.md ("Sparsity and accuracy") writes them:

    python -m analysis.sparsity SWEEP_DIR [--out reports/sparsity]

For each setting: the active atoms per local guide row (mean over auxiliary sets and seeds), the share
of the score direction in the top 1 and 10 atoms (:mod:`pipeline.method.atoms`), and per run the guides'
image and pixel AUROC with their std over guide seeds; then the mean over runs (image AUROC over the
runs where it is defined). Writes ``<out>/sparsity.csv`` and ``<out>/sparsity.png`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

from pipeline.evaluation import report


def setting_of(folder: Path) -> dict:
    """The guide setting a folder was run with, from its params.yaml."""
    g = yaml.safe_load((folder / "params.yaml").read_text())["guides"]
    label = f"l1 {g['l1_coef']:g}" if g["variant"] == "l1" else f"topk {g['guide_topk']}"
    return {"setting": label, "variant": g["variant"], "l1_coef": g["l1_coef"], "guide_topk": g["guide_topk"]}


def sparsity_of(folder: Path) -> dict:
    """Mean over auxiliary sets and seeds of the active atoms per local row and of the concentration."""
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("*/atoms.json"))]
    if not rows:
        raise SystemExit(f"{folder}: no <A>/atoms.json (run the atoms stage)")
    active = [s for r in rows for s in r["active_atoms"]]
    conc = [c for r in rows for c in r["concentration"]["per_seed"]]
    return {"active_anomaly_local": float(np.mean([a["anomaly_local"] for a in active])),
            "active_normal_local": float(np.mean([a["normal_local"] for a in active])),
            "top_1": float(np.mean([c["top_1"] for c in conc])), "top_10": float(np.mean([c["top_10"] for c in conc]))}


def accuracy_of(folder: Path) -> tuple[dict, dict]:
    """({run: {image_auroc, image_auroc_std, pixel_auroc, pixel_auroc_std}}, the means over runs)."""
    runs = {}
    for path in sorted(folder.glob("*_to_*/metrics.json")):
        m = json.loads(path.read_text())
        runs[path.parent.name] = {k: m.get(k) for k in ("image_auroc", "image_auroc_std", "pixel_auroc",
                                                         "pixel_auroc_std")}
    if not runs:
        raise SystemExit(f"{folder}: no <run>/metrics.json")

    def mean(key: str) -> float | None:
        values = [r[key] for r in runs.values() if r[key] is not None]
        return float(np.mean(values)) if values else None

    return runs, {k: mean(k) for k in ("image_auroc", "image_auroc_std", "pixel_auroc", "pixel_auroc_std")}


def table(sweep: Path) -> list[dict]:
    rows = []
    for folder in sorted(p for p in sweep.iterdir() if (p / "params.yaml").is_file()):
        runs, means = accuracy_of(folder)
        row = {**setting_of(folder), **sparsity_of(folder), **{f"mean_{k}": v for k, v in means.items()}}
        for run, m in runs.items():
            row[f"{run}.image_auroc"], row[f"{run}.pixel_auroc"] = m["image_auroc"], m["pixel_auroc"]
        rows.append(row)
    # Folder names sort as strings (topk_16 before topk_8); order by the setting's own number instead.
    return sorted(rows, key=lambda r: (r["variant"], r["l1_coef"] if r["variant"] == "l1" else r["guide_topk"]))


def figure(rows: list[dict]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for ax, key, name in ((axes[0], "image_auroc", "image AUROC"), (axes[1], "pixel_auroc", "pixel AUROC")):
        for variant, marker in (("l1", "o"), ("topk", "s")):
            sel = [r for r in rows if r["variant"] == variant and r[f"mean_{key}"] is not None]
            if not sel:
                continue
            x = [max(r["active_anomaly_local"], 0.5) for r in sel]
            ax.errorbar(x, [r[f"mean_{key}"] for r in sel], yerr=[r[f"mean_{key}_std"] or 0 for r in sel],
                        marker=marker, linestyle="none", capsize=3, label=variant)
            for xi, r in zip(x, sel):
                ax.annotate(r["setting"], (xi, r[f"mean_{key}"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("active atoms in the anomaly-local guide (mean)")
        ax.set_ylabel(f"guides' {name}, mean over runs")
        ax.legend(fontsize=7)
    fig.suptitle("sparsity of the guide codes against accuracy (error bars: mean std over guide seeds)", fontsize=9)
    fig.tight_layout()
    return fig


def markdown(rows: list[dict]) -> str:
    def f(v, d=3):
        return "n/a" if v is None else f"{v:.{d}f}"

    lines = ["| setting | active atoms (anomaly / normal local) | top-1 / top-10 share | image AUROC (seed std) "
             "| pixel AUROC (seed std) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['active_anomaly_local']:.0f} / {r['active_normal_local']:.0f} | "
                     f"{f(r['top_1'], 2)} / {f(r['top_10'], 2)} | {f(r['mean_image_auroc'])} "
                     f"({f(r['mean_image_auroc_std'])}) | {f(r['mean_pixel_auroc'])} ({f(r['mean_pixel_auroc_std'])}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="one folder per setting (params.yaml + reports)")
    parser.add_argument("--out", type=Path, default=Path("reports/sparsity"))
    args = parser.parse_args(argv)
    rows = table(args.sweep)
    if not rows:
        raise SystemExit(f"{args.sweep}: no setting folder (one with a params.yaml)")
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k.count("."), k))
    report.write_csv(args.out / "sparsity.csv", rows, fields)
    report.save_figure(figure(rows), args.out / "sparsity.png")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
