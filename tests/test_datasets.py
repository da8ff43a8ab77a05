"""Tests for pipeline.data.tables: tiny trees built in tmp_path with PIL."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.data.tables import FORMATS, Sample, categories_without_masks, category_name_problem, load_table, summarize
from pipeline.data.images import DatasetError, binarise, header_size, load_image, load_mask, mask_from_header, to_rgb

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


def test_max_pixels_is_the_only_pixel_cap(tmp_path, monkeypatch):
    # PIL's own guard (here shrunk to refuse above 20 pixels) must not refuse what max_pixels allows,
    # and must be back as it was after each file
    p = _img(tmp_path / "bomb.png", size=(10, 10))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    assert load_image(p).size == (10, 10)
    assert header_size(p, max_pixels=100) == (10, 10)
    root = tmp_path / "m"
    _img(root / "c/test/good/bomb.png", size=(10, 10))
    assert len(load_table("mvtec", root)) == 1
    assert Image.MAX_IMAGE_PIXELS == 10
    with pytest.raises(DatasetError, match=r"bomb\.png.*100 pixels.*data\.max_pixels = 99"):
        load_image(p, max_pixels=99)
    with pytest.raises(DatasetError, match=r"100 pixels, over the limit --max-pixels = 99; pass a larger --max-pixels"):
        load_image(p, max_pixels=99, limit="--max-pixels")


def _png_header_only(path, width, height):
    """A PNG whose header says width x height (8-bit grey) with a few bytes of pixel data: PIL reads
    its size without decoding, and decoding it fails as truncated."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_a_raised_max_pixels_lifts_pils_default_cap(tmp_path):
    # 13500 x 13500 = 182 M pixels, above PIL's default refusal (2 x 89.48 M): with data.max_pixels
    # raised above it, the file is ours to judge (here: truncated), not PIL's bomb guard
    p = _png_header_only(tmp_path / "huge.png", 13_500, 13_500)
    assert 13_500 ** 2 > 2 * Image.MAX_IMAGE_PIXELS
    assert header_size(p, max_pixels=200_000_000) == (13_500, 13_500)
    with pytest.raises(DatasetError, match=r"182,250,000 pixels, over the limit data\.max_pixels = 50,000,000"):
        header_size(p, max_pixels=50_000_000)
    with pytest.raises(DatasetError, match="cannot decode image .*huge.png") as err:
        load_image(p, max_pixels=200_000_000)
    assert "bomb" not in str(err.value).lower()


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
    (froot / "c/ground_truth").mkdir()  # ground_truth/ present: every anomalous image needs its mask
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


# ------------------------------------------------------------------ category names


@pytest.mark.parametrize(
    "name, problem",
    [("", "is empty"), (".", "relative path"), ("..", "relative path"), (".hidden", "starts with '.'"),
     ("../../../PWNED", "starts with '.'"), ("a/b", "path separator"), ("a\\b", "path separator"),
     ("a\nb", "control character"), ("a\x1bb", "control character")],
)
def test_category_name_problem(name, problem):
    assert problem in category_name_problem(name)


@pytest.mark.parametrize("name", ["bottle", "pcb1", "metal_nut", "Ü-12 ok"])
def test_category_name_plain_names_pass(name):
    assert category_name_problem(name) is None


@pytest.mark.parametrize("obj", ["../../../PWNED", "a/b", "..\\x", ".", "..", "\"a\nb\""])
def test_visa_object_column_cannot_leave_a_folder(tmp_path, obj):
    root = tmp_path / "v"
    _img(root / "a.png")
    _visa(root, rows=["good,test,normal,a.png,", f"{obj},test,normal,a.png,"])
    with pytest.raises(DatasetError, match=r"1cls\.csv, line \d: object column: category name"):
        load_table("visa", root)


@pytest.mark.parametrize("name", ["back\\slash", "bell\x07"])
def test_tree_category_folder_names_are_checked(tmp_path, name):
    root = _mvtec(tmp_path / "m")
    (root / "bottle").rename(root / name)
    for fmt in ("mvtec", "folder"):
        with pytest.raises(DatasetError, match=r"category folder .*category name"):
            load_table(fmt, root)


# -------------------------------------------------------------------- OS litter


