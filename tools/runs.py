"""What the offline analyses in tools/ share: a fitted run's guide sets and stores, read from a checkout."""
from pathlib import Path

import torch

from pipeline import detector, evaluation, guides, sae, store


def load_run(root: Path, aux: str, target: str, device: torch.device):
    """(detector, guide sets by name as `evaluation.guide_sets` gives them, target store) of run aux -> target,
    from the models and feature stores a `dvc repro` left under ``root``."""
    det = detector.Detector.load(root / f"models/{aux}/detector", device=device, with_backbone=False)
    model, dead, _ = sae.load(root / f"models/{aux}/sae", device)
    _, gcfg = guides.load(root / f"models/{aux}/guides")
    aux_store = store.open_store(root / f"features/{aux}")
    vec = evaluation.guide_sets(det.vectors, det.seeds, model.dictionary.detach(), dead, gcfg["training"],
                                aux_store, device)
    return det, vec, store.open_store(root / f"features/{target}")
