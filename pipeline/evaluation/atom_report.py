"""The atoms of a fitted detector, on its auxiliary set: which atoms carry the anomaly score, where they
fire, and whether they are category-general or category-specific (:mod:`pipeline.method.atoms`).

:func:`atom_statistics` streams the auxiliary store once: each patch token through the SAE's TopK
encoder (an atom fires on a patch when it is among the k codes chosen there), each patch labelled
anomalous when its cell of the ground-truth mask holds a defect pixel (the mask max-pooled to the patch
grid). Per top atom and category it counts firings on anomalous and on normal patches, and keeps the
patches that activate it most (for the gallery) and the images where it fires most.
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np
import torch

from pipeline.evaluation import report
from pipeline.features import store
from pipeline.files import write_bytes
from pipeline.method import atoms as A
from pipeline.method import sae as S


def patch_labels(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """masks (B, S, S) -> (B, L) bool: a patch is anomalous when its cell holds a defect pixel."""
    b, size, _ = masks.shape
    gh, gw = grid
    cells = masks[:, : size - size % gh, : size - size % gw].reshape(b, gh, size // gh, gw, size // gw)
    return (cells.max(axis=(2, 4)) > 0).reshape(b, gh * gw)


def atom_statistics(aux: store.FeatureStore, model: S.TopKSAE, atoms: list[int], *, gallery: int = 8,
                    batch_images: int = 16) -> dict[int, dict[str, Any]]:
    """Per atom of ``atoms``: firings on anomalous/normal patches per category (counts and rates), the
    ``gallery`` patches of highest activation ((value, image, patch)) and the images of highest peak."""
    grid = tuple(aux.attrs["grid"])
    categories = list(aux.attrs["categories"])
    cat_of = aux.category[:]
    counts = {j: {c: {"anomalous": 0, "normal": 0} for c in categories} for j in atoms}
    totals = {c: {"anomalous": 0, "normal": 0} for c in categories}
    best: dict[int, list] = {j: [] for j in atoms}  # min-heaps of (activation, image, patch)
    peaks: dict[int, list] = {j: [] for j in atoms}  # (peak activation, image)
    index = torch.tensor(atoms, dtype=torch.long)
    with torch.no_grad():
        for a in range(0, aux.n_images, batch_images):
            b = min(a + batch_images, aux.n_images)
            tokens = torch.from_numpy(aux.tokens[a:b].astype(np.float32))
            n, length, d = tokens.shape
            codes = model.dense_codes(tokens.reshape(-1, d)).reshape(n, length, -1)[..., index]  # (n, L, m)
            anomalous = patch_labels(aux.masks[a:b], grid)
            for i in range(n):
                c = categories[int(cat_of[a + i])]
                totals[c]["anomalous"] += int(anomalous[i].sum())
                totals[c]["normal"] += int((~anomalous[i]).sum())
                fired = (codes[i] > 0).numpy()  # (L, m)
                for m, j in enumerate(atoms):
                    counts[j][c]["anomalous"] += int(fired[anomalous[i], m].sum())
                    counts[j][c]["normal"] += int(fired[~anomalous[i], m].sum())
                    column = codes[i, :, m]
                    top = int(torch.argmax(column))
                    value = float(column[top])
                    if value > 0:
                        _push(peaks[j], (value, a + i), 3)
                        for p in torch.nonzero(column > 0).ravel().tolist():
                            _push(best[j], (float(column[p]), a + i, p), gallery)
    out = {}
    for j in atoms:
        fires = {c: {**counts[j][c],
                     "anomalous_rate": counts[j][c]["anomalous"] / max(1, totals[c]["anomalous"]),
                     "normal_rate": counts[j][c]["normal"] / max(1, totals[c]["normal"])} for c in categories}
        out[j] = {"fires": fires, "kind": A.kind_of({c: counts[j][c]["anomalous"] for c in categories}),
                  "gallery": sorted(best[j], reverse=True), "peaks": sorted(peaks[j], reverse=True)}
    return out


def _push(heap: list, item: tuple, size: int) -> None:
    if len(heap) < size:
        heapq.heappush(heap, item)
    elif item > heap[0]:
        heapq.heapreplace(heap, item)


def gallery_figure(aux: store.FeatureStore, model: S.TopKSAE, atom: int, stats: dict, title: str):
    """Top row: crops (3 x 3 patch cells) around the patches that activate ``atom`` most, with the
    ground-truth outline; bottom row: the atom's activation over the images where it peaks."""
    import matplotlib.pyplot as plt

    grid = tuple(aux.attrs["grid"])
    size = aux.images.shape[1]
    cell = size // grid[0]
    crops = stats["gallery"]
    peaks = stats["peaks"]
    cols = max(len(crops), len(peaks), 1)
    # at least 4 columns wide, so the title fits over an atom that fires on one or two patches only
    fig, axes = plt.subplots(2, max(cols, 4), figsize=(1.6 * max(cols, 4), 3.6), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for k, (value, image, patch) in enumerate(crops):
        y, x = divmod(patch, grid[1])
        y0, x0 = max(0, (y - 1) * cell), max(0, (x - 1) * cell)
        sl = (slice(y0, min(size, (y + 2) * cell)), slice(x0, min(size, (x + 2) * cell)))
        axes[0, k].imshow(aux.images[image][sl])
        mask = aux.masks[image][sl]
        if mask.any():
            axes[0, k].contour(mask, levels=[0.5], colors="white", linewidths=0.8)
        axes[0, k].set_title(f"{value:.2f}", fontsize=7)
    with torch.no_grad():
        for k, (value, image) in enumerate(peaks):
            tokens = torch.from_numpy(aux.tokens[image].astype(np.float32))
            act = model.dense_codes(tokens)[:, atom].reshape(grid).numpy()
            axes[1, k].imshow(aux.images[image])
            axes[1, k].imshow(np.kron(act, np.ones((cell, cell))), cmap="jet", alpha=0.5, vmin=0, vmax=max(value, 1e-6))
            if aux.masks[image].any():
                axes[1, k].contour(aux.masks[image], levels=[0.5], colors="white", linewidths=0.8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def summary(codes_per_seed: torch.Tensor, dictionary: torch.Tensor, stats: dict[int, dict], atoms: list[int],
            weights: torch.Tensor, seeds: list[int]) -> dict:
    """atoms.json: sparsity and concentration per seed, and the top atoms' weights, firings and kinds."""
    per_seed = [A.direction_weights(c, dictionary) for c in codes_per_seed]
    total = float(weights.abs().sum())
    kinds: dict[str, int] = {}
    top = []
    for j in atoms:
        kind = stats[j]["kind"]
        kinds[kind["kind"]] = kinds.get(kind["kind"], 0) + 1
        top.append({"atom": j, "weight": float(weights[j]), "weight_per_seed": [float(w[j]) for w in per_seed],
                    "share_of_direction": abs(float(weights[j])) / total if total > 0 else 0.0,
                    "kind": kind["kind"], "category_shares": kind["shares"],
                    "normalised_entropy": kind["normalised_entropy"], "fires": stats[j]["fires"]})
    return {
        "seeds": seeds,
        "decomposition": "anomaly logit of a patch = sum over atoms j of w_j <D_j, t/|t|> / temperature, "
                         "w_j = a_j/|g_a| - n_j/|g_n| (pipeline/method/atoms.py)",
        "active_atoms": [A.active_atoms(c) for c in codes_per_seed],
        "concentration": {"per_seed": [A.concentration(w) for w in per_seed],
                          "mean_of_seeds_weights": A.concentration(weights)},
        "kind_rule": (f"over the auxiliary set's anomalous patches, an atom's firings per category: specific when "
                      f"one category holds >= {A.SPECIFIC_SHARE} of them, general when the normalised entropy of the "
                      f"shares is >= {A.GENERAL_ENTROPY}, else mixed; silent when it never fires"),
        "kinds": kinds,
        "top_atoms": top,
    }


def write(out, summary_path, aux: store.FeatureStore, model: S.TopKSAE, codes_per_seed: torch.Tensor,
          seeds: list[int], n_top: int = 16, gallery: int = 8) -> dict:
    """Compute the report of the ``n_top`` atoms of largest |mean w|, write atom_<j>.png into ``out``
    and then ``summary_path`` (the JSON, last); returns the JSON's dict."""
    dictionary = model.dictionary.detach()
    weights = torch.stack([A.direction_weights(c, dictionary) for c in codes_per_seed]).mean(dim=0)
    atoms = A.top_atoms(weights, n_top)
    stats = atom_statistics(aux, model, atoms, gallery=gallery)
    result = summary(codes_per_seed, dictionary, stats, atoms, weights, seeds)
    result["aux"] = aux.attrs["dataset"]
    files = {}
    for rank, j in enumerate(atoms):
        entry = result["top_atoms"][rank]
        fig = gallery_figure(aux, model, j, stats[j],
                             f"atom {j}: rank {rank + 1}, w {entry['weight']:+.3f} "
                             f"({100 * entry['share_of_direction']:.1f}% of the direction), {entry['kind']}")
        files[report.report_path(out, f"atom_{j}", ".png")] = report.png_bytes(fig)
        entry["gallery"] = f"atom_{j}.png"
    for path, data in files.items():
        write_bytes(path, data)
    report.write_json(summary_path, result)
    return result


def explanation_figure(image: np.ndarray, signal: np.ndarray, grid: tuple[int, int], explained: dict,
                       share_maps: np.ndarray, title: str):
    """The panel ``predict --explain`` writes beside an overlay: the image under its guide signal with
    the peak patch boxed; each top atom's share of the logit at the peak (bars, the rest last); then,
    per top atom, its share of the logit at every patch (red: towards anomalous, blue: towards normal)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    gh, gw = grid
    h, w = image.shape[:2]
    n = len(explained["atoms"])
    fig, axes = plt.subplots(1, 2 + n, figsize=(2.2 * (2 + n), 2.6), dpi=100, squeeze=False)
    axes = axes[0]
    for ax in axes:
        ax.set_axis_off()
    extent = (0, w, h, 0)
    axes[0].imshow(image)
    axes[0].imshow(signal.reshape(gh, gw), cmap="jet", alpha=0.45, extent=extent, interpolation="bilinear")
    peak = explained["peak"]
    cell_h, cell_w = h / gh, w / gw
    axes[0].add_patch(Rectangle((peak["col"] * cell_w, peak["row"] * cell_h), cell_w, cell_h, fill=False,
                                edgecolor="white", linewidth=1.5))
    axes[0].set_title(f"logit {peak['logit']:+.2f} at the peak", fontsize=7)
    labels = [f"atom {a['atom']}" for a in explained["atoms"]] + ["other atoms"]
    values = [a["share"] for a in explained["atoms"]] + [explained["rest"]]
    bars = axes[1]
    bars.set_axis_on()
    bars.barh(range(len(values))[::-1], values, color=["tab:red" if v > 0 else "tab:blue" for v in values])
    bars.set_yticks(range(len(values))[::-1], labels, fontsize=6)
    bars.tick_params(axis="x", labelsize=6)
    bars.axvline(0, color="black", linewidth=0.5)
    bars.set_title("share of the logit", fontsize=7)
    grey = image.mean(axis=2) if image.ndim == 3 else image
    for k, entry in enumerate(explained["atoms"]):
        ax = axes[2 + k]
        top = float(np.abs(share_maps[k]).max()) or 1.0
        ax.imshow(grey, cmap="gray")
        ax.imshow(share_maps[k].reshape(gh, gw), cmap="coolwarm", vmin=-top, vmax=top, alpha=0.6, extent=extent)
        ax.set_title(f"atom {entry['atom']}: {entry['share']:+.2f}", fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig
