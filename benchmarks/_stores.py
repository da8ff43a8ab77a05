"""Synthetic feature stores shared by the benchmarks (imported from the benchmark scripts' folder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.features import store


def build_store(path: Path, n_images: int, n_tokens: int, dim: int, chunk_images: int, seed: int,
                mask_size: int = 8, anomalous_fraction: float = 0.0) -> None:
    """A complete synthetic store: tokens (n_images, n_tokens, dim) float16 ~ N(mu, 1).

    ``anomalous_fraction`` of the images are labelled anomalous, each with one random rectangle
    (1/16 to 1/4 of the side) set in its ``mask_size`` x ``mask_size`` mask, as the guide loss needs.
    """
    rng = np.random.default_rng(seed)
    mu = rng.normal(0.0, 2.0, size=dim).astype(np.float32)
    layout = store.StoreLayout(n_images, n_tokens, dim, mask_size=mask_size, chunk_images=chunk_images)
    side = int(round(np.sqrt(n_tokens)))
    attrs = {"dataset": "bench", "backbone": "none", "weights_sha256": "none", "layer": -1,
             "image_size": mask_size, "grid": [side, n_tokens // side]}

    def chunk(start: int, stop: int) -> dict:
        n = stop - start
        tokens = (mu + rng.standard_normal((n, n_tokens, dim), dtype=np.float32)).astype(np.float16)
        labels = (rng.random(n) < anomalous_fraction).astype(np.uint8)
        masks = np.zeros((n, mask_size, mask_size), np.uint8)
        for i in np.flatnonzero(labels):
            h, w = rng.integers(max(1, mask_size // 16), max(2, mask_size // 4) + 1, size=2)
            y, x = rng.integers(0, mask_size - h + 1), rng.integers(0, mask_size - w + 1)
            masks[i, y : y + h, x : x + w] = 1
        return {"tokens": tokens, "masks": masks, "images": np.repeat(255 * masks[..., None], 3, axis=-1),
                "labels": labels}

    store.write(path, layout, attrs, chunk)
