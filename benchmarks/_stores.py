"""Synthetic feature stores shared by the SAE benchmarks (imported from the benchmark scripts' folder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import store


def build_store(path: Path, n_images: int, n_tokens: int, dim: int, chunk_images: int, seed: int) -> None:
    """A complete synthetic store: tokens (n_images, n_tokens, dim) float16 ~ N(mu, 1)."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(0.0, 2.0, size=dim).astype(np.float32)
    layout = store.StoreLayout(n_images, n_tokens, dim, mask_size=8, chunk_images=chunk_images)
    attrs = {"dataset": "bench", "backbone": "none", "weights_sha256": "none", "layer": -1,
             "image_size": 0, "grid": [16, n_tokens // 16]}
    group, pending = store.prepare(path, layout, attrs)
    for chunk in pending:
        start, stop = layout.chunk_range(chunk)
        n = stop - start
        tokens = (mu + rng.standard_normal((n, n_tokens, dim), dtype=np.float32)).astype(np.float16)
        store.write_chunk(group, layout, chunk, {
            "tokens": tokens, "cls": tokens.mean(axis=1), "masks": np.zeros((n, 8, 8), np.uint8),
            "labels": np.zeros(n, np.uint8), "category": np.zeros(n, np.int16), "defect": np.zeros(n, np.int16)})
    store.finalize(group, path)
