"""How far this checkout's metrics lie from a commit's, against the tolerance measured across CPU kernels.

    python -m pipeline.cli.drift                    # the workspace's DVC metrics against HEAD's
    python -m pipeline.cli.drift --rev v1.2 --exact # any difference at all fails
    python -m pipeline.cli.drift --json drift.json  # also write every compared metric

A fresh clone without a DVC remote recomputes every stage, and the DINOv2 forward (and every matmul
after it) takes the kernels the CPU offers: AVX-512, AVX2 or baseline x86 in torch's own kernels, a
different branch in MKL and oneDNN. The bytes of the feature stores then differ in about 1 % of their
float16 values and every metric downstream moves a little. This command says whether it moved by more
than that: each metric the stages declare in dvc.yaml (``sae.json``, ``guides.json``, ``atoms.json``,
``metrics.json``, ``per_category.json``), as DVC's own ``metrics diff`` reads them, is compared with the
tolerance of its file, signal group and name (:func:`tolerance_key`: ``metrics.json:top:pixel_ap``,
``sae.json:top:n_dead``, ...) in ``docs/kernel_paths.json``. That file is written by
``python benchmarks/kernel_paths.py``, which re-runs the whole DAG in fresh copies under forced kernel
paths and records how far each metric moved; the tolerance is twice the largest move measured within
its key (zero where none moved). A metric with no measured tolerance must match exactly; text values
(rules, names, the reasons a metric is null) must match once the numbers they quote are masked.

Exit 0 when every metric is within its tolerance, 1 when one is not (each named with its values), an
``error:`` line when a metrics file is missing on either side. ``dvc pull`` from a remote gives the
committed outputs themselves, and then ``--exact`` passes.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Mapping

from pipeline.errors import PipelineError
from pipeline.launch import run

TOLERANCES = Path("docs/kernel_paths.json")


class DriftError(PipelineError, ValueError):
    """A metrics file absent on one side, or a tolerance file that cannot be read."""


def tolerance_key(file: str, key: str) -> str:
    """What a metric's tolerance is kept under: ``<file name>:<signal group>:<metric name>``.

    The group is the key's first part (``baselines``, ``fused``, ``few_shot``, ``controls``, ...;
    ``top`` for a key of one part), after the category in ``per_category.json``; the name is its last
    part. So ``fused.guides+batch.pixel_ap`` of a run's metrics.json is ``metrics.json:fused:pixel_ap``,
    pooled over the runs and the signal sets of that group, and ``metal.controls.untrained_init.
    image_auroc`` is ``per_category.json:controls:image_auroc``, pooled over the categories. Pooling
    within a group, not across groups, matters: an untrained-SAE control moves ten times as far as the
    detector, and the training-free baselines do not move at all.
    """
    parts = key.split(".")
    kind = Path(file).name
    if kind == "per_category.json" and len(parts) > 1:
        parts = parts[1:]
    return f"{kind}:{parts[0] if len(parts) > 1 else 'top'}:{parts[-1]}"


def load_tolerances(path: Path) -> dict[str, float]:
    """:func:`tolerance_key` -> tolerance, from a ``docs/kernel_paths.json`` (``{"tolerance": {...}}``)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DriftError(f"{path}: cannot read the tolerances ({err}); write them with "
                         "python benchmarks/kernel_paths.py") from None
    tol = data.get("tolerance") if isinstance(data, dict) else None
    if not isinstance(tol, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                            and math.isfinite(v) and v >= 0 for v in tol.values()):
        raise DriftError(f"{path}: 'tolerance' must map metric keys to finite numbers >= 0")
    return {str(k): float(v) for k, v in tol.items()}


def metrics_diff(rev: str, root: Path = Path(".")) -> dict[str, dict[str, dict[str, Any]]]:
    """DVC's ``metrics diff`` of the workspace against ``rev``, every metric (changed or not):
    ``{file: {key: {"old": ..., "new": ...}}}``."""
    from dvc.exceptions import DvcException  # dvc is slow to import; only this command needs it
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            out = repo.metrics.diff(a_rev=rev, b_rev="workspace", all=True)
    except DvcException as err:  # a revision git does not know, no DVC repository
        raise DriftError(f"dvc metrics diff against {rev!r} in {root}: {err}") from err
    return out.get("diff", {})


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _text(x: Any) -> bool:
    return x is not None and not _number(x)


