"""The method side of evaluation: which guide sets are scored, how a store's rows are scored, and how
per-category metrics are summarised over categories and seeds. No paths, no reports (the evaluate
stage does those); maps come from :func:`pipeline.method.scoring.score_tokens` only.

Named guide sets (:func:`guide_sets`), each (4, d) in :data:`guides.ROWS` order:

- ``learned/<seed>``: the detector's decoded guide vectors of that seed (``c·D``), exactly what
  :class:`pipeline.method.detector.Detector` scores with;
- ``untrained_init/<seed>``: the guide codes as initialised, before any training (what the learned
  coefficients add);
- ``no_sae/0``: local guides = mean normal and mean anomalous auxiliary patch tokens, global guides =
  mean normal and mean anomalous auxiliary CLS tokens (what the SAE dictionary adds).

:func:`score_rows` adds :data:`ENSEMBLE`, the mean of the ``learned/*`` seeds' maps
(:func:`scoring.mean_of_seeds`): the detector's default scoring, which the auxiliary threshold belongs to.

:func:`baseline_rows` scores the training-free baselines of :mod:`pipeline.method.baselines` from the same
tokens, with the same upsampling, blur and image scores (:func:`scoring.patch_maps`,
:func:`scoring.scores_by_mode`); :func:`baseline_metrics` and :func:`image_by_score` turn maps and
scores into per-category metrics with the metric code the learned result uses (:mod:`pipeline.evaluation.metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.method import baselines
from pipeline.method import guides
from pipeline.evaluation import metrics
from pipeline.method import scoring
from pipeline.features import store
from pipeline.evaluation.target_scores import category_ranges  # noqa: F401  (re-exported)
from pipeline.method import fusion, neighbours, thresholds
from pipeline.method.reference import Reference

KEYS = metrics.METRIC_KEYS
IMAGE_KEYS = KEYS[:3]
THRESHOLD_KEYS = metrics.THRESHOLD_KEYS
DECISION_KEYS = (*metrics.THRESHOLD_KEYS, *metrics.OPERATOR_KEYS)
"""What the detector's own scoring (the mean of the seeds' maps) decides: at the aux threshold, and the
operator's view (:func:`metrics.operator_view`)."""
MapSink = Callable[[int, Mapping[str, np.ndarray]], None]
"""Called with (row offset in [start, stop) minus start, {name: maps (b, S, S) float32}) for each batch
of images as it is scored, in row order: how the evaluate stage streams maps to disk."""
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
        # the module on the device first, then its effective codes: codes and dead mask meet on one device
        out[f"untrained_init/{s}"] = guides.guide_vectors(init.to(device).effective().detach(), dictionary)
    out["no_sae/0"] = no_sae_guides(aux, device)
    return out


def score_rows(target: store.FeatureStore, start: int, stop: int, vectors: Mapping[str, torch.Tensor],
               settings: scoring.ScoreSettings, batch_images: int, device: torch.device,
               keep_maps: bool = True, by_mode: dict | None = None,
               sink: MapSink | None = None) -> dict[str, tuple[np.ndarray | None, np.ndarray]]:
    """Maps (n, S, S) float32 and image scores (n,) float64 of rows [start, stop) for every named guide set.

    With ``learned/*`` sets among ``vectors``, the result also holds :data:`ENSEMBLE`: the mean of their
    maps and its image score (:func:`scoring.mean_of_seeds`), as the detector computes it. Tokens and
    CLS are checked finite as read (the error names the store, array, image and chunk). With
    ``keep_maps=False`` the maps are dropped batch by batch (None in the result): memory stays flat.
    A dict passed as ``by_mode`` is filled with name -> {mode: image scores (n,) float64} for every mode
    of :data:`scoring.IMAGE_SCORES` (the score of ``settings.image_score`` is the result's own).
    A ``sink`` (:data:`MapSink`) gets every batch's maps of every name (with ``keep_maps=False``, the
    maps then exist one batch at a time).
    """
    grid, size = tuple(target.attrs["grid"]), target.masks.shape[-1]
    learned = [name for name in vectors if name.startswith(LEARNED + "/")]
    names = [*vectors, *([ENSEMBLE] if learned else [])]
    maps: dict[str, list] = {name: [] for name in names}
    scores: dict[str, list] = {name: [] for name in names}
    modes: dict[str, list] = {name: [] for name in names}
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
        if sink is not None:
            sink(i - start, {name: m for name, (m, _) in batch.items()})
        for name, (m, global_probs) in batch.items():
            scores[name].append(scoring.score_images(m, global_probs, settings))
            if by_mode is not None:
                modes[name].append(scoring.scores_by_mode(m, global_probs, settings))
            if keep_maps:
                maps[name].append(m)
    if by_mode is not None:
        by_mode.update({name: {mode: np.concatenate([b[mode] for b in modes[name]]) for mode in scoring.IMAGE_SCORES}
                        for name in names})
    return {name: (np.concatenate(maps[name]) if keep_maps else None, np.concatenate(scores[name])) for name in names}


