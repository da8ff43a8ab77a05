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
    save_figure(fig, path)


def plot_roc_pr(path: str | Path, curves: Mapping[str, Mapping[str, Sequence[Mapping]]], title: str) -> None:
    """ROC and PR curves, image and pixel level, in one PNG. ``curves[level][roc|pr]`` are row lists."""
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.2), dpi=110)
    for level, c in curves.items():
        axes[0].plot([r["fpr"] for r in c["roc"]], [r["tpr"] for r in c["roc"]], label=level)
        axes[1].plot([r["recall"] for r in c["pr"]], [r["precision"] for r in c["pr"]], label=level)
    axes[0].plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    axes[0].set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    axes[1].set(xlabel="recall", ylabel="precision", title="precision-recall")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def plot_per_category(path: str | Path, by_category: Mapping[str, Mapping], title: str,
                      keys: Sequence[str] = ("image_auroc", "pixel_auroc", "pixel_aupro")) -> None:
    """Grouped bars of ``keys`` per category, with the no-SAE control's pixel AUROC as a marker."""
    import numpy as np

    names = list(by_category)
    x = np.arange(len(names))
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(names) + 2), 4.2), dpi=110)
    for i, key in enumerate(keys):
        values = [by_category[n].get(key) for n in names]
        ax.bar(x + (i - (len(keys) - 1) / 2) * width, [v if v is not None else 0 for v in values], width, label=key)
    control = [by_category[n]["controls"]["no_sae"].get("pixel_auroc") for n in names]
    ax.scatter(x, [v if v is not None else np.nan for v in control], color="black", marker="_", s=400, zorder=3,
               label="pixel_auroc, no-SAE control")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def plot_overlays(path: str | Path, rows: Sequence[tuple], title: str, vmin: float = 0.0, vmax: float = 1.0) -> None:
    """A grid, one column per image: the image, its ground truth, and the anomaly map over the image.

    ``rows``: (image (S, S, 3) uint8, mask (S, S), map (S, S), caption) per image. The maps share one
    colour scale [vmin, vmax] so that columns compare.
    """
    n = len(rows)
    if n == 0:
        return
    fig, axes = plt.subplots(3, n, figsize=(2.0 * n, 6.3), dpi=100, squeeze=False)
    for j, (image, mask, amap, caption) in enumerate(rows):
        axes[0, j].imshow(image)
        axes[0, j].set_title(caption, fontsize=8)
        axes[1, j].imshow(mask, cmap="gray", vmin=0, vmax=1)
        axes[2, j].imshow(image)
        axes[2, j].imshow(amap, cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
        for ax in axes[:, j]:
            ax.set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: str | Path) -> None:
    """Write a matplotlib figure as PNG (making its folder) and free it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
