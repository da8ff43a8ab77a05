"""Verify dataset layouts before a long extraction: counts per category and defect type.

    python -m pipeline.cli.check                 # every dataset in params.yaml
    python -m pipeline.cli.check mvtec visa      # only these keys of the datasets section
    python -m pipeline.cli.check --decode mvtec  # also decode every image and mask (finds truncated files)

Stops at the first problem with an error naming the file and the convention expected (the same
checks the extract stage makes), and exits non-zero. Without ``--decode`` images are read to their
headers only, but the masks of anomalous images are always decoded (they are small, and a mask that
binarises empty is otherwise found only by extract; ``data.allow_empty_masks`` accepts them).
Generated datasets (``synthetic.datasets``) must have been generated first (``dvc repro data@synth_a``).

A ``folder`` category without ``ground_truth/`` (labels only) is listed with ``no masks: pixel metrics
will be null``; such a dataset can be a target but not an auxiliary set (fit_guides needs masks), so
one listed in ``aux_datasets`` is an error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from pipeline.config import ConfigError, load_params
from pipeline.data.images import DatasetError, load_image, load_mask, mask_from_header
from pipeline.data.tables import load_table, summarize
from pipeline.errors import PipelineError


def format_summary(name: str, fmt: str, root: str, summary: dict) -> str:
    """A plain-text table: one line per category with its counts per split and defect type."""
    lines = [f"{name} ({fmt}, {root}): {summary['n_images']} images, {summary['n_normal']} normal, "
             f"{summary['n_anomalous']} anomalous, {len(summary['categories'])} categories"]
    for category in summary["categories"]:
        entry = summary["per_category"][category]
        splits = "; ".join(f"{split}: " + ", ".join(f"{d} {n}" for d, n in sorted(defects.items()))
                           for split, defects in sorted(entry["splits"].items()))
        note = "" if entry.get("masks", True) else "  (no masks: pixel metrics will be null)"
        lines.append(f"  {category:<16} {entry['n_images']:>5}  {splits}{note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="*", help="keys of the datasets section (default: all)")
    parser.add_argument("--params", default="params.yaml", type=Path)
    parser.add_argument("--decode", action="store_true", help="fully decode every image and mask")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params, ["datasets", "data", "aux_datasets"])
        if not params.datasets:
            raise ConfigError(f"{args.params}: the datasets section is empty or missing; nothing to check")
        names = args.datasets or list(params.datasets)
        unknown = [n for n in names if n not in params.datasets]
        if unknown:
            raise ConfigError(f"datasets.{unknown[0]}: not in {args.params} (known: {', '.join(params.datasets)})")
        for name in names:
            ds = params.datasets[name]
            samples = load_table(ds.format, Path(ds.root), splits=params.data.splits, categories=ds.categories,
                                 max_pixels=params.data.max_pixels)
            allow_empty = params.data.allow_empty_masks
            if args.decode:
                for s in tqdm(samples, desc=f"decode {name}", unit="img"):
                    image = load_image(s.image, params.data.max_pixels)
                    load_mask(s.mask, image.size, allow_empty=allow_empty)
            else:
                anomalous = [s for s in samples if s.mask is not None]
                for s in tqdm(anomalous, desc=f"masks {name}", unit="mask"):
                    mask_from_header(s.mask, params.data.max_pixels, allow_empty=allow_empty)
            summary = summarize(samples)
            no_masks = summary["categories_without_masks"]
            if name in params.aux_datasets and no_masks:
                which = (f"category {no_masks[0]} of {ds.root} has" if len(no_masks) == 1 else
                         f"categories {', '.join(no_masks)} of {ds.root} have")
                raise DatasetError(
                    f"datasets.{name} is listed in aux_datasets, but {which} labels but no masks "
                    "(no ground_truth/ folder): fit_guides needs pixel masks on an auxiliary set; add the "
                    "masks, or use it as a target only (remove it from aux_datasets)")
            print(format_summary(name, ds.format, ds.root, summary), flush=True)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
