"""The embedded default benchmark: seeded synthetic defects on textures, written in MVTec AD layout.

A fresh machine may have neither datasets nor a network, yet ``dvc repro`` must run end to end. This
module renders three small anomaly-detection datasets from textures that ship with installed packages
(scikit-image's CC0 ``brick``, ``grass`` and ``gravel``, and its ``moon`` photograph as ``stone``:
``skimage.data.moon``'s docstring names no source or licence, so it is covered only by the
scikit-image package's BSD-3-Clause ``LICENSE.txt``; nothing of it is committed here) and from
procedural ones (wood, woven fabric, brushed metal, marble, concrete, leather), and writes them as

    <root>/<category>/train/good/000.png
    <root>/<category>/test/good/000.png
    <root>/<category>/test/<defect>/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png      (mode L, 0 or 255)

``synth_a``, ``synth_b`` and ``synth_c`` pairwise share neither categories nor defect styles, so fitting
on one and evaluating on another is a true cross-dataset zero-shot protocol in every direction.
``synth_a``/``synth_b`` defects are high-contrast and geometric; ``synth_c``'s imitate the families of
real surface defects (faint shading, cracks that follow the texture, pits, edge chips, contamination)
on generic surfaces, as auxiliary data for real targets. Adding ``synth_c`` changed no
byte of the other two (a test pins their digests).

The ground-truth mask is *exactly* the set of changed pixels: outside the mask an image equals its
clean source bit for bit, and every mask pixel differs from it by at least ``MIN_DELTA`` grey levels
in at least one channel. Defect renderers only propose a region and a candidate appearance;
:func:`_composite` enforces the rule after uint8 rounding.

Everything is a function of the seed: each image draws from its own ``numpy.random.Generator`` seeded
by ``(seed, dataset, category, split, index)``, so changing the counts of one folder never changes the
images of another, and the same seed gives byte-identical PNGs.
"""

from __future__ import annotations

import logging
import re
import shutil
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from scipy import interpolate, ndimage
from tqdm import tqdm

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

DATASETS: dict[str, dict] = {
    "synth_a": {
        "categories": ["brick", "wood", "fabric"],
        "defects": ["scratch", "hole", "stain"],
    },
    "synth_b": {
        "categories": ["grass", "gravel", "metal", "marble"],
        "defects": ["crack", "particle", "fold"],
    },
    "synth_c": {
        "categories": ["concrete", "leather", "stone"],
        "defects": ["shading", "texture_crack", "pit", "edge_chip", "contamination"],
    },
}
"""Dataset name -> its ``categories`` and ``defects`` (pairwise disjoint between the datasets)."""

MIN_DELTA = 24
"""Least change (grey levels, in at least one channel) of every defective pixel, so that the mask is
visible in the image and survives any uint8 rounding."""

MIN_DEFECT_PIXELS = 12
"""Floor on a defect's area, so tiny images still get a non-empty mask."""

DEFECT_AREA: dict[str, tuple[float, float]] = {
    # Fractions of the image area; sizes are drawn log-uniformly between the two bounds. Thin defects
    # (scratch, crack) cannot plausibly cover 10 % of an image, blob-like ones can.
    "scratch": (0.001, 0.03),
    "hole": (0.002, 0.10),
    "stain": (0.004, 0.12),
    "crack": (0.001, 0.04),
    "particle": (0.0008, 0.05),
    "fold": (0.004, 0.10),
    # synth_c. Shading is large by nature; pits are a dozen discs of at most 6 px radius at 256 px
    # (12 * pi * 6^2 / 256^2 ~ 0.02; 0.01 keeps each within 6 px), the smallest one or two pits of a few patches.
    "shading": (0.015, 0.20),
    "texture_crack": (0.0005, 0.012),  # 1.4 S long and 2.5 px wide at most: ~0.014 at 256 px
    "pit": (0.0005, 0.01),
    "edge_chip": (0.002, 0.06),
    "contamination": (0.0005, 0.04),
}

_MIN_IMAGE_SIZE = 32

# --------------------------------------------------------------------------------------------------
# noise and geometry helpers


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale) -> np.ndarray:
    """Zero-mean, unit-std noise (h, w) float32 whose features are about ``scale`` pixels wide.

    ``scale`` is a number or ``(scale_y, scale_x)`` for anisotropic (streaky) noise. White noise on a
    coarse grid is upsampled by a cubic interpolating spline, one axis at a time: far cheaper than a
    wide Gaussian filter or a 2-D per-pixel interpolation, and free of BLAS calls, whose threads
    slow small products down several-fold on a busy machine.
    """
    sy, sx = (float(scale), float(scale)) if np.isscalar(scale) else (float(scale[0]), float(scale[1]))
    sy, sx = max(sy, 1.0), max(sx, 1.0)
    h, w = shape
    ny, nx = int(np.ceil(h / sy)) + 4, int(np.ceil(w / sx)) + 4
    coarse = rng.standard_normal((ny, nx))
    # Start 2 knots in: the spline is least faithful next to its ends.
    ys, xs = np.arange(h) / sy + 2.0, np.arange(w) / sx + 2.0
    cols = interpolate.make_interp_spline(np.arange(ny), coarse, k=3, axis=0)(ys)  # (h, nx)
    out = interpolate.make_interp_spline(np.arange(nx), cols, k=3, axis=1)(xs).astype(np.float32)  # (h, w)
    return (out - out.mean()) / (out.std() + 1e-8)


def _fractal(rng: np.random.Generator, shape: tuple[int, int], scales, gain: float = 0.55) -> np.ndarray:
    """Unit-std sum of octaves of :func:`_smooth_noise`, coarsest first; (h, w) float32."""
    out = np.zeros(shape, np.float32)
    amp = 1.0
    for s in scales:
        out += amp * _smooth_noise(rng, shape, s)
        amp *= gain
    return (out - out.mean()) / (out.std() + 1e-8)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(yy, xx)``, each (S, S) float32."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _tint(gray: np.ndarray, dark, light) -> np.ndarray:
    """Colourise a grey image (S, S) in [0, 1] by a dark→light colour ramp; returns (S, S, 3)."""
    dark = np.asarray(dark, np.float32)
    light = np.asarray(light, np.float32)
    return dark + np.clip(gray, 0, 1)[..., None] * (light - dark)


def _jitter_colour(rng: np.random.Generator, colour, amount: float = 0.03) -> np.ndarray:
    """A colour (3,) nudged per image, so that normal images of a category are not all one hue."""
    return np.clip(np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3), 0, 1)


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0, 1)
    return t * t * (3 - 2 * t)


def _lowest(field: np.ndarray, n: int) -> np.ndarray:
    """Boolean mask (same shape as ``field``) of its ``n`` smallest entries.

    Thresholding a distance-like field by rank rather than by value gives every defect exactly the
    area it was asked for; ``argpartition`` breaks ties deterministically.
    """
    flat = field.ravel()
    n = int(np.clip(n, 1, flat.size))
    out = np.zeros(flat.size, bool)
    out[np.argpartition(flat, n - 1)[:n]] = True
    return out.reshape(field.shape)


