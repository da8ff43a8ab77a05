"""The method side of evaluation: which guide sets are scored, how a store's rows are scored, and how
per-category metrics are summarised over categories and seeds. No paths, no reports (the evaluate
stage does those); maps come from :func:`pipeline.scoring.score_tokens` only.

Named guide sets (:func:`guide_sets`), each (4, d) in :data:`guides.ROWS` order:

- ``learned/<seed>``: the detector's decoded guide vectors of that seed (``c·D``), exactly what
  :class:`pipeline.detector.Detector` scores with;
- ``untrained_init/<seed>``: the guide codes as initialised, before any training (what the learned
  coefficients add);
- ``no_sae/0``: local guides = mean normal and mean anomalous auxiliary patch tokens, global guides =
  mean normal and mean anomalous auxiliary CLS tokens (what the SAE dictionary adds).

:func:`score_rows` adds :data:`ENSEMBLE`, the mean of the ``learned/*`` seeds' maps
(:func:`scoring.mean_of_seeds`): the detector's default scoring, which the auxiliary threshold belongs to.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import guides, metrics, scoring, store

KEYS = metrics.METRIC_KEYS
THRESHOLD_KEYS = metrics.THRESHOLD_KEYS
LEARNED = "learned"
ENSEMBLE = "seed_ensemble"
"""The name of the mean-of-seeds map in :func:`score_rows`' result."""


def no_sae_guides(aux: store.FeatureStore, device: torch.device) -> torch.Tensor:
    """(4, d) guide vectors from auxiliary means, in guides.ROWS order (the no-SAE control).

    Normal patches are those with no anomalous pixel; the anomalous mean weights every patch by the
    fraction of its pixels that are anomalous (small defects rarely cover half a patch, and a hard
    threshold would leave the mean undefined on sets of small defects).
    """
    grid = tuple(aux.attrs["grid"])
    d = aux.tokens.shape[-1]
    sums = {name: torch.zeros(d, dtype=torch.float64) for name in ("pn", "pa", "cn", "ca")}
    counts = dict.fromkeys(sums, 0.0)
    for chunk in range(aux.n_chunks):
        a = aux.read(chunk, ("tokens", "cls", "masks", "labels"), finite=True)
        tokens = torch.from_numpy(a["tokens"].astype(np.float32)).reshape(-1, d)
        cover = F.adaptive_avg_pool2d(torch.from_numpy(a["masks"]).float()[:, None], grid).reshape(-1)
        cls = torch.from_numpy(a["cls"].astype(np.float32))
        labels = torch.from_numpy(a["labels"].astype(bool))
        weights = {"pn": (cover == 0).float(), "pa": cover, "cn": (~labels).float(), "ca": labels.float()}
        for key, rows in (("pn", tokens), ("pa", tokens), ("cn", cls), ("ca", cls)):
            sums[key] += (weights[key][:, None].double() * rows.double()).sum(0)
            counts[key] += float(weights[key].sum())
    empty = [k for k, n in counts.items() if n == 0]
    if empty:
        raise ValueError(f"{aux.path}: no {', '.join(empty)} samples for the no-SAE control "
                         "(pn/pa: normal/anomalous patches, cn/ca: normal/anomalous images)")
    mean = {k: (sums[k] / counts[k]).float() for k in sums}
    return torch.stack([mean["cn"], mean["ca"], mean["pn"], mean["pa"]]).to(device)


def category_ranges(target: store.FeatureStore) -> dict[str, tuple[int, int]]:
    """Category name -> [start, stop) rows; the extract stage writes each category contiguously."""
    category = target.category[:]
    out = {}
    for i, name in enumerate(target.attrs["categories"]):
        rows = np.flatnonzero(category == i)
        if len(rows) == 0:
            continue
        if rows[-1] - rows[0] + 1 != len(rows):
            raise ValueError(f"{target.path}: category {name!r} is not contiguous in the store")
        out[name] = (int(rows[0]), int(rows[-1]) + 1)
    return out


def learned_sets(vectors: torch.Tensor, seeds: Sequence[int]) -> dict[str, torch.Tensor]:
    """``learned/<seed>`` -> (4, d) from the detector's vectors (n_seeds, 4, d), in seed order."""
    if len(vectors) != len(seeds):
        raise ValueError(f"{len(vectors)} guide vector sets for {len(seeds)} seeds {list(seeds)}")
    return {f"{LEARNED}/{s}": v for s, v in zip(seeds, vectors)}


