"""Plot data for ``dvc plots`` and the same plots as PNG (``dvc plots show`` needs a CDN offline).

Library code: it writes the files it is given and knows nothing of the DAG.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: stages run without a display
import matplotlib.pyplot as plt  # noqa: E402


def write_json(path: str | Path, data: Mapping) -> None:
    """A metrics JSON, pretty and with a trailing newline (git diffs stay readable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | Path, rows: Sequence[Mapping]) -> None:
    """Rows of equal keys as CSV, the format ``dvc plots`` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        raise ValueError(f"{path}: no rows to write")
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(path: str | Path, rows: Sequence[Mapping], x: str, ys: Sequence[str], title: str,
                log_y: bool = True) -> None:
    """One PNG with a line per key of ``ys`` against ``x``."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for y in ys:
        ax.plot([r[x] for r in rows], [r[y] for r in rows], label=y)
    ax.set_xlabel(x)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
