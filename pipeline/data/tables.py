"""Sample tables for the supported dataset layouts, and image / mask loading.

Every layout is turned into one flat, sorted list of :class:`Sample` rows, so later stages never
care where a dataset came from. Three formats are understood (docs/design.md#datasets):

``mvtec``
    ``<root>/<category>/train/good/*.png``, ``<root>/<category>/test/<defect>/*.png`` and, for every
    image of a defect other than ``good``, ``<root>/<category>/ground_truth/<defect>/<stem>_mask.png``.
``visa``
    ``<root>/split_csv/1cls.csv`` with the header ``object,split,label,image,mask``; ``label`` is
    ``normal`` or ``anomaly``; ``image`` and ``mask`` are paths relative to ``<root>``. VisA has no
    defect types, so anomalous rows get the defect ``anomaly``. Masks are multi-valued (one value per
    defect instance); a pixel is anomalous where the mask is ``!= 0``.
``folder``
    Any MVTec-like tree (MPDD, BTAD, a user's own line): the same layout as ``mvtec``, but images may
    be ``.png .jpg .jpeg .bmp .tif .tiff`` and masks are ``ground_truth/<defect>/<stem>_mask.<ext>``
    or ``ground_truth/<defect>/<stem>.<ext>`` (BTAD). Normal folders are named ``good`` or ``ok``
    (BTAD); both are reported as the defect ``good``.

    **Labels without masks.** A category with no ``ground_truth/`` folder at all (a line's photos sorted
    into ``test/good`` and ``test/<defect>`` folders, nobody drew masks) is accepted: its anomalous
    images are labelled 1 and get no mask (``Sample.mask`` is ``None``), so image metrics are computed
    and pixel metrics are ``null``. The rule is per category and all or nothing: once
    ``<category>/ground_truth/`` exists (even empty), every anomalous image of that category needs its
    mask, exactly as before. :func:`categories_without_masks` names such categories; the feature store
    records them (attr ``categories_without_masks``) because their all-zero masks do not mean "no
    defect". The ``mvtec`` format always requires masks.

A set with no labels at all (a flat folder of photos, or a split folder holding images instead of
``good`` and ``<defect>`` folders) is refused with a message pointing at ``python -m pipeline.predict``,
which scores unlabelled images.

Extensions are matched case-insensitively everywhere (``000.JPG``). Operating-system litter is ignored in
every folder listing of every format: names starting with a dot (``.DS_Store``, macOS ``._*`` resource
forks, ``.gitignore``) and :data:`LITTER` (``Thumbs.db``, ``ehthumbs.db``, ``desktop.ini``, any case).
Anything else that does not fit the layout is an error (:class:`DatasetError`, naming the file and the
convention expected). Nothing is skipped silently.

Category names (MVTec / folder category folders, the VisA ``object`` column, ``categories`` in params)
become file names of reports, so :func:`category_name_problem` refuses any that is empty, ``.`` or
``..``, starts with a dot, or holds a path separator (``/``, ``\\``) or a control character.
Image and mask files are read through :mod:`pipeline.data.images`.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence


from pipeline.config import category_name_problem
from pipeline.data.images import (IMAGE_EXTENSIONS, DatasetError, check_pair, header_size, visible)

log = logging.getLogger(__name__)

FORMATS = ("mvtec", "visa", "folder")
"""The dataset layouts :func:`load_table` understands."""

SPLITS = ("train", "test")
"""The splits a sample can belong to."""


_TREE_EXTENSIONS = {"mvtec": (".png",), "folder": IMAGE_EXTENSIONS}
_NORMAL_DIRS = {"mvtec": ("good",), "folder": ("good", "ok")}

VISA_CSV = PurePosixPath("split_csv/1cls.csv")
"""Where the VisA table lives, relative to the dataset root."""
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_LABELS = {"normal": 0, "anomaly": 1}
VISA_DEFECT = "anomaly"
"""Defect name given to anomalous VisA samples (the CSV has no defect types)."""


PREDICT_HINT = ("to score unlabelled images use `python -m pipeline.predict --detector models/<aux>/detector "
                "IMAGES... --out predictions/<name>`")
"""Quoted in the errors for a set with no labels (it belongs to predict, not to the DAG)."""

LAYOUTS = {
    "mvtec": (
        "mvtec layout: <root>/<category>/train/good/*.png, <root>/<category>/test/<defect>/*.png, "
        "masks at <root>/<category>/ground_truth/<defect>/<stem>_mask.png"
    ),
    "folder": (
        "folder layout: <root>/<category>/train/{good|ok}/*, <root>/<category>/test/<defect>/* "
        f"(extensions {' '.join(IMAGE_EXTENSIONS)}, any case), masks at "
        "<root>/<category>/ground_truth/<defect>/<stem>_mask.<ext> or <stem>.<ext>"
    ),
    "visa": (
        f"visa layout: <root>/{VISA_CSV} with header {','.join(VISA_COLUMNS)}, label normal|anomaly, "
        "image and mask paths relative to <root>"
    ),
}
"""One-line description of each layout, quoted in error messages."""

@dataclass(frozen=True)
class Sample:
    """One image of a dataset table."""

    image: Path
    """Absolute path of the image."""
    mask: Path | None
    """Absolute path of the mask; ``None`` for normal images (their mask is all zeros) and for the
    anomalous images of a ``folder`` category without ``ground_truth/`` (labels only: the mask is
    unknown, not empty; see :func:`categories_without_masks`)."""
    label: int
    """0 normal, 1 anomalous."""
    category: str
    """Object / texture category (MVTec ``bottle``, VisA ``candle``, ...)."""
    defect: str
    """Defect type; ``good`` for normal images, ``anomaly`` for VisA anomalies."""
    split: str
    """``train`` or ``test``."""
    relpath: str
    """Image path relative to the dataset root, POSIX style (stored in the feature store's attrs)."""


def _check_category(name: str, where: str) -> None:
    problem = category_name_problem(name)
    if problem is not None:
        raise DatasetError(
            f"{where}: category name {problem}; a category must be a plain file name "
            "(no / or \\, not . or .., not starting with '.', no control characters)"
        )


def categories_without_masks(samples: Iterable[Sample]) -> list[str]:
    """Sorted categories holding an anomalous sample without a mask file (labels only).

    The rule of the ``folder`` format makes this all or nothing per category, so such a category's
    stored masks (all zero) say nothing about where its defects are: pixel metrics are undefined there,
    and it cannot serve to fit guides.
    """
    return sorted({s.category for s in samples if s.label and s.mask is None})


def _sort_key(s: Sample) -> tuple[str, str, str, str]:
    return (s.category, s.split, s.defect, s.relpath)


# ---------------------------------------------------------------------------------------------------
# Public API


def load_table(
    fmt: str,
    root: Path,
    *,
    splits: Sequence[str] = ("test",),
    categories: Sequence[str] | None = None,
    max_pixels: int = 50_000_000,
) -> list[Sample]:
    """Read a dataset tree into a list of samples.

    Args:
        fmt: one of :data:`FORMATS`.
        root: dataset root folder (made absolute; symlinks inside it, such as DVC's, are not followed
            so ``relpath`` stays relative to ``root``).
        splits: which splits to include, a subset of :data:`SPLITS`.
        categories: restrict to these categories; ``None`` means every category found. Requesting a
            category the dataset does not have is an error.
        max_pixels: refuse any image (or mask) whose header says it has more pixels than this
            (``data.max_pixels``).

    Returns:
        Samples in a deterministic order: sorted by ``(category, split, defect, relpath)``.

    Raises:
        DatasetError: the root is missing, the format unknown, no image is found, an anomalous image
            has no mask, a mask has no image, a mask's size differs from its image's, an image header
            is unreadable or over ``max_pixels``, a VisA CSV is malformed or points outside the root,
            or a requested category does not exist.
    """
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r} for {root}; expected one of {', '.join(FORMATS)}")
    root = Path(os.path.abspath(Path(root).expanduser()))
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise DatasetError(f"dataset root {root} {what}; expected the {LAYOUTS[fmt]}")
    splits = tuple(splits)
    if not splits:
        raise DatasetError(f"{root}: no split requested; expected some of {', '.join(SPLITS)}")
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise DatasetError(f"{root}: unknown split(s) {bad}; expected some of {', '.join(SPLITS)}")
    if categories is not None:
        categories = tuple(categories)
        if not categories:
            raise DatasetError(f"{root}: the category list is empty; use null/None for every category")
    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise DatasetError(f"data.max_pixels must be a positive integer, got {max_pixels!r}")

    if fmt == "visa":
        samples = _visa_table(root, splits, categories, max_pixels)
    else:
        samples = _tree_table(fmt, root, splits, categories, max_pixels)
    if not samples:
        raise DatasetError(
            f"no images found under {root} for splits {list(splits)}; expected the {LAYOUTS[fmt]}"
        )
    samples.sort(key=_sort_key)
    return samples