def baseline_rows(target: store.FeatureStore, start: int, stop: int, settings: scoring.ScoreSettings,
                  batch_images: int, device: torch.device, sink: MapSink | None = None,
                  mutual: np.ndarray | None = None) -> dict[str, tuple[np.ndarray | None, dict | None, str | None]]:
    """The baselines of rows [start, stop) (one category): name -> (maps (n, S, S) float32, {mode: image
    scores (n,) float64, ``global`` None}, None), or (None, None, reason) where a baseline is undefined
    (``mutual`` on a category of one image).

    Maps are the patch scores upsampled and blurred like the guide maps (:func:`scoring.patch_maps`,
    ``settings.blur_sigma``). ``mutual`` sees every image of [start, stop), so the rows must be one
    whole category. Tokens are read chunk by chunk (:class:`baselines.ChunkRows`, one decoded chunk
    kept), ``mutual`` in blocks of images (:func:`pipeline.method.neighbours.mutual`) and ``self_dissimilarity``
    batch by batch, so no (n, L, d) token array of the category is held; each chunk's rows
    of the category are checked finite the first time they are read. ``mutual`` (n, L): the category's
    mutual patch scores when already computed (the ``neighbours@<T>`` stage's,
    :mod:`pipeline.evaluation.target_scores`), else they are computed here. With a ``sink``
    (:data:`MapSink`), each batch's maps go to it instead and the result's maps are None (the scores
    by mode are the same).
    """
    grid, size = tuple(target.attrs["grid"]), target.masks.shape[-1]
    n, length = stop - start, target.tokens.shape[1]
    read = baselines.ChunkRows(lambda c: target.read(c, ("tokens",))["tokens"], target.chunk_images, start, stop,
                               check=lambda values, first: target.check_finite("tokens", values, first))
    reasons = {}
    if n < 2:
        mutual = None
        reasons[baselines.MUTUAL] = baselines.ONE_IMAGE
    elif mutual is None:  # (n, L) float32: needs every image of the category before any batch's map
        mutual = neighbours.mutual(read, n, length, device=device)
    elif mutual.shape != (n, length):
        raise ValueError(f"mutual scores {mutual.shape} for {n} images of {length} patches")
    names = [baselines.SELF_DISSIMILARITY] + ([baselines.MUTUAL] if mutual is not None else [])
    out: dict[str, tuple] = {name: (None, None, reason) for name, reason in reasons.items()}
    maps: dict[str, list] = {name: [] for name in names}
    modes: dict[str, list] = {name: [] for name in names}
    for i in range(0, n, batch_images):  # batches outermost: a sink sees each batch's baselines together
        j = min(i + batch_images, n)
        patch = {baselines.SELF_DISSIMILARITY: baselines.self_dissimilarity(
            torch.from_numpy(read(i, j).astype(np.float32)).to(device)).cpu()}  # (b, L): per image, so per batch
        if mutual is not None:
            patch[baselines.MUTUAL] = torch.from_numpy(mutual[i:j])
        batch = {name: scoring.patch_maps(values, grid, size, sigma=settings.blur_sigma)
                 for name, values in patch.items()}
        if sink is not None:
            sink(i, batch)
        for name, m in batch.items():
            modes[name].append(scoring.scores_by_mode(m, None, settings))  # row by row: batches change nothing
            if sink is None:
                maps[name].append(m)
    for name in names:
        by_mode = {mode: None if modes[name][0][mode] is None else np.concatenate([b[mode] for b in modes[name]])
                   for mode in scoring.IMAGE_SCORES}
        out[name] = (np.concatenate(maps[name]) if sink is None else None, by_mode, None)
    return {name: out[name] for name in baselines.SETTINGS}


