"""Benchmark: exact AUPRO by one sort (``pipeline.evaluation.metrics.aupro``) vs the common 200-threshold loop.

    python benchmarks/aupro.py [--images 200] [--size 448] [--thresholds 200] [--fast-repeats 3] [--slow-repeats 1]

Data (seeded): ``--images`` maps of ``--size``², about half of them normal; an anomalous image holds 1-3
blobs (rotated ellipses) or scratches (thick segments) covering 0.1 %-10 % of it (log-uniform). A map is
sigmoid(smoothed unit noise + a × blurred mask - 1), float32, a ∈ [0.5, 2.5], so AUPRO is neither 0 nor 1.

fast  ``pipeline.evaluation.metrics.aupro``: every distinct score is a threshold, one sort of all pixels.
loop  the loop widespread in anomaly-detection code (MVTec-style ``compute_pro``, anomalib's before it
      went to torch): ``--thresholds`` thresholds evenly spaced from the lowest to the highest score;
      per threshold, binarise the whole stack, then per image label its mask (8-connectivity,
      skimage) and count each region's hits through the region's coordinates, and count the false
      positives over all normal pixels. Its curve gets the same (0, 0) start and is integrated by the
      same trapezoid + interpolation rule (``metrics.partial_area``), so |Δ AUPRO| is the loop's
      threshold-discretisation error alone.
loop, regions once  the same loop with the regions labelled once before it: what the loop costs
      without its redundant work (reported with ``--hoisted``, default on).

The alternatives run interleaved (fast, loop, fast, loop, ..., fast) so machine noise hits both; the
printed times are medians. Target: speed-up (loop / fast) >= 20x at the default size.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np
from scipy import ndimage
from skimage import measure

from pipeline.evaluation import metrics


def make_masks(n_images: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(N, S, S) uint8; about half the images are normal (all 0)."""
    masks = np.zeros((n_images, size, size), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in np.flatnonzero(rng.random(n_images) < 0.5):
        coverage = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1)))
        n_shapes = int(rng.integers(1, 4))
        area = coverage * size * size / n_shapes
        for _ in range(n_shapes):
            cy, cx = rng.uniform(0.1 * size, 0.9 * size, 2)
            theta = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)  # along the shape
            v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)  # across it
            if rng.random() < 0.6:  # blob: an ellipse of the wanted area
                ratio = rng.uniform(1, 3)
                a, b = np.sqrt(area / np.pi * ratio), np.sqrt(area / np.pi / ratio)
                shape = (u / a) ** 2 + (v / b) ** 2 <= 1
            else:  # scratch: a segment of width w and the wanted area
                width = rng.uniform(2, 5)
                half = min(area / width, 0.8 * size) / 2
                shape = (np.abs(u) <= half) & (np.abs(v) <= width / 2)
            masks[i][shape] = 1
    return masks