NO_TRAIN = "no train/good images: the reference is drawn from test/good"
"""The reason :func:`train_good` gives for a category without a train split."""


def train_good(fmt: str, root: Path, *, categories: Sequence[str] | None = None,
               max_pixels: int = 50_000_000) -> tuple[list[Sample], dict[str, str]]:
    """The known-good images of the train split, where the dataset has one: (samples sorted as
    :func:`load_table` sorts them, {category: reason} for each category without any). A category
    whose format has a train split but whose folder lacks it is not an error here, unlike
    :func:`load_table`: few-shot draws fall back to its test/good images."""
    root = Path(os.path.abspath(Path(root).expanduser()))
    tested = {s.category for s in load_table(fmt, root, splits=("test",), categories=categories,
                                              max_pixels=max_pixels)}
    samples: list[Sample] = []
    for category in sorted(tested):
        has_split = fmt == "visa" or (root / category / "train").is_dir()
        found: list[Sample] = []
        if has_split:
            try:
                found = load_table(fmt, root, splits=("train",), categories=(category,), max_pixels=max_pixels)
            except DatasetError as err:
                if "no images found" not in str(err):
                    raise  # a malformed train split (a defect folder, an unreadable image) stays an error
        samples += found
    missing = {c: NO_TRAIN for c in sorted(tested) if not any(s.category == c for s in samples)}
    return samples, missing


