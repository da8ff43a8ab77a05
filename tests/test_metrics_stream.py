"""The streaming pixel metrics against the in-memory reference, metrics.compute_all: the
same values to 1e-12 on maps full of ties, whatever the batches, the merge blocks and the fan-in."""

import numpy as np
import pytest

from pipeline.evaluation import metrics
from pipeline.evaluation import metrics_stream as ms


def tied_case(seed, n=14, size=12, levels=6):
    """Maps quantised to ``levels`` values (so ties span images, batches and merge blocks), -0.0 and
    +0.0 both present; masks with one to three rectangles in every other image, one touching another
    diagonally (8-connected: one region)."""
    g = np.random.default_rng(seed)
    maps = (g.integers(0, levels, (n, size, size)) / levels - 0.25).astype(np.float32)
    maps[0, :3] = -0.0
    maps[1, :3] = 0.0
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(0, n, 2):
        for _ in range(g.integers(1, 4)):
            y, x = g.integers(0, size - 3, 2)
            masks[i, y:y + g.integers(1, 4), x:x + g.integers(1, 4)] = 1
    masks[2] = 0
    masks[2, 1, 1] = masks[2, 2, 2] = 1  # diagonal neighbours: one region under 8-connectivity
    masks[2, 5, 5] = 1
    labels = masks.any(axis=(1, 2)).astype(np.int64)
    return labels, maps.reshape(n, -1).max(axis=1), masks, maps


def streamed(tmp_path, labels, scores, masks, maps, batch, block_words=ms.BLOCK_WORDS, fan_in=ms.FAN_IN,
             has_masks=True):
    with ms.PixelStream(tmp_path, rank=has_masks, block_words=block_words, fan_in=fan_in) as s:
        for i in range(0, len(maps), batch):
            s.add(masks[i:i + batch], maps[i:i + batch])
        return ms.compute_all(labels, scores, s, has_masks=has_masks)


@pytest.mark.parametrize("batch", [1, 3, 5, 14])
@pytest.mark.parametrize("block_words, fan_in", [(ms.BLOCK_WORDS, ms.FAN_IN), (7, 2), (100, 3)])
def test_equals_compute_all_with_ties_across_batches_blocks_and_passes(tmp_path, batch, block_words, fan_in):
    for seed in range(3):
        labels, scores, masks, maps = tied_case(seed)
        ref = metrics.compute_all(labels, scores, masks, maps)
        out = streamed(tmp_path, labels, scores, masks, maps, batch, block_words, fan_in)
        assert out["null_reasons"] == ref["null_reasons"] == {}
        for key in metrics.METRIC_KEYS:
            assert out[key] == pytest.approx(ref[key], abs=1e-12, rel=0), (seed, key)
        assert list(tmp_path.iterdir()) == []  # the runs and every merge pass's file are gone


def test_constant_and_two_level_maps_equal_the_reference(tmp_path):
    """One tie group spanning every run and block (a constant map), and a 2-level map: the group ends
    only at the last pixel, so nothing may be read off inside it."""
    labels, scores, masks, _ = tied_case(5)
    for maps in (np.full(masks.shape, 0.5, np.float32), np.where(masks == 1, 0.75, 0.5).astype(np.float32)):
        ref = metrics.compute_all(labels, scores, masks, maps)
        out = streamed(tmp_path, labels, scores, masks, maps, 2, block_words=5, fan_in=2)
        for key in metrics.METRIC_KEYS:
            assert out[key] == pytest.approx(ref[key], abs=1e-12, rel=0), key
    assert streamed(tmp_path, labels, scores, masks, np.full(masks.shape, 0.5, np.float32), 3)["pixel_aupro"] == \
        pytest.approx(0.15, abs=1e-12)  # hand-worked: (0,0) -> (1,1) in one step, PRO = FPR


def test_one_class_categories_are_null_with_the_reference_reasons(tmp_path):
    labels, scores, masks, maps = tied_case(1)
    normal = labels == 0
    cases = [
        (labels[normal], scores[normal], masks[normal], maps[normal], True),  # no anomalous image or pixel
        (labels[~normal], scores[~normal], masks[~normal], maps[~normal], True),  # no normal image
        (np.ones_like(labels), scores, np.ones_like(masks), maps, True),  # no normal pixel
        (labels, scores, masks, maps, False),  # a target without masks
    ]
    for labels_, scores_, masks_, maps_, has_masks in cases:
        ref = metrics.compute_all(labels_, scores_, masks_, maps_, has_masks=has_masks)
        out = streamed(tmp_path, labels_, scores_, masks_, maps_, 4, has_masks=has_masks)
        assert out["null_reasons"] == ref["null_reasons"] and ref["null_reasons"]
        for key in metrics.METRIC_KEYS:
            assert out[key] == (None if ref[key] is None else pytest.approx(ref[key], abs=1e-12, rel=0)), key


def test_merge_runs_is_a_sort_of_every_run(tmp_path):
    g = np.random.default_rng(0)
    runs, offset, path = [], 0, tmp_path / "runs.u64"
    with open(path, "wb") as f:
        for length in g.integers(0, 40, 11):
            words = np.sort(g.integers(0, 9, length).astype(np.uint64))  # few values: long runs of ties
            words.tofile(f)
            runs.append((offset, int(length)))
            offset += int(length)
    everything = np.sort(np.fromfile(path, dtype="<u8"))
    for block_words, fan_in in [(1, 2), (6, 3), (1000, 64)]:
        blocks = list(ms.merge_runs(path, runs, block_words, fan_in))
        np.testing.assert_array_equal(np.concatenate(blocks), everything)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.u64"]  # pass files removed, ours kept


def test_bad_maps_are_refused_like_compute_all(tmp_path):
    labels, scores, masks, maps = tied_case(0)
    with ms.PixelStream(tmp_path) as s:
        with pytest.raises(ValueError, match=r"maps: .* NaN"):
            s.add(masks[:2], np.where(masks[:2] == 1, np.nan, maps[:2]))
        with pytest.raises(ValueError, match="float32 does not hold exactly"):
            s.add(masks[:2], maps[:2].astype(np.float64) + 1e-12)
        s.add(masks[:2], maps[:2].astype(np.float64))  # float64 that float32 holds: accepted
        with pytest.raises(ValueError, match=r"expected images of \(12, 12\)"):
            s.add(masks[:2, :, :-1], maps[:2, :, :-1])
        with pytest.raises(ValueError, match="one map per image"):
            ms.compute_all(labels, scores, s)