def _place(points: np.ndarray, size: int, margin: float, rng: np.random.Generator) -> np.ndarray:
    """Translate a polyline ``points`` (P, 2) as (y, x) to a random spot with its bounding box inside
    the image (``margin`` pixels from the border where it fits); clips what cannot fit."""
    lo, hi = points.min(0), points.max(0)
    span = hi - lo
    offset = np.empty(2)
    for ax in range(2):
        room = size - 1 - 2 * margin - span[ax]
        start = margin + (rng.uniform(0, room) if room > 0 else room / 2)
        offset[ax] = start - lo[ax]
    return np.clip(points + offset, 0, size - 1)


def _path_field(points: np.ndarray, size: int, rng: np.random.Generator, wobble: float) -> np.ndarray:
    """Distance (S, S) of every pixel to a densely sampled polyline ``points`` (P, 2), plus a little
    smooth noise so a rank threshold of it has a width that varies along the path; negative on the path."""
    on_path = np.zeros((size, size), bool)
    iy, ix = np.rint(points).astype(int).T
    on_path[iy, ix] = True
    dist = ndimage.distance_transform_edt(~on_path).astype(np.float32)
    field = dist + wobble * _smooth_noise(rng, (size, size), max(2.0, size / 48))
    # The path itself ranks first, in path order: a defect smaller than its path is cut short at the
    # end rather than broken into dashes.
    flat, first = np.unique(iy * size + ix, return_index=True)
    field.ravel()[flat] = -1.0 + 0.5 * first / len(points)
    return field


def _resample_path(vertices: np.ndarray, step: float = 0.5) -> np.ndarray:
    """Points every ``step`` pixels along a polyline of ``vertices`` (V, 2), so it rasterises without
    gaps; returns (P, 2)."""
    seg = np.diff(vertices, axis=0)
    seg_len = np.hypot(seg[:, 0], seg[:, 1])
    arc = np.concatenate([[0.0], np.cumsum(seg_len)])
    s = np.arange(0.0, arc[-1] + step, step)
    return np.stack([np.interp(s, arc, vertices[:, 0]), np.interp(s, arc, vertices[:, 1])], axis=1)


# --------------------------------------------------------------------------------------------------
# textures: each returns a clean image (S, S, 3) float32 in [0, 1]


@lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    """A photograph shipped inside the scikit-image package (no download; licences in the module
    docstring), (H, W) float32 in [0, 1]."""
    from skimage import data

    return getattr(data, name)().astype(np.float32) / 255.0


def _photo_texture(name: str, dark, light, rotate: bool, stretch: bool = False):
    """A texture maker from a grey photo: random crop, flips, optional quarter turns, and a jitter of
    contrast and brightness, then a category colour ramp (the photos are grey; the tint makes the
    categories differ in colour too). ``stretch`` reads the photo through :func:`_stretched_photo`."""

    def make(rng: np.random.Generator, size: int) -> np.ndarray:
        photo = _stretched_photo(name) if stretch else _photo(name)
        h, w = photo.shape
        side = int(rng.uniform(0.55, 0.85) * min(h, w))
        y0 = int(rng.integers(0, h - side + 1))
        x0 = int(rng.integers(0, w - side + 1))
        crop = photo[y0 : y0 + side, x0 : x0 + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if rng.random() < 0.5:
            crop = crop[::-1, :]
        if rotate:
            crop = np.rot90(crop, int(rng.integers(0, 4)))
        img = Image.fromarray(np.ascontiguousarray(crop, dtype=np.float32))  # float32 -> mode "F"
        gray = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), np.float32)
        mean = gray.mean()
        gray = (gray - mean) * rng.uniform(0.9, 1.1) + mean + rng.uniform(-0.04, 0.04)
        return _tint(gray, _jitter_colour(rng, dark), _jitter_colour(rng, light))

    return make


def _wood(rng: np.random.Generator, size: int) -> np.ndarray:
    """Plank grain: growth rings seen edge-on (a sawtooth across the grain, bent by low-frequency
    noise) times fine fibre streaks along it."""
    u = size / 256
    yy, xx = _grid(size)
    theta = np.deg2rad(rng.uniform(-5, 5))
    across = -xx * np.sin(theta) + yy * np.cos(theta)
    period = rng.uniform(9, 13) * u
    bend = _fractal(rng, (size, size), (160 * u, 64 * u), gain=0.4)
    phase = across / period + 1.4 * bend + rng.uniform(0, 1)
    ring = phase - np.floor(phase)
    # Early wood is light and wide; late wood is a narrow dark band at the end of each ring.
    tone = 0.35 + 0.65 * (1 - ring**3)
    fibre = _smooth_noise(rng, (size, size), (1.0, 40 * u))
    gray = tone * (0.88 + 0.07 * fibre)
    return _tint(gray, _jitter_colour(rng, (0.28, 0.14, 0.05)), _jitter_colour(rng, (0.86, 0.60, 0.34)))


def _fabric(rng: np.random.Generator, size: int) -> np.ndarray:
    """Plain weave: vertical warp and horizontal weft threads alternate over and under; each thread
    is shaded across its width and has its own slight brightness, and the two yarns differ in colour."""
    u = size / 256
    yy, xx = _grid(size)
    theta = np.deg2rad(rng.uniform(-2, 2))
    period = rng.uniform(7, 9) * u
    uu = (xx * np.cos(theta) + yy * np.sin(theta)) / period + rng.uniform(0, 1)
    vv = (-xx * np.sin(theta) + yy * np.cos(theta)) / period + rng.uniform(0, 1)
    i, j = np.floor(uu).astype(int), np.floor(vv).astype(int)
    warp_on_top = (i + j) % 2 == 0
    warp_var = rng.normal(0, 0.06, i.max() - i.min() + 1)[i - i.min()]
    weft_var = rng.normal(0, 0.06, j.max() - j.min() + 1)[j - j.min()]
    profile_warp = np.sin(np.pi * (uu - i)) ** 0.6
    profile_weft = np.sin(np.pi * (vv - j)) ** 0.6
    fibre = _smooth_noise(rng, (size, size), 1.0)
    shade = np.where(warp_on_top, profile_warp * (1 + warp_var), profile_weft * (1 + weft_var))
    shade = 0.3 + 0.7 * shade + 0.04 * fibre
    warp_col = _jitter_colour(rng, (0.22, 0.32, 0.58))
    weft_col = _jitter_colour(rng, (0.80, 0.78, 0.70))
    colour = np.where(warp_on_top[..., None], warp_col, weft_col)
    return colour * np.clip(shade, 0, 1.2)[..., None]


