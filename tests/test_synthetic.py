"""Tests for pipeline.data.synthetic: mask exactness, dataset split, sizes, MVTec layout, determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from pipeline.data import synthetic
from pipeline.data.synthetic import DATASETS, DataFolderError, generate, render_sample

PAIRS = [(ds, c, d) for ds, spec in DATASETS.items() for c in spec["categories"] for d in spec["defects"]]
SMALL = dict(image_size=64, train_good=2, test_good=2, test_anomalous=6)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _generate_a(root: Path, **kw) -> Path:
    generate(root, "synth_a", **kw)
    return root


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Every dataset, small, generated once for the read-only tests."""
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
    assert set(DATASETS) == {"synth_a", "synth_b", "synth_c"}
    names = sorted(DATASETS)
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            assert not set(DATASETS[x]["categories"]) & set(DATASETS[y]["categories"]), (x, y)
            assert not set(DATASETS[x]["defects"]) & set(DATASETS[y]["defects"]), (x, y)
    a, b = DATASETS["synth_a"], DATASETS["synth_b"]
    assert len(set(a["categories"]) | set(b["categories"])) >= 6
    assert len(set(a["defects"]) | set(b["defects"])) >= 6
    assert {"brick", "grass", "gravel"} <= set(a["categories"]) | set(b["categories"])
    assert len(DATASETS["synth_c"]["categories"]) == 3 and len(DATASETS["synth_c"]["defects"]) == 5
    # Every defect has an area range, and every renderer is registered.
    assert set(synthetic.DEFECT_AREA) == set(synthetic._DEFECTS) == {d for s in DATASETS.values() for d in s["defects"]}


# sha256 over (relative path, NUL, bytes) of every file of
# generate(root, ds, seed=0, image_size=64, train_good=1, test_good=1, test_anomalous=3), computed with
# pipeline/data/synthetic.py as it was before synth_c was added (commit c333679): adding a dataset must not
# change a single byte of the existing two.
LEGACY_DIGESTS = {
    "synth_a": "becbe8e3b82ca5cfdc9067d5a3cd241456fa6acdd08088996307a669c66c0669",
    "synth_b": "5e1fb6297932eb3e5e60f2181f07ed931cf801e3401214c170ddc777277d3dfb",
}


@pytest.mark.parametrize("dataset", sorted(LEGACY_DIGESTS))
def test_existing_datasets_are_byte_identical(tmp_path, dataset):
    root = tmp_path / dataset
    generate(root, dataset, seed=0, image_size=64, train_good=1, test_good=1, test_anomalous=3)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    assert h.hexdigest() == LEGACY_DIGESTS[dataset]


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
# synth_c: each defect family's defining property