def test_os_litter_is_ignored_in_every_listing(tmp_path):
    litter = ["Thumbs.db", "thumbs.db", "desktop.ini", "ehthumbs.db", ".DS_Store", "._000.png"]
    root = _mvtec(tmp_path / "m")
    for folder in [root, root / "bottle", root / "bottle/test", root / "bottle/test/crack",
                   root / "bottle/ground_truth", root / "bottle/ground_truth/crack"]:
        for name in litter:
            (folder / name).write_bytes(b"litter")
    for fmt in ("mvtec", "folder"):
        assert len(load_table(fmt, root)) == 10, fmt
    (root / "bottle/test/crack/Thumbs.db.bak").write_bytes(b"x")  # not litter: still an error
    with pytest.raises(DatasetError, match=r"Thumbs\.db\.bak"):
        load_table("mvtec", root)


# ------------------------------------------------------------- pixel modes


def _palette_image(mode: str, index: np.ndarray, alpha: int | None = None) -> Image.Image:
    im = Image.fromarray(index.astype(np.uint8), mode="L").convert("P")
    im.putpalette([0, 0, 0, 10, 20, 30] + [0] * (3 * 254))
    if mode == "PA":
        im = im.convert("PA")
        arr = np.asarray(im).copy()
        arr[..., 1] = alpha
        im = Image.fromarray(arr, mode="PA")
        im.putpalette([0, 0, 0, 10, 20, 30] + [0] * (3 * 254))
    return im


def _lab(pixels) -> Image.Image:
    """A 1 x n LAB image from raw bytes: PIL stores L in 0..255 and a, b as signed bytes (0 neutral)."""
    return Image.fromarray(np.array([pixels], np.uint8), mode="LAB")


def _lab_reference(im: Image.Image) -> list[tuple[int, int, int]]:
    """sRGB of a LAB image through littleCMS (ImageCms), a path independent of Image.convert."""
    from PIL import ImageCms

    t = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    out = ImageCms.applyTransform(im, t)
    return [out.getpixel((x, 0)) for x in range(im.size[0])]


# mode -> (a 1x2 image, the RGB of its two pixels worked out by hand)
MODE_CASES = {
    "1": (lambda: Image.fromarray(np.array([[False, True]])), [(0, 0, 0), (255, 255, 255)]),
    "L": (lambda: Image.fromarray(np.array([[7, 200]], np.uint8)), [(7, 7, 7), (200, 200, 200)]),
    "P": (lambda: _palette_image("P", np.array([[0, 1]])), [(0, 0, 0), (10, 20, 30)]),
    "PA": (lambda: _palette_image("PA", np.array([[0, 1]]), alpha=50), [(0, 0, 0), (10, 20, 30)]),
    "RGB": (lambda: Image.fromarray(np.array([[[1, 2, 3], [250, 251, 252]]], np.uint8)),
            [(1, 2, 3), (250, 251, 252)]),
    # alpha is dropped, not composited: a transparent pixel keeps its colour
    "RGBA": (lambda: Image.fromarray(np.array([[[1, 2, 3, 0], [9, 8, 7, 255]]], np.uint8), mode="RGBA"),
             [(1, 2, 3), (9, 8, 7)]),
    "RGBX": (lambda: Image.fromarray(np.array([[[1, 2, 3, 255], [4, 5, 6, 0]]], np.uint8), mode="RGBX"),
             [(1, 2, 3), (4, 5, 6)]),
    "LA": (lambda: Image.fromarray(np.array([[[9, 0], [99, 255]]], np.uint8), mode="LA"),
           [(9, 9, 9), (99, 99, 99)]),
    # premultiplied alpha 51 = 255 / 5: the straight colour is 5 x the stored one
    "RGBa": (lambda: Image.fromarray(np.array([[[10, 20, 40, 51], [1, 2, 3, 255]]], np.uint8), mode="RGBa"),
             [(50, 100, 200), (1, 2, 3)]),
    "La": (lambda: Image.fromarray(np.array([[[20, 51], [7, 255]]], np.uint8), mode="La"),
           [(100, 100, 100), (7, 7, 7)]),
    # naive CMYK: R = 255 - C - K (clipped); no ink is white, full K is black
    "CMYK": (lambda: Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 0]]], np.uint8), mode="CMYK"),
             [(255, 255, 255), (0, 255, 255)]),
    # full-range YCbCr: neutral chroma 128 gives grey Y
    "YCbCr": (lambda: Image.fromarray(np.array([[[128, 128, 128], [0, 128, 128]]], np.uint8), mode="YCbCr"),
              [(128, 128, 128), (0, 0, 0)]),
    # HSV hue 0 -> red, 85/255 * 360 = 120 degrees -> green
    "HSV": (lambda: Image.fromarray(np.array([[[0, 255, 255], [85, 255, 255]]], np.uint8), mode="HSV"),
            [(255, 0, 0), (0, 255, 0)]),
    "I;16": (lambda: Image.fromarray(np.array([[256, 65535]], np.uint16)), [(1, 1, 1), (255, 255, 255)]),
    "I;16B": (lambda: Image.fromarray(np.array([[256, 65535]], ">u2")), [(1, 1, 1), (255, 255, 255)]),
}