def summarize(samples: Iterable[Sample]) -> dict:
    """Count samples for a ``check`` command.

    Returns a JSON-ready dict::

        {"n_images": N, "n_normal": ..., "n_anomalous": ..., "categories": [...],
         "categories_without_masks": [...],
         "per_category": {category: {"n_images": ..., "n_normal": ..., "n_anomalous": ...,
                                     "masks": true | false,
                                     "splits": {split: {defect: count}}}}}

    with every mapping sorted by key; ``masks`` is false for a category whose anomalous images have
    labels but no masks (:func:`categories_without_masks`).
    """
    samples = list(samples)
    per: dict[str, dict] = {}
    counts: dict[str, Counter] = defaultdict(Counter)
    splits: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for s in samples:
        counts[s.category]["n_images"] += 1
        counts[s.category]["n_anomalous" if s.label else "n_normal"] += 1
        splits[s.category][s.split][s.defect] += 1
    no_masks = categories_without_masks(samples)
    for cat in sorted(counts):
        per[cat] = {
            "n_images": counts[cat]["n_images"],
            "n_normal": counts[cat]["n_normal"],
            "n_anomalous": counts[cat]["n_anomalous"],
            "masks": cat not in no_masks,
            "splits": {
                sp: {d: n for d, n in sorted(splits[cat][sp].items())} for sp in sorted(splits[cat])
            },
        }
    n_anom = sum(1 for s in samples if s.label)
    return {
        "n_images": len(samples),
        "n_normal": len(samples) - n_anom,
        "n_anomalous": n_anom,
        "categories": sorted(per),
        "categories_without_masks": no_masks,
        "per_category": per,
    }





def _tree_categories(fmt: str, root: Path) -> list[str]:
    cats = []
    for p in visible(root.iterdir()):
        if not p.is_dir():
            continue  # licence and readme files sit next to the categories in MVTec AD
        if any((p / sub).is_dir() for sub in ("train", "test", "ground_truth")):
            _check_category(p.name, f"category folder {p}")
            cats.append(p.name)
        else:
            log.warning("%s: not a category (no train/, test/ or ground_truth/ inside); ignored", p)
    if not cats:
        extra = ""
        if any((root / sub).is_dir() for sub in ("train", "test")):
            extra = f" ({root} itself looks like one category: pass its parent folder as the root)"
        elif _holds_images(root):
            extra = (f" ({root} holds images without labels (no <category>/test/good or <category>/test/<defect> "
                     f"folders); {PREDICT_HINT})")
        raise DatasetError(f"no category folders found in {root}{extra}; expected the {LAYOUTS[fmt]}")
    return cats


