"""Image and mask decoding: what a dataset's files hold, read one at a time.

Sizes are read from headers only (no pixel decode) when a table is built (:func:`header_size`,
:func:`check_pair`). Pixels are decoded later, one image at a time, by :func:`load_image` (which refuses
pixel modes it cannot turn into 8-bit RGB without guessing a scale, such as 32-bit ``I`` and ``F``) and
:func:`load_mask` (which refuses an anomalous image's mask that binarises empty, unless
``data.allow_empty_masks``). Operating-system litter (dot files, :data:`LITTER`) is left out of every
folder listing by :func:`visible`.
"""

from __future__ import annotations

import threading
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from pipeline.errors import PipelineError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""Image (and mask) extensions accepted by the ``folder`` format, compared lower-cased."""

LITTER = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini"})
"""Lower-cased names of operating-system litter files, ignored in every listing (as are dot files)."""

# What PIL raises on a file it cannot identify or decode (UnidentifiedImageError is an OSError;
# truncated data is an OSError; some corrupt PNG chunks raise SyntaxError; bad zlib streams zlib.error).
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError)

# PIL's decompression-bomb guard (Image.MAX_IMAGE_PIXELS, refusing above twice its ~89 M) is a
# module-wide setting: left on, it would refuse images that data.max_pixels / --max-pixels allow, and
# a user raising our limit could never lift PIL's. check_pixels is the same guard (the header's size,
# before any pixel is decoded) with the user's limit, so PIL's is switched off while a file is opened
# and decoded here (TIFF and GIF check again when they load). The lock keeps two threads from
# restoring each other's value; decoding is one image at a time per process anyway.
_PIL_GUARD = threading.RLock()


@contextmanager
def open_image(path: Path) -> Iterator[Image.Image]:
    """``Image.open(path)`` with PIL's own pixel cap off until the block ends; callers check the size
    by :func:`check_pixels` before decoding."""
    with _PIL_GUARD:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(path) as im:
                yield im
        finally:
            Image.MAX_IMAGE_PIXELS = saved


class DatasetError(PipelineError, ValueError):
    """A dataset tree, table or file does not follow its layout. The message names the file."""



@contextmanager
def decode_errors(what: str, path: Path) -> Iterator[None]:
    """Turn a missing or undecodable ``what`` ("image", "mask") at ``path`` into a DatasetError."""
    try:
        yield
    except DatasetError:
        raise
    except FileNotFoundError as e:
        raise DatasetError(f"{what} {path} does not exist") from e
    except _PIL_ERRORS as e:
        raise DatasetError(
            f"cannot decode {what} {path}: {e} (expected a complete, readable image file)"
        ) from e


_RGB_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "RGBA", "RGBa", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV"})
"""Modes whose ``convert("RGB")`` in PIL is exact or the standard conversion (see :func:`to_rgb`)."""
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
"""16-bit unsigned grey in either byte order (``numpy.asarray`` reads each with its own byte order)."""
_NO_SCALE_MODES = {"I": "32-bit signed integer", "F": "32-bit float"}
"""Modes with no range that says which value is white, refused by :func:`to_rgb`."""


def to_rgb(im: Image.Image, path: Path | str = "<image>") -> Image.Image:
    """Convert a decoded image of any mode PIL returns to 8-bit RGB, or refuse its mode by name.

    Per mode (PIL names):

    - ``1``, ``L``, ``P``: grey or palette colours (``1`` gives 0 / 255).
    - ``RGB``, ``RGBX``: as is (the X padding is dropped).
    - ``RGBA``, ``LA``, ``PA``: alpha is dropped, the colour is kept (not composited on a background,
      so pixels stay the colour the camera saw). ``RGBa`` / ``La`` (premultiplied) are un-premultiplied
      first, so they give the same colour as the straight-alpha image.
    - ``CMYK``: PIL's naive conversion (no ICC profile); ``YCbCr`` (JPEG, full range), ``LAB``
      (a, b offset by 128, as ImageCms), ``HSV``: PIL's standard conversions.
    - ``I;16`` and its byte-order variants ``I;16L``, ``I;16B``, ``I;16N``: the top 8 bits (value >> 8),
      so 65535 is white; PIL's own conversion would clip every value above 255 to white.
    - ``I`` (32-bit integer) and ``F`` (32-bit float) are refused: they have no range that says which
      value is white (a 16-bit camera frame, a depth map and a [0, 1] float all arrive as these), and
      any guessed scale would give silently wrong pixels. Convert such files to 8-bit or 16-bit first.
    - Any other mode is refused by name.

    Args:
        im: a loaded image, ``(width, height)`` any mode.
        path: the file it came from, for the error message.

    Returns:
        An ``RGB`` image of the same size.

    Raises:
        DatasetError: the mode is refused (the message names the file, the mode and how to convert).
    """
    mode = im.mode
    if mode in _RGB_MODES:
        return im.convert("RGB")
    if mode == "La":
        return im.convert("LA").convert("RGB")  # PIL has no La -> RGB; La -> LA un-premultiplies
    if mode in _UINT16_MODES:
        arr = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode in _NO_SCALE_MODES:
        raise DatasetError(
            f"image {path} has pixel mode {mode!r} ({_NO_SCALE_MODES[mode]}), which has no range that says "
            "which value is white; convert it to 8-bit (grey or RGB) or 16-bit grey PNG/TIFF first, "
            "scaled as the data requires"
        )
    raise DatasetError(
        f"image {path} has pixel mode {mode!r}, which is not supported; convert it to 8-bit RGB, "
        "8-bit grey or 16-bit grey PNG/TIFF first"
    )


def load_image(path: Path, max_pixels: int = 50_000_000, limit: str = "data.max_pixels") -> Image.Image:
    """Open and fully decode an image as 8-bit RGB, converting its mode by :func:`to_rgb`.

    Truncated or corrupt files raise instead of being padded (``ImageFile.LOAD_TRUNCATED_IMAGES``
    is left alone). 16-bit grey images are scaled to 8 bit; alpha is dropped; 32-bit ``I`` and ``F``
    images are refused; EXIF orientation is *not* applied, so pixels stay aligned with their mask.
    A file of several frames (animated GIF, multi-page TIFF) gives its first; the returned image's
    ``info["n_frames"]`` says how many the file holds (1 for a still image).

    Raises:
        DatasetError: the file cannot be read or decoded, its pixel mode is refused, or it has more
            than ``max_pixels`` pixels; the message names ``limit``, the setting that holds it
            (``data.max_pixels``, or predict's ``--max-pixels``). PIL's own decompression-bomb cap
            is not applied (:func:`open_image`): ``max_pixels`` is the one limit, in both directions.
    """
    path = Path(path)
    with decode_errors("image", path), open_image(path) as im:
        check_pixels(path, im.size, max_pixels, limit)
        im.load()
        rgb = to_rgb(im, path)
        # an animated GIF / multi-page TIFF: the first frame is what is decoded; say how many there were
        rgb.info["n_frames"] = int(getattr(im, "n_frames", 1) or 1)
        return rgb


def load_mask(
    path: Path | None,
    size: tuple[int, int],
    resize_to: int | None = None,
    *,
    allow_empty: bool = False,
) -> np.ndarray:
    """Load a mask as a binary array.

    A pixel is anomalous (1) where the mask is not black (:func:`binarise`):

    - grey, palette and integer masks (``1``, ``L``, ``P``, ``I``, ``I;16*``, ``F``): value ``!= 0``
      (VisA masks are multi-valued; palette masks are read by palette index, 0 is background);
    - ``RGB`` / ``RGBX``: any colour channel ``!= 0``; ``CMYK`` after PIL's RGB conversion;
      ``YCbCr`` Y, ``LAB`` L and ``HSV`` V ``!= 0`` (their black has non-zero chroma channels);
    - with alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``): an alpha that is the same everywhere
      says nothing and is ignored. Otherwise transparent pixels (alpha 0) are background, so a pixel
      is anomalous where its colour is not black *and* alpha ``!= 0``; and when the colour is black
      everywhere (a defect painted only in alpha), alpha ``!= 0`` marks the defect.

    A mask file belongs to an anomalous image, so one that binarises empty is an error (the image
    would train and score with no anomalous pixel) unless ``allow_empty`` (``data.allow_empty_masks``).
    The check is made at the file's resolution: a defect smaller than a pixel at ``resize_to`` may
    still vanish in the nearest-neighbour resize (the paper's protocol); :func:`pipeline.features.extract.extract`
    warns about those.

    Args:
        path: mask file, or ``None`` for a normal image (an all-zero mask is returned).
        size: the image's size in **PIL order** ``(width, height)`` (what ``Image.size`` gives). The
            mask must have exactly this size.
        resize_to: if given, the mask is resized nearest-neighbour to ``(S, S)`` and then binarised.
        allow_empty: accept a mask file that binarises empty.

    Returns:
        ``uint8`` array with values in {0, 1}, shape ``(height, width)`` or ``(S, S)`` when
        ``resize_to`` is given.

    Raises:
        DatasetError: the mask cannot be decoded, its mode is not supported, it holds NaN, its size
            differs from ``size``, or it is empty and ``allow_empty`` is false.
    """
    w, h = int(size[0]), int(size[1])
    if path is None:
        shape = (resize_to, resize_to) if resize_to is not None else (h, w)
        return np.zeros(shape, dtype=np.uint8)
    path = Path(path)
    with decode_errors("mask", path), open_image(path) as im:
        if im.size != (w, h):
            raise DatasetError(
                f"mask {path} is {im.size[0]}x{im.size[1]} but its image is {w}x{h}; "
                "a mask must have its image's size"
            )
        im.load()
        binary, how = binarise(im, path)
    if not allow_empty and not binary.any():
        raise DatasetError(
            f"mask {path} of an anomalous image is empty (mode {im.mode!r}, binarised as {how}); "
            "draw the defect in the mask, or set data.allow_empty_masks: true in params.yaml to accept "
            "anomalous images without anomalous pixels"
        )
    if resize_to is not None:
        resized = Image.fromarray(binary * np.uint8(255)).resize(
            (resize_to, resize_to), Image.Resampling.NEAREST
        )
        binary = (np.asarray(resized) > 0).astype(np.uint8)
    return binary


def mask_from_header(path: Path, max_pixels: int = 50_000_000, *, allow_empty: bool = False) -> np.ndarray:
    """Decode a mask at its own size (read from its header) with the checks of :func:`load_mask`.

    For ``check`` without ``--decode``: masks are small to decode, images need not be.
    """
    return load_mask(path, header_size(Path(path), max_pixels, what="mask"), allow_empty=allow_empty)


def check_pixels(path: Path, size: tuple[int, int], max_pixels: int, limit: str = "data.max_pixels") -> None:
    """Refuse an image of more than ``max_pixels`` pixels, naming ``limit``, the setting to raise."""
    w, h = size
    if w * h > max_pixels:
        where = "raise data.max_pixels in params.yaml" if limit == "data.max_pixels" else f"pass a larger {limit}"
        raise DatasetError(
            f"image {path} is {w}x{h} = {w * h:,} pixels, over the limit {limit} = {max_pixels:,}; "
            f"{where} if such images are expected"
        )


def header_size(path: Path, max_pixels: int, what: str = "image") -> tuple[int, int]:
    """(width, height) from the file header, without decoding pixels."""
    try:
        with open_image(path) as im:
            size = im.size
    except _PIL_ERRORS as e:
        raise DatasetError(
            f"cannot read the header of {what} {path}: {e} (expected a readable image file)"
        ) from e
    check_pixels(path, size, max_pixels)
    return size


def check_pair(image: Path, mask: Path, max_pixels: int) -> None:
    isize = header_size(image, max_pixels)
    msize = header_size(mask, max_pixels, what="mask")
    if isize != msize:
        raise DatasetError(
            f"mask {mask} is {msize[0]}x{msize[1]} but its image {image} is {isize[0]}x{isize[1]}; "
            "a mask must have its image's size"
        )


_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def binarise(im: Image.Image, path: Path | str = "<mask>") -> tuple[np.ndarray, str]:
    """A decoded mask as ``(binary (H, W) uint8 in {0, 1}, how)``; ``how`` says the rule applied.

    The rules per mode are those of :func:`load_mask`. Raises DatasetError for a mode with no rule
    and for a float mask holding NaN (neither background nor defect).
    """
    mode = im.mode
    alpha = None
    if mode in _ALPHA_MODES:
        arr = np.asarray(im)
        colour, alpha = arr[..., :-1], arr[..., -1]
        colour_how = "palette index != 0" if mode == "PA" else "colour != 0"
    elif mode in ("1", "L", "P", "I", "F") or mode in _UINT16_MODES:
        colour = np.asarray(im)
        if mode == "F" and not np.isfinite(colour).all():
            raise DatasetError(
                f"mask {path} (mode 'F') holds NaN or Inf; expected 0 for background, non-zero for defect"
            )
        colour_how = "palette index != 0" if mode == "P" else "value != 0"
    elif mode in ("RGB", "RGBX"):
        colour = np.asarray(im)[..., :3]  # RGBX: the X byte is padding
        colour_how = "any of R, G, B != 0"
    elif mode == "CMYK":
        colour = np.asarray(im.convert("RGB"))
        colour_how = "RGB (PIL conversion) != 0"
    elif mode in ("YCbCr", "LAB", "HSV"):
        colour = np.asarray(im)[..., 2 if mode == "HSV" else 0]  # black: Y = 0, L = 0, V = 0
        colour_how = {"YCbCr": "Y != 0", "LAB": "L != 0", "HSV": "V != 0"}[mode]
    else:
        raise DatasetError(
            f"mask {path} has pixel mode {mode!r}, which is not supported; save masks as 8-bit grey "
            "(0 background, non-zero defect)"
        )
    fg = colour != 0
    if fg.ndim == 3:
        fg = fg.any(axis=-1)
    if alpha is None or alpha.min() == alpha.max():
        how = colour_how + (" (alpha is uniform, ignored)" if alpha is not None else "")
        return fg.astype(np.uint8), how
    if not fg.any():  # black everywhere: the defect is painted in alpha alone
        return (alpha != 0).astype(np.uint8), "alpha != 0 (colour is black everywhere)"
    return (fg & (alpha != 0)).astype(np.uint8), f"{colour_how} where alpha != 0 (transparent is background)"


# ---------------------------------------------------------------------------------------------------
# MVTec-like trees (mvtec, folder)



def visible(entries: Iterable[Path]) -> list[Path]:
    """``entries`` without dot files (``.DS_Store``, ``._*``) and :data:`LITTER`, sorted."""
    return sorted(p for p in entries if not p.name.startswith(".") and p.name.lower() not in LITTER)
