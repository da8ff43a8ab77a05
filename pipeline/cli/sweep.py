"""Sensitivity heatmaps of a sweep: `dvc exp show --json` -> CSV + PNG per run.

    dvc exp run --queue -S 'sae.n_latents=2048,4096' -S 'sae.k=16,32'   # 4 cells
    dvc queue start -j 2 && dvc queue status                             # wait until all are done
    python -m pipeline.cli.sweep --out reports/sweep                         # runs `dvc exp show --json`
    python -m pipeline.cli.sweep --json exp.json --out reports/sweep          # or from a saved file
    python -m pipeline.cli.sweep --x backbone.layer --y backbone.image_size   # any two params
    python -m pipeline.cli.sweep -A ...                                       # experiments of older commits too

Only experiments whose params other than the two swept ones equal the workspace's are used (``--all``
keeps every one), so another sweep or an unrelated experiment never lands in a cell. For every run
(``reports/<run>/metrics.json``) it writes ``<out>/<run>.csv`` (one row per
experiment: its name, the two swept params, image and pixel AUROC, and the same two of the ``no_sae``
control) and ``<out>/<run>.png`` (two
heatmaps, cells annotated). Several experiments with different results in one cell are averaged and
listed in the CSV; one result seen under several revisions counts once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.evaluation import report

METRICS = ("image_auroc", "pixel_auroc")
CONTROL = "no_sae"
"""The control whose metrics the CSV lists beside each result (mean auxiliary tokens as guides)."""


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def experiments(states: list[dict]) -> Iterator[dict]:
    """Flatten `dvc exp show --json` (ExpState trees) into {name, rev, params, metrics} per experiment.

    ``params`` are dotted keys of params.yaml; ``metrics`` maps a metrics file path to its content.
    The baseline (workspace and commits) is included; states that failed or hold no data, and
    experiments still queued or running, are skipped.
    """
    for state in states:
        data = state.get("data")
        if data and not state.get("error"):
            params = (data.get("params") or {}).get("params.yaml", {}).get("data") or {}
            metrics = {path: r.get("data") for path, r in (data.get("metrics") or {}).items() if r.get("data")}
            name = state.get("name") or (state["rev"] if state["rev"] == "workspace" else state["rev"][:7])
            yield {"name": name, "rev": state["rev"],
                   "params": _flatten(params), "metrics": metrics}
        for exp_range in state.get("experiments") or []:
            executor = exp_range.get("executor") or {}
            if executor.get("state") in ("queued", "running", "failed"):
                continue  # a running experiment shows its base commit's metrics until it finishes
            yield from experiments(exp_range.get("revs") or [])


def table(exps: list[dict], x: str, y: str, baseline: dict[str, Any] | None = None
          ) -> tuple[dict[str, list[dict]], list[tuple[str, str]]]:
    """(run name -> rows {experiment, x, y, image_auroc, pixel_auroc}, left out).

    One row per experiment having both params; a result seen again (same run, cell and metrics: the
    workspace and its commit, or every commit of ``dvc exp show -A`` that carries it) counts once. With ``baseline`` (flattened params), an experiment
    whose params other than ``x`` and ``y`` differ from it is left out, so a cell never mixes in an
    unrelated experiment (another sweep, another backbone); ``left out`` lists (name, first differing
    key) of those.
    """
    runs: dict[str, list[dict]] = defaultdict(list)
    left_out: list[tuple[str, str]] = []
    seen_revs: set[str] = set()
    seen_results: set[tuple] = set()
    for e in exps:
        if e["rev"] in seen_revs or x not in e["params"] or y not in e["params"]:
            continue
        seen_revs.add(e["rev"])
        if baseline is not None:
            differing = sorted(k for k in set(baseline) | set(e["params"])
                               if k not in (x, y) and e["params"].get(k) != baseline.get(k))
            if differing:
                left_out.append((e["name"], differing[0]))
                continue
        for path, m in e["metrics"].items():
            parts = Path(path).parts
            if len(parts) == 3 and parts[0] == "reports" and parts[2] == "metrics.json":
                control = (m.get("controls") or {}).get(CONTROL) or {}
                row = {"experiment": e["name"], x: e["params"][x], y: e["params"][y],
                       **{k: m.get(k) for k in METRICS}, **{f"{CONTROL}_{k}": control.get(k) for k in METRICS}}
                key = (parts[1], repr(row[x]), repr(row[y]), *(repr(row[k]) for k in METRICS))
                if key not in seen_results:  # the same result seen again (workspace, its commit, an applied experiment)
                    seen_results.add(key)
                    runs[parts[1]].append(row)
    return dict(runs), left_out


def heatmap_grid(rows: list[dict], x: str, y: str, metric: str) -> tuple[list, list, np.ndarray, np.ndarray]:
    """(x values, y values, mean (len y, len x) with NaN where empty, count per cell)."""
    xs = sorted({r[x] for r in rows})
    ys = sorted({r[y] for r in rows})
    total = np.zeros((len(ys), len(xs)))
    count = np.zeros((len(ys), len(xs)), dtype=int)
    for r in rows:
        if r[metric] is not None:
            i, j = ys.index(r[y]), xs.index(r[x])
            total[i, j] += r[metric]
            count[i, j] += 1
    with np.errstate(invalid="ignore"):
        return xs, ys, np.where(count > 0, total / np.maximum(count, 1), np.nan), count


def plot(path: Path, rows: list[dict], x: str, y: str, title: str) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5.2 * len(METRICS), 4.2), dpi=110, squeeze=False)
    for ax, metric in zip(axes[0], METRICS):
        xs, ys, grid, _ = heatmap_grid(rows, x, y, metric)
        im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
        ax.set_xticks(range(len(xs)), xs)
        ax.set_yticks(range(len(ys)), ys)
        ax.set(xlabel=x, ylabel=y, title=metric)
        for i in range(len(ys)):
            for j in range(len(xs)):
                if not np.isnan(grid[i, j]):
                    bright = im.norm(grid[i, j]) > 0.6  # viridis is light at the top: dark text there
                    ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=9,
                            color="black" if bright else "white")
        fig.colorbar(im, ax=ax)
    fig.suptitle(title)
    fig.tight_layout()
    report.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="saved `dvc exp show --json` output (default: run it)")
    parser.add_argument("--out", type=Path, default=Path("reports/sweep"))
    parser.add_argument("--x", default="sae.k", help="param on the x axis")
    parser.add_argument("--y", default="sae.n_latents", help="param on the y axis")
    parser.add_argument("--all-commits", "-A", action="store_true",
                        help="experiments of every commit (`dvc exp show -A`), not only those based on HEAD; "
                             "results of older code count too")
    parser.add_argument("--all", action="store_true",
                        help="keep experiments whose other params differ from the workspace's (default: leave them out)")
    args = parser.parse_args(argv)
    if args.json:
        states = json.loads(args.json.read_text())
    else:
        cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json"] + (["-A"] if args.all_commits else [])
        shown = subprocess.run(cmd, capture_output=True, text=True)
        if shown.returncode != 0:
            print(f"error: dvc exp show failed: {shown.stderr.strip()}", file=sys.stderr)
            return 1
        states = json.loads(shown.stdout)
    exps = list(experiments(states))
    workspace = next((e["params"] for e in exps if e["rev"] == "workspace"), None)
    runs, left_out = table(exps, args.x, args.y, None if args.all else workspace)
    if left_out:
        print(f"left out {len(left_out)} experiment(s) whose other params differ from the workspace's "
              f"(--all keeps them): " + ", ".join(f"{n} ({k})" for n, k in left_out))
    if not runs:
        print(f"error: no experiment has {args.x}, {args.y} and a reports/<run>/metrics.json", file=sys.stderr)
        return 1
    for run, rows in sorted(runs.items()):
        report.write_csv(args.out / f"{run}.csv", rows)
        plot(args.out / f"{run}.png", rows, args.x, args.y, f"{run}: sensitivity to {args.y} x {args.x}")
        print(f"{run}: {len(rows)} experiments -> {args.out / run}.csv, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