FUSED = {
    "guides+batch": "the detector's guide map (mean of the learned seeds) fused with the batch (mutual) distances: "
                    + fusion.RULE + "; " + fusion.IMAGE_RULE,
    "no_sae+batch": "the no-SAE control's guide map fused with the batch distances the same way (what the SAE "
                    "adds on top of the batch)",
}
"""The fused scorings evaluate reports next to the guides alone and the batch alone."""
RULE_FAR = 0.01
"""The false-alarm rate the few-shot modes' threshold allows on their references (predict's ``--far``
default): with k ≤ 16 references it sits just above the highest of them."""
RULE_KEYS = metrics.RULE_KEYS


def decision_score(image_score: str) -> str:
    """The image score a fused or few-shot mode decides on: the detector's, but ``max`` for
    ``global`` (those maps have no CLS guide), as predict does."""
    return "max" if image_score == "global" else image_score


def with_rule(entry: dict, labels: np.ndarray, scores: np.ndarray, rule: dict | None, reason: str | None = None) -> dict:
    """``entry`` (a :func:`baseline_metrics` dict) with :data:`RULE_KEYS` at the rule's threshold
    (``rule``: a :mod:`pipeline.method.thresholds` result), or null with ``reason``."""
    if rule is None:
        entry.update(dict.fromkeys(RULE_KEYS))
        entry["null_reasons"] = {**entry.get("null_reasons", {}), **dict.fromkeys(RULE_KEYS, reason)}
        return entry
    at = metrics.at_threshold(labels, scores, rule["value"], keys=RULE_KEYS)
    entry["null_reasons"] = {**entry.get("null_reasons", {}), **at.pop("null_reasons")}
    entry.update(at)
    return entry


def batch_rule_metrics(labels: np.ndarray, entry: dict, by_mode: Mapping[str, np.ndarray | None],
                       image_score: str) -> dict:
    """A :data:`FUSED` mode's metrics with the batch rule's decisions (:func:`thresholds.batch_threshold`
    of the category's own scores: the threshold ``predict --batch`` uses without references)."""
    scores = by_mode[decision_score(image_score)]
    return with_rule(entry, labels, scores, thresholds.batch_threshold(scores))


def fused_rows(target: store.FeatureStore, start: int, stop: int, vectors: Mapping[str, torch.Tensor],
               settings: scoring.ScoreSettings, batch_images: int, device: torch.device, mutual: np.ndarray,
               sink: MapSink | None = None) -> dict[str, dict[str, np.ndarray | None]]:
    """The :data:`FUSED` scorings of rows [start, stop) (one whole category, the set scored together):
    name -> {mode: image scores (n,) float64; ``global`` None}. mutual (n, L): the category's batch
    patch scores; the guide signals are :func:`guide_signals`'. The rule's statistics are the
    category's (:func:`pipeline.method.fusion.fuse`); the image scores come from the batch distances alone
    (:func:`pipeline.method.fusion.decision`); each batch's fused maps go to ``sink``."""
    grid, size = tuple(target.attrs["grid"]), target.masks.shape[-1]
    signals = guide_signals(target, start, stop, vectors, settings, batch_images, device)
    batch = torch.from_numpy(mutual)
    probability = settings.fusion == "none"
    patches = {"guides+batch": fusion.fuse(torch.from_numpy(signals["guides"]), batch, probability=probability),
               "no_sae+batch": fusion.fuse(torch.from_numpy(signals["no_sae"]), batch, probability=probability)}
    # both modes decide on the batch distances alone (the same values: the guide is not in them)
    decided = fusion.decision(None, batch)
    modes: dict[str, list] = {name: [] for name in FUSED}
    for i in range(0, stop - start, batch_images):
        j = min(i + batch_images, stop - start)
        maps = {name: scoring.patch_maps(v[i:j], grid, size, sigma=settings.blur_sigma) for name, v in patches.items()}
        if sink is not None:
            sink(i, maps)
        by_mode = scoring.scores_by_mode(scoring.patch_maps(decided[i:j], grid, size, sigma=settings.blur_sigma),
                                         None, settings)
        for name in maps:
            modes[name].append(by_mode)
    return {name: {mode: None if mode == "global" else np.concatenate([b[mode] for b in modes[name]])
                   for mode in scoring.IMAGE_SCORES} for name in FUSED}


