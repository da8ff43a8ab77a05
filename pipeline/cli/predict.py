"""Score your own images with an exported detector: anomaly maps, scores and pass/fail decisions.

    python -m pipeline.predict --detector models/synth_a/detector IMAGES... --out predictions/<name>
        [--threshold X | --threshold-from-normals DIR [--far 0.01]]
        [--normals DIR | --batch] [--explain] [--batch-size 8] [--writers 4] [--device auto] [--seed S] [--weights FILE] [--max-pixels 50000000]

IMAGES are files, folders (searched recursively for the image extensions of
:data:`pipeline.data.tables.IMAGE_EXTENSIONS`, any case, skipping dot files, dot folders and OS litter such as
``Thumbs.db``) or glob patterns (expanded here, so quoting them works; ``**`` recurses). A pattern or
folder that yields no image is reported in the log and in ``summary.json`` (``unmatched``); a path that
does not exist and is not a pattern is an error, and so is an input set with no image at all. A file
named explicitly is always tried, whatever its extension. Anything under ``--out`` is never an input.

Each image is decoded by :func:`pipeline.data.tables.load_image`, turned upright by its EXIF orientation
tag (as image viewers show it), (any size; modes L, RGB, RGBA, 16-bit grey,
palette, ...; 32-bit ``I``/``F`` refused; more than ``--max-pixels`` pixels refused, and PIL's own
pixel cap does not apply; an animated GIF or multi-page TIFF on its first frame, named in the log and in
``summary.json``'s ``first_frame_only``) and scored by the
detector (:class:`pipeline.method.detector.Detector`: maps (B, S, S) in [0, 1] and image scores (B,)). An image
is **anomalous** when ``score >= threshold`` (the rule under which the F1-max threshold is defined,
:func:`pipeline.evaluation.metrics.f1_max`).

Writes into ``--out`` (each file whole or not at all, through a temp file and ``os.replace``):

- ``scores.csv``: ``path, score, decision, seconds, map, overlay, mask`` per scored image, in input order
  (``overlay`` and ``mask`` empty where none was written);
  ``seconds`` is the image's own decode and write time plus an equal share of its batch's scoring time.
- ``maps/<relative path>.png``: the map at the image's **original size** (the S x S map resized
  bilinearly), a 16-bit greyscale PNG whose pixel value v means the anomaly probability v / 65535
  (a detector exported with ``fusion: self_dissimilarity`` has ``map_range`` [0, 2]: v / 65535 · 2).
- ``overlays/<relative path>.jpg`` (flagged images; every image with ``--overlays all``): the image with
  the map over it as a colour layer (``jet``, fixed scale 0 to the map range's top, half transparent)
  and the outline, in white, of the pixels whose map value is ``>= threshold`` (a fused run, which
  decides on its distance signals alone: whose decision map value is). A picture for people,
  so JPEG (quality :data:`JPEG_QUALITY`) by default: twenty times cheaper to encode than a PNG of a
  photo; ``--overlay-format png`` writes ``.png`` files, exact to the pixel.
- ``skipped.csv``: ``path, input, reason`` for every file that could not be scored (truncated, not an
  image, a decompression bomb, a refused mode, a name that cannot be mirrored under ``--out``); the
  batch goes on without them. Always written (the header alone when nothing was skipped).
- ``masks/<relative path>.png`` (flagged images, when a pixel threshold applies: ``--pixel-threshold``
  or the detector's own, chosen on its auxiliary set for the guide map): 8-bit, 255 where the map at
  the original size is ``>= pixel threshold``, regions under ``--min-region-area`` pixels removed; and
  ``regions.csv``: ``path, region, area_px, x0, y0, x1, y1, peak, mean`` per connected (8-neighbour)
  defect region of each flagged image (:func:`regions_of`).
- ``explanations/<relative path>.json`` and ``.png`` (``--explain``, flagged images only): the SAE atoms
  that carry the guide score at the image's peak patch, each with its exact share of the logit there
  (:func:`pipeline.method.atoms.explain_image`), and a panel of those shares and where each atom acts.
- ``report.html``: a self-contained page of the scored images as cards sorted by score, with a
  threshold slider that re-decides them in the browser (:mod:`pipeline.evaluation.html_report`).
- ``summary.json`` (last): counts, the threshold and how it was chosen, timing, the map encoding and
  the detector's provenance (its ``detector.json``); ``complete`` true.

A run stopped while scoring (Ctrl-C, SIGTERM, a full disk, an error naming an image) still writes
``scores.csv``, with a row for each image whose files were all written, and ``summary.json`` with
``complete`` false and ``stopped`` saying why; Ctrl-C and SIGTERM exit with status 130, a full disk
is one line (exit 1). Maps of the batch in flight may be there without a row.

``<relative path>`` is the image's path relative to the deepest folder holding every input image, with
its own extension kept (``a/good/000.png`` -> ``maps/a/good/000.png.png``), so two images with one stem
(in two folders, or ``x.png`` beside ``x.jpg``) never share an output file. Files of an earlier run into
the same ``--out`` are overwritten when their names recur and otherwise left alone (``scores.csv`` lists
what this run wrote).

Threshold, in order of precedence: ``--threshold X``; ``--threshold-from-normals DIR`` (see
:func:`threshold_from_normals`: at most a fraction ``--far`` of the known-good images in DIR is flagged);
otherwise the detector's own (chosen on its auxiliary set, ``detector.json`` ``threshold``).

``--seed``: which guide seed's vectors score; the default (none) is the mean of every seed's map, as
:meth:`Detector.load` does.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, ImageOps
from scipy.ndimage import minimum_filter
from tqdm import tqdm

from pipeline.evaluation import html_report, report
from pipeline.data.images import IMAGE_EXTENSIONS, DatasetError, load_image
from pipeline.data.png import encode_png
from pipeline.data.images import visible
from pipeline.errors import NonFiniteError, PipelineError
from pipeline.files import atomic_write, write_bytes
from pipeline.method import tiles
from pipeline.method.tiles import map_at_size, map_top, resized, stitch_tiles, tile_origins  # noqa: F401 (predict's API)
from pipeline.method.thresholds import ThresholdError, batch_threshold, check_rate, threshold_from_normals

log = logging.getLogger("pipeline.cli.predict")

MAP_SCALE = 65535
"""A map PNG's pixel value v stands for the anomaly probability v / MAP_SCALE."""
SCORE_COLUMNS = ("path", "score", "decision", "seconds", "map", "overlay", "mask")
REGION_COLUMNS = ("path", "region", "area_px", "x0", "y0", "x1", "y1", "peak", "mean")
SKIPPED_COLUMNS = ("path", "input", "reason")
ANOMALOUS, NORMAL = "anomalous", "normal"
OVERLAY_CHOICES = ("flagged", "all")
"""``--overlays``: write an overlay for the flagged images only, or for every image."""
OVERLAY_ALPHA = 0.5
"""Weight of the colour layer in an overlay (the image keeps the rest)."""
OVERLAY_FORMATS = {"jpeg": ".jpg", "png": ".png"}
"""``--overlay-format`` -> the overlay files' suffix."""
JPEG_QUALITY = 90
"""libjpeg quality of the JPEG overlays (4:2:0 chroma, PIL's default at this quality)."""

class PredictError(PipelineError, ValueError):
    """The inputs of ``predict`` cannot be used (no image, a missing path, a bad threshold or rate)."""


