"""Tests for pipeline.synthetic: mask exactness, dataset split, sizes, MVTec layout, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import synthetic
from pipeline.synthetic import DATASETS, DataFolderError, generate, render_sample

PAIRS = [(ds, c, d) for ds, spec in DATASETS.items() for c in spec["categories"] for d in spec["defects"]]
SMALL = dict(image_size=64, train_good=2, test_good=2, test_anomalous=6)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _generate_a(root: Path, **kw) -> Path:
    generate(root, "synth_a", **kw)
    return root


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Both datasets, small, generated once for the read-only tests."""
    base = tmp_path_factory.mktemp("synth")
    return {ds: (base / ds, generate(base / ds, ds, seed=7, **SMALL)) for ds in DATASETS}


# ------------------------------------------------------------------------------------------------
# render_sample


@pytest.mark.parametrize("dataset,category,defect", PAIRS)
@pytest.mark.parametrize("end", [0, 1])
def test_mask_is_exactly_the_changed_pixels(dataset, category, defect, end):
    lo, hi = synthetic.DEFECT_AREA[defect]
    rng = np.random.default_rng([11, end, len(category), len(defect)])
    clean, image, mask = render_sample(category, defect, size=96, rng=rng, area_fraction=(lo, hi)[end])

    assert clean.shape == image.shape == (96, 96, 3) and clean.dtype == image.dtype == np.uint8
    assert mask.shape == (96, 96) and mask.dtype == bool
    assert mask.any(), "defect mask is empty"
    np.testing.assert_array_equal(image[~mask], clean[~mask])
    changed = (image != clean).any(-1)
    assert changed[mask].mean() >= 0.95
    # Stronger than required: every mask pixel moved by at least MIN_DELTA in some channel.
    delta = np.abs(image.astype(int) - clean.astype(int)).max(-1)
    assert delta[mask].min() >= synthetic.MIN_DELTA


