"""The training-free baselines (issue 12 §2) against slow, obviously correct loops over patches and images."""

import math

import numpy as np
import pytest
import torch

from pipeline import baselines, guides, scoring


def cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def slow_self_dissimilarity(tokens):
    out = np.zeros(tokens.shape[:2])
    for i in range(tokens.shape[0]):
        mean = tokens[i].mean(axis=0)
        for p in range(tokens.shape[1]):
            out[i, p] = 1 - cosine(tokens[i, p], mean)
    return out


def slow_mutual(tokens, fraction=0.3):
    """Loops: per patch, per OTHER image, the distance to its nearest patch; mean of the smallest
    max(1, floor(fraction * (N - 1))) of them."""
    n, length, _ = tokens.shape
    k = max(1, math.floor(round(fraction * (n - 1), 9)))
    out = np.zeros((n, length))
    for i in range(n):
        for p in range(length):
            per_image = []
            for j in range(n):
                if j == i:
                    continue
                per_image.append(min(1 - cosine(tokens[i, p], tokens[j, q]) for q in range(length)))
            out[i, p] = np.mean(sorted(per_image)[:k])
    return out


def test_self_dissimilarity_equals_the_loop():
    tokens = np.random.default_rng(0).standard_normal((3, 6, 5)).astype(np.float32)
    got = baselines.self_dissimilarity(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(got, slow_self_dissimilarity(tokens), atol=1e-6)


def test_self_dissimilarity_by_hand():
    # image of 4 patches: three along x and one along y; the mean (3, 1)/4 is closest to the x patches
    tokens = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    c = 3 / math.sqrt(10)  # cos((1, 0), (3, 1)); cos((0, 1), (3, 1)) = 1 / sqrt(10)
    np.testing.assert_allclose(baselines.self_dissimilarity(tokens)[0].numpy(),
                               [1 - c, 1 - c, 1 - c, 1 - 1 / math.sqrt(10)], atol=1e-6)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 11, 14])
@pytest.mark.parametrize("elements", [1, 40, 1 << 24])  # one image per block, 1 (L=6: 40 -> 1), all at once
def test_mutual_equals_the_loop(n, elements):
    tokens = np.random.default_rng(n).standard_normal((n, 6, 4)).astype(np.float32)
    got = baselines.mutual(tokens, elements=elements)
    np.testing.assert_allclose(got, slow_mutual(tokens), atol=1e-5)


def test_mutual_blocks_of_uneven_size_equal_the_loop():
    tokens = np.random.default_rng(1).standard_normal((7, 3, 4)).astype(np.float32)
    assert baselines.block_images(3, 7, elements=40) == 2  # 7 images in blocks of 2, 2, 2, 1
    np.testing.assert_allclose(baselines.mutual(tokens, elements=40), slow_mutual(tokens), atol=1e-5)


@pytest.mark.parametrize("n_other, k", [(1, 1), (2, 1), (3, 1), (4, 1), (6, 1), (7, 2), (10, 3), (13, 3), (20, 6),
                                        (99, 29), (100, 30)])
def test_mutual_k_is_the_floor_of_30_percent_at_least_one(n_other, k):
    assert baselines.mutual_k(n_other) == k


def test_mutual_excludes_the_image_itself_and_averages_the_k_nearest_images():
    """Hand-worked: 11 images of one patch each (k = 3 of 10 others). Image 0 is (1, 0); the others
    sit at angles 10°, 20°, ..., 100° from it. Its score is the mean of 1 − cos(10°, 20°, 30°), and
    would be (0 + ...) if it could see itself."""
    angles = np.deg2rad([0, *range(10, 101, 10)])
    tokens = np.stack([np.cos(angles), np.sin(angles)], axis=-1)[:, None, :].astype(np.float32)  # (11, 1, 2)
    got = baselines.mutual(tokens)
    assert got[0, 0] == pytest.approx(np.mean(1 - np.cos(np.deg2rad([10, 20, 30]))), abs=1e-6)
    # image 5 (50°): its nearest others are 40° and 60° (10° away) then 30° or 70° (20°)
    assert got[5, 0] == pytest.approx(np.mean(1 - np.cos(np.deg2rad([10, 10, 20]))), abs=1e-6)
    # a duplicate image scores 0 against its twin, never against itself
    twins = np.concatenate([tokens[:1], tokens[:1], tokens[10:]])  # (3, 1, 2): 0°, 0°, 100°
    assert baselines.mutual(twins)[:2, 0] == pytest.approx([0, 0], abs=1e-6)
    assert baselines.mutual(twins)[2, 0] == pytest.approx(1 - math.cos(math.radians(100)), abs=1e-6)


def test_mutual_patch_distance_is_to_the_nearest_patch_of_each_image():
    # image 1 holds the query patch's twin among unrelated patches: distance 0; image 2 holds its opposite
    a = np.array([1.0, 0.0, 0.0])
    tokens = np.array([[a, [0, 1, 0]], [[0, 0, 1], a], [-a, -a]], dtype=np.float32)  # (3, 2, 3), k = 1
    got = baselines.mutual(tokens)
    assert got[0, 0] == pytest.approx(0.0, abs=1e-6)  # min over images 1 (0) and 2 (2)
    assert got[2, 0] == pytest.approx(1.0, abs=1e-6)  # nearest to -a in image 0 or 1: an orthogonal patch


def test_mutual_refuses_a_category_of_one_image():
    with pytest.raises(ValueError, match="one image"):
        baselines.mutual(np.zeros((1, 4, 3), np.float32))


def test_patch_maps_upsample_exactly_as_the_guide_maps():
    """The anomaly probability per patch, put through patch_maps, is the guide map pixel for pixel."""
    g = torch.Generator().manual_seed(0)
    tokens, vectors = torch.randn(3, 16, 8, generator=g), torch.randn(4, 8, generator=g)
    cos = torch.nn.functional.normalize(tokens, dim=-1) @ torch.nn.functional.normalize(
        vectors[[guides.NORMAL_LOCAL, guides.ANOMALY_LOCAL]], dim=-1).T
    patch_probs = (cos / 0.07).softmax(dim=-1)[..., 1]  # (3, 16)
    for sigma in (0.0, 2.0):
        want = scoring.anomaly_maps(tokens, vectors, (4, 4), 16, temperature=0.07, sigma=sigma)
        got = scoring.patch_maps(patch_probs, (4, 4), 16, sigma=sigma)
        assert got.dtype == np.float32 and got.shape == (3, 16, 16)
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_scores_by_mode_gives_every_mode_and_no_global_without_cls_guides():
    maps = np.zeros((2, 4, 4), np.float32)
    maps[0, 0, 0], maps[1] = 1.0, 0.5
    settings = scoring.ScoreSettings(top_fraction=2 / 16)
    by_mode = scoring.scores_by_mode(maps, None, settings)
    assert set(by_mode) == set(scoring.IMAGE_SCORES) and by_mode["global"] is None
    np.testing.assert_allclose(by_mode["max"], [1.0, 0.5])
    np.testing.assert_allclose(by_mode["top_mean"], [0.5, 0.5])
    with_global = scoring.scores_by_mode(maps, np.array([0.2, 0.7]), settings)
    np.testing.assert_allclose(with_global["global"], [0.2, 0.7])
