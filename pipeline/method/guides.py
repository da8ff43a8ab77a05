"""Stage 2 of SPG: four sparse guide codes fitted against the auxiliary masks (docs/design.md#the-method).

Codes ``C`` (4, n_latents), rows in :data:`ROWS` order, are the only trainable tensor; the backbone
tokens and the SAE dictionary ``D`` (n_latents, d) are frozen. The effective codes are

    l1:   c = ReLU(C) ⊙ alive                       (+ λ · mean|c| in the loss)
    topk: c = top-``guide_topk`` per row of ReLU(C) ⊙ alive, straight-through (forward hard,
          backward as if no selection happened)

and the guide vectors ``g = c D`` (4, d). Local scores: per patch token, cosines to the normal and
anomaly local guides, softmax at temperature τ over the two → (normal, anomaly) probabilities on the
patch grid, bilinearly upsampled to S x S. Global: cosines of the CLS token to the two global guides,
used as logits as they are (no temperature).

Loss = focal(probabilities, mask; γ) + dice(anomaly, mask) + dice(normal, 1 − mask)
       + CE(global cosines, image label) + λ · mean|c|
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.errors import NonFiniteError, PipelineError
from pipeline.files import write_bytes
from pipeline.features.stream import local_image_steps
from pipeline.features.store import ChunkReader

log = logging.getLogger(__name__)

ROWS = ("normal_global", "anomaly_global", "normal_local", "anomaly_local")
"""Row order of the codes and of the guide vectors (docs/design.md#artifacts)."""
NORMAL_GLOBAL, ANOMALY_GLOBAL, NORMAL_LOCAL, ANOMALY_LOCAL = range(4)

STORE_FINGERPRINT = ("dataset", "inputs_sha256", "weights_sha256", "backbone", "layer", "image_size")
"""Attrs of the auxiliary store that identify it; the checkpoint records them (``aux_store``)."""


class GuidesError(PipelineError, ValueError):
    """A guides checkpoint that does not belong with the SAE or the auxiliary store it is used with
    (or predates the provenance that would say). Names both sides."""


# ----------------------------------------------------------------------------------------------------
# Codes


class GuideCodes(nn.Module):
    """The trainable codes ``C`` (4, n_latents) and their effective, sparse, non-negative form."""

    def __init__(self, n_latents: int, dead_mask: torch.Tensor | None = None, *, variant: str = "l1",
                 guide_topk: int | None = None, init_mean: float = 0.1, init_std: float = 0.01,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if variant not in ("l1", "topk"):
            raise ValueError(f"guides.variant must be 'l1' or 'topk', got {variant!r}")
        if variant == "topk" and not (guide_topk and 0 < guide_topk <= n_latents):
            raise ValueError(f"guides.guide_topk must be in [1, {n_latents}] for variant topk, got {guide_topk}")
        self.variant, self.guide_topk = variant, guide_topk
        alive = torch.ones(n_latents, dtype=torch.bool) if dead_mask is None else ~dead_mask.to(torch.bool)
        # Codes and mask live on one device, the dead mask's (an SAE loaded onto the GPU gives a GPU mask):
        # the codes are drawn on the CPU, so a seed gives the same initial codes on every device, then moved.
        init = torch.randn(len(ROWS), n_latents, generator=generator) * init_std + init_mean
        self.codes = nn.Parameter(init.to(alive.device))
        self.register_buffer("alive", alive)

    def effective(self, codes: torch.Tensor | None = None) -> torch.Tensor:
        """c (4, n_latents) >= 0 from ``codes`` (default: the trained ones); dead latents are 0."""
        raw = self.codes if codes is None else codes
        c = F.relu(raw) * self.alive
        if self.variant == "topk":
            keep = torch.zeros_like(c, dtype=torch.bool).scatter_(1, c.topk(self.guide_topk, dim=1).indices, True)
            c = c + (c * keep - c).detach()  # straight-through: forward hard top-k, identity backward
        return c


def guide_vectors(codes: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
    """Effective codes (G, n_latents) through the dictionary (n_latents, d) -> guide vectors (G, d)."""
    return codes @ dictionary


# ----------------------------------------------------------------------------------------------------
# Scores (also used by evaluation)


def local_probabilities(tokens: torch.Tensor, normal: torch.Tensor, anomaly: torch.Tensor,
                        grid: tuple[int, int], size: int, temperature: float = 0.07) -> torch.Tensor:
    """tokens (B, L, d), guide vectors normal/anomaly (d,) -> probabilities (B, 2, S, S).

    Channel 0 is normal, 1 anomalous: softmax over the two cosines / temperature on the patch grid
    (gh, gw) with L = gh * gw, then bilinear upsampling to S x S.
    """
    b, length, _ = tokens.shape
    gh, gw = grid
    if length != gh * gw:
        raise ValueError(f"tokens have {length} patches but the grid is {gh}x{gw}")
    probs = patch_probabilities(tokens, normal, anomaly, temperature).permute(0, 2, 1).reshape(b, 2, gh, gw)
    return F.interpolate(probs, size=(size, size), mode="bilinear", align_corners=False)


def patch_probabilities(tokens: torch.Tensor, normal: torch.Tensor, anomaly: torch.Tensor,
                        temperature: float = 0.07) -> torch.Tensor:
    """tokens (B, L, d), guide vectors (d,) -> (B, L, 2) [normal, anomaly] per patch: the softmax of the
    two cosines / temperature, before :func:`local_probabilities` upsamples it."""
    guides = F.normalize(torch.stack([normal, anomaly]), dim=-1)  # (2, d)
    cos = F.normalize(tokens, dim=-1) @ guides.T  # (B, L, 2)
    return (cos / temperature).softmax(dim=-1)


def global_logits(cls: torch.Tensor, normal: torch.Tensor, anomaly: torch.Tensor) -> torch.Tensor:
    """cls (B, d), guide vectors (d,) -> cosines (B, 2) [normal, anomaly], used as logits unscaled."""
    return F.normalize(cls, dim=-1) @ F.normalize(torch.stack([normal, anomaly]), dim=-1).T


# ----------------------------------------------------------------------------------------------------
# Loss terms: pure functions


def focal_loss(probs: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0, eps: float = 1e-8,
               reduction: str = "mean") -> torch.Tensor:
    """Mean over pixels of −(1 − p_t)^γ log p_t; probs (B, 2, S, S) [normal, anomaly], mask (B, S, S) {0,1}.

    ``reduction="sum"``: the sum over pixels (a rank's share of a global batch's mean)."""
    p_t = probs.gather(1, mask.long().unsqueeze(1)).squeeze(1)
    per_pixel = -(1 - p_t).pow(gamma) * p_t.clamp_min(eps).log()
    return per_pixel.sum() if reduction == "sum" else per_pixel.mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Mean over images of 1 − (2 Σ p·t + s) / (Σ p + Σ t + s); pred, target (B, S, S). ``reduction="sum"``: summed."""
    dims = tuple(range(1, pred.ndim))
    inter = (pred * target).sum(dims)
    per_image = 1 - (2 * inter + smooth) / (pred.sum(dims) + target.sum(dims) + smooth)
    return per_image.sum() if reduction == "sum" else per_image.mean()


def global_ce(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the (B, 2) global cosines against image labels (B,) {0 normal, 1 anomalous}."""
    return F.cross_entropy(logits, labels.long(), reduction=reduction)


def l1_penalty(codes: torch.Tensor) -> torch.Tensor:
    """mean |c| over the effective codes (4, n_latents)."""
    return codes.abs().mean()


def guide_loss(codes: torch.Tensor, dictionary: torch.Tensor, tokens: torch.Tensor, cls: torch.Tensor,
               masks: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int], *, temperature: float,
               gamma: float, l1_coef: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its terms for one batch. codes (4, n) effective; tokens (B, L, d); cls (B, d);
    masks (B, S, S) {0,1}; labels (B,)."""
    g = guide_vectors(codes, dictionary)
    probs = local_probabilities(tokens, g[NORMAL_LOCAL], g[ANOMALY_LOCAL], grid, masks.shape[-1], temperature)
    m = masks.float()
    terms = {
        "focal": focal_loss(probs, masks, gamma),
        "dice_anomaly": dice_loss(probs[:, 1], m),
        "dice_normal": dice_loss(probs[:, 0], 1 - m),
        "global_ce": global_ce(global_logits(cls, g[NORMAL_GLOBAL], g[ANOMALY_GLOBAL]), labels),
        "l1": l1_coef * l1_penalty(codes),
    }
    total = sum(terms.values())
    return total, {k: v.item() for k, v in terms.items()}


TERMS = ("focal", "dice_anomaly", "dice_normal", "global_ce", "l1")
"""Keys of :func:`guide_loss`'s terms, in its order."""


def guide_loss_share(codes: torch.Tensor, dictionary: torch.Tensor, tokens: torch.Tensor, cls: torch.Tensor,
                     masks: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int], *, n_images: int,
                     with_l1: bool, temperature: float, gamma: float, l1_coef: float) -> dict[str, torch.Tensor]:
    """This rank's share of :func:`guide_loss`'s terms for a global batch of ``n_images`` images, as
    tensors: every mean over images (or their pixels) becomes this rank's sum over the global count,
    so the shares of all ranks add up to the global terms; the L1 term, which depends on the codes
    only, is in the share of one rank (``with_l1``). Shapes as in :func:`guide_loss`; B may be 0."""
    terms = {k: codes.sum() * 0.0 for k in TERMS}  # zero with a graph, for a rank without images
    if len(labels):
        g = guide_vectors(codes, dictionary)
        size = masks.shape[-1]
        probs = local_probabilities(tokens, g[NORMAL_LOCAL], g[ANOMALY_LOCAL], grid, size, temperature)
        m = masks.float()
        terms["focal"] = focal_loss(probs, masks, gamma, reduction="sum") / (n_images * size * size)
        terms["dice_anomaly"] = dice_loss(probs[:, 1], m, reduction="sum") / n_images
        terms["dice_normal"] = dice_loss(probs[:, 0], 1 - m, reduction="sum") / n_images
        terms["global_ce"] = global_ce(global_logits(cls, g[NORMAL_GLOBAL], g[ANOMALY_GLOBAL]), labels,
                                       reduction="sum") / n_images
    if with_l1:
        terms["l1"] = l1_coef * l1_penalty(codes)
    return terms


# ----------------------------------------------------------------------------------------------------
# Training


def _autocast(device: torch.device, dtype: torch.dtype | None):
    # as pipeline.method.sae.autocast; not imported, so that the stages reading guides need not sae.py
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def ema_update_(ema: torch.Tensor, value: torch.Tensor, decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · value, in place."""
    ema.mul_(decay).add_(value, alpha=1 - decay)


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, L, d) float32
    cls: torch.Tensor  # (B, d) float32
    masks: torch.Tensor  # (B, S, S) uint8
    labels: torch.Tensor  # (B,) int64


@dataclass
class FitResult:
    codes: torch.Tensor
    """EMA codes, effective form (4, n_latents): what is saved and evaluated."""
    final_terms: dict[str, float]
    """Loss terms of the EMA codes over the whole auxiliary set."""
    curve: list[dict] = field(default_factory=list)


def fit(read: Callable[[int], Mapping[str, np.ndarray]], n_chunks: int, dictionary: torch.Tensor,
        dead_mask: torch.Tensor | None, grid: tuple[int, int], *, variant: str = "l1",
        guide_topk: int | None = None, init_mean: float = 0.1, init_std: float = 0.01,
        temperature: float = 0.07, gamma: float = 2.0, l1_coef: float = 1e-3, lr: float = 1e-2,
        betas: tuple[float, float] = (0.5, 0.999), batch_images: int = 8, epochs: int = 15,
        ema_decay: float = 0.999, seed: int = 0, device: torch.device = torch.device("cpu"),
        desc: str = "fit_guides", shards: int = 1, comm: Any = None, dtype: torch.dtype | None = None) -> FitResult:
    """Fit one guide set. ``dictionary`` (n_latents, d) is frozen; only the codes get gradients.

    ``shards`` and ``comm`` as in :func:`pipeline.method.sae.train`: under torchrun each rank computes its
    share of every global batch of ``batch_images`` images (:func:`guide_loss_share`), the gradient of
    the codes and the loss terms are summed over the ranks, and every rank takes the step one process
    with the same ``shards`` takes, up to float rounding.

    ``dtype``: the loss's autocast dtype (:func:`pipeline.method.sae.autocast_dtype`; None: float32);
    the codes, their EMA and Adam's moments stay float32. Each step reads its loss terms on the host
    (one sync) to stop before a NaN reaches the codes: a step is a batch of images through the loss,
    so the sync is small beside it, unlike the SAE's steps.
    """
    rank, world = (comm.rank, comm.world) if comm is not None else (0, 1)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    dictionary = dictionary.detach().to(device)
    model = GuideCodes(dictionary.shape[0], dead_mask, variant=variant, guide_topk=guide_topk,
                       init_mean=init_mean, init_std=init_std, generator=gen).to(device)
    ema = model.codes.detach().clone()
    opt = torch.optim.Adam([model.codes], lr=lr, betas=betas)
    kw = dict(temperature=temperature, gamma=gamma, l1_coef=l1_coef)
    curve, step = [], 0
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch", mininterval=1.0):
        sums: dict[str, float] = {}
        n = 0
        for arrays in local_image_steps(read, n_chunks, batch_images, rng, shards=shards, rank=rank, world=world):
            if world > 1:
                terms = _distributed_step(model, opt, arrays, dictionary, grid, device, comm, kw, dtype)
                if terms is None:  # no rank has images left: the epoch is over
                    break
                _check_finite_terms(terms, f"{desc}: epoch {epoch}, step {step + 1}")
                opt.step()
            else:
                b = _to_batch(arrays, device)
                with _autocast(device, dtype):
                    loss, terms = guide_loss(model.effective(), dictionary, b.tokens, b.cls, b.masks, b.labels, grid,
                                             **kw)
                # the inputs were checked finite when read, so a NaN here comes from the dictionary or a
                # diverging step; stop before the optimiser spreads it into every code
                _check_finite_terms(terms, f"{desc}: epoch {epoch}, step {step + 1}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                ema_update_(ema, model.codes, ema_decay)
            step += 1
            n += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
        curve.append({"epoch": epoch, "step": step, **{k: v / n for k, v in sums.items()},
                      "loss": sum(sums.values()) / n})
    with torch.no_grad():
        codes = model.effective(ema)
        check_finite_codes(codes, f"{desc}: the EMA codes after {epochs} epochs")
        final = evaluate_terms(read, n_chunks, codes, dictionary, grid, device=device, comm=comm, **kw)
        _check_finite_terms(final, f"{desc}: the final loss of the EMA codes over the whole set")
    return FitResult(codes=codes.cpu(), final_terms=final, curve=curve)


def _distributed_step(model: GuideCodes, opt: torch.optim.Optimizer, arrays: Mapping[str, np.ndarray] | None,
                      dictionary: torch.Tensor, grid: tuple[int, int], device: torch.device, comm: Any,
                      kw: Mapping, dtype: torch.dtype | None = None) -> dict[str, float] | None:
    """Gradients of this rank's share of a global batch, summed over the ranks (the step is the
    caller's, after the finiteness check); the global loss terms, or None when no rank has images."""
    n_local = 0 if arrays is None else len(arrays["labels"])
    n_images = int(comm.all_reduce_sum_(torch.tensor([float(n_local)], device=device))[0])
    if n_images == 0:
        return None
    codes = model.effective()
    if n_local:
        b = _to_batch(arrays, device)
        inputs = (b.tokens, b.cls, b.masks, b.labels)
    else:
        inputs = (None, None, None, torch.zeros(0, device=device))
    with _autocast(device, dtype):
        terms = guide_loss_share(codes, dictionary, *inputs, grid, n_images=n_images, with_l1=comm.rank == 0, **kw)
    opt.zero_grad(set_to_none=True)
    sum(terms.values()).backward()
    values = comm.all_reduce_grads_([model.codes], torch.stack([terms[k] for k in TERMS]).detach())
    return {k: float(v) for k, v in zip(TERMS, values)}


def _check_finite_terms(terms: Mapping[str, float], where: str) -> None:
    """Raise NonFiniteError naming ``where`` and the first loss term that is NaN or infinite."""
    bad = {k: v for k, v in terms.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteError(f"{where}: loss term(s) {bad} not finite (tokens were checked finite: look at the "
                             "SAE dictionary, or lower guides.lr)")


def check_finite_codes(codes: torch.Tensor, where: str) -> None:
    """Raise NonFiniteError naming ``where``, the guide row and latent of the first NaN/Inf in
    ``codes`` (..., 4, n_latents)."""
    bad = ~torch.isfinite(codes)
    if bad.any():
        index = [int(i) for i in bad.nonzero()[0]]
        row, latent = index[-2], index[-1]
        raise NonFiniteError(f"{where}: codes hold {int(bad.sum())} NaN/Inf value(s), first in guide "
                             f"{ROWS[row]!r} (row {row}), latent {latent}")


def _to_batch(arrays: Mapping[str, np.ndarray], device: torch.device) -> Batch:
    return Batch(
        tokens=torch.from_numpy(np.asarray(arrays["tokens"], np.float32)).to(device),
        cls=torch.from_numpy(np.asarray(arrays["cls"], np.float32)).to(device),
        masks=torch.from_numpy(np.asarray(arrays["masks"])).to(device),
        labels=torch.from_numpy(np.asarray(arrays["labels"]).astype(np.int64)).to(device),
    )


@torch.no_grad()
def evaluate_terms(read, n_chunks: int, codes: torch.Tensor, dictionary: torch.Tensor, grid, *,
                   temperature: float, gamma: float, l1_coef: float, batch_images: int = 32,
                   device: torch.device = torch.device("cpu"), comm: Any = None) -> dict[str, float]:
    """Image-weighted mean of each loss term of fixed ``codes`` over the whole set.

    ``comm`` (under torchrun): rank r reads chunks r, r+world, ...; the sums are added over the ranks."""
    rank, world = (comm.rank, comm.world) if comm is not None else (0, 1)
    sums: dict[str, float] = {}
    count = 0
    for _, arrays in ChunkReader(read, range(rank, n_chunks, world)):
        for i in range(0, len(arrays["labels"]), batch_images):
            b = _to_batch({k: v[i : i + batch_images] for k, v in arrays.items()}, device)
            _, terms = guide_loss(codes, dictionary, b.tokens, b.cls, b.masks, b.labels, grid,
                                  temperature=temperature, gamma=gamma, l1_coef=l1_coef)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v * len(b.labels)
            count += len(b.labels)
    if world > 1:
        packed = torch.tensor([sums.get(k, 0.0) for k in TERMS] + [count], dtype=torch.float64, device=device)
        packed = comm.all_reduce_sum_(packed)
        sums, count = {k: float(v) for k, v in zip(TERMS, packed)}, int(packed[-1])
    return {k: v / count for k, v in sums.items()}


def summarize(codes: torch.Tensor, top: int = 10) -> dict:
    """Per guide: non-zero count and the ``top`` atoms with their coefficients. codes (4, n_latents)."""
    out = {}
    for name, row in zip(ROWS, codes):
        values, atoms = row.topk(min(top, int((row > 0).sum()) or 1))
        out[name] = {
            "nonzero": int((row > 0).sum()),
            "top_atoms": [{"atom": int(a), "coef": float(v)} for a, v in zip(atoms, values) if v > 0],
        }
    return out


# ----------------------------------------------------------------------------------------------------
# Checkpoint: config.json + guides.safetensors (docs/design.md#artifacts)


def save(folder: str | Path, codes_per_seed: torch.Tensor, config: Mapping) -> None:
    """``codes`` (4, n_latents) = the first seed's; ``codes_per_seed`` (n_seeds, 4, n_latents).

    Non-finite codes are refused before anything is written; each file is replaced atomically.
    """
    from safetensors.torch import save as save_bytes

    folder = Path(folder)
    codes_per_seed = codes_per_seed.detach().cpu().float().contiguous()
    check_finite_codes(codes_per_seed, f"{folder}: refusing to save")
    tensors = save_bytes({"codes": codes_per_seed[0].clone(), "codes_per_seed": codes_per_seed})
    text = json.dumps({"rows": list(ROWS), **config}, indent=2, allow_nan=False) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    write_bytes(folder / "guides.safetensors", tensors)
    write_bytes(folder / "config.json", text.encode())


def load(folder: str | Path) -> tuple[torch.Tensor, dict]:
    """(codes_per_seed (n_seeds, 4, n_latents), config dict); non-finite codes are refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    hint = f"re-run `dvc repro fit_guides@{folder.name}` (or `dvc pull` it)"
    tensors_path, config_path = folder / "guides.safetensors", folder / "config.json"
    for path in (tensors_path, config_path):
        if not path.is_file():
            raise GuidesError(f"{path}: no guides here; {hint}")
    try:
        codes = load_file(str(tensors_path))["codes_per_seed"]
    except (SafetensorError, OSError, KeyError) as err:
        raise GuidesError(f"{tensors_path}: no readable 'codes_per_seed' ({type(err).__name__}: {err}); {hint}") from None
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise GuidesError(f"{config_path}: not valid JSON ({err}); {hint}") from None
    check_finite_codes(codes, f"{tensors_path}: re-run fit_guides;")
    return codes, config


def store_fingerprint(attrs: Mapping) -> dict:
    """The attrs of :data:`STORE_FINGERPRINT` of a feature store (None where the store lacks one)."""
    return {k: attrs.get(k) for k in STORE_FINGERPRINT}


def check_provenance(config: Mapping, guides_folder: str | Path, *, sae_sha256: str, sae_folder: str | Path,
                     aux_attrs: Mapping, aux_path: str | Path) -> None:
    """Refuse guides fitted on another SAE or another auxiliary store than the ones given.

    ``config`` is the guides checkpoint's config.json, which records ``sae_sha256`` (sha256 of the
    SAE's ``sae.safetensors``) and ``aux_store`` (:func:`store_fingerprint` of the store it was fitted
    on). Raises :class:`GuidesError` naming both sides of the first mismatch.
    """
    where = Path(guides_folder) / "config.json"
    missing = [k for k in ("sae_sha256", "aux_store") if k not in config]
    if missing:
        raise GuidesError(f"{where}: no {' or '.join(missing)} recorded (fitted by an older version), so it "
                          "cannot be checked against the SAE and the auxiliary store; re-run fit_guides")
    if config["sae_sha256"] != sae_sha256:
        raise GuidesError(f"{where}: the guides were fitted on an SAE with sae.safetensors sha256 "
                          f"{config['sae_sha256']}, but {Path(sae_folder) / 'sae.safetensors'} has {sae_sha256}; "
                          "re-run fit_guides on this SAE, or pass the SAE the guides were fitted on")
    have = store_fingerprint(aux_attrs)
    for key, recorded in config["aux_store"].items():
        if have.get(key) != recorded:
            raise GuidesError(f"{where}: the guides were fitted on auxiliary store {config['aux_store'].get('dataset')!r} "
                              f"with {key} {recorded!r}, but {aux_path} has {key} {have.get(key)!r}; pass the "
                              "guides' own auxiliary store as --aux")
