"""How far a fresh clone's metrics move when the CPU takes other kernels, and the tolerance that follows.

    python benchmarks/kernel_paths.py                       # every path below -> docs/kernel_paths.json
    python benchmarks/kernel_paths.py --paths avx2 --out /tmp/kp.json --keep /tmp/kp
    python benchmarks/kernel_paths.py --render              # docs/kernel_paths.md from the .json

Each path is a fresh clone of HEAD (no DVC cache, so every stage runs, as on a new machine) whose
``dvc repro`` runs under environment variables that force one kernel path of the pinned torch:

- ``native``: nothing forced (what this CPU picks; on the machine that made dvc.lock it reproduces it);
- ``avx2``: an AVX2 machine without AVX-512, for torch's own kernels, MKL and oneDNN alike;
- ``baseline_x86``: torch's baseline kernels, MKL's SSE2 branch that its docs give as the one path
  reproducible across Intel and non-Intel CPUs (``MKL_CBWR=COMPATIBLE``), oneDNN capped at SSE4.1;
- ``one_thread``: one intra-op thread instead of the machine's count (MKL blocks a matmul by threads).

It prints each path's wall time beside ``native``'s, whether its feature stores came out with the
committed bytes, and how far each metric moved (DVC's ``metrics diff`` against HEAD, as
``python -m pipeline.cli.drift`` reads it). The JSON records, per tolerance key (file, signal group and
metric name, :func:`pipeline.cli.drift.tolerance_key`, pooled over runs, categories and the signal sets of
a group), the largest move and where, and the tolerance ``pipeline.cli.drift`` applies: twice that
largest move, zero for a key that never moved.

Decisions at a threshold (F1, precision and recall at the aux or rule threshold) also pass the drift
check when they are one image per category apart (:func:`pipeline.cli.drift.one_image_apart`): a
whole image changing side is the quantum they move by, which no measured largest move can bound.

The path ``aten_default`` (torch's baseline kernels alone, MKL and oneDNN native) is left out of the
tolerance on purpose, as a path the tolerance was not fitted on: ``--paths aten_default --out X.json``,
then ``python -m pipeline.cli.drift`` in its clone (docs/reliability.md says what it found).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.cli.drift import compare, metrics_diff, tolerance_key  # noqa: E402

PATHS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "baseline_x86": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "one_thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
}
HELD_OUT = {"aten_default": {"ATEN_CPU_CAPABILITY": "default"}}
MARGIN = 2.0
"""tolerance = MARGIN x the largest move measured: room for CPUs beyond the forced paths."""


def clone(dest: Path) -> None:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)


def repro(where: Path, env: dict[str, str], log: Path) -> tuple[int, float]:
    """``dvc repro`` in ``where`` under ``env`` added to this process's: (exit status, seconds)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(["dvc", "repro", "-q"], cwd=where, env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
                            stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - t0


def store_md5s(lock_text: str) -> dict[str, str]:
    """extract@<D> -> the md5 of its feature store, from a dvc.lock's text."""
    stages = (yaml.safe_load(lock_text) or {}).get("stages", {})
    return {name: outs[0].get("md5") for name, st in stages.items() if name.startswith("extract@")
            for outs in [st.get("outs", [])] if outs}


def moves(where: Path) -> dict[tuple[str, str], float]:
    """(file, key) -> |new - old| for every numeric metric of the clone against its HEAD, read as
    ``pipeline.cli.drift`` reads them (a count on one side only is 0 on the other)."""
    rows = compare(metrics_diff("HEAD", root=where), {})
    return {(r["file"], r["key"]): r["abs_diff"] for r in rows if r["abs_diff"] is not None}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_paths(names: list[str], work: Path) -> dict:
    """Clone and ``dvc repro`` each path in ``work/<name>``: name -> env, wall time, stores' bytes."""
    committed = store_md5s((ROOT / "dvc.lock").read_text())
    paths = {}
    for name in names:
        env = {**PATHS, **HELD_OUT}[name]
        where = work / name
        if where.exists():
            subprocess.run(["rm", "-rf", str(where)], check=True)
        clone(where)
        rc, wall = repro(where, env, work / f"{name}.log")
        if rc != 0:
            raise SystemExit(f"{name}: dvc repro exited {rc}; see {work / f'{name}.log'}")
        equal = store_md5s((where / "dvc.lock").read_text()) == committed
        paths[name] = {"env": env, "wall_s": round(wall, 1), "stores_equal_committed": equal}
        print(f"{name:13s} {wall:7.1f} s  stores {'equal' if equal else 'differ'}", flush=True)
    return paths


