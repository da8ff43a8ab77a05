"""Stage extract@D: patch tokens of dataset D into the Zarr feature store features/<D>/.

    python -m pipeline.stages.extract --dataset synth_a \
        --weights models/backbones/dinov2_vits14.safetensors --out features/synth_a

On several GPUs (or CPU processes, with gloo):

    torchrun --nproc_per_node 4 -m pipeline.stages.extract --dataset ... (same arguments)

A ``folder`` category without ``ground_truth/`` (labels only) is stored with all-zero masks for its
anomalous images and named in the attr ``categories_without_masks`` (absent when every category has
masks): readers must not take those zeros for "no defect".

A killed run re-run with the same config resumes from the last complete chunk (the DVC output is
``persist: true`` so that ``dvc repro`` does not delete the partial store first).

Stage normals@D runs the same command with ``--train-good --out normals/<D>``: the known-good images
of D's train split (:func:`pipeline.data.tables.train_good`), the pool the few-shot protocol draws its
reference images from. The categories without a train split are named in the attr
``train_good_missing``; a dataset with none at all (e.g. a ``folder`` set of test images only) gets
the folder with :data:`ABSENT` alone, saying why, so the neighbours stage draws from test/good.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from pipeline.features import backbones, store
from pipeline.data import tables
from pipeline.config import ConfigError, load_params
from pipeline.features.extract import WeightsError, extract, fingerprint
from pipeline.files import atomic_write
from pipeline.launch import process_group, run, setup_logging

log = logging.getLogger("pipeline.stages.extract")

ABSENT, ABSENT_FORMAT = store.NORMALS_ABSENT, store.NORMALS_ABSENT_FORMAT


def read_weights_record(path: Path) -> dict:
    """The JSON the weights stage writes beside the weights; missing or malformed is a WeightsError."""
    if not path.is_file():
        raise WeightsError(f"{path}: weights record not found; run the weights stage first "
                           "(dvc repro weights)")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{path}: not valid JSON ({err}); re-run the weights stage") from None
    missing = [k for k in ("backbone", "sha256", "source") if not isinstance(record, dict) or k not in record]
    if missing:
        raise WeightsError(f"{path}: missing key(s) {missing}; re-run the weights stage")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a key of the datasets section of params.yaml")
    parser.add_argument("--weights", required=True, type=Path, help="<name>.safetensors written by the weights stage")
    parser.add_argument("--out", required=True, type=Path, help="the store to write, features/<dataset>")
    parser.add_argument("--params", default="params.yaml", type=Path)
    parser.add_argument("--train-good", action="store_true",
                        help="extract the train split's good images (the few-shot reference pool) instead "
                             "of data.splits")
    args = parser.parse_args(argv)
    setup_logging()
    params = load_params(args.params, ["datasets", "data", "backbone", "extract"])
    if args.dataset not in params.datasets:
        raise ConfigError(f"--dataset {args.dataset!r} is not a key of {args.params}'s datasets section "
                          f"(known: {', '.join(params.datasets) or 'none'})")
    ds, data, bcfg, ecfg = params.datasets[args.dataset], params.data, params.backbone, params.extract

    digest, record = checked_weights(args.weights, bcfg.name)

    missing: dict[str, str] = {}
    if args.train_good:
        samples, missing = tables.train_good(ds.format, Path(ds.root), categories=ds.categories,
                                             max_pixels=data.max_pixels)
        if not samples:
            write_absent(args.out, args.dataset, missing)
            log.info("%s: no train/good image in any category; wrote %s", args.dataset, args.out / ABSENT)
            return
        (args.out / ABSENT).unlink(missing_ok=True)  # the dataset has gained a train split since
    else:
        samples = tables.load_table(ds.format, Path(ds.root), splits=data.splits, categories=ds.categories,
                                    max_pixels=data.max_pixels)
    categories = sorted({s.category for s in samples})
    defects = sorted({s.defect for s in samples})
    no_masks = tables.categories_without_masks(samples)
    if no_masks:
        log.warning("%s: categor%s %s ha%s labels but no masks (no ground_truth/ folder): their anomalous "
                    "images are stored with all-zero masks, recorded in attrs categories_without_masks; pixel "
                    "metrics will be null there", args.dataset, "y" if len(no_masks) == 1 else "ies",
                    ", ".join(no_masks), "s" if len(no_masks) == 1 else "ve")
    log.info("%s: %d images, %d categories, backbone %s (weights from %s)",
             args.dataset, len(samples), len(categories), bcfg.name, record["source"])

    with process_group(ecfg.device) as (dist_info, device):
        backbone = backbones.create_backbone(bcfg.name, layer=bcfg.layer, image_size=bcfg.image_size,
                                             weights=args.weights)
        attrs = {
            "dataset": args.dataset,
            "format": ds.format,
            "root": ds.root,
            "splits": ["train"] if args.train_good else list(data.splits),
            "backbone": bcfg.name,
            "weights_sha256": digest,
            "weights_source": record["source"],
            "layer": backbone.layer,
            "image_size": bcfg.image_size,
            "grid": list(backbone.grid),
            "dim": backbone.embed_dim,
            "paths": [s.relpath for s in samples],
            "categories": categories,
            "defects": defects,
            "inputs_sha256": fingerprint(samples),
        }
        if missing:
            attrs["train_good_missing"] = missing
        if no_masks:
            # Only when there are some: a store without the attr has masks in every category, so the
            # stores extracted before this attr existed stay valid (store.prepare compares attrs).
            attrs["categories_without_masks"] = no_masks
        extract(samples, backbone, backbones.image_transform(backbone), args.out, attrs,
                categories=categories, defects=defects, batch_size=ecfg.batch_size,
                chunk_images=ecfg.chunk_images, num_workers=ecfg.num_workers, max_pixels=data.max_pixels,
                allow_empty_masks=data.allow_empty_masks, device=device, dist_info=dist_info)
    log.info("%s: store complete at %s", args.dataset, args.out)


def write_absent(out: Path, dataset: str, missing: dict[str, str]) -> None:
    """Make ``out`` a normals folder that holds only :data:`ABSENT`: no store, and the reason per category."""
    import shutil

    if out.exists():
        shutil.rmtree(out)  # this stage's own output (a store of an earlier run of the same dataset)
    out.mkdir(parents=True)
    atomic_write(out / ABSENT, lambda tmp: tmp.write_text(json.dumps(
        {"format": ABSENT_FORMAT, "dataset": dataset, "categories": missing}, indent=1, sort_keys=True) + "\n"))


def checked_weights(weights: Path, backbone: str) -> tuple[str, dict]:
    """(sha256, the weights stage's record) of ``weights``, refused unless that record is for
    ``backbone`` and the file's sha256 is the one it records."""
    record_path = weights.with_suffix(".json")
    record = read_weights_record(record_path)
    if record.get("backbone") != backbone:
        raise WeightsError(f"{record_path}: weights are for {record.get('backbone')!r} but backbone.name is "
                           f"{backbone!r}; re-run the weights stage")
    if not weights.is_file():
        raise WeightsError(f"{weights}: weights file not found; run the weights stage first")
    digest = backbones.sha256_file(weights)
    if digest != record["sha256"]:
        raise WeightsError(f"{weights}: sha256 {digest} differs from {record_path} ({record['sha256']}); "
                           "re-run the weights stage")
    return digest, record


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run(main)
