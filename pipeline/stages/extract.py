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

Stage normals@D (:mod:`pipeline.stages.normals`) writes the known-good images of D's train split
through the same code.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from pipeline.features import backbones
from pipeline.data import tables
from pipeline.config import ConfigError, load_params
from pipeline.features.extract import WeightsError, extract, fingerprint
from pipeline.launch import process_group, run, setup_logging

log = logging.getLogger("pipeline.stages.extract")



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


def stage_parser(description: str, out: str) -> argparse.ArgumentParser:
    """The arguments of a stage that extracts a dataset (extract, normals); ``out`` names its folder."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a key of the datasets section of params.yaml")
    parser.add_argument("--weights", required=True, type=Path, help="<name>.safetensors written by the weights stage")
    parser.add_argument("--out", required=True, type=Path, help=f"the store to write, {out}")
    parser.add_argument("--params", default="params.yaml", type=Path)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__, "features/<dataset>").parse_args(argv)
    setup_logging()
    params = load_params(args.params, ["datasets", "data", "backbone", "extract"])
    ds = dataset_of(params, args.dataset, args.params)
    weights = checked_weights(args.weights, params.backbone.name)  # before the dataset is read: fails fast
    samples = tables.load_table(ds.format, Path(ds.root), splits=params.data.splits, categories=ds.categories,
                                max_pixels=params.data.max_pixels)
    write_store(args.dataset, args.weights, weights, args.out, params, samples, splits=list(params.data.splits))


def dataset_of(params, name: str, params_path: Path):
    """The datasets entry ``name`` of ``params``; a ConfigError naming the known ones if absent."""
    if name not in params.datasets:
        raise ConfigError(f"--dataset {name!r} is not a key of {params_path}'s datasets section "
                          f"(known: {', '.join(params.datasets) or 'none'})")
    return params.datasets[name]


def write_store(dataset: str, weights: Path, checked: tuple[str, dict], out: Path, params, samples: list, *,
                splits: list[str], extra_attrs: dict | None = None) -> None:
    """Extract ``samples`` of ``dataset`` through the backbone ``weights`` (``checked``: what
    :func:`checked_weights` gave for them) into the store ``out`` (resuming a partial one), with the
    attrs of the module docstring plus ``extra_attrs``."""
    ds, data, bcfg, ecfg = params.datasets[dataset], params.data, params.backbone, params.extract
    digest, record = checked
    categories = sorted({s.category for s in samples})
    defects = sorted({s.defect for s in samples})
    no_masks = tables.categories_without_masks(samples)
    if no_masks:
        log.warning("%s: categor%s %s ha%s labels but no masks (no ground_truth/ folder): their anomalous "
                    "images are stored with all-zero masks, recorded in attrs categories_without_masks; pixel "
                    "metrics will be null there", dataset, "y" if len(no_masks) == 1 else "ies",
                    ", ".join(no_masks), "s" if len(no_masks) == 1 else "ve")
    log.info("%s: %d images, %d categories, backbone %s (weights from %s)",
             dataset, len(samples), len(categories), bcfg.name, record["source"])

    with process_group(ecfg.device) as (dist_info, device):
        backbone = backbones.create_backbone(bcfg.name, layer=bcfg.layer, image_size=bcfg.image_size,
                                             weights=weights)
        attrs = {
            "dataset": dataset,
            "format": ds.format,
            "root": ds.root,
            "splits": splits,
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
            **(extra_attrs or {}),
        }
        if no_masks:
            # Only when there are some: a store without the attr has masks in every category, so the
            # stores extracted before this attr existed stay valid (store.prepare compares attrs).
            attrs["categories_without_masks"] = no_masks
        extract(samples, backbone, backbones.image_transform(backbone), out, attrs,
                categories=categories, defects=defects, batch_size=ecfg.batch_size,
                chunk_images=ecfg.chunk_images, num_workers=ecfg.num_workers, max_pixels=data.max_pixels,
                allow_empty_masks=data.allow_empty_masks, device=device, dist_info=dist_info)
    log.info("%s: store complete at %s", dataset, out)


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