def make_maps(masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, S, S) float32 in (0, 1): sigmoid(smoothed unit noise + a × blurred mask - 1)."""
    noise = ndimage.gaussian_filter(rng.standard_normal(masks.shape, dtype=np.float32), sigma=(0, 4, 4))
    noise /= noise.std()
    signal = ndimage.gaussian_filter(masks.astype(np.float32), sigma=(0, 2, 2))
    signal *= rng.uniform(0.5, 2.5, (len(masks), 1, 1)).astype(np.float32)
    noise += signal
    del signal
    noise -= 1
    return 1 / (1 + np.exp(-noise))


def _integrate(fprs: list[float], pros: list[float], fpr_limit: float) -> float:
    fpr = np.concatenate(([0.0], fprs))
    pro = np.concatenate(([0.0], pros))
    return metrics.partial_area(fpr, pro, fpr_limit) / fpr_limit


def aupro_loop(masks: np.ndarray, maps: np.ndarray, n_thresholds: int = 200, fpr_limit: float = 0.3,
               regions_once: bool = False) -> float:
    """AUPRO from ``n_thresholds`` evenly spaced thresholds, highest first, as the common loop does."""
    normal = masks == 0
    n_normal = int(normal.sum())
    binary = np.empty(maps.shape, dtype=bool)

    def regions_of(mask: np.ndarray) -> list[np.ndarray]:
        return [r.coords for r in measure.regionprops(measure.label(mask, connectivity=2))]

    fixed = [regions_of(m) for m in masks] if regions_once else None
    fprs, pros = [], []
    for t in np.linspace(maps.min(), maps.max(), n_thresholds)[::-1]:
        np.greater_equal(maps, t, out=binary)
        overlaps = []
        for i in range(len(masks)):
            for coords in (fixed[i] if regions_once else regions_of(masks[i])):
                overlaps.append(binary[i][coords[:, 0], coords[:, 1]].sum() / len(coords))
        pros.append(np.mean(overlaps))
        fprs.append(np.logical_and(binary, normal).sum() / n_normal)
    return _integrate(fprs, pros, fpr_limit)


def timed(fn: Callable[[], float]) -> tuple[float, float]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--thresholds", type=int, default=200, help="thresholds of the loop")
    parser.add_argument("--fast-repeats", type=int, default=3)
    parser.add_argument("--slow-repeats", type=int, default=1, help="repeats of each loop variant")
    parser.add_argument("--no-hoisted", dest="hoisted", action="store_false",
                        help="skip the loop variant with regions labelled once")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    masks = make_masks(args.images, args.size, rng)
    maps = make_maps(masks, rng)
    cover = masks.mean(axis=(1, 2))
    cover = cover[cover > 0]
    n_regions = sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks)
    print(f"data: {args.images} maps of {args.size}x{args.size} ({masks.size / 1e6:.1f}M pixels), "
          f"{len(cover)} anomalous images, {n_regions} regions, coverage {cover.min():.2%}-{cover.max():.2%}, "
          f"built in {time.perf_counter() - t0:.1f} s", flush=True)

    slow = {"loop": lambda: aupro_loop(masks, maps, args.thresholds)}
    if args.hoisted:
        slow["loop, regions once"] = lambda: aupro_loop(masks, maps, args.thresholds, regions_once=True)
    fast_runs: list[tuple[float, float]] = []
    slow_runs: dict[str, list[tuple[float, float]]] = {name: [] for name in slow}

    def run_fast() -> None:
        fast_runs.append(timed(lambda: metrics.aupro(masks, maps)))
        print(f"fast: {fast_runs[-1][0]:7.2f} s  AUPRO {fast_runs[-1][1]:.6f}", flush=True)

    # Interleaved: fast, then each loop variant followed by a fast run while both kinds have repeats left.
    run_fast()
    for rep in range(max(args.slow_repeats, args.fast_repeats - 1)):
        for name, fn in slow.items():
            if rep < args.slow_repeats:
                slow_runs[name].append(timed(fn))
                print(f"{name}: {slow_runs[name][-1][0]:7.2f} s  AUPRO {slow_runs[name][-1][1]:.6f}", flush=True)
            if len(fast_runs) < args.fast_repeats:
                run_fast()
    while len(fast_runs) < args.fast_repeats:
        run_fast()

    fast_t = statistics.median(t for t, _ in fast_runs)
    fast_v = fast_runs[0][1]
    print(f"\n{args.images} maps of {args.size}x{args.size}, {args.thresholds} loop thresholds, medians of "
          f"{len(fast_runs)} fast / {args.slow_repeats} loop runs")
    print(f"fast (one sort, every distinct score): {fast_t:8.2f} s  AUPRO {fast_v:.6f}")
    for name, runs in slow_runs.items():
        slow_t = statistics.median(t for t, _ in runs)
        print(f"{name + ' (' + str(args.thresholds) + ' thresholds)':38s}: {slow_t:8.2f} s  AUPRO {runs[0][1]:.6f}  "
              f"speed-up {slow_t / fast_t:6.1f}x  |Δ AUPRO| {abs(runs[0][1] - fast_v):.2e}")


if __name__ == "__main__":
    main()
