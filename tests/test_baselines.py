"""The training-free baselines against slow, obviously correct loops over patches and images."""

import math

import numpy as np
import pytest
import torch

from pipeline.method import baselines, neighbours
from pipeline.evaluation import evaluate as evaluation
from pipeline.method import guides
from pipeline.method import scoring
from pipeline.features import store
from pipeline.errors import NonFiniteError


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


def mutual(tokens, **kwargs):
    """:func:`pipeline.method.neighbours.mutual` (the code evaluate and the neighbours stage run) over
    an in-memory category."""
    return neighbours.mutual(lambda i, j: tokens[i:j], len(tokens), tokens.shape[1], **kwargs)


GRID, SIZE = 2, 8  # L = 4 tokens per image, maps 8 x 8


def tiny_store(path, tokens, categories, chunk_images):
    """A complete store of ``tokens`` (N, L, d) float16, category index per image, ``chunk_images`` per chunk."""
    n, length, d = tokens.shape
    layout = store.StoreLayout(n, length, d, SIZE, chunk_images)
    attrs = {"dataset": "tiny", "backbone": "none", "weights_sha256": "none", "layer": -1, "image_size": SIZE,
             "grid": [GRID, GRID], "categories": [f"c{i}" for i in range(max(categories) + 1)],
             "paths": [f"img{i:02d}.png" for i in range(n)]}
    return store.write(path, layout, attrs, lambda a, b: {
        "tokens": tokens[a:b], "labels": np.arange(a, b) % 2 == 1, "category": np.asarray(categories[a:b], np.int16)})


def store_reader(target, start, stop):
    return baselines.ChunkRows(lambda c: target.read(c, ("tokens",))["tokens"], target.chunk_images, start, stop,
                               check=lambda values, first: target.check_finite("tokens", values, first))


@pytest.fixture(scope="module")
def category_store(tmp_path_factory):
    """11 images in chunks of 3: category c1 is rows [2, 9), 7 images, not aligned with the chunks."""
    tokens = np.random.default_rng(5).standard_normal((11, GRID * GRID, 6)).astype(np.float16)
    return tiny_store(tmp_path_factory.mktemp("baselines") / "target", tokens, [0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2], 3)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block", [1, 2, 6, 7])  # 1, 2 (7 = 2+2+2+1), N - 1 (6 + 1), N
def test_mutual_from_a_store_equals_the_loop(category_store, block, symmetric):
    target = category_store
    tokens = target.tokens[2:9]  # (7, 4, 6) float16: the references only
    length = tokens.shape[1]
    got = neighbours.mutual(store_reader(target, 2, 9), 7, length, block=block, symmetric=symmetric)
    assert got.dtype == np.float32 and got.shape == (7, length)
    np.testing.assert_allclose(got, slow_mutual(tokens.astype(np.float64)), atol=1e-5)


@pytest.mark.parametrize("n, block", [(2, 1), (2, 2), (5, 1), (5, 2), (5, 4), (5, 5), (9, 4)])
def test_mutual_never_asks_the_reader_for_more_than_a_block(n, block):
    tokens = np.random.default_rng(n).standard_normal((n, 3, 4)).astype(np.float16)
    calls = []

    def read(i, j):
        calls.append((i, j))
        return tokens[i:j]

    got = neighbours.mutual(read, n, 3, block=block)
    assert calls and all(0 <= i < j <= n and j - i <= block for i, j in calls)
    np.testing.assert_allclose(got, slow_mutual(tokens.astype(np.float64)), atol=1e-5)


def test_mutual_refuses_one_image_without_reading():
    def read(i, j):
        raise AssertionError("a category of one image must not be read")

    with pytest.raises(ValueError, match="one image"):
        neighbours.mutual(read, 1, 4)


def test_chunk_rows_reads_category_rows_decoding_each_chunk_once_in_order():
    rows = np.arange(11 * 2, dtype=np.float32).reshape(11, 2)  # 11 rows in chunks of 3
    decoded = []

    def read_chunk(c):
        decoded.append(c)
        return rows[3 * c:3 * c + 3]

    read = baselines.ChunkRows(read_chunk, 3, 2, 9)  # rows [2, 9): chunks 0 (row 2), 1, 2 (rows 6-8)
    assert len(read) == 7
    for i, j in [(0, 2), (2, 3), (3, 7)]:
        np.testing.assert_array_equal(read(i, j), rows[2 + i:2 + j])
    assert decoded == [0, 1, 2]  # one chunk kept: reading in order decodes each chunk once
    np.testing.assert_array_equal(read(0, 7), rows[2:9])
    assert decoded == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="outside"):
        read(5, 8)


def test_chunk_rows_checks_only_the_category_rows_once_per_chunk(tmp_path):
    tokens = np.random.default_rng(0).standard_normal((7, GRID * GRID, 3)).astype(np.float16)
    tokens[1, 0, 0] = np.nan  # image 1 is in category 0, which shares chunk 0 with category 1
    target = tiny_store(tmp_path / "nan", tokens, [0, 0, 1, 1, 1, 1, 1], 3)
    got = neighbours.mutual(store_reader(target, 2, 7), 5, GRID * GRID, block=2)  # category 1: no NaN
    np.testing.assert_allclose(got, slow_mutual(tokens[2:7].astype(np.float64)), atol=1e-5)
    with pytest.raises(NonFiniteError, match=r"tokens of image 1 \(img01.png\), chunk 0"):
        neighbours.mutual(store_reader(target, 0, 2), 2, GRID * GRID)