@pytest.mark.parametrize("mode", sorted(MODE_CASES))
def test_to_rgb_every_mode(mode):
    make, expected = MODE_CASES[mode]
    im = make()
    assert im.mode == mode
    out = to_rgb(im)
    assert out.mode == "RGB" and out.size == (2, 1)
    assert [out.getpixel((x, 0)) for x in range(2)] == expected


LAB_PIXELS = [(255, 0, 0), (0, 0, 0), (128, 100, 0), (60, 180, 90)]


def test_to_rgb_lab_matches_littlecms():
    lab = _lab(LAB_PIXELS)
    got = [to_rgb(lab).getpixel((x, 0)) for x in range(len(LAB_PIXELS))]
    assert max(got[1]) <= 1  # L = 0 is black (PIL gives (1, 0, 1))
    assert min(got[0]) >= 254  # L = 100 with neutral a, b is white (up to the D50 -> D65 adaptation)
    for g, ref in zip(got, _lab_reference(lab)):
        assert max(abs(a - b) for a, b in zip(g, ref)) <= 1, (g, ref)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB",
                                  "I;16", "I;16B"])
def test_load_image_decodes_tiff_of_every_mode(tmp_path, mode):
    """Through a real file: TIFF carries all these modes."""
    if mode == "LAB":
        im = _lab(LAB_PIXELS[2:])
        expected = _lab_reference(im)
    else:
        make, expected = MODE_CASES[mode]
        im = make()
    im.save(tmp_path / "x.tif")
    got = load_image(tmp_path / "x.tif")
    assert [got.getpixel((x, 0)) for x in range(2)] == [tuple(e) for e in expected]


@pytest.mark.parametrize(
    "arr, mode, kind",
    [(np.array([[0, 70000]], np.int32), "I", "32-bit signed integer"),
     (np.array([[0.0, 0.5]], np.float32), "F", "32-bit float")],
)
def test_load_image_refuses_32_bit_modes_by_name(tmp_path, arr, mode, kind):
    """Before: I decoded all white (clipped at 255) and F near black, with no word."""
    path = tmp_path / "deep.tif"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode == mode
    with pytest.raises(DatasetError, match=rf"deep\.tif has pixel mode '{mode}' \({kind}\).*convert it"):
        load_image(path)


# ------------------------------------------------------------ masks


def _save(im: Image.Image, path: Path) -> Path:
    im.save(path)
    return path


DEFECT = np.array([[0, 1, 0], [0, 0, 1]], np.uint8)  # (2, 3): the pixels every mask below marks


@pytest.mark.parametrize(
    "mode, arr",
    [("I", np.where(DEFECT, np.array([[0, 70000, 0], [0, 0, -5]]), 0).astype(np.int32)),
     ("F", np.where(DEFECT, np.array([[0, 1e-9, 0], [0, 0, -0.5]]), 0).astype(np.float32)),
     ("I;16", (DEFECT * np.array([[0, 1, 0], [0, 0, 65535]])).astype(np.uint16)),
     ("I;16B", (DEFECT * np.array([[0, 1, 0], [0, 0, 65535]])).astype(">u2"))],
)
def test_deep_masks_binarise_by_nonzero(tmp_path, mode, arr):
    p = _save(Image.fromarray(arr), tmp_path / "m.tif")
    assert Image.open(p).mode == mode
    np.testing.assert_array_equal(load_mask(p, (3, 2)), DEFECT)


def test_float_mask_with_nan_is_refused(tmp_path):
    p = _save(Image.fromarray(np.array([[0, np.nan, 1]], np.float32)), tmp_path / "nan.tif")
    with pytest.raises(DatasetError, match=r"nan\.tif.*NaN"):
        load_mask(p, (3, 1))


def _rgba(colour: np.ndarray, alpha: np.ndarray, mode="RGBA") -> Image.Image:
    return Image.fromarray(np.dstack([colour, alpha]).astype(np.uint8), mode=mode)


ZERO3 = np.zeros((2, 3, 3), np.uint8)
OPAQUE = np.full((2, 3), 255, np.uint8)


