"""Nearest-patch scoring (pipeline.method.neighbours) against plain loops over images and patches."""

import math

import numpy as np
import pytest
import torch

from pipeline.method import neighbours as nb


def unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def slow_mutual(tokens: np.ndarray, fraction: float = 0.3) -> np.ndarray:
    """The definition, one patch and one other image at a time, in float64."""
    n, length, _ = tokens.shape
    u = unit(tokens)
    k = max(1, min(n - 1, math.floor(round(fraction * 1e6) * (n - 1) / 1e6)))
    out = np.zeros((n, length))
    for i in range(n):
        for p in range(length):
            per_image = [min(1 - float(u[i, p] @ u[j, q]) for q in range(length)) for j in range(n) if j != i]
            out[i, p] = np.mean(sorted(per_image)[:k])
    return out


def slow_reference(tokens: np.ndarray, bank: np.ndarray) -> np.ndarray:
    u, v = unit(tokens), unit(bank)
    return np.array([[min(1 - float(u[b, p] @ row) for row in v) for p in range(tokens.shape[1])]
                     for b in range(tokens.shape[0])])


def slow_coreset(bank: np.ndarray, size: int, seed: int = 0) -> list[int]:
    v = unit(bank)
    picks = [seed % len(v)]
    while len(picks) < size:
        gaps = [(-math.inf if i in picks else min(1 - float(v[i] @ v[j]) for j in picks)) for i in range(len(v))]
        picks.append(int(np.argmax(gaps)))
    return sorted(picks)


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(0)
    # a shared component so that nearest patches are close, as real tokens are; float16 as the store holds them
    base = rng.normal(size=(1, 1, 16))
    return (base + 0.6 * rng.normal(size=(7, 9, 16))).astype(np.float16)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block", [1, 2, 3, 7, None])
def test_mutual_equals_the_definition_for_every_block_size(tokens, block, symmetric):
    want = slow_mutual(tokens.astype(np.float32))
    got = nb.mutual(lambda i, j: tokens[i:j], len(tokens), tokens.shape[1], block=block, symmetric=symmetric)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_mutual_reads_at_most_one_block_at_a_time(tokens):
    asked = []

    def read(i, j):
        asked.append(j - i)
        return tokens[i:j]

    nb.mutual(read, len(tokens), tokens.shape[1], block=3)
    assert max(asked) <= 3
    # each pair of blocks once: rows I read themselves and every later block, 3 blocks -> 3 + 2 + 1 reads
    assert len(asked) == 6


@pytest.fixture(scope="module")
def close_tokens():
    """Tokens whose nearest patches are at cos ~0.95, as real backbone tokens are: there a cosine rounded
    to bfloat16 is off by up to 2^-9, far more than the 1e-3 a score may move."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(1, 1, 384))  # the width of a ViT-S token
    return (base + 0.2 * rng.normal(size=(6, 12, 384))).astype(np.float16)


def test_mutual_bfloat16_chooses_in_half_precision_and_measures_in_float32(close_tokens):
    tokens = close_tokens
    want = slow_mutual(tokens.astype(np.float32))
    got = nb.mutual(lambda i, j: tokens[i:j], len(tokens), tokens.shape[1], precision="bfloat16", block=2)
    assert np.abs(got - want).max() <= 1e-3
    # the same scores from cosines rounded to bfloat16 miss by more than 1e-3: the bound above is not loose
    u = torch.nn.functional.normalize(torch.from_numpy(tokens.astype(np.float32)).reshape(-1, 384), dim=-1)
    rounded = (1 - (u.bfloat16() @ u.bfloat16().T).float()).numpy().reshape(6, 12, 6, 12).min(axis=3)
    exact = (1 - (u @ u.T)).numpy().reshape(6, 12, 6, 12).min(axis=3)
    assert np.abs(rounded - exact).max() > 1e-3


def test_reference_bfloat16_chooses_in_half_precision_and_measures_in_float32(close_tokens):
    bank = close_tokens[:2].reshape(-1, 384)
    want = slow_reference(close_tokens[2:].astype(np.float32), bank.astype(np.float32))
    got = nb.reference(torch.from_numpy(close_tokens[2:]), bank, precision="bfloat16", elements=50).numpy()
    assert np.abs(got - want).max() <= 1e-3


def test_mutual_of_two_images_is_their_nearest_patch_distance():
    a = np.array([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=np.float32)  # two images of one patch each, orthogonal
    np.testing.assert_allclose(nb.mutual(lambda i, j: a[i:j], 2, 1), [[1.0], [1.0]], atol=1e-7)
    with pytest.raises(ValueError, match="one image"):
        nb.mutual(lambda i, j: a[i:j], 1, 1)
    with pytest.raises(ValueError, match="precision"):
        nb.mutual(lambda i, j: a[i:j], 2, 1, precision="float16")


def test_reference_equals_the_definition_and_is_zero_on_bank_patches(tokens):
    bank = tokens[:2].reshape(-1, tokens.shape[-1])
    got = nb.reference(torch.from_numpy(tokens), bank, elements=40).numpy()
    np.testing.assert_allclose(got, slow_reference(tokens.astype(np.float32), bank.astype(np.float32)), atol=1e-5)
    np.testing.assert_allclose(got[:2], 0, atol=1e-6)  # a bank patch is its own nearest normal patch
    assert (got[2:] > 1e-3).all()


def test_coreset_picks_the_farthest_patch_each_time():
    # e1, e1 again, e2, -e1: from e1 the farthest is -e1 (distance 2); then e2 (1 from both) beats e1's twin (0)
    bank = np.array([[1, 0], [1, 0], [0, 1], [-1, 0]], dtype=np.float32)
    assert nb.coreset(bank, 3).tolist() == [0, 2, 3]
    assert nb.coreset(bank, 10).tolist() == [0, 1, 2, 3]
    # once every gap is 0 (only twins left) a pick is still a new row, never one picked before
    twins = np.concatenate([bank, bank[2:3]])
    assert nb.coreset(twins, 4).tolist() == [0, 1, 2, 3]
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(60, 8)).astype(np.float32)
    for seed in (0, 7):
        assert nb.coreset(bank, 12, seed=seed, chunk=7).tolist() == slow_coreset(bank, 12, seed)


def test_draws_are_distinct_sorted_repeatable_and_refuse_too_many():
    a = nb.draws(20, 4, [0, 1, 2])
    assert [len(set(d.tolist())) for d in a] == [4, 4, 4]
    assert all((np.diff(d) > 0).all() and d.min() >= 0 and d.max() < 20 for d in a)
    assert [d.tolist() for d in a] == [d.tolist() for d in nb.draws(20, 4, [0, 1, 2])]
    assert len({tuple(d.tolist()) for d in a}) > 1
    with pytest.raises(ValueError, match="5 reference images asked for, 4"):
        nb.draws(4, 5, [0])
