"""Why does the no-SAE control come close to the learned guides? (docs/experiments.md)
Per auxiliary set: dead latents, active latents per guide row, and the cosines between the learned guide
vectors and the no-SAE control's mean tokens, from models/<A>/{sae,guides,detector} and features/<A>.

    python -m analysis.guide_directions [--root .] [A ...]     (default: synth_a synth_b)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.evaluation import evaluate as evaluation
from pipeline.features import store
from pipeline.method import detector, sae
from pipeline.method import guides as G


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("aux", nargs="*", default=["synth_a", "synth_b"], help="auxiliary sets to read")
    parser.add_argument("--root", type=Path, default=Path("."), help="a checkout after dvc repro")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    dev = torch.device("cpu")
    for a in args.aux:
        report(args.root, a, dev)
    return 0


def report(root: Path, a: str, dev: torch.device) -> None:
    model, dead, _ = sae.load(root / f"models/{a}/sae", dev)
    codes, _ = G.load(root / f"models/{a}/guides")
    aux = store.open_store(root / f"features/{a}")
    ns = evaluation.no_sae_guides(aux, dev)
    det = detector.Detector.load(root / f"models/{a}/detector", device=dev, with_backbone=False)
    print(a, "dead latents", int(dead.sum()), "of", len(dead))
    for s, c in enumerate(codes):
        v = det.vectors[s]
        active = (c > 0).sum(1).tolist()
        dn = F.normalize(v[G.ANOMALY_LOCAL] - v[G.NORMAL_LOCAL], dim=0)
        dm = F.normalize(ns[G.ANOMALY_LOCAL] - ns[G.NORMAL_LOCAL], dim=0)
        # cos used by the scoring is cos(token, g): the discriminant direction is normalize(ga) - normalize(gn)
        en = F.normalize(v[G.ANOMALY_LOCAL], dim=0) - F.normalize(v[G.NORMAL_LOCAL], dim=0)
        em = F.normalize(ns[G.ANOMALY_LOCAL], dim=0) - F.normalize(ns[G.NORMAL_LOCAL], dim=0)
        print(f"  seed {s}: active latents per row {active}; cos(learned local n, mean normal) "
              f"{float(F.cosine_similarity(v[G.NORMAL_LOCAL], ns[G.NORMAL_LOCAL], dim=0)):.3f}, "
              f"(a, mean anomalous) {float(F.cosine_similarity(v[G.ANOMALY_LOCAL], ns[G.ANOMALY_LOCAL], dim=0)):.3f}; "
              f"cos(learned a-n, mean a-n) {float(dn @ dm):.3f}; cos of the cosine-score directions {float(F.cosine_similarity(en, em, dim=0)):.3f}; "
              f"|cos(ga, gn)| learned {float(F.cosine_similarity(v[G.NORMAL_LOCAL], v[G.ANOMALY_LOCAL], dim=0)):.3f} "
              f"vs mean {float(F.cosine_similarity(ns[G.NORMAL_LOCAL], ns[G.ANOMALY_LOCAL], dim=0)):.3f}")
    # how well can 32 live atoms express the mean tokens? (SAE reconstruction of the no-SAE guides)
    for name, row in (("mean normal patch", G.NORMAL_LOCAL), ("mean anomalous patch", G.ANOMALY_LOCAL)):
        x = ns[row][None]
        recon = model(x)[0].detach()
        print(f"  SAE reconstruction of the {name}: cos {float(F.cosine_similarity(recon, x)):.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
