"""Plot data for ``dvc plots`` and the same plots as PNG (``dvc plots show`` needs a CDN offline).

Library code: it writes the files it is given and knows nothing of the DAG. Every file is written
whole or not at all (a temp file in the same folder, then ``os.replace``), a JSON never holds NaN or
Infinity (they are not JSON), and a file named after data (a category) is built with
:func:`report_path`, which refuses any name that would leave its folder.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: stages run without a display
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.errors import NonFiniteError, PipelineError  # noqa: E402
from pipeline.files import write_bytes  # noqa: E402,F401  (re-exported: stages write PNG bytes through it)


class ReportError(PipelineError, ValueError):
    """A report file cannot be written as asked (a name that would leave its folder). Names the file."""


def report_path(folder: str | Path, name: str, suffix: str = "") -> Path:
    """``folder / (name + suffix)``, for a ``name`` that comes from data (a category, a dataset key).

    Refuses, rather than renames, a name that is empty, ``.`` or ``..``, or holds a path separator
    (``/``, ``\\``) or a NUL: such a name would write outside ``folder`` or over another file, and a
    silently changed name would break the link between a report file and its category.
    """
    bad = None
    if not isinstance(name, str) or not name:
        bad = "it is empty"
    elif name in (".", ".."):
        bad = f"{name!r} is not a file name"
    elif any(sep in name for sep in ("/", "\\", os.sep, os.altsep or "/", "\0")):
        bad = "it holds a path separator or NUL"
    if bad:
        raise ReportError(f"{folder}: cannot name a report file after {name!r}: {bad} (a category or dataset "
                          "name must be a plain file name: no '/', '\\', '..'); rename it in the dataset")
    return Path(folder) / f"{name}{suffix}"


def _first_nonfinite(value: Any, at: str = "") -> tuple[str, float] | None:
    """(key path such as ``controls.no_sae.pixel_auroc`` or ``curve[2].loss``, value) of the first
    NaN or infinite float in nested dicts and lists, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (at or "(top level)", value)
    if isinstance(value, Mapping):
        items = ((f"{at}.{k}" if at else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{at}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for key, v in items:
        found = _first_nonfinite(v, key)
        if found:
            return found
    return None


def json_text(path: str | Path, data: Mapping) -> str:
    """The text :func:`write_json` writes: pretty, trailing newline (git diffs stay readable).

    Raises :class:`~pipeline.errors.NonFiniteError` naming ``path`` and the key path of the first NaN
    or infinite number: bare ``NaN`` is not JSON, and a metric that is undefined is ``null`` with a
    reason, never a NaN.
    """
    found = _first_nonfinite(data)
    if found:
        raise NonFiniteError(f"{path}: key {found[0]} is {found[1]}; refusing to write a non-finite number into "
                             "JSON (the values it came from are not finite: see the stage's log)")
    return json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"


def write_json(path: str | Path, data: Mapping) -> None:
    """A metrics JSON (:func:`json_text`), written atomically (:func:`write_bytes`)."""
    write_bytes(path, json_text(path, data).encode())


def csv_text(path: str | Path, rows: Sequence[Mapping], fieldnames: Sequence[str] | None = None) -> str:
    """Rows of equal keys as CSV text, the format ``dvc plots`` reads.

    With ``fieldnames`` an empty ``rows`` gives the header alone (a declared plot whose curve is
    undefined still exists); without, there must be rows to take the header from.
    """
    if not rows and fieldnames is None:
        raise ValueError(f"{path}: no rows to write")
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames or rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv(path: str | Path, rows: Sequence[Mapping], fieldnames: Sequence[str] | None = None) -> None:
    """:func:`csv_text` of ``rows``, written atomically."""
    write_bytes(path, csv_text(path, rows, fieldnames).encode())


def plot_curves(path: str | Path, rows: Sequence[Mapping], x: str, ys: Sequence[str], title: str,
                log_y: bool = True) -> None:
    """:func:`curves_figure` saved as PNG."""
    save_figure(curves_figure(rows, x, ys, title, log_y), path)


def curves_figure(rows: Sequence[Mapping], x: str, ys: Sequence[str], title: str, log_y: bool = True):
    """One figure with a line per key of ``ys`` against ``x``."""
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
    return fig


def roc_pr_figure(curves: Mapping[str, Mapping[str, Sequence[Mapping]]], title: str):
    """ROC and PR curves, image and pixel level, in one figure. ``curves[level][roc|pr]`` are row lists;
    a level whose rows are empty (its curve is undefined: one class) is named in the legend, not drawn."""
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.2), dpi=110)
    for level, c in curves.items():
        label = level if c["roc"] else f"{level} (undefined: one class)"
        axes[0].plot([r["fpr"] for r in c["roc"]], [r["tpr"] for r in c["roc"]], label=label)
        axes[1].plot([r["recall"] for r in c["pr"]], [r["precision"] for r in c["pr"]], label=label)
    axes[0].plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    axes[0].set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    axes[1].set(xlabel="recall", ylabel="precision", title="precision-recall")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def per_category_figure(by_category: Mapping[str, Mapping], title: str,
                        keys: Sequence[str] = ("image_auroc", "pixel_auroc", "pixel_aupro")):
    """Grouped bars of ``keys`` per category, with the no-SAE control's pixel AUROC as a marker
    (an undefined metric, None, draws as an empty bar)."""
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
    return fig


def overlays_figure(rows: Sequence[tuple], title: str, vmin: float = 0.0, vmax: float = 1.0):
    """A grid, one column per image: the image, its ground truth, and the anomaly map over the image.

    ``rows``: (image (S, S, 3) uint8, mask (S, S), map (S, S), caption) per image. The maps share one
    colour scale [vmin, vmax] so that columns compare. None for no rows.
    """
    n = len(rows)
    if n == 0:
        return None
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
    return fig


def png_bytes(fig) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is freed."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def save_figure(fig, path: str | Path) -> None:
    """Write a matplotlib figure as PNG (making its folder, atomically) and free it."""
    write_bytes(path, png_bytes(fig))
