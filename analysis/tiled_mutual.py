"""Is the tiled guides' lead over the batch only the batch's lower resolution? The batch signal at the
tiles' resolution, measured beside the tiled guides on one grid (a research analysis behind
docs/experiments.md; nothing here is used by the pipeline).

    python -m analysis.tiled_mutual --root <clone> --dataset kolektorsdd --aux synth_a synth_b \
        --references 32 --out /tmp/tiled_mutual.json

``<clone>`` is a checkout where ``configs/real_tiled.yaml`` ran (its params.yaml names the dataset and
its ``tile``; its models/ hold the aux detectors). For every image of the dataset, the tokens of its
tiles (the crops ``predict --tile`` scores) are taken once through the detectors' shared backbone, and:

- ``tiled_batch``: mutual scoring with each image's patches the union of its tiles' patches. The full
  mutual compares every pair of images; at 10 tiles an image that is about 100x the resized signal's
  matmuls (about 36 minutes a target on 2 cores), so each image is compared with ``references``
  other images of its category drawn with a fixed seed (``numpy.random.default_rng(seed)``), and the
  score is the mean of its k = ⌊0.3 · references⌋ smallest nearest-patch distances, as
  :func:`pipeline.method.neighbours.mutual_k` counts them. Each tile's patch scores are upsampled and
  blurred like a map, the tiles stitched as the guides' are.
- ``resized_batch``: the same subsampled mutual on the resized images' tokens (one 224 px view an
  image), to show what the subsampling alone changes against the pipeline's full ``batch``.
- per aux: ``tiled`` (the tiled guide map, from the same tile tokens), ``tiled+tiled_batch`` (the two
  fused by the grid-pixel rule of :mod:`pipeline.evaluation.tiled`), whose image score is the tiled
  batch's.

Every map and mask on the ``evaluate.tiled_grid`` grid, as the tiled block puts them; the six metrics
per category and their mean.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_params
from pipeline.data.images import load_image, load_mask
from pipeline.data.tables import load_table
from pipeline.evaluation import metrics
from pipeline.evaluation.tiled import grid_map, grid_mask
from pipeline.method import detector as D
from pipeline.method import fusion, neighbours, scoring, tiles

DISTANCE_TOP = 2.0
"""1 − cos lies in [0, 2]: the clip of a stitched distance map (the guides' is their map top, 1)."""


def subsampled_mutual(bags: list[torch.Tensor], references: int, seed: int = 0,
                      fraction: float = neighbours.MUTUAL_FRACTION) -> list[torch.Tensor]:
    """Unit patch tokens of each image (n_i, d), any n_i -> each patch's mutual score (n_i,): the mean of
    the k smallest of its nearest-patch distances (1 − cos) to ``references`` other images, drawn for
    each image from the rest with ``default_rng(seed)`` (all of them when there are fewer)."""
    n = len(bags)
    if n < 2:
        raise ValueError(neighbours.ONE_IMAGE)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        chosen = others if len(others) <= references else sorted(rng.choice(others, references, replace=False))
        k = neighbours.mutual_k(len(chosen), fraction)
        nearest = torch.stack([(1 - bags[i] @ bags[j].T).min(dim=1).values for j in chosen], dim=1)
        out.append(torch.topk(nearest, k, dim=1, largest=False).values.mean(dim=1))
    return out


def unit(tokens: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(tokens.float().reshape(-1, tokens.shape[-1]), dim=-1, eps=1e-8)


def stitched(values: torch.Tensor, boxes, size, det, tile: int, top: float) -> np.ndarray:
    """Patch values (n_tiles, L) of one image's tiles -> its (H, W) map, as :func:`tiles.tiled_map`."""
    maps = scoring.patch_maps(values, det.grid, det.image_size, sigma=det.settings.blur_sigma)
    if len(boxes) == 1:
        return tiles.map_at_size(maps[0], size, top)
    return tiles.stitch_tiles(size, tile, [b[:2] for b in boxes], maps, top)


def category_metrics(labels, scores, cells, maps) -> dict:
    out = metrics.compute_all(labels, scores, cells, maps)
    out.pop("null_reasons")
    return out


def fused(guide: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """The grid-pixel rule of pipeline/evaluation/tiled.py on whole arrays: :func:`fusion.fuse` of the
    guide probability and the batch map with every value of each as one set."""
    flat = [torch.from_numpy(np.ascontiguousarray(a, np.float32).reshape(1, -1)) for a in (guide, batch)]
    return fusion.fuse(*flat).reshape(guide.shape).numpy()


def run(root: Path, dataset: str, auxes: list[str], references: int, seed: int = 0, every: int = 1) -> dict:
    params = load_params(root / "params.yaml", ["datasets", "data", "evaluate", "backbone"])
    ds = params.datasets[dataset]
    if ds.tile is None:
        raise SystemExit(f"{root / 'params.yaml'}: datasets.{dataset} sets no tile")
    data_root = Path(ds.root) if Path(ds.root).is_absolute() else root / ds.root
    samples = load_table(ds.format, data_root, splits=params.data.splits, categories=ds.categories,
                         max_pixels=params.data.max_pixels)
    weights = root / "models/backbones" / f"{params.backbone.name}.safetensors"
    dets = {a: D.Detector.load(root / "models" / a / "detector", weights=weights) for a in auxes}
    first = dets[auxes[0]]
    grid = params.evaluate.tiled_grid
    result: dict = {"dataset": dataset, "tile": ds.tile, "grid": grid, "references": references, "seed": seed,
                    "every": every,
                    "per_category": {}}
    for category in sorted({s.category for s in samples}):
        items = [s for s in samples if s.category == category][::every]  # every > 1: a smoke run
        t0 = time.perf_counter()
        bags, whole, boxes, sizes, cells, guide_vals = [], [], [], [], [], {a: [] for a in auxes}
        for s in items:
            image = load_image(s.image, params.data.max_pixels)
            box = tiles.tile_boxes(image.size, ds.tile)
            tokens, cls = first.features([image.crop(b) for b in box])
            resized_tokens, _ = first.features([image])
            for a, det in dets.items():
                guide_vals[a].append(det.guide_signal(tokens))
            bags.append(unit(tokens))
            whole.append(unit(resized_tokens))
            boxes.append(box)
            sizes.append(image.size)
            cells.append(grid_mask(load_mask(s.mask, image.size, allow_empty=params.data.allow_empty_masks), grid))
        extract_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        tiled_scores = subsampled_mutual(bags, references, seed)
        tiled_s = time.perf_counter() - t0
        resized_scores = subsampled_mutual(whole, references, seed)
        labels = np.array([s.label for s in items], np.int64)
        cells = np.stack(cells)
        per = {}
        maps = {"tiled_batch": [], "resized_batch": []}
        for i in range(len(items)):
            length = first.grid[0] * first.grid[1]
            maps["tiled_batch"].append(stitched(tiled_scores[i].reshape(-1, length), boxes[i], sizes[i], first,
                                                ds.tile, DISTANCE_TOP))
            maps["resized_batch"].append(tiles.map_at_size(scoring.patch_maps(
                resized_scores[i].reshape(1, -1), first.grid, first.image_size, sigma=first.settings.blur_sigma)[0],
                sizes[i], DISTANCE_TOP))
        image_scores = {}
        for name in ("tiled_batch", "resized_batch"):
            image_scores[name] = np.array([float(scoring.score_images(m[None], None, first.settings)[0])
                                           for m in maps[name]])
            maps[name] = np.stack([grid_map(m, grid) for m in maps[name]])
            per[name] = category_metrics(labels, image_scores[name], cells, maps[name])
        for a, det in dets.items():
            top = tiles.map_top(det)
            guide = [stitched(v, boxes[i], sizes[i], det, ds.tile, top) for i, v in enumerate(guide_vals[a])]
            scores = np.array([float(scoring.score_images(m[None], None, det.settings)[0]) for m in guide])
            guide = np.stack([grid_map(m, grid) for m in guide])
            per[f"{a}:tiled"] = category_metrics(labels, scores, cells, guide)
            per[f"{a}:tiled+tiled_batch"] = category_metrics(labels, image_scores["tiled_batch"], cells,
                                                             fused(guide, maps["tiled_batch"]))
        per["seconds"] = {"tokens_per_image": extract_s / len(items), "tiled_mutual_per_image": tiled_s / len(items)}
        result["per_category"][category] = per
        print(json.dumps({category: per}, indent=1), flush=True)
    return result


COLUMNS = ("tiled", "resized_batch", "tiled_batch", "tiled+tiled_batch")
KEYS = (("I-AUROC", "image_auroc"), ("P-AUROC", "pixel_auroc"), ("AUPRO", "pixel_aupro"))


def summary(results: list[dict]) -> str:
    """A markdown table of saved results: a row per aux and dataset (means over the dataset's
    categories), the four scorings' image AUROC, pixel AUROC and AUPRO, and their mean over the rows."""
    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    def fmt(v):
        return "–" if v is None else f"{v:.3f}"

    rows = []
    for r in results:
        auxes = sorted({k.split(":")[0] for per in r["per_category"].values() for k in per if ":" in k})
        for a in auxes:
            name = {"tiled": f"{a}:tiled", "tiled+tiled_batch": f"{a}:tiled+tiled_batch"}
            rows.append((f"{a} → {r['dataset']}", [mean([per[name.get(c, c)][key] for per in r["per_category"].values()])
                                                  for c in COLUMNS for _, key in KEYS]))
    head = "| run | " + " | ".join(f"{c} {label}" for c in COLUMNS for label, _ in KEYS) + " |"
    lines = [head, "|" + "---|" * (1 + len(COLUMNS) * len(KEYS))]
    lines += [f"| {name} | " + " | ".join(map(fmt, values)) + " |" for name, values in rows]
    lines.append("| **mean over the runs where defined** | "
                 + " | ".join(fmt(mean([v[i] for _, v in rows])) for i in range(len(COLUMNS) * len(KEYS))) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summarise", type=Path, nargs="+", metavar="JSON",
                        help="print the table of results saved with --out, and run nothing")
    parser.add_argument("--root", type=Path)
    parser.add_argument("--dataset")
    parser.add_argument("--aux", nargs="+")
    parser.add_argument("--references", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=1, help="score every n-th image only (a smoke run)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.summarise:
        print(summary([json.loads(p.read_text()) for p in args.summarise]), end="")
        return
    if not (args.root and args.dataset and args.aux):
        parser.error("--root, --dataset and --aux are needed to run (or --summarise saved results)")
    torch.set_grad_enabled(False)
    result = run(args.root, args.dataset, args.aux, args.references, args.seed, args.every)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
