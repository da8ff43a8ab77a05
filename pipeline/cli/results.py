"""Write the results tables from the reports, so no number in the docs is typed by hand.

    python -m pipeline.cli.results                      # writes docs/results.md and README's table
    python -m pipeline.cli.results --check              # exit 1 if either differs from the reports
    python -m pipeline.cli.results --reports other/ --out other.md --readme ''

Reads every ``<reports>/<run>/metrics.json`` (the evaluate stage's) and writes one table per signal
set: the zero-shot detector (guides alone), the batch (``mutual`` alone and fused with the guides), the
few-shot modes per k, and the controls, each run a row; then the mean over runs. The README's headline
table (between ``<!-- results:begin -->`` and ``<!-- results:end -->``) is the first of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pipeline.errors import PipelineError

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
TRIPLE = ("image_auroc", "pixel_auroc", "pixel_aupro")
SHORT = {"image_auroc": "I-AUROC", "pixel_auroc": "P-AUROC", "pixel_aupro": "AUPRO"}


class ResultsError(PipelineError, ValueError):
    """A report folder without a readable metrics.json, or a README without the results markers."""


def load_runs(reports: Path) -> dict[str, dict[str, Any]]:
    """run name -> its metrics.json, for every ``reports/<run>/metrics.json``, sorted by name."""
    paths = sorted(reports.glob("*/metrics.json"))
    if not paths:
        raise ResultsError(f"{reports}: no <run>/metrics.json (run dvc repro first)")
    runs = {}
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ResultsError(f"{path}: not a readable metrics.json ({err})") from err
        if not isinstance(data, dict) or "image_auroc" not in data:
            raise ResultsError(f"{path}: not an evaluate report (no image_auroc key)")
        runs[path.parent.name] = data
    return runs


def fmt(value: Any) -> str:
    """A metric as the tables print it: 3 decimals, ``–`` for null (undefined on that target)."""
    return "–" if value is None else f"{float(value):.3f}"


def pick(metrics: Mapping[str, Any], *path: str) -> Mapping[str, Any] | None:
    for key in path:
        if not isinstance(metrics, Mapping) or key not in metrics:
            return None
        metrics = metrics[key]
    return metrics


Column = tuple[str, Callable[[Mapping[str, Any]], Mapping[str, Any] | None]]


def table(runs: Mapping[str, Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """One markdown table: a row per run and the mean over runs, each column a scoring's triple."""
    head = ["run (aux → target)"] + [f"{name} {SHORT[k]}" for name, _ in columns for k in TRIPLE]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sums: dict[tuple[int, str], list[float]] = {}
    for run, m in runs.items():
        cells = [f"{run} ({m.get('aux', '?')} → {m.get('target', '?')})"]
        for i, (_, get) in enumerate(columns):
            scored = get(m)
            for key in TRIPLE:
                value = None if scored is None else scored.get(key)
                cells.append(fmt(value))
                if value is not None:
                    sums.setdefault((i, key), []).append(float(value))
        rows.append("| " + " | ".join(cells) + " |")
    mean = ["**mean over the runs where defined**"]
    for i in range(len(columns)):
        for key in TRIPLE:
            values = sums.get((i, key))
            mean.append(fmt(sum(values) / len(values)) if values else "–")
    rows.append("| " + " | ".join(mean) + " |")
    return "\n".join(rows) + "\n"


