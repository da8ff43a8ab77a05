"""Benchmark: pixel AUROC, AP and AUPRO of one category from one sort vs scikit-learn + AUPRO.

    python benchmarks/pixel_metrics.py [--images 60] [--size 448] [--repeats 5]

What the evaluate stage computes per category, per guide seed and per control:

one sort  ``pipeline.evaluation.metrics.pixel_metrics``: one sort of all pixels serves AUROC, AP and AUPRO.
separate  ``sklearn.metrics.roc_auc_score`` + ``average_precision_score`` on the flattened pixels
          (each sorts them again and checks the labels and scores with np.unique first) +
          ``pipeline.evaluation.metrics.aupro`` (its own sort): what ``compute_all`` did before.

The data are those of ``benchmarks/aupro.py`` (seeded blobs and scratches, about half the images
normal, float32 maps). The values are checked to agree (|Δ| printed) before timing; the two sides
run interleaved and the printed times are medians. Target: speed-up (separate / one sort) >= 2x.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from aupro import make_maps, make_masks  # this folder is on sys.path when run as a script
from pipeline.evaluation import metrics


def separate(masks: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    return {"pixel_auroc": float(roc_auc_score(masks.ravel(), maps.ravel())),
            "pixel_ap": float(average_precision_score(masks.ravel(), maps.ravel())),
            "pixel_aupro": metrics.aupro(masks, maps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    masks = make_masks(args.images, args.size, rng)
    maps = make_maps(masks, rng)

    a, b = metrics.pixel_metrics(masks, maps), separate(masks, maps)
    print("values:", {k: round(v, 6) for k, v in a.items()},
          "max |Δ| vs separate:", max(abs(a[k] - b[k]) for k in a))
    times: dict[str, list[float]] = {"one sort": [], "separate": []}
    for _ in range(args.repeats):
        for name, fn in (("one sort", metrics.pixel_metrics), ("separate", separate)):
            t0 = time.perf_counter()
            fn(masks, maps)
            times[name].append(time.perf_counter() - t0)
    one, sep = statistics.median(times["one sort"]), statistics.median(times["separate"])
    ratios = [s / o for o, s in zip(times["one sort"], times["separate"])]
    print(f"{args.images} maps of {args.size}^2 ({masks.size / 1e6:.1f} M pixels), {args.repeats} interleaved repeats")
    print(f"median one sort {one:.2f} s | separate {sep:.2f} s | median speed-up {statistics.median(ratios):.2f}x "
          "(target >= 2x)")


if __name__ == "__main__":
    main()
