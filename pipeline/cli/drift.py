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
its key, and never less than :data:`FLOOR` (1e-5), so a metric no path moved may still move by float
rounding below anything a report prints; text values
(rules, names, the reasons a metric is null) must match once the numbers they quote are masked.

Decisions at a threshold (``image_{f1,precision,recall}_at_{aux,rule}_threshold`` and the reasons they
are null) are counts of images on each side of it, so an image whose score sits within float rounding
of the threshold changes side on another CPU and moves them by a whole image: from "no image flagged"
(precision undefined) to one, say. No tolerance on their value can hold that, so a decision of one
scoring also passes when it is **one image per category apart** (:func:`one_image_apart`): in each
category of per_category.json, some (true, false) alarm counts give the old F1, precision and recall
and counts one image away give the new; a run's mean in metrics.json passes when each of its
categories does. Means over few-shot draws cannot be counted back and keep the measured tolerance.

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
FLOOR = 1e-5
"""The least tolerance of any metric, measured or not: below the fourth decimal the reports print.
The forced paths of one machine bound float rounding only from below; on another CPU the
training-free baselines' pixel AP moved by 1.4e-6, twice the largest move measured on those paths."""


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


_DECISION = re.compile(r"^(?P<prefix>(?:.*\.)?)image_(?P<which>f1|precision|recall)_at_(?P<kind>aux|rule)_threshold$")


def decision_of(key: str) -> tuple[str, str, str, bool] | None:
    """(scoring prefix, f1|precision|recall, aux|rule, whether it is the reason the value is null) of a
    decision metric's key, None for any other key. The prefix is the scoring the decision belongs to
    (``fused.guides+batch.``; empty for the detector's own)."""
    m = _DECISION.match(key)
    if m is None:
        return None
    prefix = m["prefix"]
    reason = prefix == "null_reasons." or prefix.endswith(".null_reasons.")
    return (prefix[: -len("null_reasons.")] if reason else prefix), m["which"], m["kind"], reason


def one_image_apart(old: Mapping[str, float | None], new: Mapping[str, float | None], n_images: int,
                    n_anomalous: int) -> bool:
    """Whether one category's decisions ``new`` (``{"f1", "precision", "recall"}``, None where
    undefined) can follow from ``old`` by at most one image changing side of the threshold.

    Tries every count of true alarms TP in [0, P] and false alarms FP in [0, N] (P anomalous and N
    normal images) and keeps those that give the old values (precision TP/(TP+FP), None with no alarm;
    recall TP/P and F1 2TP/(P+TP+FP), None with no anomalous image); passes when one of them is at most
    one image (|ΔTP| + |ΔFP| ≤ 1) from counts that give the new values. Exhaustive on purpose: a
    category holds at most a few thousand images, and an argument from the values alone would miss
    the flat cases (precision 0 says nothing of FP).
    """
    import numpy as np

    p, n = int(n_anomalous), int(n_images) - int(n_anomalous)
    if p < 0 or n < 0:
        return False
    tp, fp = np.meshgrid(np.arange(p + 1), np.arange(n + 1), indexing="ij")
    flagged = tp + fp
    with np.errstate(divide="ignore", invalid="ignore"):
        values = {"precision": (np.where(flagged > 0, tp / flagged, np.nan), flagged > 0),
                  "recall": (tp / p if p else np.full(tp.shape, np.nan), np.full(tp.shape, p > 0)),
                  "f1": (2 * tp / (p + flagged) if p else np.full(tp.shape, np.nan), np.full(tp.shape, p > 0))}

    def fits(side: Mapping[str, float | None]) -> np.ndarray:
        ok = np.ones(tp.shape, bool)
        for name, (v, defined) in values.items():
            x = side.get(name)
            ok &= ~defined if x is None else defined & (np.abs(np.nan_to_num(v, nan=np.inf) - float(x)) <= 1e-9)
        return ok

    a, b = fits(old), fits(new)
    if not a.any() or not b.any():
        return False
    # b dilated by one image along either count, then met with a
    near = b.copy()
    near[1:, :] |= b[:-1, :]
    near[:-1, :] |= b[1:, :]
    near[:, 1:] |= b[:, :-1]
    near[:, :-1] |= b[:, 1:]
    return bool((a & near).any())


