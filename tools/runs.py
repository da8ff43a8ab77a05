"""What the offline analyses in tools/ share: a fitted run's guide sets and stores, read from a checkout,
and the pipeline's own patch probabilities, maps and metrics for a (n, L) patch score."""
from pathlib import Path

import numpy as np
import torch

from pipeline.method import detector
from pipeline.evaluation import evaluate as evaluation
from pipeline.method import guides
from pipeline.evaluation import metrics
from pipeline.method import sae
from pipeline.method import scoring
from pipeline.features import store


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


def patch_probs(tokens: torch.Tensor, g: torch.Tensor, temperature: float) -> torch.Tensor:
    """tokens (B, L, d), guide vectors g (4, d) -> (B, L) anomaly probability per patch, before upsampling."""
    return guides.patch_probabilities(tokens, g[guides.NORMAL_LOCAL], g[guides.ANOMALY_LOCAL], temperature)[..., 1]


def seed_mean(tokens: torch.Tensor, vec: dict, kind: str, seeds, temperature: float) -> torch.Tensor:
    """(B, L) mean over ``seeds`` of the patch probabilities of guide set ``kind`` (learned, untrained_init)."""
    return torch.stack([patch_probs(tokens, vec[f"{kind}/{s}"], temperature) for s in seeds]).mean(0)


def map_metrics(p: torch.Tensor, labels: np.ndarray, masks: np.ndarray, grid, size: int, sigma: float,
                has_masks: bool) -> dict:
    """Patch scores p (n, L) of one category -> the pipeline's maps (upsampled, blurred; 16 images at a time)
    and `metrics.compute_all` with the `max` image score."""
    maps = np.concatenate([scoring.patch_maps(p[i : i + 16], grid, size, sigma=sigma) for i in range(0, len(p), 16)])
    return metrics.compute_all(labels, maps.reshape(len(maps), -1).max(1).astype(np.float64), masks, maps,
                               has_masks=has_masks)