def _metal(rng: np.random.Generator, size: int) -> np.ndarray:
    """Brushed steel: noise stretched along the brushing direction at two scales, under a soft
    lighting gradient."""
    u = size / 256
    yy, xx = _grid(size)
    fine = _smooth_noise(rng, (size, size), (1.0, 48 * u))
    coarse = _smooth_noise(rng, (size, size), (4 * u, 140 * u))
    phi = rng.uniform(0, 2 * np.pi)
    light = (np.cos(phi) * xx + np.sin(phi) * yy) / size
    gray = 0.6 + 0.07 * fine + 0.05 * coarse + 0.12 * (light - light.mean())
    return _tint(gray, _jitter_colour(rng, (0.22, 0.24, 0.27)), _jitter_colour(rng, (0.86, 0.88, 0.92)))


def _marble(rng: np.random.Generator, size: int) -> np.ndarray:
    """Marble: a sine of a slanted coordinate perturbed by turbulence; its zero crossings are the veins."""
    u = size / 256
    yy, xx = _grid(size)
    theta = np.deg2rad(35 + rng.uniform(-15, 15))
    coord = (xx * np.cos(theta) + yy * np.sin(theta)) / size
    turb = _fractal(rng, (size, size), (96 * u, 48 * u, 24 * u, 12 * u, 6 * u))
    v = np.sin(2 * np.pi * coord * rng.uniform(1.5, 2.5) + 2.2 * turb)
    vein = (1 - np.abs(v)) ** 6
    cloud = _smooth_noise(rng, (size, size), 20 * u)
    gray = 0.93 - 0.6 * vein + 0.03 * cloud
    # Cream stone with green-grey veins, so it is not just another grey category.
    return _tint(gray, _jitter_colour(rng, (0.20, 0.32, 0.27)), _jitter_colour(rng, (0.98, 0.94, 0.85)))


def _concrete(rng: np.random.Generator, size: int) -> np.ndarray:
    """Cast concrete: a fractal grey cement matrix, a scatter of rounded aggregate stones a shade
    lighter or darker than the matrix, and small dark air pores (bug holes)."""
    u = size / 256
    gray = 0.55 + 0.07 * _fractal(rng, (size, size), (64 * u, 24 * u, 8 * u, 2 * u), gain=0.6)
    # Aggregate: where a mid-scale noise field is high, a stone shows through with its own tone.
    stones = _smooth_noise(rng, (size, size), 10 * u)
    tone = _smooth_noise(rng, (size, size), 40 * u)
    gray = gray + np.where(stones > 1.0, 0.06 * tone - 0.02 * (stones - 1.0), 0.0)
    # Pores: a few dozen small dark round dimples, shaded darker towards their centre.
    n_pores = int(rng.integers(20, 60))
    cy, cx = rng.uniform(0, size, (2, n_pores))
    radius = rng.uniform(0.8, 3.0, n_pores) * u
    at = np.clip(cy.astype(int), 0, size - 1), np.clip(cx.astype(int), 0, size - 1)
    seeds = np.zeros((size, size), bool)
    seeds[at] = True
    dist, (iy, ix) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    r_map = np.zeros((size, size), np.float32)
    r_map[at] = radius
    pore = np.clip(1 - dist / np.maximum(r_map[iy, ix], 0.5), 0, 1)
    gray = gray - 0.3 * pore**0.7
    return _tint(gray, _jitter_colour(rng, (0.19, 0.21, 0.21)), _jitter_colour(rng, (0.74, 0.76, 0.74)))


def _leather(rng: np.random.Generator, size: int) -> np.ndarray:
    """Pebble-grain leather: irregular domed cells (a Voronoi tessellation of jittered seeds, its
    coordinates warped by smooth noise) separated by narrow dark creases, with fine pore noise."""
    u = size / 256
    yy, xx = _grid(size)
    cell = rng.uniform(10, 15) * u
    # One seed per grid cell, jittered: pebbles of similar size (Poisson seeds give slivers).
    g = np.arange(0.0, size, cell)
    sy, sx = np.meshgrid(g, g, indexing="ij")
    sy = np.clip(sy + rng.uniform(0.1, 0.9, sy.shape) * cell, 0, size - 1).astype(int)
    sx = np.clip(sx + rng.uniform(0.1, 0.9, sx.shape) * cell, 0, size - 1).astype(int)
    seeds = np.zeros((size, size), bool)
    seeds[sy, sx] = True
    # Warp where each pixel looks up its nearest seed, so cell walls are wavy rather than straight.
    warp = 0.2 * cell
    wy = np.clip(np.rint(yy + warp * _smooth_noise(rng, (size, size), 2 * cell)), 0, size - 1).astype(int)
    wx = np.clip(np.rint(xx + warp * _smooth_noise(rng, (size, size), 2 * cell)), 0, size - 1).astype(int)
    _, (iy, ix) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    label = (iy * size + ix)[wy, wx]
    # Creases are where the warped cell label changes; each cell domes up away from its crease.
    edge = np.zeros((size, size), bool)
    edge[:-1] |= label[:-1] != label[1:]
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    to_edge = ndimage.distance_transform_edt(~edge).astype(np.float32)
    dome = 1 - np.exp(-to_edge / (0.18 * cell))
    pores = _smooth_noise(rng, (size, size), 1.0)
    bright = rng.normal(0, 0.04, size * size)[label]  # each pebble its own slight tone
    gray = 0.35 + 0.5 * dome + bright + 0.03 * pores + 0.05 * _smooth_noise(rng, (size, size), 60 * u)
    return _tint(gray, _jitter_colour(rng, (0.10, 0.05, 0.04)), _jitter_colour(rng, (0.50, 0.24, 0.16)))