@pytest.mark.parametrize("category", sorted({c for s in DATASETS.values() for c in s["categories"]}))
def test_no_defect_gives_clean_image_and_empty_mask(category):
    clean, image, mask = render_sample(category, None, size=64, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(image, clean)
    assert not mask.any() and mask.shape == (64, 64)
    # The texture is a texture: not flat, and in colour.
    assert clean.std() > 5
    assert np.ptp(clean.reshape(-1, 3).mean(0)) > 5


def test_area_fraction_is_honoured():
    for defect in synthetic.DEFECT_AREA:
        _, _, mask = render_sample("metal", defect, size=128, rng=np.random.default_rng(1), area_fraction=0.02)
        assert mask.sum() == round(0.02 * 128 * 128), defect


def test_categories_differ_in_colour():
    means = {
        c: render_sample(c, None, size=64, rng=np.random.default_rng(0))[0].reshape(-1, 3).mean(0)
        for c in synthetic._TEXTURES
    }
    names = list(means)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(means[a] - means[b]).max() > 10, (a, b)


def test_normal_images_of_a_category_differ():
    a = render_sample("brick", None, size=64, rng=np.random.default_rng(1))[0]
    b = render_sample("brick", None, size=64, rng=np.random.default_rng(2))[0]
    assert not np.array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# the two datasets


def test_datasets_are_disjoint_and_large_enough():
    a, b = DATASETS["synth_a"], DATASETS["synth_b"]
    assert set(DATASETS) == {"synth_a", "synth_b"}
    assert not set(a["categories"]) & set(b["categories"])
    assert not set(a["defects"]) & set(b["defects"])
    assert len(set(a["categories"]) | set(b["categories"])) >= 6
    assert len(set(a["defects"]) | set(b["defects"])) >= 6
    assert {"brick", "grass", "gravel"} <= set(a["categories"]) | set(b["categories"])


def test_defect_areas_span_small_to_large(generated):
    for ds, (root, summary) in generated.items():
        fractions = [
            float(np.mean(np.asarray(Image.open(p)) > 0)) for p in sorted(root.glob("*/ground_truth/*/*_mask.png"))
        ]
        assert min(fractions) < 0.005, ds
        assert max(fractions) >= 0.05, ds
        assert summary["area_fraction"]["min"] == pytest.approx(min(fractions))
        assert summary["area_fraction"]["max"] == pytest.approx(max(fractions))


# ------------------------------------------------------------------------------------------------
# generate: layout


def test_generate_writes_exact_mvtec_layout(generated):
    for ds, (root, summary) in generated.items():
        spec = DATASETS[ds]
        assert sorted(p.name for p in root.iterdir()) == sorted(spec["categories"])
        for category in spec["categories"]:
            cat = root / category
            assert sorted(p.name for p in cat.iterdir()) == ["ground_truth", "test", "train"]
            assert [p.name for p in (cat / "train").iterdir()] == ["good"]
            assert sorted(p.name for p in (cat / "test").iterdir()) == sorted(["good", *spec["defects"]])
            assert sorted(p.name for p in (cat / "ground_truth").iterdir()) == sorted(spec["defects"])
            assert len(list((cat / "train/good").iterdir())) == SMALL["train_good"]
            assert len(list((cat / "test/good").iterdir())) == SMALL["test_good"]
            for split in ("train/good", "test/good"):
                for img in (cat / split).iterdir():
                    assert img.suffix == ".png"
                    with Image.open(img) as im:
                        assert im.mode == "RGB" and im.size == (64, 64)
            n_anomalous = 0
            for defect in spec["defects"]:
                images = sorted((cat / "test" / defect).iterdir())
                masks = sorted((cat / "ground_truth" / defect).iterdir())
                assert [m.name for m in masks] == [f"{p.stem}_mask.png" for p in images]
                assert summary["counts"][category]["test_anomalous"][defect] == len(images)
                n_anomalous += len(images)
                for img, msk in zip(images, masks):
                    with Image.open(img) as im, Image.open(msk) as mm:
                        assert im.mode == "RGB" and mm.mode == "L" and mm.size == im.size
                        values = np.unique(np.asarray(mm))
                    assert set(values.tolist()) == {0, 255}
            assert n_anomalous == SMALL["test_anomalous"]


def test_written_mask_equals_rendered_mask(generated):
    root, _ = generated["synth_b"]
    for category, defect, i, n in [("gravel", "crack", 0, 2), ("marble", "fold", 1, 2)]:
        rng = synthetic._rng(7, "synth_b", category, f"test/{defect}", i)
        fraction = synthetic._stratified_fraction(defect, i, n, rng)
        _, image, mask = render_sample(category, defect, size=64, rng=rng, area_fraction=fraction)
        on_disk = np.asarray(Image.open(root / category / "ground_truth" / defect / f"{i:03d}_mask.png"))
        np.testing.assert_array_equal(on_disk > 0, mask)
        np.testing.assert_array_equal(np.asarray(Image.open(root / category / "test" / defect / f"{i:03d}.png")), image)


def test_anomalous_images_are_spread_over_defects(tmp_path):
    summary = generate(tmp_path / "a", "synth_a", seed=0, image_size=32, train_good=1, test_good=1, test_anomalous=4)
    assert summary["counts"]["brick"]["test_anomalous"] == {"scratch": 2, "hole": 1, "stain": 1}
    assert summary["n_images"] == 3 * (1 + 1 + 4)


# ------------------------------------------------------------------------------------------------
# generate: determinism and re-runs


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path, generated):
    root, _ = generated["synth_a"]
    again = tmp_path / "again"
    generate(again, "synth_a", seed=7, **SMALL)
    first, second = _files(root), _files(again)
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first)

    other = tmp_path / "other"
    generate(other, "synth_a", seed=8, **SMALL)
    third = _files(other)
    assert third.keys() == first.keys()
    images = [k for k in first if not k.endswith("_mask.png")]
    assert all(first[k] != third[k] for k in images)


def test_counts_of_one_folder_do_not_change_others(tmp_path):
    kw = dict(seed=3, image_size=32, train_good=2, test_anomalous=3)
    small = _files(_generate_a(tmp_path / "s", test_good=1, **kw))
    large = _files(_generate_a(tmp_path / "l", test_good=3, **kw))
    shared = [k for k in small if "test/good" not in k] + ["fabric/test/good/000.png"]
    assert all(small[k] == large[k] for k in shared)