FEW_SHOT = {
    "reference": "few-shot, training-free: per patch, 1 - cos to the nearest patch of k known-good images of the "
                 "category (AnomalyDINO-style); the references are not scored",
    "guides+reference": "the detector's guide map fused with the reference distances: " + fusion.RULE + "; "
                        + fusion.IMAGE_RULE,
    "guides+reference+batch": "guides, reference and batch (mutual) distances fused: " + fusion.RULE + "; "
                              + fusion.IMAGE_RULE,
    "no_sae+reference": "the no-SAE control's guide map fused with the reference distances the same way",
}
"""The few-shot scorings evaluate reports for each k of ``neighbours.reference_k``."""


def guide_signals(target: store.FeatureStore, start: int, stop: int, vectors: Mapping[str, torch.Tensor],
                  settings: scoring.ScoreSettings, batch_images: int, device: torch.device) -> dict[str, np.ndarray]:
    """{"guides": mean over the ``learned/*`` seeds, "no_sae": the control} of :func:`scoring.patch_signal`
    for rows [start, stop): (n, L) float32 each, the patch values a guide map upsamples."""
    learned = [g for name, g in vectors.items() if name.startswith(LEARNED + "/")]
    out: dict[str, list] = {"guides": [], "no_sae": []}
    for i in range(start, stop, batch_images):
        j = min(i + batch_images, stop)
        raw = target.tokens[i:j]
        target.check_finite("tokens", raw, i)
        tokens = torch.from_numpy(raw.astype(np.float32)).to(device)
        signal = lambda g: scoring.patch_signal(tokens, g, temperature=settings.temperature,  # noqa: E731
                                                fusion=settings.fusion)
        out["guides"].append(torch.stack([signal(g) for g in learned]).mean(dim=0).cpu().numpy())
        out["no_sae"].append(signal(vectors["no_sae/0"]).cpu().numpy())
    return {name: np.concatenate(parts) for name, parts in out.items()}