def guide_sets(vectors: torch.Tensor, seeds: Sequence[int], dictionary: torch.Tensor, dead_mask: torch.Tensor,
               training: Mapping[str, Any], aux: store.FeatureStore, device: torch.device) -> dict[str, torch.Tensor]:
    """Every named guide set the evaluate stage scores (see the module docstring), each (4, d).

    vectors (n_seeds, 4, d): the detector's; dictionary (n_latents, d) and dead_mask (n_latents,) from
    the SAE; ``training``: the guides checkpoint's training config (variant, guide_topk, init_mean,
    init_std), which rebuilds each seed's initial codes.
    """
    out = {name: v.to(device) for name, v in learned_sets(vectors, seeds).items()}
    dictionary = dictionary.detach().to(device)
    for s in seeds:
        init = guides.GuideCodes(dictionary.shape[0], dead_mask, variant=training["variant"],
                                 guide_topk=training["guide_topk"], init_mean=training["init_mean"],
                                 init_std=training["init_std"], generator=torch.Generator().manual_seed(s))
        out[f"untrained_init/{s}"] = guides.guide_vectors(init.effective().detach().to(device), dictionary)
    out["no_sae/0"] = no_sae_guides(aux, device)
    return out


def score_rows(target: store.FeatureStore, start: int, stop: int, vectors: Mapping[str, torch.Tensor],
               settings: scoring.ScoreSettings, batch_images: int, device: torch.device,
               keep_maps: bool = True) -> dict[str, tuple[np.ndarray | None, np.ndarray]]:
    """Maps (n, S, S) float32 and image scores (n,) float64 of rows [start, stop) for every named guide set.

    With ``learned/*`` sets among ``vectors``, the result also holds :data:`ENSEMBLE`: the mean of their
    maps and its image score (:func:`scoring.mean_of_seeds`), as the detector computes it. Tokens and
    CLS are checked finite as read (the error names the store, array, image and chunk). With
    ``keep_maps=False`` the maps are dropped batch by batch (None in the result): memory stays flat.
    """
    grid, size = tuple(target.attrs["grid"]), target.masks.shape[-1]
    learned = [name for name in vectors if name.startswith(LEARNED + "/")]
    names = [*vectors, *([ENSEMBLE] if learned else [])]
    maps: dict[str, list] = {name: [] for name in names}
    scores: dict[str, list] = {name: [] for name in names}
    for i in range(start, stop, batch_images):
        j = min(i + batch_images, stop)
        arrays = {"tokens": target.tokens[i:j], "cls": target.cls[i:j]}
        for name, values in arrays.items():  # names the store, array, image and chunk of a NaN/Inf
            target.check_finite(name, values, i)
        tokens = torch.from_numpy(arrays["tokens"].astype(np.float32)).to(device)
        cls = torch.from_numpy(arrays["cls"].astype(np.float32)).to(device)
        batch = {name: scoring.score_tokens(tokens, cls, g, grid, size, settings) for name, g in vectors.items()}
        if learned:
            batch[ENSEMBLE] = scoring.mean_of_seeds(np.stack([batch[n][0] for n in learned]),
                                                    np.stack([batch[n][1] for n in learned]))
        for name, (m, global_probs) in batch.items():
            scores[name].append(scoring.score_images(m, global_probs, settings))
            if keep_maps:
                maps[name].append(m)
    return {name: (np.concatenate(maps[name]) if keep_maps else None, np.concatenate(scores[name])) for name in names}


def mean_over_categories(per_category: Mapping[str, Mapping], keys: Sequence[str] = KEYS) -> dict[str, float | None]:
    """Mean of each key over the categories where it is defined (None where no category has it)."""
    out = {}
    for key in keys:
        values = [m[key] for m in per_category.values() if m.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def seed_summary(per_seed: Sequence[Mapping], keys: Sequence[str] = KEYS) -> dict[str, float | None]:
    """Mean over seeds, plus ``<key>_std`` (sample std, ddof=1) when there are several."""
    out: dict[str, float | None] = {}
    for key in keys:
        values = [m[key] for m in per_seed if m[key] is not None]
        out[key] = float(np.mean(values)) if values else None
        if len(per_seed) > 1:
            out[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return out