def _crash_after(monkeypatch, n_images):
    """Make generate die (as a kill would) after writing ``n_images`` PNGs into its temp tree."""
    written = []
    save = synthetic._save_png

    def save_then_die(path, array):
        if len(written) == n_images:
            raise KeyboardInterrupt("killed")
        written.append(path)
        save(path, array)

    monkeypatch.setattr(synthetic, "_save_png", save_then_die)


def test_rerun_after_crash_replaces_everything(tmp_path, monkeypatch):
    root = tmp_path / "synth_b"
    kw = dict(seed=1, image_size=32, train_good=1, test_good=1, test_anomalous=3)
    generate(root, "synth_b", **kw)
    reference = _files(root)
    # A crashed run leaves a half-written temp tree (a real one, made by generate) and an older tree.
    (root / "grass" / "test" / "good" / "999.png").write_bytes(b"stale")
    with monkeypatch.context() as m:
        _crash_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            generate(root, "synth_b", **kw)
    assert len([p for p in (tmp_path / "synth_b.tmp").rglob("*.png")]) == 3
    generate(root, "synth_b", **kw)
    assert _files(root) == reference
    assert not (tmp_path / "synth_b.tmp").exists()


# issue 10 item 1: <root>.tmp is deleted only when generate made it (its marker file) or it is empty.


@pytest.mark.parametrize("content", ["notes", "dataset"])
def test_foreign_tmp_folder_is_refused_and_kept(tmp_path, content):
    from pipeline.errors import PipelineError

    tmp = tmp_path / "synth_a.tmp"
    if content == "notes":
        tmp.mkdir()
        (tmp / "NOTES.txt").write_text("mine")
    else:  # a dataset tree that happens to sit there, even with our category names, has no marker
        synthetic._save_png(tmp / "brick" / "train" / "good" / "000.png", np.zeros((4, 4, 3), np.uint8))
    before = _files(tmp)
    shown = "NOTES.txt" if content == "notes" else "brick"
    with pytest.raises(PipelineError, match=rf"synth_a\.tmp.*1 entry: {shown}"):
        generate(tmp_path / "synth_a", "synth_a", seed=0, image_size=32, train_good=1, test_good=1, test_anomalous=1)
    assert _files(tmp) == before
    assert not (tmp_path / "synth_a").exists()


def test_empty_tmp_folder_is_used(tmp_path):
    (tmp_path / "synth_a.tmp").mkdir()
    kw = dict(seed=0, image_size=32, train_good=1, test_good=1, test_anomalous=1)
    generate(tmp_path / "synth_a", "synth_a", **kw)
    generate(tmp_path / "ref", "synth_a", **kw)
    assert _files(tmp_path / "synth_a") == _files(tmp_path / "ref")
    assert not (tmp_path / "synth_a.tmp").exists()


def test_refuses_to_wipe_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataFolderError, match="notes.txt"):  # a PipelineError: one line at the stage
        generate(tmp_path, "synth_a", seed=0, image_size=32, train_good=1, test_good=1, test_anomalous=1)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------
# bad arguments


@pytest.mark.parametrize(
    "override,name",
    [
        ({"dataset": "mvtec"}, "dataset"),
        ({"image_size": 0}, "image_size"),
        ({"image_size": 8}, "image_size"),
        ({"train_good": 0}, "train_good"),
        ({"test_good": -1}, "test_good"),
        ({"test_anomalous": 0}, "test_anomalous"),
        ({"seed": -1}, "seed"),
        ({"train_good": 1.5}, "train_good"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(tmp_path, override, name):
    kw = dict(dataset="synth_a", seed=0, image_size=32, train_good=1, test_good=1, test_anomalous=1)
    kw.update(override)
    dataset = kw.pop("dataset")
    with pytest.raises(ValueError, match=name):
        generate(tmp_path / "out", dataset, **kw)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args,name",
    [
        (("velvet", None), "category"),
        (("brick", "dent"), "defect"),
    ],
)
def test_render_sample_rejects_unknown_names(args, name):
    with pytest.raises(ValueError, match=name):
        render_sample(*args, size=64, rng=np.random.default_rng(0))


def test_render_sample_rejects_bad_sizes():
    with pytest.raises(ValueError, match="size"):
        render_sample("brick", None, size=4, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="area_fraction"):
        render_sample("brick", "hole", size=64, rng=np.random.default_rng(0), area_fraction=1.5)