def few_shot_metrics(labels: np.ndarray, masks: np.ndarray, signals: Mapping[str, np.ndarray], reference: np.ndarray,
                     mutual: np.ndarray | None, grid: tuple[int, int], settings: scoring.ScoreSettings, *,
                     has_masks: bool = True, tokens_of: Callable[[np.ndarray], np.ndarray] | None = None,
                     max_patches: int | None = None, normals: tuple[np.ndarray, np.ndarray] | None = None,
                     ) -> dict[str, list[dict[str, Any]]]:
    """One category's :data:`FEW_SHOT` scorings for one k: mode -> [metrics of each draw] (the form of
    :func:`baseline_metrics`, plus :data:`RULE_KEYS`). reference (draws, n, L): NaN rows are that draw's
    references and are not scored; signals: :func:`guide_signals`; mutual (n, L) or None (then no
    ``guides+reference+batch``). The fusion's statistics are those of the draw's scored images; a fused
    mode's image scores come from its distance signals alone (:func:`pipeline.method.fusion.decision`).

    The rule's threshold is ``predict --normals``': each reference image scored against the other
    references' patches (``tokens_of(rows)`` gives their tokens (k, L, d); the bank subsampled to
    ``max_patches`` as the neighbours stage's was), put on the scored images' scale, then
    :func:`thresholds.threshold_from_normals` at :data:`RULE_FAR`; null for one reference. References
    drawn from a train/good pool are no rows here (``reference`` has no NaN row): ``normals`` then gives
    their own signals, (draws, k, L) each against the others and against the batch
    (:func:`pipeline.evaluation.target_scores.compute_normals`)."""
    size = masks.shape[-1]
    probability = settings.fusion == "none"
    mode = decision_score(settings.image_score)
    out: dict[str, list] = {name: [] for name in FEW_SHOT if mutual is not None or "batch" not in name}

    def maps_of(values: torch.Tensor) -> tuple[np.ndarray, dict]:
        maps = scoring.patch_maps(values, grid, size, sigma=settings.blur_sigma)
        return maps, scoring.scores_by_mode(maps, None, settings)

    for d, draw in enumerate(reference):
        keep = ~np.isnan(draw).any(axis=1)
        refs = np.flatnonzero(~keep)
        ref = torch.from_numpy(draw[keep])
        on = {"guides": torch.from_numpy(signals["guides"]), "no_sae": torch.from_numpy(signals["no_sae"])}
        parts = {"reference": [ref], "guides+reference": [on["guides"][keep], ref],
                 "no_sae+reference": [on["no_sae"][keep], ref]}
        if mutual is not None:
            parts["guides+reference+batch"] = [on["guides"][keep], ref, torch.from_numpy(mutual[keep])]
        if normals is not None:
            loo = None if np.isnan(normals[0][d]).any() else torch.from_numpy(normals[0][d])
            ref_batch = torch.from_numpy(normals[1][d])
        else:
            loo = (Reference.build(tokens_of(refs), max_patches=max_patches).leave_one_out()
                   if tokens_of is not None and len(refs) >= 2 else None)
            ref_batch = torch.from_numpy(mutual[refs]) if mutual is not None else None
        for name, signal in parts.items():
            if name == "reference":
                values = decided = signal[0]
                normal_values = loo
            else:
                guide, *distances = signal
                stats = fusion.statistics(*fusion.parts(guide, *distances, probability=probability))
                values = fusion.fuse(guide, *distances, probability=probability, stats=stats)
                decided = fusion.decision(guide, *distances, probability=probability, stats=stats)
                normal_values = None
                if loo is not None:
                    normal_parts = [loo] + ([ref_batch] if len(distances) == 2 else [])
                    normal_values = fusion.decision(guide, *normal_parts, probability=probability, stats=stats)
            maps, by_mode = maps_of(values)
            if decided is not values:
                by_mode = maps_of(decided)[1]
            entry = baseline_metrics(labels[keep], masks[keep], (maps, by_mode, None), settings.image_score,
                                     has_masks=has_masks)
            rule = None
            if normal_values is not None:
                value, _ = thresholds.threshold_from_normals(maps_of(normal_values)[1][mode], RULE_FAR)
                rule = {"value": value}
            out[name].append(with_rule(entry, labels[keep], by_mode[mode], rule,
                                       "one reference image: the threshold is set by scoring each reference "
                                       "against the others"))
    return out


def image_by_score(labels: np.ndarray, by_mode: Mapping[str, np.ndarray | None] | None,
                   reason: str | None = None) -> dict[str, Any]:
    """labels (n,), {mode: image scores (n,) or None} -> {mode: {image_auroc, image_ap, image_f1_max}} and
    ``null_reasons`` ({``image_by_score.<mode>``: why}) for one category. A mode whose scores are None
    (no CLS guide: ``global`` of a baseline) is null with :data:`scoring.GLOBAL_WITHOUT_CLS_GUIDE`;
    ``by_mode`` None (the scoring is undefined) makes every mode null with ``reason``."""
    out: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    for mode in scoring.IMAGE_SCORES:
        scores = None if by_mode is None else by_mode[mode]
        if scores is None:
            out[mode] = dict.fromkeys(IMAGE_KEYS)
            reasons[f"image_by_score.{mode}"] = reason if by_mode is None else scoring.GLOBAL_WITHOUT_CLS_GUIDE
            continue
        m = metrics.image_metrics(labels, scores)
        if m["null_reasons"]:
            reasons[f"image_by_score.{mode}"] = next(iter(m["null_reasons"].values()))
        out[mode] = {k: m[k] for k in IMAGE_KEYS}
    out["null_reasons"] = reasons
    return out