def _masked(x: Any) -> Any:
    return _NUMBER.sub("#", x) if isinstance(x, str) else x


def compare(diff: Mapping[str, Mapping[str, Mapping[str, Any]]], tolerances: Mapping[str, float],
            *, exact: bool = False) -> list[dict[str, Any]]:
    """One row per metric: file, key, old, new, |difference|, tolerance, and ``ok``.

    A metrics file that is missing on one side is a DriftError (every value of it reads None): a stage
    that did not run is not a metric that moved. A numeric key present on one side only counts as 0 on
    the other. Text must match, with ``exact`` literally, else once every number in it is masked.
    """
    rows = []
    for file, metrics in sorted(diff.items()):
        values = list(metrics.values())
        for side in ("old", "new"):
            if values and all(v.get(side) is None for v in values):
                where = "the workspace (run dvc repro)" if side == "new" else "the revision compared with"
                raise DriftError(f"{file}: no metrics in {where}")
        for key, v in sorted(metrics.items()):
            old, new = v.get("old"), v.get("new")
            tol = 0.0 if exact else tolerances.get(tolerance_key(file, key), 0.0)
            if (_number(old) or _number(new)) and not (_text(old) or _text(new)):
                # a key on one side only is a count left out when it is zero (atoms.json's kinds)
                a, b = (float(x) if _number(x) else 0.0 for x in (old, new))
                delta = abs(b - a)
                ok = delta <= tol or (math.isnan(a) and math.isnan(b))
            elif _number(old) or _number(new):
                delta, ok = None, False  # a number on one side, text on the other
            else:
                # text: exact with --exact; else equal once the numbers it quotes (thresholds in a
                # null reason) are masked, since those numbers move as the metrics do
                delta = None
                ok = old == new if exact else _masked(old) == _masked(new)
            rows.append({"file": file, "key": key, "old": old, "new": new, "abs_diff": delta,
                         "tolerance": tol if delta is not None else None, "ok": ok})
    return rows


def summary_lines(rows: list[dict[str, Any]], rev: str, exact: bool) -> list[str]:
    """What the command prints: the count, the metrics beyond tolerance, and the closest calls."""
    bad = [r for r in rows if not r["ok"]]
    moved = [r for r in rows if r["abs_diff"]]
    lines = [f"{len(rows)} metrics against {rev}: {len(moved)} moved, {len(bad)} beyond "
             f"{'zero (--exact)' if exact else 'their tolerance'}"]
    for r in bad:
        lines.append(f"  BEYOND {r['file']} {r['key']}: {r['old']!r} -> {r['new']!r}"
                     + (f" (|diff| {r['abs_diff']:.3g} > {r['tolerance']:.3g})" if r["abs_diff"] is not None else ""))
    near = sorted((r for r in moved if r["ok"] and r["tolerance"]), key=lambda r: -r["abs_diff"] / r["tolerance"])
    for r in near[:5]:
        lines.append(f"  within {r['file']} {r['key']}: |diff| {r['abs_diff']:.3g} = "
                     f"{r['abs_diff'] / r['tolerance']:.0%} of {r['tolerance']:.3g}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="HEAD", help="the git revision whose metrics to compare with (HEAD)")
    parser.add_argument("--tolerances", type=Path, default=TOLERANCES)
    parser.add_argument("--exact", action="store_true", help="every metric must equal the revision's")
    parser.add_argument("--json", type=Path, default=None, help="also write every compared metric here")
    args = parser.parse_args(argv)
    tolerances = {} if args.exact else load_tolerances(args.tolerances)
    diff = metrics_diff(args.rev)
    if not diff:
        raise DriftError(f"no DVC metrics to compare with {args.rev} (none declared, or none on either side)")
    rows = compare(diff, tolerances, exact=args.exact)
    if args.json is not None:
        from pipeline.files import write_bytes

        write_bytes(args.json, (json.dumps(rows, indent=1) + "\n").encode())
    for line in summary_lines(rows, args.rev, args.exact):
        print(line, file=sys.stderr if line.startswith("  BEYOND") else sys.stdout)
    return 1 if any(not r["ok"] for r in rows) else 0


def console() -> None:
    run(main)


if __name__ == "__main__":
    console()