def _holds_images(folder: Path) -> bool:
    """True when an image file (:data:`IMAGE_EXTENSIONS`) lies anywhere under ``folder``."""
    return any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in folder.rglob("*"))


def _list_images(fmt: str, folder: Path) -> list[Path]:
    exts = _TREE_EXTENSIONS[fmt]
    images = []
    for p in visible(folder.iterdir()):
        if p.is_dir():
            raise DatasetError(
                f"unexpected folder {p}; expected only images ({' '.join(exts)}) in the {LAYOUTS[fmt]}"
            )
        if p.suffix.lower() not in exts:
            hint = " (use format 'folder' for other image types)" if fmt == "mvtec" else ""
            raise DatasetError(
                f"unexpected file {p}: extension is not one of {' '.join(exts)}{hint}; "
                f"expected the {LAYOUTS[fmt]}"
            )
        images.append(p)
    stems = Counter(p.stem for p in images)
    dup = sorted(s for s, n in stems.items() if n > 1)
    if dup:
        names = sorted(p.name for p in images if p.stem == dup[0])
        raise DatasetError(
            f"{folder}: several images share the stem {dup[0]!r} ({', '.join(names)}); "
            "stems must be unique so each image has one mask"
        )
    return images


def _mask_index(fmt: str, gt_dir: Path) -> dict[str, Path]:
    """Files of one ``ground_truth/<defect>`` folder, keyed by file name stem."""
    exts = _TREE_EXTENSIONS[fmt]
    out: dict[str, Path] = {}
    for p in visible(gt_dir.iterdir()):
        if p.is_dir():
            raise DatasetError(f"unexpected folder {p}; expected only mask files in the {LAYOUTS[fmt]}")
        if p.suffix.lower() not in exts or (fmt == "mvtec" and not p.stem.endswith("_mask")):
            raise DatasetError(f"unexpected file {p}: not a mask name; expected the {LAYOUTS[fmt]}")
        if p.stem in out:
            raise DatasetError(
                f"{gt_dir}: several masks share the stem {p.stem!r} ({out[p.stem].name}, {p.name}); "
                "expected one mask per image"
            )
        out[p.stem] = p
    return out


def _find_mask(fmt: str, image: Path, gt_dir: Path, index: dict[str, Path]) -> Path:
    """The mask of anomalous ``image`` in ``gt_dir`` (whose files ``index`` lists by stem), or a
    DatasetError naming the names expected."""
    stem = image.stem
    keys = [f"{stem}_mask"] if fmt == "mvtec" else [f"{stem}_mask", stem]
    found = [index[k] for k in keys if k in index]
    if len(found) > 1:
        raise DatasetError(
            f"image {image} has two candidate masks ({found[0].name}, {found[1].name}) in {gt_dir}; keep one"
        )
    if not found:
        if fmt == "mvtec":
            expected = str(gt_dir / f"{stem}_mask.png")
        else:
            expected = f"{gt_dir / stem}_mask.<ext> or {gt_dir / stem}.<ext>"
        hint = ""
        if fmt == "mvtec" and not os.path.lexists(gt_dir.parent):
            hint = "; a set with labels but no masks takes format folder, without a ground_truth/ folder"
        raise DatasetError(f"anomalous image {image} has no mask; expected {expected} ({LAYOUTS[fmt]}){hint}")
    return found[0]


