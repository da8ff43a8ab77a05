"""What a coreset of the reference patches costs the few-shot modes: two report folders side by side
(a research analysis behind docs/experiments.md; nothing here is used by the pipeline).

    python -m analysis.coreset --before A/reports --after B/reports --runs synth_a_to_synth_b ...

``--before`` and ``--after`` are the ``reports/`` of two checkouts that differ in ``neighbours.max_patches``
alone (null: every reference patch searched; N: a greedy k-centre coreset of N patches per draw). Prints,
for each run, k and few-shot mode, the image and pixel AUROC (means over draws, as metrics.json holds
them) before and after, then per (k, mode, level) the mean over the runs where both are defined.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODES = ("reference", "guides+reference", "guides+reference+batch")
LEVELS = {"image": "image_auroc", "pixel": "pixel_auroc"}


def few_shot(reports: Path, run: str) -> dict:
    """metrics.json's ``few_shot`` of one run."""
    return json.loads((reports / run / "metrics.json").read_text())["few_shot"]


def compare(before: Path, after: Path, runs: list[str]) -> tuple[list[tuple], dict]:
    """Rows (run, k, mode, level, before, after) and {(k, mode, level): [(before, after), ...]} where both
    are defined."""
    rows, pooled = [], {}
    for run in runs:
        a, b = few_shot(before, run), few_shot(after, run)
        for k in sorted(a, key=lambda s: int(s.split("=")[1])):
            for mode in MODES:
                for level, key in LEVELS.items():
                    x, y = a[k].get(mode, {}).get(key), b.get(k, {}).get(mode, {}).get(key)
                    rows.append((run, k, mode, level, x, y))
                    if x is not None and y is not None:
                        pooled.setdefault((k, mode, level), []).append((x, y))
    return rows, pooled


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="reports/ without the coreset")
    parser.add_argument("--after", type=Path, required=True, help="reports/ with it")
    parser.add_argument("--runs", nargs="+", required=True)
    args = parser.parse_args(argv)
    rows, pooled = compare(args.before, args.after, args.runs)
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    print("| run | k | mode | level | all patches | coreset |\n|---|---|---|---|---:|---:|")
    for run, k, mode, level, x, y in rows:
        if x is not None or y is not None:
            print(f"| {run} | {k} | {mode} | {level} AUROC | {fmt(x)} | {fmt(y)} |")
    print("\n| k | mode | level | runs | all patches | coreset | difference |\n|---|---|---|---:|---:|---:|---:|")
    for (k, mode, level), pairs in sorted(pooled.items(), key=lambda kv: (int(kv[0][0].split("=")[1]), kv[0][1:])):
        x = sum(p[0] for p in pairs) / len(pairs)
        y = sum(p[1] for p in pairs) / len(pairs)
        print(f"| {k} | {mode} | {level} AUROC | {len(pairs)} | {x:.4f} | {y:.4f} | {y - x:+.4f} |")


if __name__ == "__main__":
    main()