def baseline_metrics(labels: np.ndarray, masks: np.ndarray | None, scored: tuple, image_score: str,
                     has_masks: bool = True, pixels: Any = None) -> dict[str, Any]:
    """One baseline's metrics on one category: the six metrics of :func:`metrics.compute_all` (image
    metrics by ``image_score``; null for ``global``, which needs a CLS guide), ``image_by_score`` and
    ``null_reasons``. ``scored`` is an entry of :func:`baseline_rows`; an undefined baseline (maps None)
    has every metric null with its reason. labels (n,), masks (n, S, S); or, for maps streamed through
    a sink, ``pixels``: their :class:`pipeline.evaluation.metrics_stream.PixelStream` (masks then unused)."""
    maps, by_mode, reason = scored
    if by_mode is None:
        out: dict[str, Any] = dict.fromkeys(KEYS)
        reasons = dict.fromkeys(KEYS, reason)
    else:
        # a global score does not exist here: any map score stands in, then the image metrics are nulled
        scores = by_mode["max"] if by_mode[image_score] is None else by_mode[image_score]
        out = (metrics.compute_all(labels, scores, masks, maps, has_masks=has_masks) if pixels is None
               else pixels.metrics(labels, scores, has_masks=has_masks))
        reasons = out.pop("null_reasons")
        if by_mode[image_score] is None:
            out.update(dict.fromkeys(IMAGE_KEYS))
            reasons.update(dict.fromkeys(IMAGE_KEYS, f"scoring.image_score is {image_score!r}: "
                                                     + scoring.GLOBAL_WITHOUT_CLS_GUIDE))
    by_score = image_by_score(labels, by_mode, reason)
    reasons.update(by_score.pop("null_reasons"))
    out["image_by_score"] = by_score
    out["null_reasons"] = reasons
    return out


def summarise(per_category: Mapping[str, Mapping[str, Any]], keys: Sequence[str] = KEYS) -> dict[str, Any]:
    """Means over categories (:func:`mean_over_categories`) of ``keys`` and of every mode of
    ``image_by_score``, with ``null_reasons`` for what is undefined in every category (each category's
    reason quoted). ``per_category``: category -> a dict of :func:`baseline_metrics`' form."""
    out: dict[str, Any] = mean_over_categories(per_category, keys)
    out["image_by_score"] = {mode: mean_over_categories({c: m["image_by_score"][mode] for c, m in per_category.items()},
                                                        IMAGE_KEYS) for mode in scoring.IMAGE_SCORES}
    undefined = [k for k in keys if out[k] is None]
    undefined += [f"image_by_score.{mode}" for mode, m in out["image_by_score"].items() if all(v is None for v in m.values())]
    reasons = {}
    for key in undefined:
        quoted = {r for m in per_category.values() if (r := m.get("null_reasons", {}).get(key))}
        if len(quoted) == 1 and len(per_category) > 1:  # one reason for all: say it once
            reasons[key] = "undefined in every category: " + quoted.pop()
        else:
            reasons[key] = "undefined in every category; " + "; ".join(
                f"{c}: {m['null_reasons'][key]}" for c, m in per_category.items() if key in m.get("null_reasons", {}))
    if reasons:
        out["null_reasons"] = reasons
    return out


def seed_summary_by_score(per_seed: Sequence[Mapping[str, Mapping]]) -> dict[str, dict]:
    """[{mode: {image keys}} per seed] -> {mode: :func:`seed_summary` of the image keys} (mean, ``_std``)."""
    return {mode: seed_summary([s[mode] for s in per_seed], IMAGE_KEYS) for mode in scoring.IMAGE_SCORES}


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


@dataclass
class Collected:
    """What the evaluate stage's category loop gathers, for :func:`assemble`: per scored set and
    category the metrics (``per_category``: :data:`ENSEMBLE` and every guide set name in ``names``;
    ``by_score``: their image metrics by mode), the baselines', fused and few-shot metrics, the
    neighbours stage's info, and the pooled labels, scores and pixel sample of the ROC/PR curves."""

    names: list[str]
    per_category: dict[str, dict[str, dict]]
    by_score: dict[str, dict[str, dict]]
    per_baseline: dict[str, dict[str, dict]]
    per_fused: dict[str, dict[str, dict]]
    per_few_shot: dict[int, dict[str, dict[str, list]]]
    scores_info: dict
    pooled_labels: list
    pooled_scores: list
    pixel_sample: tuple[list, list]
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    """category -> (images, anomalous images): what the decisions at a threshold are counted over."""

    @classmethod
    def empty(cls, names: Sequence[str], ks: Sequence[int], scores_info: dict) -> Collected:
        """Nothing collected yet, for the guide sets ``names`` and the few-shot sizes ``ks``."""
        sets = [*names, ENSEMBLE]
        return cls(names=list(names), per_category={name: {} for name in sets}, by_score={name: {} for name in sets},
                   per_baseline={name: {} for name in baselines.SETTINGS},
                   per_fused={name: {} for name in FUSED},
                   per_few_shot={k: {name: {} for name in FEW_SHOT} for k in ks},
                   scores_info=scores_info, pooled_labels=[], pooled_scores=[], pixel_sample=([], []))


