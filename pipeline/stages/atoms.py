"""Stage atoms@<A>: which SAE atoms carry the anomaly score of the guides fitted on auxiliary set A.

    python -m pipeline.stages.atoms --features features/<A> --sae models/<A>/sae --guides models/<A>/guides \
        --out reports/<A>/atoms --summary reports/<A>/atoms.json [--top 16] [--gallery 8]

The score direction of the local guides, written in atoms (:func:`pipeline.method.atoms.direction_weights`),
ranks the atoms; for the ``--top`` of largest weight :mod:`pipeline.evaluation.atom_report` streams A's
store once through the SAE and writes ``<out>/atom_<j>.png`` (the ``--gallery`` patches of A that
activate atom j most, with the mask outline, and its activation over the images where it peaks) and
``--summary`` (sparsity of the codes, concentration of the direction, per atom its firings on anomalous
and normal patches of each category and whether it is category-general or -specific). It reads A only,
never a target.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from pipeline.evaluation import atom_report
from pipeline.features import store
from pipeline.launch import run, setup_logging
from pipeline.method import guides, sae

log = logging.getLogger("pipeline.stages.atoms")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", required=True, type=Path, help="the auxiliary store, features/<A>")
    parser.add_argument("--sae", required=True, type=Path, help="models/<A>/sae")
    parser.add_argument("--guides", required=True, type=Path, help="models/<A>/guides")
    parser.add_argument("--out", required=True, type=Path, help="folder of the gallery PNGs, reports/<A>/atoms")
    parser.add_argument("--summary", required=True, type=Path, help="the JSON, reports/<A>/atoms.json")
    parser.add_argument("--top", type=int, default=16, help="atoms reported, by |weight| in the score direction")
    parser.add_argument("--gallery", type=int, default=8, help="patches shown per atom")
    args = parser.parse_args(argv)
    for name in ("top", "gallery"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    setup_logging()
    model, _, _ = sae.load(args.sae)
    codes_per_seed, config = guides.load(args.guides)
    provenance = config["features"]
    aux = store.open_store(args.features, expect={k: provenance[k] for k in store.TOKEN_SPACE})
    seeds = [int(s) for s in config["training"]["seeds"]]
    result = atom_report.write(args.out, args.summary, aux, model, codes_per_seed.float(), seeds,
                               n_top=args.top, gallery=args.gallery)
    conc = result["concentration"]["mean_of_seeds_weights"]
    log.info("%s: %d atoms reported (%s); the top 1/5/10/50 carry %.1f/%.1f/%.1f/%.1f %% of the score direction",
             aux.attrs["dataset"], len(result["top_atoms"]), result["kinds"],
             *(100 * conc[f"top_{k}"] for k in (1, 5, 10, 50)))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run(main)
