"""Tests for pipeline.datasets: tiny trees built in tmp_path with PIL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.datasets import (
    FORMATS,
    DatasetError,
    Sample,
    load_image,
    load_mask,
    load_table,
    summarize,
)

W, H = 8, 6  # PIL order (width, height)


def _img(path: Path, size=(W, H), mode="RGB", value=None, seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if value is None:
        rng = np.random.default_rng(seed)
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        arr = rng.integers(0, 256, shape, dtype=np.uint8)
        im = Image.fromarray(arr).convert(mode)
    else:
        im = Image.new(mode, size, value)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}.get(
        path.suffix.lower(), "PNG"
    )
    im.save(path, format=fmt)
    return path


def _mask(path: Path, arr: np.ndarray | None = None, size=(W, H)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr is None:
        arr = np.zeros((size[1], size[0]), np.uint8)
        arr[1:3, 2:5] = 255
    Image.fromarray(arr.astype(np.uint8), mode="L").save(path, format="PNG")
    return path


def _mvtec(root: Path) -> Path:
    """Two categories; zipper listed first on disk would still sort after bottle."""
    for cat in ("zipper", "bottle"):
        _img(root / cat / "train/good/000.png")
        _img(root / cat / "train/good/001.png")
        _img(root / cat / "test/good/000.png")
        for defect in ("crack", "broken"):
            for stem in ("001", "000"):
                _img(root / cat / f"test/{defect}/{stem}.png")
                _mask(root / cat / f"ground_truth/{defect}/{stem}_mask.png")
    (root / "license.txt").write_text("CC BY-NC-SA 4.0")
    return root


# --------------------------------------------------------------------------------------- happy paths


def test_formats():
    assert FORMATS == ("mvtec", "visa", "folder")


def test_mvtec_table(tmp_path):
    root = _mvtec(tmp_path / "mvtec")
    table = load_table("mvtec", root)
    assert len(table) == 2 * (1 + 4)
    assert all(isinstance(s, Sample) and s.split == "test" for s in table)
    assert [s.relpath for s in table[:5]] == [
        "bottle/test/broken/000.png",
        "bottle/test/broken/001.png",
        "bottle/test/crack/000.png",
        "bottle/test/crack/001.png",
        "bottle/test/good/000.png",
    ]
    assert table == sorted(table, key=lambda s: (s.category, s.split, s.defect, s.relpath))
    for s in table:
        assert s.image.is_absolute() and s.image.is_file()
        assert s.image == root / s.relpath
        if s.defect == "good":
            assert s.label == 0 and s.mask is None
        else:
            assert s.label == 1
            assert s.mask == root / s.category / "ground_truth" / s.defect / f"{s.image.stem}_mask.png"
    both = load_table("mvtec", root, splits=("train", "test"), categories=["zipper"])
    assert {s.category for s in both} == {"zipper"}
    assert [(s.split, s.defect) for s in both].count(("train", "good")) == 2
    assert [s.split for s in both] == ["test"] * 5 + ["train"] * 2


def test_relative_root_gives_absolute_paths(tmp_path, monkeypatch):
    _mvtec(tmp_path / "mvtec")
    monkeypatch.chdir(tmp_path)
    table = load_table("mvtec", Path("mvtec"), categories=["bottle"])
    assert all(s.image.is_absolute() for s in table)
    assert all(s.mask.is_absolute() for s in table if s.mask is not None)
    assert table[0].relpath == "bottle/test/broken/000.png"


def test_summarize(tmp_path):
    table = load_table("mvtec", _mvtec(tmp_path / "m"), splits=("train", "test"))
    summary = summarize(table)
    assert summary["n_images"] == 14 and summary["n_normal"] == 6 and summary["n_anomalous"] == 8
    assert summary["categories"] == ["bottle", "zipper"]
    assert summary["per_category"]["bottle"]["splits"] == {
        "test": {"broken": 2, "crack": 2, "good": 1},
        "train": {"good": 2},
    }


def test_folder_btad_and_mpdd_styles(tmp_path):
    root = tmp_path / "folder"
    # BTAD: ok/ko folders, .bmp images, masks named like the image (<stem>.png).
    _img(root / "01/train/ok/0000.bmp")
    _img(root / "01/test/ok/0001.bmp")
    _img(root / "01/test/ko/0002.bmp")
    _mask(root / "01/ground_truth/ko/0002.png")
    # MPDD / own line: .JPG / .jpeg / .TIFF images, <stem>_mask.<ext> masks of various extensions.
    _img(root / "bracket/train/good/a.JPG")
    _img(root / "bracket/test/good/b.jpeg")
    _img(root / "bracket/test/hole/c.TIFF")
    _mask(root / "bracket/ground_truth/hole/c_mask.PNG")
    _img(root / "bracket/test/hole/d.png")
    _mask(root / "bracket/ground_truth/hole/d.png")
    table = load_table("folder", root, splits=("train", "test"))
    got = [
        (s.category, s.split, s.defect, s.label, s.relpath, s.mask.name if s.mask else None) for s in table
    ]
    assert got == [
        ("01", "test", "good", 0, "01/test/ok/0001.bmp", None),
        ("01", "test", "ko", 1, "01/test/ko/0002.bmp", "0002.png"),
        ("01", "train", "good", 0, "01/train/ok/0000.bmp", None),
        ("bracket", "test", "good", 0, "bracket/test/good/b.jpeg", None),
        ("bracket", "test", "hole", 1, "bracket/test/hole/c.TIFF", "c_mask.PNG"),
        ("bracket", "test", "hole", 1, "bracket/test/hole/d.png", "d.png"),
        ("bracket", "train", "good", 0, "bracket/train/good/a.JPG", None),
    ]


def _visa(root: Path, rows: list[str] | None = None, header="object,split,label,image,mask") -> Path:
    if rows is None:
        rows = []
        for cat in ("pcb1", "candle"):
            rows.append(f"{cat},train,normal,{cat}/Data/Images/Normal/0000.JPG,")
            rows.append(f"{cat},test,normal,{cat}/Data/Images/Normal/0001.JPG,")
            for stem in ("000", "1234"):
                image, mask = f"{cat}/Data/Images/Anomaly/{stem}.JPG", f"{cat}/Data/Masks/Anomaly/{stem}.png"
                rows.append(f"{cat},test,anomaly,{image},{mask}")
        mask = np.zeros((H, W), np.uint8)
        mask[0, 0], mask[1, 1], mask[2, 2] = 1, 2, 255
        for cat in ("pcb1", "candle"):
            _img(root / cat / "Data/Images/Normal/0000.JPG")
            _img(root / cat / "Data/Images/Normal/0001.JPG")
            for stem in ("000", "1234"):
                _img(root / cat / f"Data/Images/Anomaly/{stem}.JPG")
                _mask(root / cat / f"Data/Masks/Anomaly/{stem}.png", mask)
    csv = root / "split_csv" / "1cls.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    csv.write_text("\n".join([header, *rows]) + "\n")
    return root


def test_visa_table(tmp_path):
    root = _visa(tmp_path / "visa")
    table = load_table("visa", root)
    assert [(s.category, s.defect, s.label, s.relpath) for s in table] == [
        ("candle", "anomaly", 1, "candle/Data/Images/Anomaly/000.JPG"),
        ("candle", "anomaly", 1, "candle/Data/Images/Anomaly/1234.JPG"),
        ("candle", "good", 0, "candle/Data/Images/Normal/0001.JPG"),
        ("pcb1", "anomaly", 1, "pcb1/Data/Images/Anomaly/000.JPG"),
        ("pcb1", "anomaly", 1, "pcb1/Data/Images/Anomaly/1234.JPG"),
        ("pcb1", "good", 0, "pcb1/Data/Images/Normal/0001.JPG"),
    ]
    a = table[1]
    assert a.mask == root / "candle/Data/Masks/Anomaly/1234.png" and a.image.is_absolute()
    assert table[2].mask is None
    m = load_mask(a.mask, load_image(a.image).size)
    expected = np.zeros((H, W), np.uint8)
    expected[1, 1] = expected[2, 2] = expected[0, 0] = 1
    np.testing.assert_array_equal(m, expected)
    assert m.dtype == np.uint8
    train = load_table("visa", root, splits=["train"], categories=["pcb1"])
    assert [s.relpath for s in train] == ["pcb1/Data/Images/Normal/0000.JPG"]


# ------------------------------------------------------------------------------------ image and mask


def test_load_image_rgb_full_decode(tmp_path):
    p = _img(tmp_path / "grey.png", mode="L")
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (W, H)
    np.testing.assert_array_equal(np.asarray(im)[..., 0], np.asarray(Image.open(p)))
    p16 = tmp_path / "16.png"
    Image.fromarray(np.full((H, W), 65535, np.uint16)).save(p16)
    assert np.asarray(load_image(p16)).min() == 255


def test_load_mask_none_and_sizes(tmp_path):
    z = load_mask(None, (W, H))
    assert z.shape == (H, W) and z.dtype == np.uint8 and not z.any()
    assert load_mask(None, (W, H), resize_to=5).shape == (5, 5)
    p = _mask(tmp_path / "m.png")
    with pytest.raises(DatasetError, match="m.png"):
        load_mask(p, (H, W))  # (h, w) given by mistake: not PIL order


def test_load_mask_resize_nearest(tmp_path):
    rng = np.random.default_rng(1)
    small = rng.integers(0, 2, (4, 4)).astype(np.uint8) * rng.integers(1, 256, (4, 4)).astype(np.uint8)
    p = _mask(tmp_path / "m.png", small, size=(4, 4))
    up = load_mask(p, (4, 4), resize_to=8)
    np.testing.assert_array_equal(up, np.kron((small > 0).astype(np.uint8), np.ones((2, 2), np.uint8)))
    # Block-constant 8x8 mask down to 4x4: nearest picks one pixel of each 2x2 block.
    p8 = _mask(tmp_path / "m8.png", np.kron(small, np.ones((2, 2), np.uint8)), size=(8, 8))
    np.testing.assert_array_equal(load_mask(p8, (8, 8), resize_to=4), (small > 0).astype(np.uint8))
    # RGB masks: non-zero in any channel.
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[0, 0, 2] = 7
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    m = load_mask(tmp_path / "rgb.png", (W, H))
    assert m.sum() == 1 and m[0, 0] == 1


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("name", ["trunc.png", "trunc.jpg"])
def test_load_image_truncated(tmp_path, name):
    p = _truncate(_img(tmp_path / name, size=(64, 64)))
    with pytest.raises(DatasetError, match=name):
        load_image(p)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_load_image_garbage_and_missing(tmp_path):
    p = tmp_path / "garbage.png"
    p.write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match="garbage.png"):
        load_image(p)
    with pytest.raises(DatasetError, match="nothere.png"):
        load_image(tmp_path / "nothere.png")


def test_load_image_pixel_limit(tmp_path):
    p = _img(tmp_path / "big.png", size=(10, 10))
    with pytest.raises(DatasetError, match=r"big\.png.*100 pixels.*data\.max_pixels = 99"):
        load_image(p, max_pixels=99)
    assert load_image(p, max_pixels=100).size == (10, 10)


def test_pil_decompression_bomb_becomes_dataset_error(tmp_path, monkeypatch):
    p = _img(tmp_path / "bomb.png", size=(10, 10))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # PIL refuses > 2x this
    with pytest.raises(DatasetError, match="bomb.png"):
        load_image(p)
    root = tmp_path / "m"
    _img(root / "c/test/good/bomb.png", size=(10, 10))
    with pytest.raises(DatasetError, match="bomb.png"):
        load_table("mvtec", root)


# ------------------------------------------------------------------------------------------- errors


def test_missing_root_and_unknown_format(tmp_path):
    with pytest.raises(DatasetError, match="nope.*does not exist"):
        load_table("mvtec", tmp_path / "nope")
    with pytest.raises(DatasetError, match="'coco'.*mvtec, visa, folder"):
        load_table("coco", tmp_path)


def test_zero_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty.*mvtec layout"):
        load_table("mvtec", tmp_path / "empty")
    (tmp_path / "r/cat/test/good").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"cat/test.*folder layout"):
        load_table("folder", tmp_path / "r")
    with pytest.raises(DatasetError, match=r"cat/train"):
        load_table("folder", tmp_path / "r", splits=("train",))


def test_anomalous_image_without_mask(tmp_path):
    root = _mvtec(tmp_path / "m")
    (root / "bottle/ground_truth/crack/001_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"001\.png.*expected .*ground_truth/crack/001_mask\.png"):
        load_table("mvtec", root)
    froot = tmp_path / "f"
    _img(froot / "c/test/hole/x.jpg")
    with pytest.raises(DatasetError, match=r"x\.jpg.*ground_truth/hole/x_mask\.<ext> or .*hole/x\.<ext>"):
        load_table("folder", froot)


def test_orphan_mask(tmp_path):
    root = _mvtec(tmp_path / "m")
    _mask(root / "bottle/ground_truth/crack/009_mask.png")
    with pytest.raises(DatasetError, match=r"orphan.*009_mask\.png"):
        load_table("mvtec", root)
    root2 = _mvtec(tmp_path / "m2")
    _mask(root2 / "zipper/ground_truth/scratch/000_mask.png")  # no test/scratch at all
    with pytest.raises(DatasetError, match=r"orphan.*scratch/000_mask\.png"):
        load_table("mvtec", root2)


def test_ground_truth_good_refused(tmp_path):
    root = _mvtec(tmp_path / "m")
    _mask(root / "bottle/ground_truth/good/000_mask.png")
    with pytest.raises(DatasetError, match=r"ground_truth/good.*no mask"):
        load_table("mvtec", root)


def test_mask_size_mismatch(tmp_path):
    root = _mvtec(tmp_path / "m")
    _mask(root / "bottle/ground_truth/crack/000_mask.png", size=(W + 1, H))
    with pytest.raises(DatasetError, match=r"000_mask\.png is 9x6.*crack/000\.png is 8x6"):
        load_table("mvtec", root)


def test_unreadable_image_at_table_time(tmp_path):
    root = _mvtec(tmp_path / "m")
    (root / "zipper/test/good/000.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match=r"zipper/test/good/000\.png"):
        load_table("mvtec", root)


def test_wrong_extension_and_stray_files(tmp_path):
    root = _mvtec(tmp_path / "m")
    _img(root / "bottle/test/crack/002.jpg")
    with pytest.raises(DatasetError, match=r"002\.jpg.*folder"):
        load_table("mvtec", root)
    (root / "bottle/test/crack/002.jpg").unlink()
    (root / "bottle/test/crack/notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"notes\.txt"):
        load_table("mvtec", root)
    (root / "bottle/test/crack/notes.txt").unlink()
    (root / "bottle/test/crack/.DS_Store").write_text("ignored")
    assert len(load_table("mvtec", root)) == 10


def test_pixel_limit_at_table_time(tmp_path):
    root = _mvtec(tmp_path / "m")
    with pytest.raises(DatasetError, match=r"48 pixels.*data\.max_pixels = 47"):
        load_table("mvtec", root, max_pixels=47)


def test_unknown_category(tmp_path):
    root = _mvtec(tmp_path / "m")
    with pytest.raises(DatasetError, match=r"'cable'.*available: bottle, zipper"):
        load_table("mvtec", root, categories=["cable"])
    vroot = _visa(tmp_path / "v")
    with pytest.raises(DatasetError, match=r"'pcb9'.*1cls\.csv.*candle, pcb1"):
        load_table("visa", vroot, categories=["pcb9"])


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/passwd", "cat/../../x.png", "C:\\x.png"])
def test_visa_path_escape(tmp_path, bad):
    root = tmp_path / "v"
    _img(tmp_path / "outside.png")
    _visa(root, rows=[f"c,test,normal,{bad},"])
    with pytest.raises(DatasetError, match=r"1cls\.csv, line 2.*escapes the dataset root"):
        load_table("visa", root)
    _visa(root, rows=[f"c,test,anomaly,ok.png,{bad}"])
    _img(root / "ok.png")
    with pytest.raises(DatasetError, match=r"1cls\.csv, line 2: mask"):
        load_table("visa", root)


def test_visa_csv_errors(tmp_path):
    root = tmp_path / "v"
    with pytest.raises(DatasetError, match=r"split_csv/1cls\.csv"):
        load_table("visa", root.parent)
    _visa(root, rows=["c,test,normal,a.png"], header="object,split,label,image")
    with pytest.raises(DatasetError, match=r"1cls\.csv.*missing column.*'mask'"):
        load_table("visa", root)
    _img(root / "a.png")
    _visa(root, rows=["c,test,bad,a.png,"])
    with pytest.raises(DatasetError, match=r"1cls\.csv, line 2.*unknown label 'bad'.*normal, anomaly"):
        load_table("visa", root)
    _visa(root, rows=["c,test,anomaly,a.png,"])
    with pytest.raises(DatasetError, match=r"line 2.*a\.png has no mask"):
        load_table("visa", root)
    _visa(root, rows=["c,test,anomaly,a.png,m.png"])
    with pytest.raises(DatasetError, match=r"m\.png.*does not exist"):
        load_table("visa", root)
    _mask(root / "m.png", size=(W, H + 2))
    with pytest.raises(DatasetError, match=r"m\.png is 8x8.*a\.png is 8x6"):
        load_table("visa", root)
    _visa(root, rows=["c,test,normal,b.png,"])
    with pytest.raises(DatasetError, match=r"b\.png does not exist"):
        load_table("visa", root)
    _visa(root, rows=["c,test,normal,a.png,,extra"])
    with pytest.raises(DatasetError, match=r"1cls\.csv, line 2: more fields"):
        load_table("visa", root)
    _visa(root, rows=["c,test,normal,a.png,m.png"])
    with pytest.raises(DatasetError, match=r"line 2: normal image .*a\.png has a mask"):
        load_table("visa", root)
    _visa(root, rows=[])
    with pytest.raises(DatasetError, match=r"no images found under .*visa layout"):
        load_table("visa", root)


def test_folder_ambiguous_mask(tmp_path):
    root = tmp_path / "f"
    _img(root / "c/test/hole/x.png")
    _mask(root / "c/ground_truth/hole/x.png")
    _mask(root / "c/ground_truth/hole/x_mask.png")
    with pytest.raises(DatasetError, match=r"x\.png has two candidate masks"):
        load_table("folder", root)
