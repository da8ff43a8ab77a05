"""Shared fixtures. Tests never touch the network: HF_HUB_OFFLINE is forced before timm is imported."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


def make_mvtec_tree(root: Path, categories=("alpha", "beta"), n_good=3, n_bad=4, size=40, seed=0) -> Path:
    """A tiny MVTec-layout tree of random images; anomalous images carry a random rectangle mask."""
    rng = np.random.default_rng(seed)
    for cat in categories:
        good = root / cat / "test" / "good"
        bad = root / cat / "test" / "scratch"
        gt = root / cat / "ground_truth" / "scratch"
        for folder in (good, bad, gt, root / cat / "train" / "good"):
            folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / cat / "train" / "good" / "000.png")
        for i in range(n_good):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(good / f"{i:03d}.png")
        for i in range(n_bad):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(bad / f"{i:03d}.png")
            mask = np.zeros((size, size), np.uint8)
            y, x = rng.integers(0, size - 8, 2)
            mask[y : y + 8, x : x + 8] = 255
            Image.fromarray(mask).save(gt / f"{i:03d}_mask.png")
    return root


@pytest.fixture
def mvtec_tree(tmp_path) -> Path:
    return make_mvtec_tree(tmp_path / "tree")
