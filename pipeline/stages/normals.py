"""Stage normals@D: the known-good images of dataset D's train split, the few-shot reference pool.

    python -m pipeline.stages.normals --dataset synth_a \
        --weights models/backbones/dinov2_vits14.safetensors --out normals/synth_a

The images of :func:`pipeline.data.tables.train_good`, extracted as the extract stage extracts the test
images (:func:`pipeline.stages.extract.write_store`, the same store layout, attrs ``splits: [train]``),
but only those some few-shot draw of ``neighbours.reference_k`` and ``reference_seeds`` can pick
(:func:`drawable`; attrs ``train_good_counts`` and ``train_good_drawn`` say which of how many). The
categories without a train split are named in the attr ``train_good_missing``; a dataset with none at
all (e.g. a ``folder`` set of test images only) gets the folder with ``absent.json`` alone, saying why,
and the neighbours stage draws those categories' references from their test/good images.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from pipeline.config import load_params
from pipeline.data import tables
from pipeline.data.draws import draws
from pipeline.features import store
from pipeline.files import atomic_write
from pipeline.launch import run, setup_logging
from pipeline.stages.extract import checked_weights, dataset_of, stage_parser, write_store

log = logging.getLogger("pipeline.stages.normals")

ABSENT, ABSENT_FORMAT = store.NORMALS_ABSENT, store.NORMALS_ABSENT_FORMAT


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__, "normals/<dataset>").parse_args(argv)
    setup_logging()
    params = load_params(args.params, ["datasets", "data", "backbone", "extract", "neighbours"])
    ds = dataset_of(params, args.dataset, args.params)
    nb = params.neighbours
    weights = checked_weights(args.weights, params.backbone.name)  # before the dataset is read: fails fast
    samples, missing = tables.train_good(ds.format, Path(ds.root), categories=ds.categories,
                                         max_pixels=params.data.max_pixels)
    if not samples:
        write_absent(args.out, args.dataset, missing)
        log.info("%s: no train/good image in any category; wrote %s", args.dataset, args.out / ABSENT)
        return
    (args.out / ABSENT).unlink(missing_ok=True)  # the dataset has gained a train split since
    samples, counts, drawn = drawable(samples, nb.reference_k, nb.reference_seeds)
    log.info("%s: %d of the %d train/good images can be drawn as references (neighbours.reference_k %s, "
             "%d seeds)", args.dataset, len(samples), sum(counts.values()), list(nb.reference_k),
             len(nb.reference_seeds))
    extra = {"train_good_counts": counts, "train_good_drawn": drawn}
    if missing:
        extra["train_good_missing"] = missing
    write_store(args.dataset, args.weights, weights, args.out, params, samples, splits=["train"], extra_attrs=extra)


def drawable(samples: list, ks, seeds) -> tuple[list, dict[str, int], dict[str, list[int]]]:
    """The train/good samples some few-shot draw can pick (the union over k and seeds of
    :func:`pipeline.data.draws.draws` on each category's list, k capped at its length), their
    categories' image counts, and per category the indices (in that list) of the ones kept: a set with
    hundreds of train images per category extracts at most Σk · draws of them."""
    by_category: dict[str, list] = {}
    for sample in samples:
        by_category.setdefault(sample.category, []).append(sample)
    kept, counts, drawn = [], {}, {}
    for name, items in by_category.items():
        picked = sorted({int(i) for k in ks for pick in draws(len(items), min(k, len(items)), seeds) for i in pick})
        kept += [items[i] for i in picked]
        counts[name], drawn[name] = len(items), picked
    return kept, counts, drawn


def write_absent(out: Path, dataset: str, missing: dict[str, str]) -> None:
    """Make ``out`` a normals folder that holds only :data:`ABSENT`: no store, and the reason per category.
    What ``out`` held is replaced only when it is this stage's own output (a store of ours, or an
    earlier record); a folder of anything else raises :class:`pipeline.features.store.StoreError`, untouched."""
    import shutil

    if out.exists() or out.is_symlink():
        if not _absent_record_only(out):
            store.check_ours(out)
        shutil.rmtree(out)
    out.mkdir(parents=True)
    atomic_write(out / ABSENT, lambda tmp: tmp.write_text(json.dumps(
        {"format": ABSENT_FORMAT, "dataset": dataset, "categories": missing}, indent=1, sort_keys=True) + "\n"))


def _absent_record_only(folder: Path) -> bool:
    """True when ``folder`` is a folder holding only an :data:`ABSENT` record of this stage's format."""
    if folder.is_symlink() or not folder.is_dir() or [p.name for p in folder.iterdir()] != [ABSENT]:
        return False
    try:
        return json.loads((folder / ABSENT).read_text()).get("format") == ABSENT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run(main)