# ---------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class InputSet:
    """The image files an argument list names, in order, without duplicates."""

    files: list[Path]
    """Image paths as found (absolute when the argument was), first occurrence kept."""
    unmatched: list[str] = field(default_factory=list)
    """Patterns and folders that yielded no image file."""
    inside_out: list[Path] = field(default_factory=list)
    """Files named one by one that lie inside the output folder: not scored, and never written over."""


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _inside(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        Path(os.path.realpath(path)).relative_to(folder)
        return True
    except ValueError:
        return False


def _walk(folder: Path, exclude: Path | None) -> Iterator[Path]:
    """Image files under ``folder``, recursively: a folder's files (sorted) before its subfolders' (sorted,
    depth first). Dot names, litter and ``exclude`` are skipped; a symlinked folder is followed once
    (a link loop is not walked twice)."""
    seen: set[str] = set()
    stack = [folder]
    while stack:
        current = stack.pop()
        real = os.path.realpath(current)
        if real in seen or _inside(current, exclude):
            continue
        seen.add(real)
        try:
            entries = visible(current.iterdir())
        except OSError as e:
            log.warning("%s: cannot list (%s); skipped", current, e)
            continue
        subfolders = []
        for p in entries:
            if p.is_dir():
                subfolders.append(p)
            elif _is_image_name(p):
                yield p
        stack.extend(reversed(subfolders))  # depth first, in sorted order


def collect_images(items: Sequence[str | Path], exclude: str | Path | None = None) -> InputSet:
    """Expand files, folders and glob patterns into the ordered list of image files.

    An existing path is taken as such (a file is kept whatever its extension; a folder is walked);
    otherwise an argument holding ``*``, ``?`` or ``[`` is a glob pattern (``recursive=True``), whose
    matched files are kept when they have an image extension and are not litter, and whose matched
    folders are walked. Files under ``exclude`` (the output folder) are never taken, not even when
    named one by one (a warning says so). Raises PredictError for an argument that neither exists nor is a pattern.
    """
    excluded = Path(os.path.realpath(exclude)) if exclude is not None else None
    files: list[Path] = []
    seen: set[str] = set()
    unmatched: list[str] = []
    inside_out: list[Path] = []

    def add(path: Path) -> None:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            files.append(path)

    for item in items:
        text = str(item)
        path = Path(text)
        if path.is_file():
            if _inside(path, excluded):  # named explicitly, still never an input: a run would overwrite it
                log.warning("%s lies inside --out %s, which holds predict's outputs: not scored", path, excluded)
                inside_out.append(path)
            else:
                add(path)
            continue
        if path.is_dir():
            found = list(_walk(path, excluded))
        elif _has_magic(text):
            found = []
            for match in sorted(glob.glob(text, recursive=True)):
                m = Path(match)
                if m.is_dir():
                    found += _walk(m, excluded)
                elif visible([m]) and _is_image_name(m) and not _inside(m, excluded):
                    found.append(m)
        else:
            raise PredictError(f"input {text} does not exist (not a file, a folder or a glob pattern)")
        if not found:
            unmatched.append(text)
            log.warning("%s: no image file (%s) matched", text, " ".join(IMAGE_EXTENSIONS))
        for p in found:
            add(p)
    return InputSet(files, unmatched, inside_out)


def relative_names(files: Sequence[Path]) -> list[tuple[str, ...]]:
    """Each file's path parts relative to the deepest folder holding all of them (its extension kept).

    ``[a/x/1.png, a/y/1.png]`` -> ``[(x, 1.png), (y, 1.png)]``; one file -> its name alone. The parts
    come from absolute, normalised paths, so none is ``..`` and two files never share a name.
    """
    if not files:
        return []
    absolute = [Path(os.path.abspath(p)) for p in files]
    root = Path(os.path.commonpath([str(p.parent) for p in absolute]))
    return [p.relative_to(root).parts for p in absolute]


def output_path(folder: Path, parts: Sequence[str], suffix: str = ".png") -> Path:
    """``folder/<parts...><suffix>``, each part checked by :func:`pipeline.evaluation.report.report_path` so that
    nothing is written outside ``folder`` (raises ReportError for a part holding a separator)."""
    path = Path(folder)
    for part in parts[:-1]:
        path = report.report_path(path, part)
    return report.report_path(path, parts[-1], suffix)


# ---------------------------------------------------------------------------------------------------
# Threshold


def decisions(scores: np.ndarray, threshold: float) -> list[str]:
    """scores (B,) -> ``anomalous`` where ``score >= threshold``, else ``normal``."""
    return [ANOMALOUS if v >= threshold else NORMAL for v in np.asarray(scores, dtype=np.float64)]


# ---------------------------------------------------------------------------------------------------
# Maps and overlays


def map_pixels(full: np.ndarray, top: float = 1.0) -> np.ndarray:
    """full (H, W) float in [0, top] -> (H, W) uint16, value round(v / top * 65535): a map PNG's pixels."""
    return np.rint(full * (MAP_SCALE / top)).astype(np.uint16)


_JET = None


def _jet_lut() -> np.ndarray:
    """(256, 3) uint8 colours of matplotlib's ``jet`` (one table lookup per pixel is cheap)."""
    global _JET
    if _JET is None:
        import matplotlib

        _JET = (matplotlib.colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)
    return _JET


def overlay(image: Image.Image, full: np.ndarray, threshold: float, top: float = 1.0,
            region: np.ndarray | None = None) -> Image.Image:
    """The RGB ``image`` (W, H) with ``full`` (H, W) in [0, top] as a ``jet`` layer (0 to top) and, in
    white, the outline (about 1/300 of the longer side thick, at least 1 pixel) of the region
    ``full >= threshold`` (threshold in map units, as the detector's image scores are), or of the
    boolean (H, W) ``region`` given."""
    # The colour layer through PIL (a palette image, then Image.blend) rather than numpy float arrays:
    # three times faster on a photo-sized image, within one level of the float blend (PIL rounds its
    # own way), and this is the costliest write predict makes per flagged image.
    index = np.rint(np.clip(full, 0.0, top) * (255 / top)).astype(np.uint8)
    colour = Image.frombytes("P", (index.shape[1], index.shape[0]), index.tobytes())
    colour.putpalette(_jet_lut().tobytes())
    out = np.array(Image.blend(image.convert("RGB"), colour.convert("RGB"), OVERLAY_ALPHA))
    region = full >= threshold if region is None else region
    if region.any():
        width = max(1, round(max(region.shape) / 300))
        # the region's inner band: pixels of the region within `width` of a pixel outside it, found in the
        # region's bounding box grown by `width` (outside it the filter would only see background)
        rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
        y0, y1 = max(int(rows[0]) - width, 0), min(int(rows[-1]) + width + 1, region.shape[0])
        x0, x1 = max(int(cols[0]) - width, 0), min(int(cols[-1]) + width + 1, region.shape[1])
        box = region[y0:y1, x0:x1]
        inner = minimum_filter(box.view(np.uint8), size=2 * width + 1, mode="nearest").astype(bool)
        out[y0:y1, x0:x1][box & ~inner] = 255
    return Image.fromarray(out)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    write_bytes(path, encode_png(pixels))


def _write_overlay(path: Path, image: Image.Image) -> None:
    if path.suffix == ".png":
        _write_png(path, np.asarray(image))
    else:
        atomic_write(path, lambda tmp: image.save(tmp, format="JPEG", quality=JPEG_QUALITY))


def regions_of(full: np.ndarray, pixel_threshold: float, min_area: int = 1) -> tuple[np.ndarray, list[dict]]:
    """A map at the image's size (H, W) -> (the defect mask (H, W) bool, its regions).

    Defect pixels are those with ``map >= pixel_threshold``; a region is a set of them connected
    through their 8 neighbours; regions of fewer than ``min_area`` pixels are dropped from both. Each
    region: ``area_px``, the bounding box ``x0, y0`` (first column, row) to ``x1, y1`` (exclusive),
    and the ``peak`` and ``mean`` map value over its pixels; numbered from 1 in raster order."""
    from scipy import ndimage

    labels, _ = ndimage.label(full >= pixel_threshold, structure=np.ones((3, 3), bool))
    keep = np.zeros(labels.max() + 1, bool)
    regions = []
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels[box] == k
        area = int(inside.sum())
        if area < min_area:
            continue
        keep[k] = True
        values = full[box][inside]
        regions.append({"region": len(regions) + 1, "area_px": area, "x0": box[1].start, "y0": box[0].start,
                        "x1": box[1].stop, "y1": box[0].stop, "peak": float(values.max()),
                        "mean": float(values.mean())})
    return keep[labels], regions


def _write_outputs(out: Path, parts: Sequence[str], image: Image.Image, amap: np.ndarray,
                   threshold: float, top: float = 1.0, *, pixel_threshold: float | None = None,
                   min_area: int = 1, low: float = 0.0, with_overlay: bool = True,
                   overlay_suffix: str = ".jpg",
                   outline: tuple[np.ndarray, float] | None = None) -> tuple[Path, Path | None, Path | None,
                                                                              list[dict], float]:
    """Write one image's map (16-bit, original size), its overlay (``overlay_suffix``: ``.jpg`` or
    ``.png``) when ``with_overlay`` and, given
    a ``pixel_threshold``, its defect mask PNG (8-bit, 255 = defect); (map file, overlay file or None,
    mask file or None, regions, seconds). ``amap`` and both thresholds are relative to ``low``; the
    regions' values are not. ``outline``: (a decision map (S, S), the image threshold in its units)
    when the image score is not read from ``amap`` (a fused run decides on its distances alone): the
    overlay outlines where that map is at or above the threshold."""
    t0 = time.perf_counter()
    full = map_at_size(amap, image.size, top)
    map_file, overlay_file = output_path(out / "maps", parts), None
    _write_png(map_file, map_pixels(full, top))
    if with_overlay:
        overlay_file = output_path(out / "overlays", parts, overlay_suffix)
        region = None if outline is None else resized(outline[0], image.size) >= outline[1]
        _write_overlay(overlay_file, overlay(image, full, threshold, top, region))
    mask_file, regions = None, []
    if pixel_threshold is not None:
        mask, regions = regions_of(full, pixel_threshold, min_area)
        for r in regions:
            r["peak"], r["mean"] = r["peak"] + low, r["mean"] + low
        mask_file = output_path(out / "masks", parts)
        _write_png(mask_file, mask.astype(np.uint8) * 255)
    return map_file, overlay_file, mask_file, regions, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class _Batch:
    paths: list[Path]
    names: list[tuple[str, ...]]
    images: list[Image.Image]
    decode_s: list[float]


def _batches(files: Sequence[Path], names: Sequence[tuple[str, ...]] | None, batch_size: int, max_pixels: int,
             skip, desc: str) -> Iterator[_Batch]:
    """Decoded images in batches of ``batch_size``; an undecodable file goes to ``skip(path, reason)``."""
    batch = _Batch([], [], [], [])
    for i, path in enumerate(tqdm(files, desc=desc, unit="image", dynamic_ncols=True)):
        t0 = time.perf_counter()
        try:
            # turned as the EXIF orientation says, as viewers show it: a phone photo is scored upright and
            # its map and overlay have the size it is displayed at
            image = ImageOps.exif_transpose(load_image(path, max_pixels, limit="--max-pixels"))
        except DatasetError as e:
            skip(path, str(e))
            continue
        batch.paths.append(path)
        batch.names.append(names[i] if names is not None else ())
        batch.images.append(image)
        batch.decode_s.append(time.perf_counter() - t0)
        if len(batch.images) == batch_size:
            yield batch
            batch = _Batch([], [], [], [])
    if batch.images:
        yield batch


def _score(detector, images: list[Image.Image], paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray, float]:
    """maps (B, S, S) float32, scores (B,) float64 and the seconds ``detector.predict`` took."""
    t0 = time.perf_counter()
    maps, scores = detector.predict(images)
    maps, scores = np.asarray(maps, dtype=np.float32), np.asarray(scores, dtype=np.float64)
    if maps.ndim != 3 or maps.shape[0] != len(images) or scores.shape != (len(images),):
        raise ValueError(f"detector returned maps {maps.shape} and scores {scores.shape} for {len(images)} images")
    bad = ~(np.isfinite(scores) & np.isfinite(maps).all(axis=(1, 2)))
    if bad.any():
        raise NonFiniteError(f"the detector's map or score of image {paths[int(np.argmax(bad))]} is not finite "
                             "(NaN or Inf); check the detector's vectors and the backbone weights")
    return maps, scores, time.perf_counter() - t0


def _score_tiled(detector, images: list[Image.Image], paths: Sequence[Path], tile: int):
    """As :func:`_score`, but every image larger than ``tile`` is scored as its overlapping tiles, their
    maps stitched at the image's own size and the image score taken on that map (``settings.image_score``).
    Maps are returned as a list (sizes differ); a tiled image's map is already at its size."""
    from pipeline.method import scoring

    t0 = time.perf_counter()
    maps: list[np.ndarray] = []
    scores = np.zeros(len(images), np.float64)
    top = map_top(detector)
    for i, (image, path) in enumerate(zip(images, paths)):
        if max(image.size) <= tile:
            m, sc, _ = _score(detector, [image], [path])
            maps.append(m[0])
            scores[i] = sc[0]
            continue
        stitched, _ = tiles.tiled_map(lambda crops: _score(detector, crops, [path] * len(crops))[0], image, tile, top)
        maps.append(stitched)
        scores[i] = float(scoring.score_images(stitched[None], None, detector.settings)[0])
    return maps, scores, time.perf_counter() - t0


def score_normals(files: Sequence[Path], detector, *, batch_size: int, max_pixels: int, skip) -> np.ndarray:
    """Image scores (n,) float64 of the decodable files among ``files`` (the others go to ``skip``)."""
    out = [_score(detector, b.images, b.paths)[1]
           for b in _batches(files, None, batch_size, max_pixels, skip, "normals")]
    return np.concatenate(out) if out else np.zeros(0)


def _csv_line(values: Sequence[Any]) -> str:
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerow(values)
    return buffer.getvalue()


@dataclass(frozen=True)
class Options:
    """How ``predict`` runs, checked once, before any image is decoded or the detector loaded."""

    batch_size: int = 8
    """Images decoded and scored together; memory holds at most two batches (one being scored, the
    one before it being written), whatever the count."""
    max_pixels: int = 50_000_000
    """Refuse (skip) images with more pixels than this."""
    threshold: float | None = None
    """Overrides the detector's threshold."""
    normals: tuple[str | Path, ...] | None = None
    """Known-good images (files, folders, patterns) to set the threshold from, at false-alarm rate
    ``far`` (:func:`threshold_from_normals`); not with ``threshold``."""
    far: float = 0.01
    """The false-alarm rate allowed on ``normals``, in [0, 1)."""
    writers: int = 4
    """Threads rendering and writing the PNGs while the next batch is decoded and scored."""
    reference_normals: tuple[str | Path, ...] | None = None
    """Known-good images of the line (files, folders, patterns) to score against (``--normals``):
    each patch's distance to its nearest patch of theirs is fused with the guide map, and the
    threshold is set on them (each scored against the others) at ``far``. Replaces a reference the
    detector carries."""
    batch: bool = False
    """Score the input images against each other too (``--batch``, the ``mutual`` signal) and fuse it."""
    max_patches: int | None = None
    """Subsample the ``reference_normals``' patches to this many (greedy coreset); None keeps all."""
    pixel_threshold: float | None = None
    """The map value at and above which a pixel of a flagged image is defect (``--pixel-threshold``);
    None: the detector's own (``pixel_threshold`` in detector.json, chosen on its auxiliary set), which
    applies to the guide map alone, so fused runs write masks only when one is given."""
    min_region_area: int = 1
    """Defect regions of fewer pixels (at the image's own size) are dropped from masks and regions.csv."""
    tile: int | None = None
    """Score images larger than this (pixels, either side) as overlapping ``tile`` x ``tile`` crops of
    the original at stride ``tile // 2``, stitched (:func:`pipeline.method.tiles.stitch_tiles`); None: the whole image resized."""
    overlays: str = "flagged"
    """Which images get an overlay: ``flagged`` (those decided anomalous; the default: rendering and
    compressing an RGB image the size of the photo is the largest write, and a line's images are mostly
    good) or ``all``. Every image gets its map either way."""
    overlay_format: str = "jpeg"
    """The overlays' file format, a key of :data:`OVERLAY_FORMATS`."""
    explain: bool = False
    """For every image flagged anomalous, the SAE atoms behind its guide score at its peak patch
    (:func:`explain_flagged`): ``explanations/<relative path>.json`` and ``.png``."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "writers", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PredictError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.threshold is not None and self.normals is not None:
            raise PredictError("give either --threshold or --threshold-from-normals, not both")
        if self.threshold is not None and not (isinstance(self.threshold, (int, float))
                                               and math.isfinite(self.threshold)):
            raise PredictError(f"--threshold must be a finite number, got {self.threshold!r}")
        try:
            check_rate(self.far)
        except ThresholdError as e:
            raise PredictError(str(e)) from None
        if self.pixel_threshold is not None and not (isinstance(self.pixel_threshold, (int, float))
                                                     and math.isfinite(self.pixel_threshold)):
            raise PredictError(f"--pixel-threshold must be a finite number, got {self.pixel_threshold!r}")
        if (isinstance(self.min_region_area, bool) or not isinstance(self.min_region_area, int)
                or self.min_region_area < 1):
            raise PredictError(f"--min-region-area must be a positive integer, got {self.min_region_area!r}")
        if self.overlays not in OVERLAY_CHOICES:
            raise PredictError(f"--overlays must be one of {', '.join(OVERLAY_CHOICES)}, got {self.overlays!r}")
        if self.overlay_format not in OVERLAY_FORMATS:
            raise PredictError(f"--overlay-format must be one of {', '.join(OVERLAY_FORMATS)}, got "
                               f"{self.overlay_format!r}")
        if self.tile is not None:
            try:
                tiles.check_tile(self.tile)
            except ValueError:
                raise PredictError(f"--tile must be an integer of at least 2 pixels, got {self.tile!r}") from None
        if self.tile is not None and (self.reference_normals is not None or self.batch):
            raise PredictError("--tile scores the guide map alone: it does not combine with --normals or --batch")
        if self.tile is not None and self.explain:
            raise PredictError("--explain decomposes the whole image's tokens; it does not combine with --tile")
        if self.max_patches is not None and (isinstance(self.max_patches, bool) or not isinstance(self.max_patches, int)
                                             or self.max_patches < 1):
            raise PredictError(f"--max-patches must be a positive integer, got {self.max_patches!r}")
        if self.normals is not None and self.reference_normals is not None:
            raise PredictError("give either --normals (known-good images scored against, which also set the "
                               "threshold) or --threshold-from-normals (a threshold only), not both")
        if self.normals is not None and self.batch:
            raise PredictError("--batch with --threshold-from-normals: give the known-good images as --normals "
                               "(they are then scored against and set the threshold), or a --threshold")
        for name in ("normals", "reference_normals"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple([value] if isinstance(value, (str, Path)) else value))


@dataclass
class _Tally:
    """What the batch loop counts: decisions, the score range and the time of each part."""

    counts: dict = field(default_factory=lambda: {ANOMALOUS: 0, NORMAL: 0})
    timing: dict = field(default_factory=lambda: {"decode_s": 0.0, "score_s": 0.0, "write_s": 0.0})
    score_min: float = math.inf
    score_max: float = -math.inf
    flagged: list = field(default_factory=list)
    """(path, name parts, score) of every image decided anomalous, in input order."""
    regions: list = field(default_factory=list)
    """regions.csv's rows (:data:`REGION_COLUMNS`) of the flagged images, in input order."""
    first_frame_only: dict = field(default_factory=dict)
    """path -> number of frames, for each scored file of several frames (only its first is scored)."""


@dataclass(frozen=True)
class MapEncoding:
    """How a map PNG's pixels read: map value = ``low`` + pixel / 65535 · ``span``."""

    low: float
    span: float
    value: str

    @classmethod
    def of_detector(cls, detector: Any) -> MapEncoding:
        """The guide map's: [0, 1] probabilities, [0, 2] with ``fusion: self_dissimilarity``."""
        top = map_top(detector)
        return cls(0.0, top, f"anomaly probability = pixel / {MAP_SCALE}" if top == 1 else
                   f"map value (guide probability x self-dissimilarity) = pixel / {MAP_SCALE} x {top:g}")

    @classmethod
    def of_range(cls, low: float, high: float) -> MapEncoding:
        """Fused maps (standardised signals, no fixed range): the range of the set's own maps."""
        span = max(high - low, 1e-12)
        return cls(low, span, f"fused map value = {low!r} + pixel / {MAP_SCALE} x {span!r} (the range of this "
                              "run's maps: fused values are relative to the set scored together)")


def reference_of(detector: Any, opts: Options, out: Path, skip):
    """The reference to score against: built from ``--normals`` (their patch tokens through the
    detector's backbone), else the one the detector carries, else None."""
    if opts.reference_normals is None:
        return getattr(detector, "reference", None)
    from pipeline.method.reference import Reference

    named = " ".join(map(str, opts.reference_normals))
    normal_set = collect_images(opts.reference_normals, exclude=out)
    if not normal_set.files:
        raise PredictError(f"--normals: no image in {named}; expected known-good images of the line")
    tokens, sources = [], []
    for b in _batches(normal_set.files, None, opts.batch_size, opts.max_pixels, skip, "normals"):
        tokens.append(detector.features(b.images)[0].cpu())
        sources.extend(str(p) for p in b.paths)
    if len(sources) < 2:
        raise PredictError(f"--normals: {len(sources)} decodable image(s) in {named}; at least 2 are needed (the "
                           "threshold is set by scoring each against the others)")
    import torch

    return Reference.build(torch.cat(tokens), max_patches=opts.max_patches, sources=sources,
                           device=getattr(detector, "device", "cpu"))


@dataclass
class Together:
    """The images scored as one set (reference and/or batch fused with the guides): their fused
    patch scores, threshold and map encoding, and a scorer for :func:`score_all`'s second pass."""

    planned: list[tuple[Path, tuple[str, ...]]]
    rows: dict[Path, int]
    patches: Any
    decided: Any
    """(N, L) the patch values the image scores come from (:func:`pipeline.method.fusion.decision`)."""
    scores: np.ndarray
    threshold: dict
    encoding: MapEncoding
    detector: Any
    names: list[str]
    image_score: str
    score_s: float

    def scorer(self, b) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
        """maps, scores, seconds, and the decision maps (the image scores' maps, in the threshold's units)."""
        from pipeline.method import scoring

        t0 = time.perf_counter()
        rows = [self.rows[p] for p in b.paths]
        maps, decided = (scoring.patch_maps(v[rows], self.detector.grid, self.detector.image_size,
                                            sigma=self.detector.settings.blur_sigma)
                         for v in (self.patches, self.decided))
        # the first pass's time is shared out as the second pass's scoring time
        return (maps, self.scores[rows], time.perf_counter() - t0 + self.score_s * len(rows) / len(self.rows),
                decided)

    def describe(self) -> dict:
        from pipeline.method import fusion

        return {"signals": self.names, "fusion": fusion.RULE, "decision": fusion.IMAGE_RULE,
                "fused_image_score": self.image_score}


@dataclass
class _Signals:
    """The first pass's patch signals (N, L) of the inputs, and of the references for the threshold."""

    kept: list
    guide: Any
    distances: list
    names: list[str]
    normal_guide: Any = None
    normal_parts: list | None = None


def collect_signals(planned, detector, reference, opts: Options, skip) -> _Signals:
    """First pass over the inputs: guide signals, reference distances, and (``--batch``) the tokens
    the mutual scores come from; the references' own signals, each against the others."""
    import torch

    from pipeline.method import neighbours

    kept, guide, ref, tokens = [], [], [], []
    for b in _batches([p for p, _ in planned], [n for _, n in planned], opts.batch_size, opts.max_pixels, skip,
                      "signals"):
        t, _ = detector.features(b.images)
        guide.append(detector.guide_signal(t))
        if reference is not None:
            ref.append(reference.distances(t, device=detector.device))
        if opts.batch:
            tokens.append(t.to(torch.float16).cpu())
        kept.extend(zip(b.paths, b.names))
    if not kept:
        raise PredictError("no input image could be decoded (see skipped.csv)")
    out = _Signals(kept, torch.cat(guide), [torch.cat(ref)] if reference is not None else [],
                   ["guides"] + (["reference"] if reference is not None else []))
    if reference is not None:
        out.normal_guide = detector.guide_signal(reference.tokens)
        out.normal_parts = [reference.leave_one_out(device=detector.device)]
    if opts.batch:
        n = len(kept)
        if n + (reference.n_images if reference is not None else 0) < 2:
            raise PredictError("--batch needs at least 2 images scored together")
        # the references join the batch: more known-good images to compare with (evaluate does the same)
        together = torch.cat(tokens + ([reference.tokens.to(torch.float16)] if reference is not None else []))
        mutual = torch.from_numpy(neighbours.mutual(lambda i, j: together[i:j].float(), len(together),
                                                    together.shape[1], device=detector.device))
        out.distances.append(mutual[:n])
        if reference is not None:
            out.normal_parts.append(mutual[n:])
        out.names.append("batch")
    return out


def score_together(planned, detector, reference, opts: Options, skip) -> Together:
    """:func:`collect_signals`, then the fusion (statistics of this set), image scores, and the
    threshold (override; the references, each against the others; else the batch rule)."""
    from pipeline.method import fusion, scoring

    t0 = time.perf_counter()
    sig = collect_signals(planned, detector, reference, opts, skip)
    kept, guide_all, distances, names = sig.kept, sig.guide, sig.distances, sig.names
    normal_guide, normal_parts = sig.normal_guide, sig.normal_parts
    probability = detector.settings.fusion == "none"
    stats = fusion.statistics(*fusion.parts(guide_all, *distances, probability=probability))
    patches = fusion.fuse(guide_all, *distances, probability=probability, stats=stats)
    # the decision comes from the distances alone (fusion.IMAGE_RULE); the map from every signal
    decided = fusion.decision(guide_all, *distances, probability=probability, stats=stats)
    image_score = detector.settings.image_score if detector.settings.image_score != "global" else "max"
    settings = detector.settings

    def image_scores(values) -> tuple[np.ndarray, float, float]:
        lo, hi, out = math.inf, -math.inf, []
        for i in range(0, len(values), opts.batch_size):
            maps = scoring.patch_maps(values[i:i + opts.batch_size], detector.grid, detector.image_size,
                                      sigma=settings.blur_sigma)
            out.append(scoring.scores_by_mode(maps, None, settings)[image_score])
            lo, hi = min(lo, float(maps.min())), max(hi, float(maps.max()))
        return np.concatenate(out).astype(np.float64), lo, hi

    scores = image_scores(decided)[0]
    _, lo, hi = image_scores(patches)
    if opts.threshold is not None:
        chosen = {"value": float(opts.threshold), "source": "override", "rule": "--threshold given on the command line"}
    elif reference is not None:
        normal_scores, _, _ = image_scores(fusion.decision(normal_guide, *normal_parts, probability=probability,
                                                           stats=stats))
        value, k = threshold_from_normals(normal_scores, opts.far)
        flagged = int((normal_scores >= value).sum())
        chosen = {"value": value, "source": "reference",
                  "rule": "threshold_from_normals at --far on the reference images' fused scores, each image scored "
                          "against the bank patches of the others and standardised with this run's statistics",
                  "far": opts.far, "n_normals": int(normal_scores.size), "k": k, "n_normals_flagged": flagged,
                  "normal_score_range": [float(normal_scores.min()), float(normal_scores.max())]}
    else:
        chosen = batch_threshold(scores)
    info = dict(reference.info) if reference is not None else None
    if info is not None:
        chosen["reference"] = {k: info[k] for k in ("n_images", "n_patches", "max_patches", "subsampling") if k in info}
    return Together(planned=kept, rows={p: i for i, (p, _) in enumerate(kept)}, patches=patches, decided=decided,
                    scores=scores,
                    threshold=chosen, encoding=MapEncoding.of_range(lo, hi), detector=detector, names=names,
                    image_score=image_score, score_s=time.perf_counter() - t0)


def predict_files(inputs: Sequence[str | Path] | str | Path, detector, out: str | Path,
                  options: Options | None = None, *, meta: Mapping[str, Any] | None = None, **settings) -> dict:
    """Score every image ``inputs`` name and write the outputs listed in the module docstring into ``out``.

    Args:
        inputs: files, folders and glob patterns (:func:`collect_images`).
        detector: a loaded :class:`pipeline.method.detector.Detector`, or any object with its ``predict(images)``
            (a list of B RGB PIL images -> maps (B, S, S) in [0, 1], scores (B,)), ``threshold``
            (float or None) and ``info`` (dict, copied into ``summary.json``).
        out: output folder (created).
        options: an :class:`Options`; or its fields as keywords (``batch_size=4, threshold=0.5, ...``).
        meta: extra entries for ``summary.json`` (the detector folder, its load time).

    Returns:
        The summary written to ``summary.json``.

    Raises:
        PredictError: a bad option (:class:`Options`), no image among ``inputs`` (or among ``normals``,
            or none of them decodable), an input that does not exist, or no threshold at all (the
            detector has none and none is given).
    """
    t_start = time.perf_counter()
    opts = options if options is not None else Options(**settings)
    out = Path(out)
    check_out(out)
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    found = collect_images(inputs, exclude=out)
    if not found.files and collect_images(inputs).files:
        raise PredictError(f"every image among {' '.join(map(str, inputs))} lies inside --out {out}, which is never "
                           "read as input (it holds this command's outputs): choose another --out")
    if not found.files:
        raise PredictError(f"no image to score in {' '.join(map(str, inputs)) or '(no input)'}: expected image files "
                           f"({' '.join(IMAGE_EXTENSIONS)}, any case), folders holding them, or glob patterns")
    if opts.explain and getattr(detector, "atoms", None) is None:
        raise PredictError("--explain: this detector carries no atoms (atoms.safetensors, written by the export "
                           "stage since explanations exist); re-export it: `dvc repro export@<aux>`")
    if opts.tile is not None and getattr(getattr(detector, "settings", None), "image_score", None) == "global":
        raise PredictError("--tile: this detector's image score is 'global' (the CLS token's), which has no "
                           "map to stitch; re-export it with another scoring.image_score")
    with OutputLock(out):  # marked as predict's and locked while this run writes into it
        skipped: list[tuple[str, str, str]] = []

        def skipper(role: str):
            def skip(path: Path, reason: str) -> None:
                log.warning("skipped %s: %s", path, reason)
                skipped.append((str(path), role, reason))
            return skip

        reference = reference_of(detector, opts, out, skipper("normals"))
        planned = plan_outputs(found.files, out, skipper("images"), keep=found.inside_out)
        if reference is None and not opts.batch:
            chosen = choose_threshold(detector, opts, out, skipper("normals"))
            if opts.tile is None:
                scorer, signals = (lambda b: _score(detector, b.images, b.paths)), None
            else:
                scorer, signals = (lambda b: _score_tiled(detector, b.images, b.paths, opts.tile)), None
            encoding = MapEncoding.of_detector(detector)
        else:
            scored = score_together(planned, detector, reference, opts, skipper("images"))
            planned, chosen, signals = scored.planned, scored.threshold, scored.describe()
            scorer, encoding = scored.scorer, scored.encoding
        log.info("threshold %.6g (%s)", chosen["value"], chosen["source"])
        out.mkdir(parents=True, exist_ok=True)
        pixel = choose_pixel_threshold(detector, opts, fused=signals is not None)
        tally = _Tally()
        try:
            score_all(planned, scorer, out, chosen["value"], encoding, opts, skipper("images"), pixel["value"], tally)
        except BaseException as e:  # whatever stopped it, the summary beside the partial scores.csv says so
            stop = "interrupted (Ctrl-C or SIGTERM)" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
            n_done = tally.counts[ANOMALOUS] + tally.counts[NORMAL]
            _write_stopped(out, found, skipped, chosen, tally, opts, encoding, time.perf_counter() - t_start,
                           {**dict(meta or {}), "detector": dict(getattr(detector, "info", {}) or {})}, stop)
            said = (f"{stop} after {n_done} of {len(planned)} image(s): {out / 'scores.csv'} lists those, "
                    f"{out / 'summary.json'} says \"complete\": false (maps of the batch in flight may lack a row)")
            if not isinstance(e, OSError):  # Ctrl-C, or an error that names its image (a NaN score): as it is
                log.error("%s", said)
                raise
            raise PredictError(said) from e
        if pixel["value"] is not None:
            report.write_csv(out / "regions.csv", tally.regions, REGION_COLUMNS)
        if opts.explain:
            explain_flagged(tally.flagged, detector, out, opts, skipper("explain"))
        with open(out / "scores.csv", newline="", encoding="utf-8") as f:
            html_report.predict_page(out, list(csv.DictReader(f)), chosen["value"], chosen["source"],
                                     f"predict: {len(found.files)} image(s), {tally.counts[ANOMALOUS]} flagged")
        report.write_csv(out / "skipped.csv", [dict(zip(SKIPPED_COLUMNS, row)) for row in skipped], SKIPPED_COLUMNS)
        signals = signals or {"signals": ["guides"], "fusion": "none: the guide map alone"}
        summary = {"complete": True, "stopped": None}
        summary |= summarise(found, skipped, chosen, tally, opts, encoding, time.perf_counter() - t_start,
                            {**signals, "pixel_threshold": pixel, "n_regions": len(tally.regions) if pixel["value"] is not None
                             else None, **dict(meta or {}), "detector": dict(getattr(detector, "info", {}) or {})})
        if summary["n_scored"] == 0:
            log.warning("no image could be scored: all %d were skipped (see %s)", len(found.files), out / "skipped.csv")
        report.write_json(out / "summary.json", summary)
        log.info("%d images: %d anomalous, %d normal, %d skipped -> %s", len(found.files), summary["n_anomalous"],
                 summary["n_normal"], summary["n_skipped"], out)
        return summary


def _write_stopped(out: Path, found: InputSet, skipped: Sequence[tuple], chosen: dict, tally: _Tally, opts: Options,
                   encoding: MapEncoding, total_s: float, extra: Mapping[str, Any], stop: str) -> None:
    """After a stop in :func:`score_all`: ``skipped.csv`` and a ``summary.json`` that says the run is not
    complete and why (best effort: the disk that stopped the run may refuse these too)."""
    summary = {"complete": False, "stopped": stop,
               **summarise(found, skipped, chosen, tally, opts, encoding, total_s, extra)}
    try:
        report.write_csv(out / "skipped.csv", [dict(zip(SKIPPED_COLUMNS, row)) for row in skipped], SKIPPED_COLUMNS)
        report.write_json(out / "summary.json", summary)
    except OSError as e:
        log.error("could not write the stopped run's summary into %s (%s)", out, e)


MARKER = ".spg-predict.json"
"""The file predict writes first into ``--out``: it marks the folder as predict's and holds its lock."""
OUTPUT_FILES = ("scores.csv", "summary.json", "skipped.csv", "regions.csv", "report.html")
OUTPUT_FOLDERS = ("maps", "overlays", "masks", "explanations")
OUTPUT_SUFFIXES = (".png", ".jpg", ".json")
"""What an output file's name adds to its image's name."""


def _earlier_predict(out: Path) -> bool:
    """``out`` holds a run of predict from before the marker existed: a ``summary.json`` of its shape."""
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and {"n_inputs", "threshold", "maps", "decision_rule"} <= summary.keys()


def check_out(out: Path) -> None:
    """Refuse an ``--out`` predict must not write into, before anything is loaded or written: a file or
    a folder below one; a folder holding a file or folder of predict's names (``scores.csv``, ``maps``,
    ...) that predict did not write (no marker: a user's own table would be replaced); an output folder
    (``maps``, ...) that is a symbolic link (its files would be written, and replaced, outside ``--out``)."""
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            raise PredictError(f"--out {out}: {folder} is a file, not a folder; give a folder for the outputs")
    if not out.is_dir():
        return
    for name in OUTPUT_FOLDERS:
        if (out / name).is_symlink():
            raise PredictError(f"--out {out}: {out / name} is a symbolic link (to {os.readlink(out / name)}); predict "
                               "writes only inside --out: remove the link or choose another --out")
    if (out / MARKER).is_file() or _earlier_predict(out):
        return
    foreign = [name for name in (*OUTPUT_FILES, *OUTPUT_FOLDERS) if os.path.lexists(out / name)]
    if foreign:
        raise PredictError(f"--out {out} holds {', '.join(foreign)}, which predict did not write (no {MARKER} there), "
                           "and a run would replace them: choose another --out, or move them")


class OutputLock:
    """``--out`` made this run's: the marker file written and locked (``flock``) while predict writes, so
    that a second predict into the same folder is refused instead of mixing the two runs' files. The
    OS drops the lock however the process ends, so a killed run never leaves the folder locked."""

    def __init__(self, out: Path):
        self.out, self.fd = out, None

    def __enter__(self) -> "OutputLock":
        check_out(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / MARKER
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            import fcntl  # POSIX; on Windows the folder is marked but not locked
        except ImportError:
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(self.fd, 4096).decode("utf-8", "replace")
                os.close(self.fd)
                self.fd = None
                try:
                    who = json.loads(holder)
                    who = f"pid {who.get('pid')}, started {who.get('started')}"
                except ValueError:
                    who = "another process"
                raise PredictError(f"--out {self.out}: another predict ({who}) is writing into it now; wait for it "
                                   "or choose another --out") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, json.dumps({"written_by": "pipeline.cli.predict", "pid": os.getpid(),
                                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock; the marker stays, saying the folder is predict's
            self.fd = None


def choose_threshold(detector, opts: Options, out: Path, skip) -> dict:
    """The image-score threshold and how it was chosen (``summary.json``'s ``threshold``): the
    override, the known-good images' (:func:`threshold_from_normals`), else the detector's own."""
    detector_threshold = getattr(detector, "threshold", None)
    if opts.threshold is not None:
        return {"value": float(opts.threshold), "source": "override", "rule": "--threshold given on the command line",
                "detector_threshold": detector_threshold}
    if opts.normals is None:
        if detector_threshold is None or not math.isfinite(float(detector_threshold)):
            raise PredictError("the detector has no threshold (detector.json 'threshold' is "
                               f"{detector_threshold!r}); pass --threshold X or --threshold-from-normals DIR")
        return {"value": float(detector_threshold), "source": "detector",
                "rule": (getattr(detector, "info", {}) or {}).get("threshold_rule", "detector.json threshold")}
    named = " ".join(map(str, opts.normals))
    normal_set = collect_images(opts.normals, exclude=out)
    if not normal_set.files:
        raise PredictError(f"--threshold-from-normals: no image in {named}; expected a folder of known-good images")
    scores = score_normals(normal_set.files, detector, batch_size=opts.batch_size, max_pixels=opts.max_pixels,
                           skip=skip)
    if scores.size == 0:
        raise PredictError(f"--threshold-from-normals: none of the {len(normal_set.files)} images in {named} could "
                           "be decoded (see the warnings above)")
    value, k = threshold_from_normals(scores, opts.far)
    flagged = int((scores >= value).sum())
    if k == 0 and opts.far > 0:
        log.warning("%d known-good images at --far %g allow no false alarm: the threshold sits just above the "
                    "highest of them; give at least %d for the rate to count", scores.size, opts.far,
                    math.ceil(1 / opts.far))
    return {"value": value, "source": "normals",
            "rule": "smallest float64 above the (k+1)-th highest known-good score, k = floor(far * n); "
                    "an image is flagged when score >= threshold",
            "normals": [str(p) for p in opts.normals], "far": opts.far, "n_normals": int(scores.size),
            "n_normals_skipped": len(normal_set.files) - int(scores.size), "k": k,
            "n_normals_flagged": flagged, "far_on_normals": flagged / scores.size,
            "normal_score_range": [float(scores.min()), float(scores.max())],
            "detector_threshold": detector_threshold}


def choose_pixel_threshold(detector, opts: Options, *, fused: bool) -> dict:
    """``summary.json``'s ``pixel_threshold``: the override, else the detector's own for the guide map
    alone; ``value`` None (no masks) for fused maps without an override or a detector without one."""
    if opts.pixel_threshold is not None:
        return {"value": float(opts.pixel_threshold), "source": "override", "min_region_area": opts.min_region_area}
    own = (getattr(detector, "info", {}) or {}).get("pixel_threshold")
    if fused:
        if own is not None:
            log.info("no defect masks: the detector's pixel threshold is on the guide map's scale, not the fused "
                     "map's; give --pixel-threshold for masks")
        return {"value": None, "source": None, "reason": "fused maps: give --pixel-threshold for masks"}
    if own is None:
        return {"value": None, "source": None, "reason": "the detector has no pixel_threshold (re-export it)"}
    return {"value": float(own), "source": "detector", "rule": detector.info.get("pixel_threshold_rule"),
            "min_region_area": opts.min_region_area}


def plan_outputs(files: Sequence[Path], out: Path, skip,
                 keep: Sequence[Path] = ()) -> list[tuple[Path, tuple[str, ...]]]:
    """(image, its relative name parts) for every image whose outputs can be written under ``out``
    (:func:`output_path`); the others go to ``skip`` with the reason: a name that cannot be mirrored,
    an output file that would be the folder another image's outputs need (``x.png`` beside a folder
    ``x.png.png/``), a path under ``out`` that is taken (a file where a folder is needed, a folder
    where the file goes) or runs through a symbolic link (it would write outside ``out``), or an
    output file that is one of ``keep`` (files the user named that lie inside ``out``)."""
    kept = {os.path.realpath(p) for p in keep}
    candidates = []
    for path, parts in zip(files, relative_names(files)):
        try:
            output_path(out / "maps", parts)
        except PipelineError as e:
            skip(path, str(e))
            continue
        candidates.append((path, parts))
    folders = {parts[:k] for _, parts in candidates for k in range(1, len(parts))}
    planned = []
    for path, parts in candidates:
        clash = next(((*parts[:-1], parts[-1] + suffix) for suffix in OUTPUT_SUFFIXES
                      if (*parts[:-1], parts[-1] + suffix) in folders), None)
        if clash is not None:
            skip(path, f"its output name {'/'.join(clash)} is the folder where other inputs' outputs go; rename "
                       "the file or that folder")
            continue
        problem = _blocked(out, parts, kept)
        if problem is not None:
            skip(path, problem)
            continue
        planned.append((path, parts))
    return planned


def _blocked(out: Path, parts: Sequence[str], kept: set[str] = frozenset()) -> str | None:
    """Why an image's outputs cannot go under ``out`` as things stand on disk, or None; ``kept`` holds
    the real paths of files that must not be written over."""
    for name in OUTPUT_FOLDERS:
        current = out / name
        for part in parts[:-1]:
            current = current / part
            if current.is_symlink():
                return f"{current} is a symbolic link: its outputs would be written outside {out}"
            if os.path.lexists(current) and not current.is_dir():
                return f"{current} is a file, where this image's outputs need a folder"
        for suffix in OUTPUT_SUFFIXES:
            target = current / (parts[-1] + suffix)
            if target.is_dir() and not target.is_symlink():
                return f"{target} is a folder, where this image's output file goes"
            if kept and os.path.realpath(target) in kept:
                return f"its output {target} is a file named as an input: it is never written over"
    return None


def score_all(planned: Sequence[tuple[Path, tuple[str, ...]]], scorer, out: Path, threshold: float,
              encoding: MapEncoding, opts: Options, skip, pixel_threshold: float | None = None,
              tally: _Tally | None = None) -> _Tally:
    """Score the planned images batch by batch (``scorer(batch)`` -> maps, scores, seconds), writing
    their PNGs (in ``opts.writers`` threads), with ``pixel_threshold`` the flagged images' masks, and
    ``scores.csv`` (rows in input order). Interrupted (Ctrl-C, SIGTERM, a full disk, a failing scorer),
    ``scores.csv`` is still written whole, with the rows of every image whose files were all written
    before the stop, and the error goes on up; ``tally`` (given, or a new one) then counts those images."""
    tally = _Tally() if tally is None else tally
    lines = [_csv_line(SCORE_COLUMNS)]
    try:
        _score_into(planned, scorer, out, threshold, encoding, opts, skip, pixel_threshold, tally, lines)
    finally:
        try:
            write_bytes(out / "scores.csv", "".join(lines).encode("utf-8"))
        except OSError as e:  # the disk that stopped the run may refuse the table too: say so, keep the cause
            log.error("could not write %s (%s)", out / "scores.csv", e)
    return tally


def _score_into(planned, scorer, out: Path, threshold: float, encoding: MapEncoding, opts: Options, skip,
                pixel_threshold: float | None, tally: _Tally, lines: list[str]) -> None:
    """:func:`score_all`'s loop: appends one CSV line to ``lines`` per image once its files are written."""

    def record(path, parts, score, decision, own_s, written) -> None:
        map_file, overlay_file, mask_file, regions, write_s = written
        if decision == ANOMALOUS:
            tally.flagged.append((path, parts, score))
            tally.regions += [{"path": str(path), **r} for r in regions]
        tally.timing["write_s"] += write_s
        tally.counts[decision] += 1
        tally.score_min, tally.score_max = min(tally.score_min, score), max(tally.score_max, score)
        # repr: the score as computed (float64), so a decision can be checked against the threshold
        lines.append(_csv_line((str(path), repr(score), decision, f"{own_s + write_s:.4f}",
                                map_file.relative_to(out).as_posix(),
                                "" if overlay_file is None else overlay_file.relative_to(out).as_posix(),
                                "" if mask_file is None else mask_file.relative_to(out).as_posix())))

    def finish(pending: list[tuple]) -> None:
        """Wait for one batch's files and record its rows, in input order; each item leaves ``pending``
        as it is taken, so after a failure ``pending`` holds only the items not yet recorded."""
        while pending:
            *row, job = pending.pop(0)
            record(*row, job.result())

    pending: list[tuple] = []
    with ThreadPoolExecutor(max_workers=opts.writers, thread_name_prefix="predict-writer") as pool:
        try:
            for b in _batches([p for p, _ in planned], [n for _, n in planned], opts.batch_size, opts.max_pixels,
                              skip, "predict"):
                maps, scores, score_s, *decided = scorer(b)
                verdicts = decisions(scores, threshold)
                tally.timing["score_s"] += score_s
                tally.timing["decode_s"] += sum(b.decode_s)
                for path, image in zip(b.paths, b.images):
                    if image.info.get("n_frames", 1) > 1:
                        log.warning("%s holds %d frames: only the first is scored", path, image.info["n_frames"])
                        tally.first_frame_only[str(path)] = image.info["n_frames"]
                # PNG encoding (PIL releases the GIL) runs in the writers while the next batch is decoded and
                # scored; waiting for the previous batch first keeps at most two batches in memory
                jobs = [pool.submit(_write_outputs, out, parts, image, maps[i] - encoding.low,
                                    threshold - encoding.low, encoding.span,
                                    pixel_threshold=(None if pixel_threshold is None or verdicts[i] != ANOMALOUS
                                                     else pixel_threshold - encoding.low),
                                    min_area=opts.min_region_area, low=encoding.low,
                                    with_overlay=opts.overlays == "all" or verdicts[i] == ANOMALOUS,
                                    overlay_suffix=OVERLAY_FORMATS[opts.overlay_format],
                                    outline=(decided[0][i], threshold) if decided else None)
                        for i, (parts, image) in enumerate(zip(b.names, b.images))]
                finish(pending)
                pending = [(path, b.names[i], float(scores[i]), verdicts[i], b.decode_s[i] + score_s / len(b.images),
                            jobs[i]) for i, path in enumerate(b.paths)]
            finish(pending)
        except BaseException:
            # stopped while the previous batch's files were being written: the images whose files all
            # made it keep their rows (a write in flight is waited for; one that failed has no row)
            for *row, job in pending:
                try:
                    written = job.result()
                except BaseException:
                    continue
                record(*row, written)
            raise


EXPLAIN_TOP = 5
"""Atoms named per explained image."""


def explain_flagged(flagged: Sequence[tuple[Path, tuple[str, ...], float]], detector, out: Path, opts: Options,
                    skip) -> int:
    """For each flagged image: the atoms behind its guide score at the patch where the guide signal
    peaks (:func:`pipeline.method.atoms.explain_image`), as ``explanations/<relative path>.json`` and a
    panel ``explanations/<relative path>.png`` (:func:`pipeline.evaluation.atom_report.explanation_figure`).
    The images are decoded and run through the backbone again, so scoring pays nothing for the option.
    With ``--normals`` or ``--batch`` the image's score also holds nearest-patch distances, which have no
    atoms: the explanation is of the guide part, and says so. Returns the count explained."""
    from pipeline.evaluation import atom_report
    from pipeline.method import atoms as A

    if not flagged:
        return 0
    fused = opts.reference_normals is not None or opts.batch or getattr(detector, "reference", None) is not None
    aux = ((getattr(detector, "info", {}) or {}).get("aux") or {}).get("dataset", "<aux>")
    done = 0
    t0 = time.perf_counter()
    by_path = {path: (parts, score) for path, parts, score in flagged}
    for b in _batches(list(by_path), [by_path[p][0] for p in by_path], opts.batch_size, opts.max_pixels, skip,
                      "explain"):
        tokens, _ = detector.features(b.images)
        signal = detector.guide_signal(tokens)
        for i, path in enumerate(b.paths):
            parts, score = by_path[path]
            explained, share_maps = A.explain_image(detector.atoms, tokens[i].cpu(), signal[i], detector.grid,
                                                    detector.settings.temperature, detector.chosen_seeds(),
                                                    top=EXPLAIN_TOP)
            image = b.images[i]
            peak = explained["peak"]
            gh, gw = detector.grid
            explained = {"image": str(path), "score": score, "decision": ANOMALOUS,
                         "peak_box": {"x0": peak["col"] * image.width / gw, "y0": peak["row"] * image.height / gh,
                                      "x1": (peak["col"] + 1) * image.width / gw,
                                      "y1": (peak["row"] + 1) * image.height / gh,
                                      "units": "pixels of the original image"},
                         **explained,
                         "galleries": f"reports/{aux}/atoms/atom_<atom>.png (dvc repro atoms@{aux})",
                         "scope": ("the guide part of the score only: nearest-patch distances to the references or "
                                   "the batch, also in this image's score, are not made of atoms") if fused else
                                  "the guide score, the whole of this image's score"}
            fig = atom_report.explanation_figure(np.asarray(image.convert("RGB")), signal[i].numpy(), detector.grid,
                                                 explained, share_maps.numpy(), f"{Path(*parts)}: score {score:.4g}")
            report.write_json(output_path(out / "explanations", parts, ".json"), explained)
            write_bytes(output_path(out / "explanations", parts, ".png"), report.png_bytes(fig))
            done += 1
    log.info("explained %d flagged image(s) in %.1f s -> %s", done, time.perf_counter() - t0, out / "explanations")
    return done


def summarise(found: InputSet, skipped: Sequence[tuple], chosen: dict, tally: _Tally, opts: Options,
              encoding: MapEncoding, total_s: float, extra: Mapping[str, Any]) -> dict:
    """``summary.json``: counts, threshold, map encoding, timing, options and ``extra`` (meta, detector)."""
    n_scored = tally.counts[ANOMALOUS] + tally.counts[NORMAL]
    return {
        "n_inputs": len(found.files),
        "n_scored": n_scored,
        "n_skipped": sum(1 for row in skipped if row[1] == "images"),
        "n_anomalous": tally.counts[ANOMALOUS],
        "n_normal": tally.counts[NORMAL],
        "unmatched": found.unmatched,
        "threshold": chosen,
        "decision_rule": f"anomalous when score >= threshold ({chosen['value']!r})",
        "score_range": [tally.score_min, tally.score_max] if n_scored else None,
        "maps": {"folder": "maps", "format": "16-bit greyscale PNG at the original image size, the S x S map "
                 "resized bilinearly", "value": encoding.value, "range": [encoding.low, encoding.low + encoding.span]},
        "overlays": {"folder": "overlays", "written_for": opts.overlays,
                     "format": ("JPEG, quality %d" % JPEG_QUALITY if opts.overlay_format == "jpeg" else "PNG"),
                     "colours": f"matplotlib jet, {encoding.low:g} to {encoding.low + encoding.span:g}, alpha 0.5",
                     "outline": ("white, pixels whose decision map (the distance signals alone, fusion.IMAGE_RULE) "
                                 "is >= threshold" if "decision" in extra else "white, pixels with map >= threshold")},
        "timing": {**{k: round(v, 4) for k, v in tally.timing.items()}, "total_s": round(total_s, 4),
                   "note": "write_s is summed over the writer threads, which run while batches are decoded "
                           "and scored, so the parts add up to more than total_s",
                   "images_per_s": round(n_scored / total_s, 4) if n_scored and total_s > 0 else None},
        "orientation": "images are turned as their EXIF orientation tag says (as viewers show them) before "
                       "scoring; maps, overlays and masks have that displayed size",
        "first_frame_only": {"files": dict(tally.first_frame_only),
                             "note": "files of several frames (animated GIF, multi-page TIFF) are scored on their "
                                     "first frame only; the number is how many frames each holds"},
        "batch_size": opts.batch_size,
        "batch": opts.batch,
        "tile": None if opts.tile is None else {"size": opts.tile, "stride": max(1, opts.tile // 2),
                                                 "stitching": "tent-weighted mean of the tiles' maps (1 at a tile's "
                                                              "centre, 0.1 at its edge)"},
        "writers": opts.writers,
        "max_pixels": opts.max_pixels,
        **extra,
    }


# ---------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files, folders (recursive) or glob patterns")
    parser.add_argument("--detector", required=True, type=Path, help="models/<A>/detector")
    parser.add_argument("--out", required=True, type=Path, help="output folder, e.g. predictions/<name>")
    parser.add_argument("--weights", type=Path, default=None,
                        help="backbone weights (.safetensors); default: the path in detector.json")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float, default=None, help="image-score threshold (overrides the detector's)")
    group.add_argument("--threshold-from-normals", nargs="+", default=None, metavar="DIR",
                       help="known-good images (folders, files, patterns) to set the threshold on, at --far")
    parser.add_argument("--far", type=float, default=0.01, help="false-alarm rate allowed on the normals (default 0.01)")
    parser.add_argument("--normals", nargs="+", default=None, metavar="DIR",
                        help="known-good images of the line to score against (fused with the guides); they also set "
                             "the threshold, each scored against the others, at --far")
    parser.add_argument("--max-patches", type=int, default=None,
                        help="keep at most this many of the --normals' patches (greedy coreset); default all")
    parser.add_argument("--batch", action="store_true",
                        help="the input images also score each other (the mutual signal), fused with the guides")
    parser.add_argument("--pixel-threshold", type=float, default=None,
                        help="map value at and above which a flagged image's pixel is defect (default: the "
                             "detector's own, chosen on its auxiliary set; fused runs need one for masks)")
    parser.add_argument("--min-region-area", type=int, default=1,
                        help="drop defect regions of fewer pixels from masks/ and regions.csv (default 1)")
    parser.add_argument("--tile", type=int, default=None, metavar="PX",
                        help="score images larger than PX as overlapping PX x PX tiles of the original (stride "
                             "PX/2), stitched; for small defects in large images (cost: one forward a tile)")
    parser.add_argument("--explain", action="store_true",
                        help="for each image flagged anomalous, the SAE atoms behind its score at its peak "
                             "(explanations/<image>.json and .png)")
    parser.add_argument("--overlays", choices=OVERLAY_CHOICES, default="flagged",
                        help="write an overlay for the flagged images only (default) or for all")
    parser.add_argument("--overlay-format", choices=tuple(OVERLAY_FORMATS), default="jpeg",
                        help="overlays as JPEG (default: a picture for people, cheap to write) or as PNG "
                             "(exact to the pixel); maps and masks are always PNG")
    parser.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                        help="torch (default) or onnxruntime, through the graph `python -m pipeline.cli.export_onnx` "
                             "wrote (guide maps only: not with --normals, --batch or --explain)")
    parser.add_argument("--onnx", type=Path, default=None, help="the ONNX file (default <detector>/detector.onnx)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--writers", type=int, default=min(4, os.cpu_count() or 1),
                        help="threads writing the PNGs (default: min(4, CPU count))")
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=None,
                        help="score with this guide seed's vectors (default: the mean of every seed's map)")
    parser.add_argument("--max-pixels", type=int, default=50_000_000,
                        help="skip images with more pixels than this (as data.max_pixels)")
    args = parser.parse_args(argv)
    from pipeline.launch import setup_logging

    setup_logging()
    # every option is checked before the detector (torch, timm, the weights) is loaded
    opts = Options(batch_size=args.batch_size, max_pixels=args.max_pixels, threshold=args.threshold,
                   normals=args.threshold_from_normals, far=args.far, writers=args.writers,
                   reference_normals=args.normals, batch=args.batch, max_patches=args.max_patches,
                   explain=args.explain, pixel_threshold=args.pixel_threshold, tile=args.tile,
                   min_region_area=args.min_region_area, overlays=args.overlays,
                   overlay_format=args.overlay_format)
    check_out(args.out)
    if args.runtime == "onnxruntime":
        if opts.reference_normals is not None or opts.batch or opts.explain:
            raise PredictError("--runtime onnxruntime scores the guide map alone: --normals, --batch and --explain "
                               "need the torch runtime")
        from pipeline.method.onnx_graph import OnnxDetector

        t0 = time.perf_counter()
        runtime = OnnxDetector(args.onnx if args.onnx is not None else args.detector / "detector.onnx")
        meta = {"detector_folder": str(args.detector), "runtime": "onnxruntime", "providers": runtime.providers,
                "onnx": {k: v for k, v in runtime.meta.items() if k != "detector_json"}, "detector_load_s": round(time.perf_counter() - t0, 4)}
        predict_files(args.images, runtime, args.out, opts, meta=meta)
        return
    from pipeline.method.detector import Detector  # heavy (torch, timm): only when a real detector is loaded
    from pipeline.launch import resolve_device

    try:
        device = str(resolve_device(args.device))
    except RuntimeError as e:  # an unknown name, or a CUDA device this machine does not have
        raise PredictError(f"--device {args.device}: {e}; use --device cpu or auto") from e
    t0 = time.perf_counter()
    detector = Detector.load(args.detector, weights=args.weights, device=device, seed=args.seed)
    meta = {"detector_folder": str(args.detector), "seed": args.seed, "device": device,
            "detector_load_s": round(time.perf_counter() - t0, 4)}
    predict_files(args.images, detector, args.out, opts, meta=meta)


def console() -> None:
    """The ``spg-predict`` command: :func:`main` with errors as one line (:func:`pipeline.launch.run`)."""
    import signal
    import sys

    from pipeline.launch import run

    def terminated(signum, frame):  # a SIGTERM (a scheduler, `kill`) stops the run as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    try:
        run(main)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    console()
