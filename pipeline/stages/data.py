"""Stage data@D: generate one embedded dataset (docs/design.md#the-embedded-default) in MVTec layout.

    python -m pipeline.stages.data --dataset synth_a --out data/synth_a
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipeline.data import synthetic
from pipeline.config import load_params
from pipeline.launch import run, setup_logging

log = logging.getLogger("pipeline.stages.data")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a name from synthetic.DATASETS")
    parser.add_argument("--out", required=True, type=Path, help="root of the generated tree")
    parser.add_argument("--params", default="params.yaml", type=Path)
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_params(args.params, ["synthetic"]).synthetic
    summary = synthetic.generate(
        args.out,
        args.dataset,
        seed=cfg.seed,
        image_size=cfg.image_size,
        train_good=cfg.train_good,
        test_good=cfg.test_good,
        test_anomalous=cfg.test_anomalous,
    )
    log.info("%s: %s", args.dataset, json.dumps(summary, default=str))


if __name__ == "__main__":
    run(main)