@pytest.mark.parametrize(
    "make, how",
    [
        # opaque mask, white defect: the alpha is uniform and says nothing
        (lambda: _rgba(DEFECT[..., None] * np.full(3, 255), OPAQUE), "alpha is uniform"),
        # the defect painted in alpha only, colour black everywhere
        (lambda: _rgba(ZERO3, DEFECT * 255), "alpha != 0 (colour is black"),
        # transparent white background, opaque red defect: transparent pixels are background
        (lambda: _rgba(np.where(DEFECT[..., None], [255, 0, 0], [255, 255, 255]), DEFECT * 255),
         "where alpha != 0"),
        (lambda: Image.fromarray(np.dstack([np.full((2, 3), 200), DEFECT * 128]).astype(np.uint8), mode="LA"),
         "where alpha != 0"),
        (lambda: Image.fromarray(np.dstack([np.zeros((2, 3)), DEFECT * 9]).astype(np.uint8), mode="LA"),
         "alpha != 0 (colour is black"),
    ],
)
def test_alpha_masks(tmp_path, make, how):
    p = _save(make(), tmp_path / "m.png")
    np.testing.assert_array_equal(load_mask(p, (3, 2)), DEFECT)
    assert how in binarise(Image.open(p))[1]


def test_alpha_masks_without_files():
    """Modes no image file carries: premultiplied alpha and the palette-with-alpha mode."""
    np.testing.assert_array_equal(binarise(_rgba(ZERO3, DEFECT * 255, mode="RGBa"))[0], DEFECT)
    pa = Image.fromarray(np.dstack([np.full((2, 3), 3), DEFECT * 255]).astype(np.uint8), mode="PA")
    np.testing.assert_array_equal(binarise(pa)[0], DEFECT)


@pytest.mark.parametrize(
    "mode, background, defect",
    [("RGBX", (0, 0, 0, 255), (0, 0, 9, 255)),   # X is padding, not colour
     ("YCbCr", (0, 128, 128), (255, 128, 128)),  # black has chroma 128
     ("LAB", (0, 30, 200), (255, 0, 0)),         # L = 0 is black whatever a, b
     ("HSV", (170, 255, 0), (0, 0, 255)),        # black is V = 0 whatever the hue
     ("CMYK", (0, 0, 0, 255), (0, 0, 0, 0))],    # full black ink vs no ink
)
def test_colour_space_masks_mark_what_is_not_black(mode, background, defect):
    arr = np.where(DEFECT[..., None], defect, background).astype(np.uint8)
    binary, _ = binarise(Image.fromarray(arr, mode=mode))
    np.testing.assert_array_equal(binary, DEFECT)


def test_empty_mask_of_an_anomalous_image_is_refused_unless_allowed(tmp_path):
    p = _mask(tmp_path / "empty.png", np.zeros((H, W), np.uint8))
    with pytest.raises(DatasetError, match=r"empty\.png of an anomalous image is empty \(mode 'L', "
                                           r"binarised as value != 0\).*data\.allow_empty_masks"):
        load_mask(p, (W, H))
    assert not load_mask(p, (W, H), allow_empty=True).any()
    # an opaque black RGBA mask is empty too (the uniform alpha is not a defect)
    q = _save(_rgba(np.zeros((H, W, 3)), np.full((H, W), 255)), tmp_path / "black.png")
    with pytest.raises(DatasetError, match=r"black\.png.*is empty.*alpha is uniform"):
        load_mask(q, (W, H))
    with pytest.raises(DatasetError, match=r"black\.png.*is empty"):
        mask_from_header(q)


def test_defect_vanishing_in_the_resize_is_not_an_error(tmp_path):
    """A 1-pixel defect that nearest-neighbour drops at S: the file is not empty, so load_mask keeps
    the paper's protocol and returns the empty (S, S) mask (extract logs it)."""
    arr = np.zeros((40, 40), np.uint8)
    arr[1, 1] = 255
    p = _mask(tmp_path / "tiny.png", arr, size=(40, 40))
    assert load_mask(p, (40, 40)).sum() == 1
    assert load_mask(p, (40, 40), resize_to=4).sum() == 0


# --------------------------------------------------------------------- labels without masks


def _labels_only(root: Path) -> Path:
    """A folder tree: category ``line`` has test/good and test/dent but no ground_truth/ at all;
    category ``press`` is a normal one with masks."""
    _img(root / "line/test/good/a.jpg")
    _img(root / "line/test/good/b.png", seed=1)
    _img(root / "line/test/dent/c.JPG", seed=2)
    _img(root / "line/test/dent/d.bmp", seed=3)
    _img(root / "press/test/good/000.png")
    _img(root / "press/test/crack/001.png")
    _mask(root / "press/ground_truth/crack/001_mask.png")
    return root