class NoSlicing:
    """Stands in for ``target.tokens``: its shape and chunks, but slicing it (reading a whole
    category at once fails."""

    def __init__(self, array):
        self.shape, self.chunks, self.dtype = array.shape, array.chunks, array.dtype

    def __getitem__(self, key):
        raise AssertionError(f"tokens[{key}] read outside the chunk reader")


@pytest.mark.parametrize("start, stop", [(2, 9), (9, 11)])
@pytest.mark.parametrize("batch_images", [2, 3, 16])
def test_baseline_rows_reads_tokens_by_chunk_and_equals_the_whole_category_scores(category_store, start, stop,
                                                                                   batch_images, monkeypatch):
    target = category_store
    tokens = target.tokens[start:stop]
    settings = scoring.ScoreSettings(blur_sigma=1.0)
    reads = []
    real_read = target.read
    monkeypatch.setattr(target, "read", lambda c, names=("tokens",), **kw: reads.append(c) or real_read(c, names, **kw))
    monkeypatch.setattr(target, "tokens", NoSlicing(target.tokens))
    got = evaluation.baseline_rows(target, start, stop, settings, batch_images, torch.device("cpu"))
    assert reads and set(reads) == set(range(start // 3, (stop - 1) // 3 + 1))
    # the whole category's scores: self-dissimilarity per image, mutual on the whole (n, L, d) array in
    # memory (the same blocks: the same bits), itself the definition's to 1e-5
    whole = mutual(tokens)
    np.testing.assert_allclose(whole, slow_mutual(tokens.astype(np.float64)), atol=1e-5)
    want = {"self_dissimilarity": baselines.self_dissimilarity(torch.from_numpy(tokens.astype(np.float32))),
            "mutual": torch.from_numpy(whole)}
    for name, values in want.items():
        maps = scoring.patch_maps(values, (GRID, GRID), SIZE, sigma=1.0)
        np.testing.assert_array_equal(got[name][0], maps)
        for mode, scores in scoring.scores_by_mode(maps, None, settings).items():
            if scores is None:
                assert got[name][1][mode] is None
            else:
                np.testing.assert_array_equal(got[name][1][mode], scores)


def test_baseline_rows_of_one_image_has_no_mutual(category_store):
    got = evaluation.baseline_rows(category_store, 10, 11, scoring.ScoreSettings(), 4, torch.device("cpu"))
    assert got["mutual"] == (None, None, baselines.ONE_IMAGE)
    assert got["self_dissimilarity"][0].shape == (1, SIZE, SIZE)


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
    got = mutual(tokens, elements=elements)
    np.testing.assert_allclose(got, slow_mutual(tokens), atol=1e-5)


def test_mutual_blocks_of_uneven_size_equal_the_loop():
    tokens = np.random.default_rng(1).standard_normal((7, 3, 4)).astype(np.float32)
    assert neighbours.block_images(3, 7, elements=40) == 2  # 7 images in blocks of 2, 2, 2, 1
    np.testing.assert_allclose(mutual(tokens, elements=40), slow_mutual(tokens), atol=1e-5)


@pytest.mark.parametrize("n_other, k", [(1, 1), (2, 1), (3, 1), (4, 1), (6, 1), (7, 2), (10, 3), (13, 3), (20, 6),
                                        (99, 29), (100, 30)])
def test_mutual_k_is_the_floor_of_30_percent_at_least_one(n_other, k):
    assert neighbours.mutual_k(n_other) == k


def test_mutual_excludes_the_image_itself_and_averages_the_k_nearest_images():
    """Hand-worked: 11 images of one patch each (k = 3 of 10 others). Image 0 is (1, 0); the others
    sit at angles 10°, 20°, ..., 100° from it. Its score is the mean of 1 − cos(10°, 20°, 30°), and
    would be (0 + ...) if it could see itself."""
    angles = np.deg2rad([0, *range(10, 101, 10)])
    tokens = np.stack([np.cos(angles), np.sin(angles)], axis=-1)[:, None, :].astype(np.float32)  # (11, 1, 2)
    got = mutual(tokens)
    assert got[0, 0] == pytest.approx(np.mean(1 - np.cos(np.deg2rad([10, 20, 30]))), abs=1e-6)
    # image 5 (50°): its nearest others are 40° and 60° (10° away) then 30° or 70° (20°)
    assert got[5, 0] == pytest.approx(np.mean(1 - np.cos(np.deg2rad([10, 10, 20]))), abs=1e-6)
    # a duplicate image scores 0 against its twin, never against itself
    twins = np.concatenate([tokens[:1], tokens[:1], tokens[10:]])  # (3, 1, 2): 0°, 0°, 100°
    assert mutual(twins)[:2, 0] == pytest.approx([0, 0], abs=1e-6)
    assert mutual(twins)[2, 0] == pytest.approx(1 - math.cos(math.radians(100)), abs=1e-6)


def test_mutual_patch_distance_is_to_the_nearest_patch_of_each_image():
    # image 1 holds the query patch's twin among unrelated patches: distance 0; image 2 holds its opposite
    a = np.array([1.0, 0.0, 0.0])
    tokens = np.array([[a, [0, 1, 0]], [[0, 0, 1], a], [-a, -a]], dtype=np.float32)  # (3, 2, 3), k = 1
    got = mutual(tokens)
    assert got[0, 0] == pytest.approx(0.0, abs=1e-6)  # min over images 1 (0) and 2 (2)
    assert got[2, 0] == pytest.approx(1.0, abs=1e-6)  # nearest to -a in image 0 or 1: an orthogonal patch


def test_mutual_refuses_a_category_of_one_image():
    with pytest.raises(ValueError, match="one image"):
        mutual(np.zeros((1, 4, 3), np.float32))


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