@lru_cache(maxsize=None)
def _stretched_photo(name: str) -> np.ndarray:
    """:func:`_photo` with its 1st..99th percentile stretched to [0, 1] (clipped), for photos as low in
    contrast as ``moon``, whose middle 90 % of pixels span only ~27 grey levels; (H, W) float32."""
    photo = _photo(name)
    lo, hi = np.percentile(photo, [1, 99])
    return np.clip((photo - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


def _stone(rng: np.random.Generator, size: int) -> np.ndarray:
    """Weathered stone from the ``moon`` photo: a cratered, pitted grey surface, contrast stretched
    (see :func:`_stretched_photo`) and tinted a cool slate. Same crop/flip/turn/jitter as the other photos."""
    return _photo_texture("moon", (0.10, 0.14, 0.20), (0.72, 0.80, 0.86), rotate=True, stretch=True)(rng, size)


_TEXTURES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "brick": _photo_texture("brick", (0.30, 0.08, 0.05), (1.0, 0.62, 0.48), rotate=False),
    "grass": _photo_texture("grass", (0.04, 0.16, 0.02), (0.62, 0.90, 0.40), rotate=True),
    "gravel": _photo_texture("gravel", (0.16, 0.14, 0.12), (0.90, 0.84, 0.74), rotate=True),
    "wood": _wood,
    "fabric": _fabric,
    "metal": _metal,
    "marble": _marble,
    "concrete": _concrete,
    "leather": _leather,
    "stone": _stone,
}

# --------------------------------------------------------------------------------------------------
# defects: each takes the clean image (S, S, 3) float32 in [0, 1], an rng and the area in pixels, and
# returns (region (S, S) bool, candidate (S, S, 3) float32); only the region of the candidate is used.


def _blob(
    rng: np.random.Generator, size: int, area: int, *, elongation: float, roughness: float, n: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Irregular blob(s) of exactly ``area`` pixels: the region and a field ``t`` (S, S) that is 0 at
    the centre(s) and 1 on the boundary (used for shading)."""
    yy, xx = _grid(size)
    field = np.full((size, size), np.inf, np.float32)
    radius = np.sqrt(area / n / np.pi)
    for _ in range(n):
        margin = min(1.3 * radius, size / 2)
        cy, cx = rng.uniform(margin, size - margin, 2)
        ang = rng.uniform(0, np.pi)
        e = rng.uniform(1.0, elongation)
        dy, dx = yy - cy, xx - cx
        a = dx * np.cos(ang) + dy * np.sin(ang)
        b = -dx * np.sin(ang) + dy * np.cos(ang)
        d = np.hypot(a / e, b * e) / max(radius, 0.5)
        d = d + roughness * _smooth_noise(rng, (size, size), max(1.5, 0.6 * radius))
        field = np.minimum(field, d)
    region = _lowest(field, area)
    t = np.clip(field / max(float(field[region].max()), 1e-6), 0, 1)
    return region, t


def _scratch(clean: np.ndarray, rng: np.random.Generator, area: int):
    """A gentle arc where the surface is scraped bright."""
    size = clean.shape[0]
    u = size / 256
    width = rng.uniform(1.5, 3.5) * u
    length = float(np.clip(area / width, 0.08 * size, 0.95 * size))
    s = np.arange(0.0, length, 0.5)
    heading = rng.uniform(0, 2 * np.pi) + rng.uniform(-0.8, 0.8) / size * s
    pts = np.stack([np.cumsum(np.sin(heading)) * 0.5, np.cumsum(np.cos(heading)) * 0.5], axis=1)
    pts = _place(pts, size, margin=width + 1, rng=rng)
    region = _lowest(_path_field(pts, size, rng, wobble=0.4), area)
    # Scraping exposes bright material; on an already bright surface it shows as a grey groove instead.
    bright = float(clean[region].mean()) > 0.65
    a = rng.uniform(0.5, 0.75)
    cand = clean * (1 - a) + a * _jitter_colour(rng, (0.38, 0.38, 0.40) if bright else (0.93, 0.93, 0.90))
    return region, cand


def _hole(clean: np.ndarray, rng: np.random.Generator, area: int):
    """A punched-through hole: dark inside, with a lighter torn rim."""
    region, t = _blob(rng, clean.shape[0], area, elongation=1.4, roughness=0.12)
    keep = (0.06 + 0.4 * _smoothstep(0.8, 1.0, t))[..., None]
    background = _jitter_colour(rng, (0.04, 0.04, 0.05), 0.02)
    return region, clean * keep + (1 - keep) * background


def _stain(clean: np.ndarray, rng: np.random.Generator, area: int):
    """A translucent stain (coffee, oil, rust) with a darker drying ring."""
    region, t = _blob(rng, clean.shape[0], area, elongation=2.0, roughness=0.35)
    colours = [(0.50, 0.32, 0.10), (0.22, 0.20, 0.16), (0.60, 0.55, 0.20), (0.55, 0.22, 0.08)]
    colour = _jitter_colour(rng, colours[int(rng.integers(len(colours)))])
    alpha = (rng.uniform(0.5, 0.75) * (0.75 + 0.25 * _smoothstep(0.6, 1.0, t)))[..., None]
    return region, clean * ((1 - alpha) + alpha * colour)


def _crack(clean: np.ndarray, rng: np.random.Generator, area: int):
    """A jagged dark crack: a heading-reverting random walk, with one or two side branches."""
    size = clean.shape[0]
    u = size / 256
    width = rng.uniform(1.2, 2.5) * u
    total = float(np.clip(area / width, 0.08 * size, 1.4 * size))
    n_branch = int(rng.integers(1, 3)) if total > 0.3 * size else 0
    main_len = total / (1 + 0.35 * n_branch)
    step = 2.0 * max(u, 0.5)

    def walk(start: np.ndarray, heading0: float, length: float) -> np.ndarray:
        n = max(2, int(length / step))
        dev = np.zeros(n)
        for k in range(1, n):  # mean-reverting wiggle, so the crack keeps a general direction
            dev[k] = 0.8 * dev[k - 1] + rng.normal(0, 0.35)
        heading = heading0 + dev
        steps = step * np.stack([np.sin(heading), np.cos(heading)], axis=1)
        return np.concatenate([start[None], start + np.cumsum(steps, axis=0)])

    theta = rng.uniform(0, 2 * np.pi)
    main = walk(np.zeros(2), theta, main_len)
    paths = [main]
    for _ in range(n_branch):
        start = main[int(rng.integers(len(main) // 4, max(len(main) // 4 + 1, 3 * len(main) // 4)))]
        side = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0)
        paths.append(walk(start, theta + side, 0.35 * main_len))
    pts = np.concatenate([_resample_path(p) for p in paths])
    pts = _place(pts, size, margin=width + 1, rng=rng)
    region = _lowest(_path_field(pts, size, rng, wobble=0.3), area)
    cand = clean * rng.uniform(0.12, 0.3) + 0.02
    return region, cand


def _particle(clean: np.ndarray, rng: np.random.Generator, area: int):
    """One to three foreign particles (plastic, fibre, grit) in a colour foreign to the texture."""
    n = int(rng.integers(1, 4)) if area >= 60 else 1
    region, t = _blob(rng, clean.shape[0], area, elongation=2.5, roughness=0.2, n=n)
    palette = np.array(
        [(0.10, 0.35, 0.85), (0.95, 0.82, 0.10), (0.93, 0.93, 0.93), (0.07, 0.07, 0.07), (0.82, 0.15, 0.15)],
        np.float32,
    )
    # Prefer colours far from the texture so the particle reads as foreign; rng picks among them.
    mean = clean.reshape(-1, 3).mean(0)
    far = palette[np.linalg.norm(palette - mean, axis=1) > 0.35]
    colour = _jitter_colour(rng, far[int(rng.integers(len(far)))] if len(far) else palette[0])
    shade = (0.75 + 0.25 * (1 - t))[..., None]  # rounded body: brighter in the middle
    grain = 0.03 * _smooth_noise(rng, t.shape, 1.5)[..., None]
    return region, colour * shade + grain


def _fold(clean: np.ndarray, rng: np.random.Generator, area: int):
    """A fold (or cut flap): a band where the neighbouring strip lies mirrored on top, shaded darker
    towards the crease."""
    size = clean.shape[0]
    yy, xx = _grid(size)
    cy, cx = rng.uniform(0.25 * size, 0.75 * size, 2)
    phi = rng.uniform(0, np.pi)
    ty, tx = np.sin(phi), np.cos(phi)  # along the band
    ny, nx = tx, -ty  # across the band
    along = (yy - cy) * ty + (xx - cx) * tx
    perp = (yy - cy) * ny + (xx - cx) * nx
    # Wider bands for larger areas, so a big fold reads as a flap rather than a long hairline.
    u = size / 256
    band = float(np.clip(0.35 * np.sqrt(area) * rng.uniform(0.8, 1.2), 2 * u, 40 * u))
    half_len = float(np.clip(area / (2 * band), 0.08 * size, 0.7 * size))
    # Capsule distance: a straight band with round ends; the rank threshold sets its width.
    field = np.hypot(perp, np.maximum(np.abs(along) - half_len, 0))
    field = field + 0.3 * _smooth_noise(rng, (size, size), max(2.0, size / 32))
    region = _lowest(field, area)
    half_w = max(float(np.abs(perp[region]).max()), 0.5)
    # Reflect across the band edge at perp = -half_w: the flap shows the strip beyond that edge.
    shift = 2 * (perp + half_w)
    src_y, src_x = yy - shift * ny, xx - shift * nx
    flap = np.stack(
        [ndimage.map_coordinates(clean[..., c], [src_y, src_x], order=1, mode="reflect") for c in range(3)],
        axis=-1,
    )
    shade = 0.5 + 0.4 * np.clip((perp + half_w) / (2 * half_w), 0, 1)
    return region, flap * shade[..., None]


# synth_c: defect families shaped like real ones: subtle unevenness, cracks that follow
# the texture, pitting, chipped edges and contamination, rather than synth_a/b's high-contrast shapes.


def _shading(clean: np.ndarray, rng: np.random.Generator, area: int):
    """Low-contrast unevenness (a pressure mark, a discoloured or dull patch): a large soft irregular
    region where brightness shifts smoothly, darker or lighter, with a slight hue shift.

    The region is a smooth noise field thresholded by rank, held together by a weak pull towards one
    centre, so it is lobed and irregular, never a disc. The candidate moves each pixel by about
    ``MIN_DELTA`` grey levels, most in the middle and least at the edge; :func:`_composite` lifts the
    weakest to exactly ``MIN_DELTA``, so this is as faint as the mask contract allows.
    """
    size = clean.shape[0]
    yy, xx = _grid(size)
    radius = np.sqrt(area / np.pi)
    margin = min(0.6 * radius, size / 2)
    cy, cx = rng.uniform(margin, size - margin, 2)
    dist = np.hypot(yy - cy, xx - cx) / max(radius, 1.0)
    # Noise weak enough against the centre pull that the region stays mostly one lobed patch.
    field = dist - 0.55 * _fractal(rng, (size, size), (max(2.0, 0.8 * radius), max(1.5, 0.3 * radius)), gain=0.4)
    region = _lowest(field, area)
    t = np.clip((field - field.min()) / max(float(field[region].max() - field.min()), 1e-6), 0, 1)
    sign = 1.0 if rng.random() < 0.4 else -1.0  # most real unevenness is a darker patch
    # Change in [0, 1] units: ~0.9-1.25 MIN_DELTA at the core falling to 60 % of that at the edge
    # (lifted back to MIN_DELTA there by the contract); a per-channel factor gives a slight hue shift.
    amp = rng.uniform(0.9, 1.25) * MIN_DELTA / 255 * (1 - 0.4 * _smoothstep(0.3, 1.0, t))
    hue = 1 + rng.uniform(-0.25, 0.25, 3).astype(np.float32)
    return region, clean + sign * amp[..., None] * hue


def _texture_walk(
    lum: np.ndarray, rng: np.random.Generator, start, heading: float, n_steps: int, step: float, pull: float = 1.0
) -> np.ndarray:
    """A walk of ``n_steps`` steps of ``step`` pixels over ``lum`` (S, S) from ``start`` (y, x) that
    prefers dark ground; returns its vertices (<= n_steps + 1, 2) as (y, x).

    At each step seven headings within ±0.9 rad of the current one are tried; each is scored by the
    luminance ``2 * step`` pixels ahead (times ``pull``), plus noise, a persistence cost on the turn
    and a pull back towards the first heading, and the cheapest wins. So the walk runs along valleys
    and grain boundaries of the texture yet keeps a general direction (it does not curl up inside a
    dark hollow). It stops at the image border.
    ``pull=0`` gives a texture-blind wiggly walk (the comparison in the tests).
    """
    size = lum.shape[0]
    turns = np.linspace(-0.9, 0.9, 7)
    spread = float(lum.std()) + 1e-6  # luminance in units of the image's own contrast
    pts = [np.asarray(start, np.float64)]
    heading0 = heading
    for _ in range(n_steps):
        cand = heading + turns
        ahead = pts[-1] + 2 * step * np.stack([np.sin(cand), np.cos(cand)], axis=1)
        iy, ix = np.rint(ahead).astype(int).T
        inside = (iy >= 0) & (iy < size) & (ix >= 0) & (ix < size)
        cost = pull * lum[np.clip(iy, 0, size - 1), np.clip(ix, 0, size - 1)] / spread
        drift = np.abs(np.angle(np.exp(1j * (cand - heading0))))  # wrapped to [0, pi]
        cost = cost + 0.6 * np.abs(turns) + 0.8 * drift + rng.normal(0, 0.35, turns.size)
        cost[~inside] = np.inf
        if not np.isfinite(cost).any():
            break
        heading = float(cand[int(np.argmin(cost))])
        nxt = pts[-1] + step * np.array([np.sin(heading), np.cos(heading)])
        if not (0 <= nxt[0] <= size - 1 and 0 <= nxt[1] <= size - 1):
            break
        pts.append(nxt)
    return np.array(pts)


def _texture_crack(clean: np.ndarray, rng: np.random.Generator, area: int):
    """A thin crack (1-2.5 px wide at 256 px) that follows the texture: it grows both ways from a dark
    seed point by :func:`_texture_walk`, so it runs along the darkest valleys and grain boundaries as
    real cracks follow weak material; darkened, and sometimes with a faint bright lip on one side."""
    size = clean.shape[0]
    u = size / 256
    width = rng.uniform(1.0, 2.5) * u
    total = float(np.clip(area / width, 0.08 * size, 1.4 * size))
    step = max(1.5 * u, 1.0)
    lum = ndimage.gaussian_filter(clean.mean(-1), max(u, 0.7))
    # Seed at the darkest of a few random interior points: cracks start at weak spots.
    lo, hi = 0.15 * size, 0.85 * size
    tries = rng.uniform(lo, hi, (8, 2))
    start = tries[int(np.argmin(lum[tries[:, 0].astype(int), tries[:, 1].astype(int)]))]
    heading = rng.uniform(0, 2 * np.pi)
    n = max(2, int(total / step / 2))
    one = _texture_walk(lum, rng, start, heading, n, step)
    other = _texture_walk(lum, rng, start, heading + np.pi, n, step)
    path = _resample_path(np.concatenate([one[::-1], other[1:]]))
    field = _path_field(path, size, rng, wobble=0.25)
    region = _lowest(field, area)
    cand = clean * rng.uniform(0.15, 0.35) + 0.02
    if rng.random() < 0.5:
        # A bright lip: the outer half of the crack's width on one side catches the light.
        on = np.zeros((size, size), bool)
        iy, ix = np.rint(path).astype(int).T
        on[iy, ix] = True
        dist, (ny, nx) = ndimage.distance_transform_edt(~on, return_indices=True)
        ty, tx = np.gradient(path[:, 0]), np.gradient(path[:, 1])
        tangent = np.zeros((size, size, 2), np.float32)
        tangent[iy, ix] = np.stack([ty, tx], axis=1)
        yy, xx = _grid(size)
        tn = tangent[ny, nx]
        side = tn[..., 0] * (xx - nx) - tn[..., 1] * (yy - ny)  # cross product: which side of the path
        lip = region & (side > 0) & (dist >= max(1.0, 0.5 * float(dist[region].max())))
        cand = np.where(lip[..., None], np.clip(clean * 1.12 + 0.06, 0, 1), cand)
    return region, cand


def _pit(clean: np.ndarray, rng: np.random.Generator, area: int):
    """Corrosion pitting: one to a dozen small round pits (radius 1.5-6 px at 256 px), clustered or
    scattered, that do not touch. Each is dark at the centre and lit from one side: a shadow on the
    rim towards the light, a bright rim opposite (the far wall of a dimple catches the light)."""
    size = clean.shape[0]
    u = size / 256
    yy, xx = _grid(size)
    # A typical radius, at least large enough that a dozen pits cover the area; then the count.
    # Rounding the count up keeps the mean radius <= r_mean <= 5 px; the spread of +-25 % about it
    # keeps every pit within ~6 px.
    r_mean = max(rng.uniform(1.5, 5.0) * u, np.sqrt(area / (12 * np.pi)))
    n = int(np.clip(np.ceil(area / (np.pi * r_mean**2)), 1, 12))
    radii = rng.uniform(0.75, 1.25, n)
    radii *= np.sqrt(area / np.pi / np.sum(radii**2))  # the discs together cover ~area pixels
    # Clustered: centres around one spot; scattered: over the whole image. Rejection keeps a gap of
    # two pixels between discs so every pit is its own component.
    clustered = rng.random() < 0.5
    hub = rng.uniform(0.25 * size, 0.75 * size, 2)
    spread = max(3.0 * radii.max() * np.sqrt(n), 0.1 * size)
    centres: list[np.ndarray] = []
    for r in radii:
        for _ in range(50):
            c = hub + rng.normal(0, spread / 2, 2) if clustered else rng.uniform(0, size, 2)
            c = np.clip(c, r + 1, size - 2 - r)
            if all(np.hypot(*(c - o)) > r + q + 2 for o, q in zip(centres, radii)):
                break
        centres.append(c)
    centres_a = np.array(centres)
    # Each pixel's pit: normalised distance rho to every centre (n, S, S); the nearest wins.
    dy = yy[None] - centres_a[:, 0, None, None]
    dx = xx[None] - centres_a[:, 1, None, None]
    rho_all = np.hypot(dy, dx) / np.maximum(radii, 0.5)[:, None, None]
    k = np.argmin(rho_all, axis=0)
    rho = np.take_along_axis(rho_all, k[None], 0)[0]
    region = _lowest(rho, area)
    phi = rng.uniform(0, 2 * np.pi)  # light direction, shared by all pits
    ky = np.take_along_axis(dy, k[None], 0)[0]
    kx = np.take_along_axis(dx, k[None], 0)[0]
    facing = (ky * np.sin(phi) + kx * np.cos(phi)) / np.maximum(np.hypot(ky, kx), 1e-3)  # -1..1
    rim = _smoothstep(0.4, 1.0, rho)
    shade = 0.25 + 0.35 * rho  # dark floor
    shade = shade + rim * (0.6 * np.clip(facing, 0, 1) - 0.2 * np.clip(-facing, 0, 1))
    return region, np.clip(clean * shade[..., None] + 0.12 * rim[..., None] * np.clip(facing, 0, 1)[..., None], 0, 1)


def _edge_chip(clean: np.ndarray, rng: np.random.Generator, area: int):
    """A chip broken off at an image border: an irregular bite anchored on one of the four borders
    (the region always touches it), showing dark background through it, with a jagged broken edge
    shaded lighter (the fracture face catches the light)."""
    size = clean.shape[0]
    u = size / 256
    yy, xx = _grid(size)
    side = int(rng.integers(4))
    along = rng.uniform(0.1 * size, 0.9 * size)
    # Coordinates (depth into the image, position along the border) for the chosen border.
    depth = [yy, size - 1 - yy, xx, size - 1 - xx][side]
    pos = [xx, xx, yy, yy][side]
    r = np.sqrt(2 * area / np.pi)  # a half-disc of radius r has the requested area
    e = rng.uniform(1.0, 2.2)  # wider along the border than deep
    # In pixels: an irregular outline at the bite's own scale, jagged by ~1 px at a few pixels' scale
    # (stronger fine noise would scatter single pixels rather than make a broken edge).
    field = np.hypot((pos - along) / e, depth)
    # Both bounded relative to r, so that a chip of a few pixels stays one piece.
    field = field + 0.15 * r * _smooth_noise(rng, (size, size), max(3.0, 0.4 * r))
    jag = min(1.2 * max(u, 0.5), 0.08 * r)
    field = (field + jag * _smooth_noise(rng, (size, size), max(1.5, 3 * u))) / max(r, 1.0)
    a = int(round(along))
    ay, ax = [(0, a), (size - 1, a), (a, 0), (a, size - 1)][side]
    field[ay, ax] = -1.0  # ranks first: the region touches the border whatever the noise does
    region = _lowest(field, area)
    t = np.clip(field / max(float(field[region].max()), 1e-6), 0, 1)
    background = _jitter_colour(rng, (0.06, 0.06, 0.07), 0.03)
    face = np.clip(clean * 1.15 + 0.10, 0, 1)  # fracture face: lighter than the surface
    w_face = _smoothstep(0.75, 1.0, t)[..., None]
    return region, background * (1 - w_face) + face * w_face


def _contamination(clean: np.ndarray, rng: np.random.Generator, area: int):
    """Dust, fibres and smudges: a few small specks, zero to two thin curved fibres, and/or a
    translucent grey smudge, all near-neutral grey, white or dark (dust has little colour), laid
    over the texture with moderate alpha."""
    size = clean.shape[0]
    u = size / 256
    yy, xx = _grid(size)
    smudge = rng.random() < 0.5
    # Every part gives a field in pixels that is negative inside it; one rank threshold over their
    # minimum sets the exact area, growing or shrinking all parts together.
    fields, parts = [], []
    n_specks = int(rng.integers(3, 16))
    cy, cx = rng.uniform(0.05 * size, 0.95 * size, (2, n_specks))
    rad = rng.uniform(0.5, 2.5, n_specks) * u
    d = np.hypot(yy[None] - cy[:, None, None], xx[None] - cx[:, None, None]) - rad[:, None, None]
    fields.append(d.min(0))
    parts.append("specks")
    for _ in range(int(rng.integers(0, 3))):
        length = rng.uniform(0.08, 0.3) * size
        s = np.arange(0.0, length, 0.5)
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.05, s.size))
        pts = np.stack([np.cumsum(np.sin(heading)) * 0.5, np.cumsum(np.cos(heading)) * 0.5], axis=1)
        pts = _place(pts, size, margin=2, rng=rng)
        on = np.zeros((size, size), bool)
        on[tuple(np.rint(pts).astype(int).T)] = True
        fields.append(ndimage.distance_transform_edt(~on).astype(np.float32) - 0.5 * u)
        parts.append("fibre")
    if smudge or (len(fields) == 1 and area > 0.02 * size * size):  # no fibres: a large area is a smudge
        region_s, t_s = _blob(rng, size, max(area // 2, 1), elongation=1.8, roughness=0.4)
        fields.append(np.sqrt(area / np.pi) * (t_s - 1.0) * 0.5 + np.where(region_s, 0, 1e3))
        parts.append("smudge")
    stack = np.stack(fields)
    which = np.argmin(stack, axis=0)
    region = _lowest(stack.min(0), area)
    # Per part a neutral grey level and alpha; the channels differ by at most 0.02 (a trace of tint).
    levels = np.array([rng.choice([rng.uniform(0.05, 0.25), rng.uniform(0.45, 0.6), rng.uniform(0.85, 0.97)])
                       for _ in parts], np.float32)
    colours = levels[:, None] + rng.uniform(-0.01, 0.01, (len(parts), 3)).astype(np.float32)
    alphas = np.array([rng.uniform(0.35, 0.5) if p == "smudge" else rng.uniform(0.55, 0.85) for p in parts],
                      np.float32)
    colour, alpha = colours[which], alphas[which][..., None]
    return region, clean * (1 - alpha) + alpha * colour


_DEFECTS: dict[str, Callable[[np.ndarray, np.random.Generator, int], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "crack": _crack,
    "particle": _particle,
    "fold": _fold,
    "shading": _shading,
    "texture_crack": _texture_crack,
    "pit": _pit,
    "edge_chip": _edge_chip,
    "contamination": _contamination,
}


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def _composite(clean: np.ndarray, candidate: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paste ``candidate`` (S, S, 3) float into ``clean`` (S, S, 3) uint8 inside ``region`` (S, S) and
    return ``(image, mask)`` with mask == the changed pixels.

    Pixels where the rounded candidate moved less than ``MIN_DELTA`` are pushed by ``MIN_DELTA`` in
    the direction the defect meant (or the other way where that would clip), so every region pixel
    changes and the mask is exactly the region.
    """
    image = clean.copy()
    cand = _to_uint8(candidate)
    image[region] = cand[region]
    clean16 = clean.astype(np.int16)
    weak = region & (np.abs(image.astype(np.int16) - clean16).max(-1) < MIN_DELTA)
    if weak.any():
        c = clean16[weak]
        intended = (cand[weak].astype(np.int16) - c).sum(-1)
        can_down = c.max(-1) >= MIN_DELTA
        can_up = c.min(-1) <= 255 - MIN_DELTA
        want_down = (intended < 0) | ((intended == 0) & (c.mean(-1) > 127))
        # One of the two is always possible: a pixel that cannot go up has every channel above 231.
        down = (want_down & can_down) | ~can_up
        pushed = c + np.where(down, -MIN_DELTA, MIN_DELTA)[:, None]
        image[weak] = np.clip(pushed, 0, 255).astype(np.uint8)
    mask = (image != clean).any(-1)
    if not np.array_equal(mask, region):  # guaranteed by construction; a failure is a bug here
        raise AssertionError("synthetic defect: changed pixels differ from the defect region")
    return image, mask


# --------------------------------------------------------------------------------------------------
# public API


def _check_name(kind: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {sorted(allowed)}")


def render_sample(
    category: str,
    defect: str | None,
    *,
    size: int,
    rng: np.random.Generator,
    area_fraction: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one sample of ``category`` with ``defect`` (or none).

    Returns ``clean`` (S, S, 3) uint8, ``image`` (S, S, 3) uint8 and ``mask`` (S, S) bool, S = ``size``.
    ``defect=None`` gives ``image == clean`` and an all-False mask. Otherwise ``image`` equals ``clean``
    outside ``mask`` and differs from it by at least ``MIN_DELTA`` in some channel at every mask pixel.
    ``area_fraction`` (of S*S) defaults to a log-uniform draw from ``DEFECT_AREA[defect]``.
    """
    _check_name("category", category, _TEXTURES)
    if defect is not None:
        _check_name("defect", defect, _DEFECTS)
    if int(size) < _MIN_IMAGE_SIZE:
        raise ValueError(f"size must be >= {_MIN_IMAGE_SIZE}, got {size}")
    size = int(size)
    clean = _to_uint8(_TEXTURES[category](rng, size))
    if defect is None:
        return clean, clean.copy(), np.zeros((size, size), bool)
    if area_fraction is None:
        lo, hi = DEFECT_AREA[defect]
        area_fraction = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    if not 0 < area_fraction < 1:
        raise ValueError(f"area_fraction must be in (0, 1), got {area_fraction}")
    area = max(MIN_DEFECT_PIXELS, int(round(area_fraction * size * size)))
    region, candidate = _DEFECTS[defect](clean.astype(np.float32) / 255.0, rng, area)
    image, mask = _composite(clean, candidate, region)
    return clean, image, mask


def _rng(seed: int, dataset: str, category: str, split: str, index: int) -> np.random.Generator:
    """The generator of one image. Names enter as CRC32 (Python's ``hash`` is salted per process)."""
    key = [seed, *(zlib.crc32(s.encode()) for s in (dataset, category, split)), index]
    return np.random.default_rng(np.random.SeedSequence(key))


def _stratified_fraction(defect: str, j: int, n: int, rng: np.random.Generator) -> float:
    """Area fraction of the ``j``-th of ``n`` images of one defect: evenly spread over the log range,
    with a little jitter, so that both the smallest and the largest sizes occur even in a small set."""
    lo, hi = np.log(DEFECT_AREA[defect][0]), np.log(DEFECT_AREA[defect][1])
    if n == 1:
        q = rng.uniform()
    else:
        q = float(np.clip(j / (n - 1) + rng.uniform(-0.25, 0.25) / n, 0, 1))
    return float(np.exp(lo + q * (hi - lo)))


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # PIL writes no timestamp into PNGs, so equal arrays give equal bytes.
    # Level 1 is ~3x faster than the default 6 for ~10 % larger files; the pixels are the same.
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


class DataFolderError(PipelineError, FileExistsError):
    """A folder the data stage would replace holds something it did not write. Names what is there."""


_GENERATED = re.compile(r"(?:train/good|test/[a-z_]+)/\d+\.png|ground_truth/[a-z_]+/\d+_mask\.png")
"""The files :func:`generate` writes inside a category folder (relative to it)."""


def _check_replaceable(root: Path) -> None:
    """Refuse to wipe a folder holding anything :func:`generate` did not write: a symbolic link (to be
    deleted through), an entry beside the categories, or any file inside a category whose path is not
    one the generator writes (:data:`_GENERATED`), e.g. a user's notes or photos. Names what it found."""
    if root.is_symlink():
        raise DataFolderError(f"{root} is a symbolic link; the data stage replaces a folder and will not delete "
                              f"or replace a link: give the folder itself ({root.resolve()}) or another root")
    if not root.exists():
        return
    if not root.is_dir():
        raise DataFolderError(f"{root} exists and is not a folder; remove it or choose another root")
    known = {c for spec in DATASETS.values() for c in spec["categories"]}
    foreign = [p.name for p in root.iterdir() if not (p.is_dir() and not p.is_symlink() and p.name in known)]
    for category in sorted(p for p in root.iterdir() if p.name in known and p.is_dir() and not p.is_symlink()):
        for path in sorted(category.rglob("*")):
            inside = path.relative_to(category).as_posix()
            if path.is_symlink() or (path.is_file() and not _GENERATED.fullmatch(inside)) or \
                    not (path.is_file() or path.is_dir()):
                foreign.append(f"{category.name}/{inside}")
    if foreign:
        raise DataFolderError(
            f"{root} holds files the data stage did not write (unexpected: {', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); it never deletes those: move them away or choose another root"
        )


_TMP_MARKER = ".spg-synthetic-tmp"
"""Written first into ``<root>.tmp`` by :func:`generate`: a temp tree holding it is ours to delete."""


def _clear_tmp(tmp: Path) -> None:
    """Delete ``tmp`` if a killed :func:`generate` left it (it holds the marker) or it is empty;
    refuse anything else, which may be a user's files."""
    if not tmp.exists() and not tmp.is_symlink():
        return
    if tmp.is_dir() and not tmp.is_symlink():
        entries = sorted(p.name for p in tmp.iterdir())
        if not entries or (tmp / _TMP_MARKER).is_file():
            shutil.rmtree(tmp)
            return
        what = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}: " + ", ".join(entries[:5])
        what += ", ..." if len(entries) > 5 else ""
    else:
        what = "not a folder"
    raise DataFolderError(
        f"{tmp}: refusing to delete it: the data stage builds its tree there, but this one was not made by it "
        f"(no {_TMP_MARKER} marker; {what}); move it away or remove it yourself"
    )


def generate(
    root: Path,
    dataset: str,
    *,
    seed: int,
    image_size: int,
    train_good: int,
    test_good: int,
    test_anomalous: int,
) -> dict:
    """Write dataset ``dataset`` (a key of ``DATASETS``) under ``root`` in MVTec AD layout.

    Per category: ``train_good`` and ``test_good`` normal images, and ``test_anomalous`` defective
    images spread as evenly as possible over the dataset's defect styles (in ``DATASETS`` order), each
    with ``ground_truth/<defect>/<stem>_mask.png``. Images are RGB PNG ``image_size`` square.

    The tree is built in ``<root>.tmp`` and renamed over ``root`` when complete, so a crashed run
    leaves no half-written dataset and a re-run gives the same bytes. A ``<root>.tmp`` already there
    is deleted only when a run of this function made it (its marker file) or it is empty; anything
    else raises :class:`DataFolderError` naming what is there. Returns a JSON-ready summary:
    counts per category and defect, and mask area fractions (min/max, overall and per defect).
    """
    _check_name("dataset", dataset, DATASETS)
    for name, value in (
        ("seed", seed),
        ("image_size", image_size),
        ("train_good", train_good),
        ("test_good", test_good),
        ("test_anomalous", test_anomalous),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {_MIN_IMAGE_SIZE}, got {image_size}")
    for name, value in (("train_good", train_good), ("test_good", test_good), ("test_anomalous", test_anomalous)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")

    spec = DATASETS[dataset]
    defects = spec["defects"]
    per_defect = [test_anomalous // len(defects) + (k < test_anomalous % len(defects)) for k in range(len(defects))]
    width = max(3, len(str(max(train_good, test_good, *per_defect) - 1)))

    # (category, split folder, defect or None, index within the folder, images of that defect)
    jobs: list[tuple[str, str, str | None, int, int]] = []
    for category in spec["categories"]:
        jobs += [(category, "train/good", None, i, train_good) for i in range(train_good)]
        jobs += [(category, "test/good", None, i, test_good) for i in range(test_good)]
        for defect, n in zip(defects, per_defect):
            jobs += [(category, f"test/{defect}", defect, i, n) for i in range(n)]

    root = Path(root)
    _check_replaceable(root)
    tmp = root.with_name(root.name + ".tmp")
    _clear_tmp(tmp)
    tmp.mkdir(parents=True)
    # The marker goes in first, so a killed run leaves either an empty folder or a marked one.
    (tmp / _TMP_MARKER).write_text("partial tree of pipeline.data.synthetic.generate; deleted on the next run\n")

    counts: dict[str, dict] = {
        c: {"train_good": train_good, "test_good": test_good, "test_anomalous": {}} for c in spec["categories"]
    }
    fractions: dict[str, list[float]] = {d: [] for d in defects}
    for category, split, defect, i, n in tqdm(jobs, desc=f"generate {dataset}", unit="img"):
        rng = _rng(seed, dataset, category, split, i)
        fraction = None if defect is None else _stratified_fraction(defect, i, n, rng)
        _, image, mask = render_sample(category, defect, size=image_size, rng=rng, area_fraction=fraction)
        stem = f"{i:0{width}d}"
        _save_png(tmp / category / split / f"{stem}.png", image)
        if defect is not None:
            _save_png(tmp / category / "ground_truth" / defect / f"{stem}_mask.png", mask.astype(np.uint8) * 255)
            fractions[defect].append(float(mask.mean()))
            tally = counts[category]["test_anomalous"]
            tally[defect] = tally.get(defect, 0) + 1

    if root.exists():
        shutil.rmtree(root)
    # Unmarked just before the rename, so the dataset holds no marker. A kill between these two calls
    # leaves a complete but unmarked <root>.tmp, which the next run refuses by name (never deletes).
    (tmp / _TMP_MARKER).unlink()
    tmp.rename(root)

    observed = [f for fs in fractions.values() for f in fs]
    summary = {
        "dataset": dataset,
        "seed": int(seed),
        "image_size": int(image_size),
        "n_images": len(jobs),
        "categories": list(spec["categories"]),
        "defects": list(defects),
        "counts": counts,
        "area_fraction": {
            "min": min(observed),
            "max": max(observed),
            "per_defect": {d: {"min": min(fs), "max": max(fs)} for d, fs in fractions.items() if fs},
        },
    }
    log.info(
        "wrote %s to %s: %d images, %d categories, defect area %.4f..%.4f of the image",
        dataset,
        root,
        len(jobs),
        len(spec["categories"]),
        summary["area_fraction"]["min"],
        summary["area_fraction"]["max"],
    )
    return summary
