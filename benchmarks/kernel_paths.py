"""How far a fresh clone's metrics move when the CPU takes other kernels, and the tolerance that follows.

    python benchmarks/kernel_paths.py                       # every path below -> docs/kernel_paths.json
    python benchmarks/kernel_paths.py --paths avx2 --out /tmp/kp.json --keep /tmp/kp

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

The path ``aten_default`` (torch's baseline kernels alone, MKL and oneDNN native) is left out of the
tolerance on purpose: tests/test_kernel_paths.py forces it as the check of a path the tolerance was
not fitted on.
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

from pipeline.cli.drift import metrics_diff, tolerance_key  # noqa: E402

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
    """(file, key) -> |new - old| for every numeric metric of the clone against its HEAD."""
    out = {}
    for file, metrics in metrics_diff("HEAD", root=where).items():
        for key, v in metrics.items():
            old, new = v.get("old"), v.get("new")
            if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (old, new)):
                out[(file, key)] = abs(float(new) - float(old))
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure(names: list[str], keep: Path | None) -> dict:
    import torch

    committed = store_md5s((ROOT / "dvc.lock").read_text())
    work = keep or Path(tempfile.mkdtemp(prefix="kernel_paths_"))
    work.mkdir(parents=True, exist_ok=True)
    paths, pooled = {}, {}
    for name in names:
        env = {**PATHS, **HELD_OUT}[name]
        where = work / name
        if where.exists():
            subprocess.run(["rm", "-rf", str(where)], check=True)
        clone(where)
        rc, wall = repro(where, env, work / f"{name}.log")
        if rc != 0:
            raise SystemExit(f"{name}: dvc repro exited {rc}; see {work / f'{name}.log'}")
        moved = moves(where)
        equal = store_md5s((where / "dvc.lock").read_text()) == committed
        by_name: dict[str, float] = {}
        for (file, key), d in moved.items():
            m = tolerance_key(file, key)
            by_name[m] = max(by_name.get(m, 0.0), d)
            if name in PATHS and d > pooled.get(m, (0.0, "", ""))[0]:
                pooled[m] = (d, name, f"{file} {key}")
            pooled.setdefault(m, (0.0, "", ""))
        paths[name] = {"env": env, "wall_s": round(wall, 1), "stores_equal_committed": equal,
                       "metrics": len(moved), "metrics_moved": sum(1 for d in moved.values() if d > 0),
                       "max_abs_diff": {m: by_name[m] for m in sorted(by_name) if by_name[m] > 0}}
        print(f"{name:13s} {wall:7.1f} s  stores {'equal' if equal else 'differ'}  "
              f"{paths[name]['metrics_moved']}/{len(moved)} metrics moved", flush=True)
    base = paths.get("native", {}).get("wall_s")
    if base:
        for name, p in paths.items():
            print(f"{name:13s} wall / native = {p['wall_s'] / base:.2f}")
    return {
        "command": "python benchmarks/kernel_paths.py " + " ".join(f"--paths {n}" for n in names
                                                                   if set(names) != set(PATHS)),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
        "native_capability": torch.backends.cpu.get_cpu_capability(),
        "paths": paths,
        "rule": f"tolerance of a key (file:group:name) = {MARGIN:g} x the largest |difference| from HEAD measured "
                "for a metric of that key over every path but the held-out ones (0 where none moved)",
        "observed": {m: {"max_abs_diff": d, "path": p, "where": w} for m, (d, p, w) in sorted(pooled.items()) if d > 0},
        "tolerance": {m: MARGIN * d for m, (d, _, _) in sorted(pooled.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", action="append", choices=sorted({**PATHS, **HELD_OUT}),
                        help="a path to run (repeatable; default: every path of the tolerance)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "kernel_paths.json")
    parser.add_argument("--keep", type=Path, default=None, help="keep the clones and logs here")
    args = parser.parse_args()
    result = measure(args.paths or list(PATHS), args.keep)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