def _delta(clean: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Per-pixel change (S, S): the largest absolute channel difference, in grey levels."""
    return np.abs(image.astype(int) - clean.astype(int)).max(-1)


def test_shading_is_large_faint_and_not_a_disc():
    shading, stain = [], []
    for seed in range(4):
        for category in DATASETS["synth_c"]["categories"]:
            rng = np.random.default_rng(seed)
            clean, image, mask = render_sample(category, "shading", size=128, rng=rng, area_fraction=0.05)
            shading.append(_delta(clean, image)[mask].mean())
            rng = np.random.default_rng(seed)
            clean2, image2, mask2 = render_sample(category, "stain", size=128, rng=rng, area_fraction=0.05)
            stain.append(_delta(clean2, image2)[mask2].mean())
            # Irregular: a disc of the same area at the region's centroid covers well under all of it.
            yy, xx = np.mgrid[0:128, 0:128]
            cy, cx = ndimage.center_of_mass(mask)
            disc = np.hypot(yy - cy, xx - cx) <= np.sqrt(mask.sum() / np.pi)
            assert (mask & disc).sum() / (mask | disc).sum() < 0.85
    # The candidate moves a pixel by at most 1.25 MIN_DELTA (times a hue factor <= 1.25 in one
    # channel); the contract lifts the rest to exactly MIN_DELTA. So the mean sits just above it.
    assert min(shading) >= synthetic.MIN_DELTA
    assert max(shading) <= 1.3 * synthetic.MIN_DELTA
    assert np.mean(shading) < np.mean(stain)
    assert synthetic.DEFECT_AREA["shading"][0] >= 0.01  # large: at least 1 % of the image


def test_texture_crack_follows_dark_ground():
    """Over seeds, the clean image under a texture crack is darker (in units of the image's own
    luminance spread) than under the texture-blind ``crack`` of the same area on the same image, and
    darker than the image mean."""
    following, blind = [], []
    for seed in range(6):
        for category in DATASETS["synth_c"]["categories"]:
            kw = dict(size=128, area_fraction=0.008)
            clean, _, mask = render_sample(category, "texture_crack", rng=np.random.default_rng(seed), **kw)
            clean2, _, mask2 = render_sample(category, "crack", rng=np.random.default_rng(seed), **kw)
            np.testing.assert_array_equal(clean, clean2)  # same seed: the same clean image
            lum = clean.mean(-1)
            following.append((lum[mask].mean() - lum.mean()) / lum.std())
            blind.append((lum[mask2].mean() - lum.mean()) / lum.std())
    assert np.mean(following) < -0.4
    assert np.mean(following) < np.mean(blind) - 0.3


def test_texture_walk_prefers_dark_ground_and_stays_inside():
    """The walk itself, on a hand-made field: a dark valley along row 20 of a bright image. Started
    in the valley heading along it, the guided walk stays in it; a blind walk (pull=0) wanders off."""
    lum = np.ones((64, 64), np.float32)
    lum[18:23, :] = 0.0
    guided = synthetic._texture_walk(lum, np.random.default_rng(0), (20.0, 2.0), 0.0, 40, 1.5)
    blind = synthetic._texture_walk(lum, np.random.default_rng(0), (20.0, 2.0), 0.0, 40, 1.5, pull=0.0)
    assert len(guided) > 20 and (guided >= 0).all() and (guided <= 63).all()
    on_valley = lambda pts: np.mean(lum[np.rint(pts[:, 0]).astype(int), np.rint(pts[:, 1]).astype(int)] == 0)
    assert on_valley(guided) == 1.0
    assert on_valley(guided) > on_valley(blind)


def test_pits_are_small_separate_discs():
    ncomp = []
    for seed in range(12):
        category = DATASETS["synth_c"]["categories"][seed % 3]
        for fraction in synthetic.DEFECT_AREA["pit"]:
            rng = np.random.default_rng(seed)
            _, _, mask = render_sample(category, "pit", size=256, rng=rng, area_fraction=fraction)
            labels, n = ndimage.label(mask)
            assert 1 <= n <= 12
            ncomp.append(n)
            for sl in ndimage.find_objects(labels):
                # A pit of radius <= 6 px spans <= 13 px; the area of a 6 px disc is ~113 px.
                assert max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) <= 13
            assert np.bincount(labels.ravel())[1:].max() <= np.pi * 6.5**2
    assert max(ncomp) >= 5  # clusters of several pits do occur


def test_edge_chip_touches_a_border():
    sides, share = set(), []
    for seed in range(12):
        for fraction in synthetic.DEFECT_AREA["edge_chip"]:
            rng = np.random.default_rng(seed)
            _, _, mask = render_sample("stone", "edge_chip", size=96, rng=rng, area_fraction=fraction)
            borders = [mask[0].any(), mask[-1].any(), mask[:, 0].any(), mask[:, -1].any()]
            assert any(borders)
            sides.add(int(np.argmax(borders)))
            labels, _ = ndimage.label(mask)
            share.append(np.bincount(labels.ravel())[1:].max() / mask.sum())
    assert len(sides) >= 3  # all borders are used, not one
    # One bite, not scattered specks: the largest component is nearly all of the region (a small
    # detached flake now and then is allowed).
    assert np.median(share) >= 0.95 and min(share) >= 0.5


def test_contamination_is_near_neutral():
    """On a flat saturated-red surface (chroma max-min = 0.6), every contaminated pixel of the candidate
    is a blend of the red (weight 1 - alpha <= 0.65) and a grey whose channels differ by <= 0.02, so its
    chroma is <= 0.65 * 0.6 + 0.02 = 0.41."""
    red = np.broadcast_to(np.array([0.8, 0.3, 0.2], np.float32), (96, 96, 3)).copy()
    for seed in range(8):
        region, cand = synthetic._contamination(red, np.random.default_rng(seed), 300)
        assert region.sum() == 300
        chroma = np.ptp(cand[region], axis=-1)
        assert chroma.max() <= 0.41 + 1e-6
    # Rendered on the reddest category, contamination lowers the colourfulness of what it covers.
    for seed in range(4):
        rng = np.random.default_rng(seed)
        clean, image, mask = render_sample("leather", "contamination", size=128, rng=rng, area_fraction=0.01)
        assert np.ptp(image[mask].astype(int), -1).mean() < np.ptp(clean[mask].astype(int), -1).mean()


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


# <root>.tmp is deleted only when generate made it (its marker file) or it is empty.


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


KW = dict(seed=0, image_size=32, train_good=1, test_good=1, test_anomalous=1)


@pytest.mark.parametrize("inside", ["brick/NOTES.txt", "brick/my_photos/keep.png", "brick/test/good/mine.jpg",
                                    "brick/ground_truth/stain/notes.md"])
def test_a_users_file_inside_a_generated_category_is_never_deleted(tmp_path, inside):
    root = tmp_path / "synth_a"
    generate(root, "synth_a", **KW)
    (root / inside).parent.mkdir(parents=True, exist_ok=True)
    (root / inside).write_text("mine")
    with pytest.raises(DataFolderError, match=inside.split("/")[-1]):
        generate(root, "synth_a", **KW)
    assert (root / inside).read_text() == "mine"
    assert not (tmp_path / "synth_a.tmp").exists()


def test_a_symlinked_root_is_refused_in_one_line_and_leaves_nothing(tmp_path):
    real = tmp_path / "real"
    generate(real, "synth_a", **KW)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(DataFolderError, match="symbolic link"):
        generate(link, "synth_a", **KW)
    assert link.is_symlink() and (real / "brick").is_dir() and not (tmp_path / "link.tmp").exists()


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