def _tree_table(
    fmt: str, root: Path, splits: tuple[str, ...], categories: tuple[str, ...] | None, max_pixels: int
) -> list[Sample]:
    available = _tree_categories(fmt, root)
    if categories is not None:
        unknown = [c for c in categories if c not in available]
        if unknown:
            raise DatasetError(
                f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown} requested under {root}; "
                f"available: {', '.join(available)}"
            )
        available = [c for c in available if c in categories]
    normal_dirs = _NORMAL_DIRS[fmt]
    samples: list[Sample] = []
    for cat in available:
        cat_dir = root / cat
        gt_root = cat_dir / "ground_truth"
        # labels only (see the module docstring): lexists, so a dangling link (a DVC-tracked
        # ground_truth/ not pulled) is not taken for "no masks" and fails on the first mask instead
        labels_only = fmt == "folder" and not os.path.lexists(gt_root)
        claimed: set[Path] = set()
        test_defects: set[str] = set()
        for split in splits:
            split_dir = cat_dir / split
            if not split_dir.is_dir():
                raise DatasetError(
                    f"missing folder {split_dir} (split {split!r} requested); expected the {LAYOUTS[fmt]}"
                )
            n_before = len(samples)
            entries = visible(split_dir.iterdir())
            if entries and not any(p.is_dir() for p in entries) and _holds_images(split_dir):
                raise DatasetError(
                    f"{split_dir} holds images but no {' or '.join(normal_dirs)} and <defect> folders: they have "
                    f"no labels. A dataset needs {split_dir}/{normal_dirs[0]}/ and {split_dir}/<defect>/ "
                    f"({LAYOUTS[fmt]}); {PREDICT_HINT}"
                )
            for defect_dir in entries:
                if not defect_dir.is_dir():
                    raise DatasetError(
                        f"unexpected file {defect_dir}: images belong in {split_dir}/<defect>/; "
                        f"expected the {LAYOUTS[fmt]}"
                    )
                normal = defect_dir.name in normal_dirs
                if split == "train" and not normal:
                    raise DatasetError(
                        f"unexpected folder {defect_dir}: the train split holds only normal images "
                        f"({' or '.join(f'train/{d}' for d in normal_dirs)}); expected the {LAYOUTS[fmt]}"
                    )
                defect = "good" if normal else defect_dir.name
                if split == "test" and not normal:
                    test_defects.add(defect_dir.name)
                gt_dir = gt_root / defect_dir.name
                index = _mask_index(fmt, gt_dir) if not normal and gt_dir.is_dir() else {}
                for image in _list_images(fmt, defect_dir):
                    mask = None
                    if normal or labels_only:
                        header_size(image, max_pixels)
                    else:
                        mask = _find_mask(fmt, image, gt_dir, index)
                        claimed.add(mask)
                        check_pair(image, mask, max_pixels)
                    samples.append(
                        Sample(
                            image=image,
                            mask=mask,
                            label=0 if normal else 1,
                            category=cat,
                            defect=defect,
                            split=split,
                            relpath=image.relative_to(root).as_posix(),
                        )
                    )
            if len(samples) == n_before:
                raise DatasetError(f"no images found in {split_dir}; expected the {LAYOUTS[fmt]}")
        if "test" in splits and gt_root.is_dir():
            _check_ground_truth(fmt, gt_root, test_defects, claimed)
    return samples


def _check_ground_truth(fmt: str, gt_root: Path, test_defects: set[str], claimed: set[Path]) -> None:
    """Every file under ``ground_truth/`` must be the mask of a test image (no orphans)."""
    normal_dirs = _NORMAL_DIRS[fmt]
    orphans: list[Path] = []
    for d in visible(gt_root.iterdir()):
        if not d.is_dir():
            raise DatasetError(
                f"unexpected file {d}: masks belong in {gt_root}/<defect>/; expected the {LAYOUTS[fmt]}"
            )
        if d.name in normal_dirs:
            raise DatasetError(
                f"unexpected folder {d}: normal images take no mask (their mask is all zeros); "
                f"remove it. Expected the {LAYOUTS[fmt]}"
            )
        if d.name in test_defects:
            index = _mask_index(fmt, d)
            orphans += [p for p in index.values() if p not in claimed]
        else:
            orphans += visible(d.iterdir())
    if orphans:
        shown = ", ".join(str(p) for p in orphans[:5])
        if len(orphans) > 5:
            shown += f" and {len(orphans) - 5} more"
        raise DatasetError(
            f"{len(orphans)} orphan mask(s) without a test image: {shown}; each mask "
            f"ground_truth/<defect>/<stem>_mask.<ext> needs test/<defect>/<stem>.<ext> ({LAYOUTS[fmt]})"
        )


# ---------------------------------------------------------------------------------------------------
# VisA (split_csv/1cls.csv)


