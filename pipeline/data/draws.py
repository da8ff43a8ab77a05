"""Seeded draws of few-shot reference images: which of a category's known-good images serve as its k
references. Here, below the feature store, because the normals stage extracts only the images some
draw can pick, and must not depend on the method's modules (a change there would re-run extraction)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def draws(n_candidates: int, k: int, seeds: Sequence[int]) -> list[np.ndarray]:
    """For each seed, ``k`` distinct indices of ``n_candidates`` drawn without replacement, sorted
    (numpy's PCG64 generator seeded with the seed, so a draw is the same on every machine)."""
    if k > n_candidates:
        raise ValueError(f"{k} reference images asked for, {n_candidates} to draw from")
    return [np.sort(np.random.default_rng(s).choice(n_candidates, size=k, replace=False)) for s in seeds]
