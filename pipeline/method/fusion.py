"""Fusing the detector's signals: the guide map with the batch (mutual) and reference distances.

Rule: per patch, the mean of the signals, each standardised (z-score) over the patches of the scored
set, with the guide probability taken as its logit; then upsampled and blurred like any map
(:func:`pipeline.method.scoring.patch_maps`). Standardising puts a probability in [0, 1] and cosine
distances whose size depends on the backbone and the line on one scale; the logit undoes the
softmax's squashing, whose tails would otherwise dominate the guide's spread. Equal weights: no
weight is fitted. The statistics come from the set scored together (a category in evaluate, the batch
in predict), so a fused score needs that set.

Chosen on the mean over every target (embedded and real, six runs) among the geometric mean, the
mean of ranks and z-score means with weight 0.5 or 0.25 on the guide, with and without the logit:
``python -m analysis.fusion_rules``, figures in docs/experiments.md.

The image score (the decision) is taken from the distance signals alone, fused by the same rule
(:func:`decision`): the guides shape the map, the training-free distances decide. On every target
measured, embedded and real, the fused map's maximum ranked images worse than the batch map's own
(mean image AUROC 0.865 against 0.905), and no image score that let the guides choose where the
batch is read out came more than 0.001 above the same read-out without them (``python -m
analysis.image_rules``, docs/experiments.md).
"""

from __future__ import annotations

import torch

RULE = ("mean of the signals, each standardised over the patches of the set scored together "
        "(the guide probability as its logit), then upsampled and blurred like a guide map")
IMAGE_RULE = ("image score from the distance signals alone (reference, batch), fused by the same rule with the same "
              "statistics: the guides shape the map, the training-free distances decide")
LOGIT_EPS = 1e-6
"""Probabilities are clipped to [eps, 1 − eps] before the logit."""


def logit(p: torch.Tensor) -> torch.Tensor:
    p = p.double().clamp(LOGIT_EPS, 1 - LOGIT_EPS)
    return torch.log(p) - torch.log1p(-p)


def statistics(*signals: torch.Tensor) -> list[tuple[float, float]]:
    """(mean, std) of each signal over all its values: the standardisation :func:`standardised_mean`
    applies, kept so that other images (known-good ones scored for a threshold) can be put on the
    scale of the set scored together."""
    return [(float(s.double().mean()), float(s.double().std(unbiased=False))) for s in signals]


def standardised_mean(*signals: torch.Tensor, stats: list[tuple[float, float]] | None = None) -> torch.Tensor:
    """Signals, each (B, L) over the same patches -> (B, L) float32: the mean over the signals of
    (s − mean(s)) / std(s), the statistics over all B·L values of each signal (a constant signal
    contributes 0), or the given ``stats`` (:func:`statistics` of another set)."""
    if not signals:
        raise ValueError("fusion needs at least one signal")
    shape = signals[0].shape
    if any(s.shape != shape for s in signals[1:]):
        raise ValueError(f"fusion: signals of shapes {[tuple(t.shape) for t in signals]}")
    stats = statistics(*signals) if stats is None else stats
    if len(stats) != len(signals):
        raise ValueError(f"fusion: {len(stats)} statistics for {len(signals)} signals")
    out = torch.zeros(shape, dtype=torch.float64, device=signals[0].device)
    for s, (mean, std) in zip(signals, stats):
        out += (s.double() - mean) / std if std > 0 else torch.zeros(shape, dtype=torch.float64, device=s.device)
    return (out / len(signals)).float()


def parts(guide: torch.Tensor | None, *distances: torch.Tensor, probability: bool = True) -> list[torch.Tensor]:
    """The signals :func:`fuse` standardises: the guide's logit (or the guide itself when it is no
    probability), then the distances."""
    return ([logit(guide) if probability else guide] if guide is not None else []) + list(distances)


def fuse(guide: torch.Tensor | None, *distances: torch.Tensor, probability: bool = True,
         stats: list[tuple[float, float]] | None = None) -> torch.Tensor:
    """The rule of the module docstring: a guide signal (B, L) or None, and distance signals (B, L)
    each -> fused patch scores (B, L) float32. ``probability`` False: the guide signal is no
    probability (``scoring.fusion: self_dissimilarity`` multiplies it by a distance) and is
    standardised as it is. ``stats``: those of another set (:func:`statistics` of its :func:`parts`)
    instead of these signals' own."""
    return standardised_mean(*parts(guide, *distances, probability=probability), stats=stats)


def decision(guide: torch.Tensor | None, *distances: torch.Tensor, probability: bool = True,
             stats: list[tuple[float, float]] | None = None) -> torch.Tensor:
    """The patch values a fused mode's image score is taken from (:data:`IMAGE_RULE`): :func:`fuse` of
    the ``distances`` alone, with their entries of ``stats`` (:func:`statistics` of :func:`parts` with
    the guide, as :func:`fuse` takes them) or their own. ``guide`` and ``probability`` say which entry
    of ``stats`` is the guide's; the guide itself is not used."""
    if not distances:
        raise ValueError("a fused decision needs at least one distance signal")
    if stats is not None:
        expected = len(parts(guide, *distances, probability=probability))
        if len(stats) != expected:
            raise ValueError(f"fusion: {len(stats)} statistics for {expected} signals")
        stats = stats[1:] if guide is not None else stats
    return standardised_mean(*distances, stats=stats)


def geometric(*signals: torch.Tensor) -> torch.Tensor:
    """A candidate measured against :func:`fuse`: the geometric mean of the signals clipped at 0."""
    prod = torch.ones(signals[0].shape, dtype=torch.float64, device=signals[0].device)
    for s in signals:
        prod = prod * s.double().clamp_min(0)
    return prod.pow(1.0 / len(signals)).float()