def _safe_relpath(value: str, csv_path: Path, line: int, column: str) -> str:
    """Normalise a CSV path to POSIX and refuse anything that could leave the dataset root.

    The check is lexical on purpose: files inside the root may be symlinks into a DVC cache, so
    resolving them would wrongly look like an escape.
    """
    text = value.replace("\\", "/")
    p = PurePosixPath(text)
    drive = len(text) >= 2 and text[1] == ":"
    if p.is_absolute() or drive or ".." in p.parts or not p.parts:
        raise DatasetError(
            f"{csv_path}, line {line}: {column} path {value!r} is absolute or escapes the dataset root; "
            "expected a path relative to the root, without '..'"
        )
    return PurePosixPath(*[part for part in p.parts if part != "."]).as_posix()


def _visa_table(
    root: Path, splits: tuple[str, ...], categories: tuple[str, ...] | None, max_pixels: int
) -> list[Sample]:
    csv_path = root / VISA_CSV
    if not csv_path.is_file():
        raise DatasetError(f"missing {csv_path}; expected the {LAYOUTS['visa']}")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in VISA_COLUMNS if c not in header]
        if missing:
            raise DatasetError(
                f"{csv_path}: missing column(s) {missing} (header {header}); expected the {LAYOUTS['visa']}"
            )
        reader.fieldnames = header
        rows = []
        for row in reader:
            line = reader.line_num
            if None in row:
                raise DatasetError(
                    f"{csv_path}, line {line}: more fields than the header {header} "
                    "(quote paths that contain commas)"
                )
            values = {k: (v or "").strip() for k, v in row.items()}
            if values["object"]:  # empty is reported below with the layout
                _check_category(values["object"], f"{csv_path}, line {line}: object column")
            rows.append((line, values))

    available = sorted({r["object"] for _, r in rows})
    if categories is not None:
        unknown = [c for c in categories if c not in available]
        if unknown:
            raise DatasetError(
                f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown} requested in {csv_path}; "
                f"available: {', '.join(available)}"
            )
    wanted = set(categories) if categories is not None else set(available)

    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for line, r in rows:
        where = f"{csv_path}, line {line}"
        if not r["object"]:
            raise DatasetError(f"{where}: empty object (category); expected the {LAYOUTS['visa']}")
        if r["split"] not in SPLITS:
            raise DatasetError(f"{where}: unknown split {r['split']!r}; expected one of {', '.join(SPLITS)}")
        if r["label"] not in VISA_LABELS:
            raise DatasetError(
                f"{where}: unknown label {r['label']!r}; expected one of {', '.join(VISA_LABELS)}"
            )
        if r["split"] not in splits or r["object"] not in wanted:
            continue
        if not r["image"]:
            raise DatasetError(f"{where}: empty image path; expected the {LAYOUTS['visa']}")
        rel = _safe_relpath(r["image"], csv_path, line, "image")
        if rel in seen:
            raise DatasetError(f"{where}: image {rel} is listed twice (first on line {seen[rel]})")
        seen[rel] = line
        image = root / rel
        if not image.is_file():
            raise DatasetError(f"{where}: image {image} does not exist; expected the {LAYOUTS['visa']}")
        label = VISA_LABELS[r["label"]]
        mask = None
        if label == 1:
            if not r["mask"]:
                raise DatasetError(
                    f"{where}: anomalous image {image} has no mask (empty mask column); "
                    "expected a mask path relative to the root"
                )
            mask = root / _safe_relpath(r["mask"], csv_path, line, "mask")
            if not mask.is_file():
                raise DatasetError(f"{where}: mask {mask} of image {image} does not exist")
            check_pair(image, mask, max_pixels)
        else:
            if r["mask"]:
                raise DatasetError(
                    f"{where}: normal image {image} has a mask {r['mask']!r}; "
                    "normal rows must leave the mask column empty"
                )
            header_size(image, max_pixels)
        samples.append(
            Sample(
                image=image,
                mask=mask,
                label=label,
                category=r["object"],
                defect=VISA_DEFECT if label else "good",
                split=r["split"],
                relpath=rel,
            )
        )
    present = {(s.category, s.split) for s in samples}
    for cat in sorted(wanted):
        for split in splits:
            if (cat, split) not in present:
                raise DatasetError(f"{csv_path}: no rows for object {cat!r} in split {split!r}")
    return samples