def assemble(scored: Collected, categories: Sequence[str], *, threshold_info: Mapping[str, Any],
             run_info: Mapping[str, Any], curve_points: int) -> tuple[dict, dict, dict]:
    """metrics.json's dict, per_category.json's dict and the pooled ROC/PR curves ({level: {roc, pr}
    rows}) of one run, from what the category loop collected (docs/design.md#artifacts)."""
    result = run_summary(scored, threshold_info, run_info)
    by_category = {c: category_summary(scored, c) for c in categories}
    null_reasons = {key: "undefined in every category; " + "; ".join(
                        f"{c}: {e['null_reasons'][key]}" for c, e in by_category.items() if key in e.get("null_reasons", {}))
                    for key in (*KEYS, *DECISION_KEYS) if result[key] is None}
    curves, curve_reasons = pooled_curves(scored, curve_points)
    null_reasons.update(curve_reasons)
    null_reasons.update(_modes_of(scored, ENSEMBLE).get("null_reasons", {}))
    if null_reasons:
        result["null_reasons"] = null_reasons
    return result, by_category, curves


def _modes_of(scored: Collected, name: str) -> dict:
    """{mode: image metrics} of one scored set, means over categories (and null_reasons)."""
    return summarise({c: {"image_by_score": {m: v[m] for m in scoring.IMAGE_SCORES}, "null_reasons": v["null_reasons"]}
                      for c, v in scored.by_score[name].items()}, ())


def _sets(scored: Collected, prefix: str) -> list[str]:
    return [n for n in scored.names if n.startswith(prefix + "/")]


def run_summary(scored: Collected, threshold_info: Mapping[str, Any], run_info: Mapping[str, Any]) -> dict:
    """metrics.json without its ``null_reasons``: means over categories, over seeds, and every mode."""
    def summary(prefix: str) -> dict:
        return seed_summary([mean_over_categories(scored.per_category[n]) for n in _sets(scored, prefix)])

    def control(prefix: str) -> dict:
        return {**summary(prefix), "image_by_score": seed_summary_by_score(
            [_modes_of(scored, n)["image_by_score"] for n in _sets(scored, prefix)])}

    ensemble = mean_over_categories(scored.per_category[ENSEMBLE], (*KEYS, *DECISION_KEYS))
    return {
        **summary(LEARNED),
        **{k: ensemble[k] for k in DECISION_KEYS},
        **threshold_info,
        "seed_ensemble": {k: ensemble[k] for k in KEYS},
        **run_info,
        "image_by_score_of": "seed_ensemble: the mean of the learned seeds' maps (the detector's scoring)",
        "image_by_score": _modes_of(scored, ENSEMBLE)["image_by_score"],
        "controls": {"untrained_init": control("untrained_init"), "no_sae": control("no_sae")},
        "baselines": {name: {"setting": setting, **summarise(scored.per_baseline[name])}
                      for name, setting in baselines.SETTINGS.items()},
        "fused": {name: {"setting": setting, **(summarise(scored.per_fused[name], (*KEYS, *RULE_KEYS))
                                                 if scored.per_fused[name]
                                                 else {"null_reasons": {"all": baselines.ONE_IMAGE}})}
                  for name, setting in FUSED.items()},
        "few_shot": few_shot_summary(scored.per_few_shot, scored.scores_info),
    }