def decisions_apart(diff: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> set[tuple[str, str, str]]:
    """(file, scoring prefix, threshold kind) of every scoring whose decisions :func:`one_image_apart`
    passes: per category in a per_category.json (its ``n_images``, ``n_anomalous`` equal on both
    sides), and in the metrics.json beside it when every category of that scoring passes."""
    passed: set[tuple[str, str, str]] = set()
    for file, metrics in diff.items():
        if Path(file).name != "per_category.json":
            continue
        triples: dict[tuple[str, str, str], dict[str, dict]] = {}
        for key, v in metrics.items():
            category, _, rest = key.partition(".")
            d = decision_of(rest)
            if d and not d[3]:
                t = triples.setdefault((category, d[0], d[2]), {"old": {}, "new": {}})
                t["old"][d[1]], t["new"][d[1]] = v.get("old"), v.get("new")
        verdicts: dict[tuple[str, str], list[bool]] = {}
        for (category, prefix, kind), t in triples.items():
            sizes = [metrics.get(f"{category}.{name}", {}) for name in ("n_images", "n_anomalous")]
            same = all(_number(s.get("old")) and s.get("old") == s.get("new") for s in sizes)
            ok = same and one_image_apart(t["old"], t["new"], sizes[0]["new"], sizes[1]["new"])
            if ok:
                passed.add((file, f"{category}.{prefix}", kind))
            verdicts.setdefault((prefix, kind), []).append(ok)
        beside = str(Path(file).with_name("metrics.json"))
        for (prefix, kind), oks in verdicts.items():
            if all(oks):
                passed.add((beside, prefix, kind))
    return passed


def compare(diff: Mapping[str, Mapping[str, Mapping[str, Any]]], tolerances: Mapping[str, float],
            *, exact: bool = False) -> list[dict[str, Any]]:
    """One row per metric: file, key, old, new, |difference|, tolerance, and ``ok``.

    A metrics file that is missing on one side is a DriftError (every value of it reads None): a stage
    that did not run is not a metric that moved. A numeric key present on one side only counts as 0 on
    the other. Text must match, with ``exact`` literally, else once every number in it is masked.
    """
    rows = []
    apart = set() if exact else decisions_apart(diff)
    for file, metrics in sorted(diff.items()):
        values = list(metrics.values())
        for side in ("old", "new"):
            if values and all(v.get(side) is None for v in values):
                where = "the workspace (run dvc repro)" if side == "new" else "the revision compared with"
                raise DriftError(f"{file}: no metrics in {where}")
        for key, v in sorted(metrics.items()):
            old, new = v.get("old"), v.get("new")
            tol = 0.0 if exact else max(tolerances.get(tolerance_key(file, key), 0.0), FLOOR)
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
            by = "tolerance"
            if not ok and (d := decision_of(key)) and (file, d[0], d[2]) in apart:
                ok, by = True, "one image per category"
            rows.append({"file": file, "key": key, "old": old, "new": new, "abs_diff": delta,
                         "tolerance": tol if delta is not None else None, "ok": ok, "by": by})
    return rows


def summary_lines(rows: list[dict[str, Any]], rev: str, exact: bool) -> list[str]:
    """What the command prints: the count, the metrics beyond tolerance, and the closest calls."""
    bad = [r for r in rows if not r["ok"]]
    moved = [r for r in rows if r["abs_diff"]]
    lines = [f"{len(rows)} metrics against {rev}: {len(moved)} moved, {len(bad)} beyond "
             f"{'zero (--exact)' if exact else 'their tolerance'}"]
    apart = [r for r in rows if r.get("by") == "one image per category"]
    if apart:
        lines.append(f"  {len(apart)} decision metrics beyond their tolerance are one image per category apart "
                     "(an image within float rounding of its threshold changed side): "
                     + ", ".join(sorted({f"{r['file']} {r['key']}" for r in apart})[:4])
                     + (" ..." if len(apart) > 4 else ""))
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