def few_shot_ks(runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    keys = {k for m in runs.values() for k in (m.get("few_shot") or {})}
    return sorted(keys, key=lambda k: int(k.split("=")[1]))


HEADLINE: list[Column] = [
    ("guides", lambda m: m),
    ("mutual", lambda m: pick(m, "baselines", "mutual")),
    ("guides+batch", lambda m: pick(m, "fused", "guides+batch")),
]


def load_atoms(reports: Path) -> dict[str, dict[str, Any]]:
    """aux set -> its atoms.json (the atoms stage's), for every ``reports/<A>/atoms.json``."""
    out = {}
    for path in sorted(reports.glob("*/atoms.json")):
        try:
            out[path.parent.name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ResultsError(f"{path}: not a readable atoms.json ({err})") from err
    return out


def atoms_table(atoms: Mapping[str, Mapping[str, Any]]) -> str:
    """Per auxiliary set: active atoms of the local guides (mean over seeds), the share of the score
    direction in the top 1, 5, 10, 50 atoms (each seed's, then the mean), and the kinds of the reported atoms."""
    head = ("| aux | active atoms anomaly-local | active atoms normal-local | top-1 | top-5 | top-10 | top-50 "
            "| reported atoms: specific / general / mixed / silent |")
    lines = [head, "|" + "---|" * 8]
    for name, a in atoms.items():
        active = a["active_atoms"]
        conc = a["concentration"]["per_seed"]

        def mean(rows, key):
            return sum(r[key] for r in rows) / len(rows)

        kinds = a["kinds"]
        lines.append(f"| {name} | {mean(active, 'anomaly_local'):.0f} | {mean(active, 'normal_local'):.0f} | "
                     + " | ".join(fmt(mean(conc, f"top_{k}")) for k in (1, 5, 10, 50)) + " | "
                     + " / ".join(str(kinds.get(k, 0)) for k in ("specific", "general", "mixed", "silent")) + " |")
    return "\n".join(lines) + "\n"


def tiled_costs(tiled: Mapping[str, Mapping[str, Any]]) -> str:
    """One sentence per run of what its tiled path cost: tile, tiles per tiled image, seconds per image."""
    parts = []
    for run, m in tiled.items():
        t = m["tiled"]
        per = t.get("tiles_per_tiled_image")
        seconds = t.get("seconds_per_image") or {}
        parts.append(f"{run}: {t['tile']} px tiles, {t['n_tiled']} of {t['n_images']} images tiled"
                     + (f" ({per:.1f} tiles each)" if per is not None else "")
                     + (f", {seconds['resized']:.2f} s an image resized and {seconds['tiled']:.2f} s tiled"
                        if {"resized", "tiled"} <= set(seconds) else ""))
    return "; ".join(parts) + "."


def render(runs: Mapping[str, Mapping[str, Any]], atoms: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """The whole of docs/results.md."""
    out = ["# Results\n",
           "Generated by `python -m pipeline.cli.results` from `reports/*/metrics.json`; do not edit by "
           "hand (`--check` fails when this file and the reports disagree). Means over categories; "
           "`–`: undefined on that target (e.g. image metrics of a set without good images).\n",
           "## Zero-shot and the batch\n",
           "`guides`: the detector alone (single image, zero-shot). `mutual`: the batch baseline alone. "
           "`guides+batch`: the two fused (docs/design.md#the-method).\n",
           table(runs, HEADLINE)]
    tiled = {run: m for run, m in runs.items() if isinstance(m.get("tiled"), Mapping)}
    if tiled:
        out += ["## Large images: whole and tiled\n",
                "The runs whose target sets `tile` in its datasets entry (metrics.json `tiled`, "
                "pipeline/evaluation/tiled.py): the detector alone on the image files, resized whole "
                "(`resized`) and as overlapping tiles stitched (`tiled`), on one grid of masks. "
                + tiled_costs(tiled) + "\n",
                table(tiled, [(path, lambda m, path=path: pick(m, "tiled", path)) for path in ("resized", "tiled")])]
        with_batch = {run: m for run, m in tiled.items() if isinstance(m["tiled"].get("batch"), Mapping)}
        if with_batch:
            out += ["On the same grid, the batch signal (`batch`: the mutual map of the resized images, as "
                    "`mutual` above) and each guide path fused with it by the fusion rule on grid pixels "
                    "(pipeline/evaluation/tiled.py); the fused image score is the batch's.\n",
                    table(with_batch, [(path, lambda m, path=path: pick(m, "tiled", path))
                                       for path in ("batch", "resized+batch", "tiled+batch")])]
    for k in few_shot_ks(runs):
        out += [f"## Few-shot, {k} reference images per category\n",
                "Mean over the seeded draws; the reference images are not scored. `reference`: the "
                "nearest-normal-patch baseline alone.\n",
                table(runs, [(name, lambda m, name=name: pick(m, "few_shot", k, name))
                             for name in ("reference", "guides+reference", "guides+reference+batch")])]
    out += ["## Controls\n",
            "`no_sae`: mean auxiliary tokens as guides (what the SAE dictionary adds); `untrained_init`: the "
            "guide codes before training.\n",
            table(runs, [("no_sae", lambda m: pick(m, "controls", "no_sae")),
                         ("untrained_init", lambda m: pick(m, "controls", "untrained_init")),
                         ("no_sae+batch", lambda m: pick(m, "fused", "no_sae+batch"))])]
    if atoms:
        out += ["## Atoms behind the score\n",
                "From `reports/<A>/atoms.json` (the atoms stage): how many SAE atoms the local guide codes use, "
                "and the fraction of the score direction (anomaly guide − normal guide, each normalised, "
                "written in atoms) that the top atoms carry; a dense code spreads it thinly "
                "(docs/design.md, \"Atoms behind a score\").\n",
                atoms_table(atoms)]
    settings = sorted({(m.get("backbone"), m.get("image_score")) for m in runs.values()}, key=str)
    out.append("Backbone and image score of these runs: "
               + "; ".join(f"{b}, image score {s}" for b, s in settings) + ".\n")
    return "\n".join(out)


def readme_with(readme: str, runs: Mapping[str, Mapping[str, Any]]) -> str:
    """``readme`` with its results block replaced by the headline table."""
    if BEGIN not in readme or END not in readme:
        raise ResultsError(f"README has no {BEGIN} ... {END} block for the results table")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table(runs, HEADLINE)}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reports", type=Path, default=Path("reports"))
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--readme", default="README.md", help="README whose results block to rewrite ('' : none)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is stale")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.reports)
        want = {args.out: render(runs, load_atoms(args.reports))}
        if args.readme:
            readme = Path(args.readme)
            want[readme] = readme_with(readme.read_text(), runs)
    except (ResultsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stale = [p for p, text in want.items() if not p.is_file() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"{p} differs from what the reports in {args.reports} give: run python -m pipeline.cli.results",
                  file=sys.stderr)
        return 1 if stale else 0
    for p, text in want.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