def category_summary(scored: Collected, category: str) -> dict:
    """One category's entry of per_category.json (``null_reasons`` sits where its first reason arises)."""
    per = scored.per_category
    runs = [per[n][category] for n in _sets(scored, LEARNED)]
    entry = seed_summary(runs)
    if category in scored.counts:
        entry["n_images"], entry["n_anomalous"] = scored.counts[category]
    reasons = {k: v for r in runs for k, v in r.get("null_reasons", {}).items()}
    if reasons:
        entry["null_reasons"] = reasons
    mean_map = per[ENSEMBLE][category]
    entry.update({k: mean_map[k] for k in DECISION_KEYS})
    entry["seed_ensemble"] = {k: mean_map[k] for k in KEYS}
    threshold_reasons = {k: v for k, v in mean_map["null_reasons"].items() if k in DECISION_KEYS}
    if threshold_reasons:
        entry["null_reasons"] = {**entry.get("null_reasons", {}), **threshold_reasons}
    entry["controls"] = {c: seed_summary([per[n][category] for n in _sets(scored, c)]) for c in ("untrained_init", "no_sae")}
    for c in entry["controls"]:
        entry["controls"][c]["image_by_score"] = seed_summary_by_score([scored.by_score[n][category]
                                                                       for n in _sets(scored, c)])
    ensemble_modes = scored.by_score[ENSEMBLE][category]
    entry["image_by_score"] = {m: ensemble_modes[m] for m in scoring.IMAGE_SCORES}
    if ensemble_modes["null_reasons"]:
        entry["null_reasons"] = {**entry.get("null_reasons", {}), **ensemble_modes["null_reasons"]}
    entry["baselines"] = {name: {"setting": setting, **scored.per_baseline[name][category]}
                          for name, setting in baselines.SETTINGS.items()}
    entry["fused"] = {name: {"setting": setting, **scored.per_fused[name][category]}
                      for name, setting in FUSED.items() if category in scored.per_fused[name]}
    k_used = scored.scores_info.get("reference", {}).get("k_used", {})
    entry["few_shot"] = {f"k={k}": {"k_used": k_used.get(str(k), {}).get(category),
                                    **{name: seed_summary(draws[category], (*KEYS, *RULE_KEYS))
                                       for name, draws in modes.items() if category in draws}}
                         for k, modes in scored.per_few_shot.items()}
    return entry


def pooled_curves(scored: Collected, curve_points: int) -> tuple[dict, dict]:
    """The ROC/PR curves of the pooled images (first learned seed) and pixel sample, and the null
    reasons of the undefined ones (their CSVs are then the header alone: DVC declares them)."""
    labels, scores = np.concatenate(scored.pooled_labels), np.concatenate(scored.pooled_scores)
    pix_masks, pix_maps = (np.concatenate(a) if a else np.zeros(0, np.uint8) for a in scored.pixel_sample)
    curves, reasons = {}, {}
    for level, (y, score, unit) in {"image": (labels, scores, "images"), "pixel": (pix_masks, pix_maps, "pixels")}.items():
        reason = metrics.one_class_reason(y, unit)
        if level == "pixel" and not scored.pixel_sample[0]:
            reason = metrics.NO_MASKS_REASON
        if reason:
            reasons[f"{level}_curves"] = f"plots/{level}_roc.csv and plots/{level}_pr.csv are empty: {reason}"
            curves[level] = {"roc": [], "pr": []}
        else:
            curves[level] = metrics.curves(y, score, curve_points, unit=unit)
    return curves, reasons


def few_shot_summary(per_few_shot: dict, info: dict) -> dict:
    """{"k=<k>": {"k_used": {category: k}, mode: {metric: mean over draws of the means over categories,
    ``<metric>_std``: their std over draws, "setting"}}}; a mode no category could score is absent."""
    out = {}
    for k, modes in per_few_shot.items():
        entry: dict = {"k_used": info["reference"]["k_used"][str(k)], "draws": len(info["reference"]["seeds"])}
        for name, by_category in modes.items():
            if not by_category:
                continue
            n_draws = len(next(iter(by_category.values())))
            per_draw = [mean_over_categories({c: draws[d] for c, draws in by_category.items()}, (*KEYS, *RULE_KEYS))
                        for d in range(n_draws)]
            entry[name] = {"setting": FEW_SHOT[name], **seed_summary(per_draw, (*KEYS, *RULE_KEYS))}
        skipped = info["reference"].get("skipped", {})
        if skipped:
            entry["null_reasons"] = {f"category {c}": r for c, r in skipped.items()}
        out[f"k={k}"] = entry
    return out