def test_folder_category_without_ground_truth_has_labels_but_no_masks(tmp_path):
    table = load_table("folder", _labels_only(tmp_path / "f"))
    line = [s for s in table if s.category == "line"]
    assert [(Path(s.relpath).name, s.label, s.defect, s.mask) for s in line] == [
        ("c.JPG", 1, "dent", None), ("d.bmp", 1, "dent", None), ("a.jpg", 0, "good", None), ("b.png", 0, "good", None)]
    press = [s for s in table if s.category == "press" and s.label]
    assert [s.mask.name for s in press] == ["001_mask.png"]  # the other category keeps its masks
    assert categories_without_masks(table) == ["line"]
    summary = summarize(table)
    assert summary["categories_without_masks"] == ["line"]
    assert summary["per_category"]["line"]["masks"] is False and summary["per_category"]["press"]["masks"] is True
    assert summary["per_category"]["line"]["n_anomalous"] == 2


def test_labels_without_masks_is_all_or_nothing_per_category(tmp_path):
    """ground_truth/ present but a mask (or a defect's folder) missing is still an error."""
    root = _labels_only(tmp_path / "f")
    (root / "line/ground_truth/dent").mkdir(parents=True)
    _mask(root / "line/ground_truth/dent/c_mask.png")
    with pytest.raises(DatasetError, match=r"anomalous image .*d\.bmp has no mask; expected .*dent/d_mask\.<ext>"):
        load_table("folder", root)
    (root / "line/ground_truth/dent/c_mask.png").unlink()
    (root / "line/ground_truth/dent").rmdir()  # an empty ground_truth/ still says "masks exist"
    with pytest.raises(DatasetError, match=r"c\.JPG has no mask"):
        load_table("folder", root)


def test_mvtec_format_still_requires_masks_and_says_where_labels_only_go(tmp_path):
    root = tmp_path / "m"
    _img(root / "c/test/good/000.png")
    _img(root / "c/test/dent/001.png")
    with pytest.raises(DatasetError, match=r"001\.png has no mask; .*a set with labels but no masks takes "
                                           r"format folder, without a ground_truth/ folder$"):
        load_table("mvtec", root)


@pytest.mark.parametrize("layout", ["flat", "one_folder", "split"])
def test_a_set_without_labels_points_at_predict(tmp_path, layout):
    root = tmp_path / "photos"
    where = {"flat": root, "one_folder": root / "line7", "split": root / "line7/test"}[layout]
    _img(where / "IMG_0001.jpg")
    _img(where / "IMG_0002.png", seed=1)
    for fmt in ("folder", "mvtec"):
        with pytest.raises(DatasetError) as err:
            load_table(fmt, root)
        msg = str(err.value)
        assert "without labels" in msg or "no labels" in msg, msg
        assert "python -m pipeline.predict --detector models/<aux>/detector" in msg and "\n" not in msg


def test_a_folder_without_images_keeps_its_old_message(tmp_path):
    (tmp_path / "r/notes").mkdir(parents=True)
    (tmp_path / "r/notes/readme.txt").write_text("x")
    with pytest.raises(DatasetError) as err:
        load_table("folder", tmp_path / "r")
    assert "predict" not in str(err.value) and str(err.value).startswith("no category folders found")


def test_train_good_takes_each_categorys_train_images_and_names_those_without(tmp_path):
    from pipeline.data.tables import NO_TRAIN, train_good

    root = _mvtec(tmp_path / "m")
    samples, missing = train_good("mvtec", root)
    assert [s.relpath for s in samples] == ["bottle/train/good/000.png", "bottle/train/good/001.png",
                                            "zipper/train/good/000.png", "zipper/train/good/001.png"]
    assert all(s.label == 0 and s.split == "train" and s.mask is None for s in samples) and missing == {}
    # a category without train/ is a fallback, not an error; an empty train/good/ likewise
    import shutil

    shutil.rmtree(root / "zipper/train")
    for p in (root / "bottle/train/good").iterdir():
        p.unlink()
    assert train_good("mvtec", root) == ([], {"bottle": NO_TRAIN, "zipper": NO_TRAIN})
    assert train_good("mvtec", root, categories=["bottle"]) == ([], {"bottle": NO_TRAIN})
    # a train split holding a defect folder stays the error load_table raises
    _img(root / "bottle/train/crack/000.png")
    with pytest.raises(DatasetError, match="the train split holds only normal images"):
        train_good("mvtec", root)