def pool(paths: dict, work: Path) -> dict:
    """Each path's moves (its clone in ``work/<name>`` against HEAD), the largest per tolerance key over
    the paths that are not held out, and the tolerance: the JSON's ``paths``, ``observed``, ``tolerance``."""
    pooled: dict[str, tuple[float, str, str]] = {}
    for name, p in paths.items():
        moved = moves(work / name)
        by_key: dict[str, float] = {}
        for (file, key), d in moved.items():
            m = tolerance_key(file, key)
            by_key[m] = max(by_key.get(m, 0.0), d)
            if name in PATHS and d > pooled.get(m, (0.0, "", ""))[0]:
                pooled[m] = (d, name, f"{file} {key}")
            pooled.setdefault(m, (0.0, "", ""))
        p.update({"metrics": len(moved), "metrics_moved": sum(1 for d in moved.values() if d > 0),
                  "max_abs_diff": {m: by_key[m] for m in sorted(by_key) if by_key[m] > 0}})
        print(f"{name:13s} {p['metrics_moved']}/{len(moved)} metrics moved", flush=True)
    base = paths.get("avx2", {}).get("wall_s")
    if base:  # avx2 runs every stage; native may skip evaluate and atoms (its bytes are the lock's)
        for name, p in paths.items():
            print(f"{name:13s} wall / avx2 = {p['wall_s'] / base:.2f}")
    return {
        "paths": paths,
        "rule": f"tolerance of a key (file:group:name) = {MARGIN:g} x the largest |difference| from HEAD measured "
                "for a metric of that key over every path but the held-out ones (0 where none moved); decisions at "
                "a threshold also pass when one image per category apart, and drift applies no tolerance below 1e-5 "
                "(pipeline.cli.drift.FLOOR)",
        "observed": {m: {"max_abs_diff": d, "path": p, "where": w} for m, (d, p, w) in sorted(pooled.items()) if d > 0},
        "tolerance": {m: MARGIN * d for m, (d, _, _) in sorted(pooled.items())},
    }


def measure(names: list[str], keep: Path | None) -> dict:
    import torch

    work = keep or Path(tempfile.mkdtemp(prefix="kernel_paths_"))
    work.mkdir(parents=True, exist_ok=True)
    paths = run_paths(names, work)
    return {
        "command": "python benchmarks/kernel_paths.py " + " ".join(f"--paths {n}" for n in names
                                                                   if set(names) != set(PATHS)),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
        "native_capability": torch.backends.cpu.get_cpu_capability(),
        **pool(paths, work),
    }


HEADLINE = ("metrics.json:top:image_auroc", "metrics.json:top:pixel_auroc", "metrics.json:top:pixel_ap",
            "metrics.json:top:pixel_aupro", "metrics.json:top:aux_threshold", "metrics.json:fused:pixel_ap",
            "metrics.json:few_shot:pixel_ap", "metrics.json:baselines:image_auroc", "metrics.json:baselines:pixel_ap",
            "metrics.json:controls:image_auroc", "per_category.json:top:pixel_ap", "sae.json:top:fvu",
            "sae.json:top:n_dead")


def render(result: dict) -> str:
    """docs/kernel_paths.md: the paths, their cost and bytes, and the headline keys' moves and tolerances."""
    paths = result["paths"]
    base = paths.get("avx2", {}).get("wall_s")
    lines = ["# Metrics across CPU kernel paths", "",
             f"Written by `{result['command'].strip()}` from `docs/kernel_paths.json` (commit "
             f"{result['commit'][:10]}, {result['cpu']}, {result['cores']} cores, torch {result['torch']}, native "
             f"{result['native_capability']}); `python benchmarks/kernel_paths.py --render` rewrites it. Each path is "
             "a fresh clone whose `dvc repro` ran under the environment shown. Wall times are compared with "
             "`avx2`'s: a path whose stores come out as committed (`native` on the machine that made dvc.lock) "
             "skips evaluate and atoms, whose committed reports are then up to date, so its time is not the "
             "whole DAG's.", "",
             "| path | environment | wall s | / avx2 | stores as committed | metrics moved |",
             "|---|---|---:|---:|---|---:|"]
    for name, p in paths.items():
        env = " ".join(f"`{k}={v}`" for k, v in p["env"].items()) or "(none)"
        ratio = f"{p['wall_s'] / base:.2f}" if base else "–"
        lines.append(f"| {name} | {env} | {p['wall_s']:.0f} | {ratio} | {'yes' if p['stores_equal_committed'] else 'no'} "
                     f"| {p['metrics_moved']} of {p['metrics']} |")
    lines += ["", f"Tolerance rule: {result['rule']}.", "",
              "| key (file:group:metric) | largest move | on path | tolerance |", "|---|---:|---|---:|"]
    for key in HEADLINE:
        obs = result["observed"].get(key)
        tol = result["tolerance"].get(key)
        if tol is None:
            continue
        lines.append(f"| `{key}` | {obs['max_abs_diff']:.4g} | {obs['path']} | {tol:.4g} |" if obs
                     else f"| `{key}` | 0 | – | 0 |")
    lines += ["", f"{sum(1 for v in result['tolerance'].values() if v > 0)} of {len(result['tolerance'])} keys "
              "moved on some path; the rest must match exactly. Every key is in `docs/kernel_paths.json`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", action="append", choices=sorted({**PATHS, **HELD_OUT}),
                        help="a path to run (repeatable; default: every path of the tolerance)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "kernel_paths.json")
    parser.add_argument("--keep", type=Path, default=None, help="keep the clones and logs here")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md beside --out from it")
    parser.add_argument("--rescore", action="store_true",
                        help="re-read the moves from the clones kept in --keep (the runs and their times as --out "
                             "recorded them): after a change to how pipeline.cli.drift reads metrics")
    args = parser.parse_args()
    if args.rescore:
        if args.keep is None:
            parser.error("--rescore needs --keep, the folder holding the clones")
        result = json.loads(args.out.read_text())
        paths = {n: {k: p[k] for k in ("env", "wall_s", "stores_equal_committed")} for n, p in result["paths"].items()}
        result.update(pool(paths, args.keep))
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"-> {args.out}")
    elif not args.render:
        result = measure(args.paths or list(PATHS), args.keep)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"-> {args.out}")
    result = json.loads(args.out.read_text())
    args.out.with_suffix(".md").write_text(render(result))
    print(f"-> {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
