"""Stage 1 of SPG: a TopK sparse autoencoder over patch tokens (docs/design.md#the-method).

    z  = TopK_k( max(W_enc (x - b), 0) )          z (B, n_latents), at most k non-zeros per row
    x̂ = z D + b                                   D (n_latents, d_in), rows of unit norm

``b`` is zero and frozen by default (the method uses no biases); ``decoder_bias=True`` makes it a
learned decoder bias initialised to the data mean, for ablations. The encoder is initialised tied,
``W_enc = D`` (as rows, i.e. the encoder matrix is Dᵀ). After every optimiser step the dictionary rows
are renormalised, and before it the gradient component parallel to each row is removed, so Adam does
not waste its step on a direction the renormalisation undoes.

Loss = FVU(x, x̂) + auxk_coef · FVU(e, ê), FVU(a, â) = ‖a − â‖² / ‖a − mean(a)‖² over the batch (an MSE
scaled by a per-batch constant, so the gradient direction is the MSE's and the value reads as the
fraction of variance left unexplained). AuxK: e = x − x̂ is the residual, ê the reconstruction of e by
the top ``k_aux`` *dead* latents (those that have not fired for ``dead_tokens`` tokens); it gives dead
latents a gradient and is exactly zero when none are dead.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.features.store import ChunkReader
from pipeline.files import write_bytes
from pipeline.features.stream import local_token_steps

if TYPE_CHECKING:  # resume imports this module for TopKSAE and TrainState
    from pipeline.method.resume import TrainCheckpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SAEShape:
    """What a checkpoint needs to rebuild its model."""

    d_in: int
    n_latents: int
    k: int
    decoder_bias: bool = False


class TopKSAE(nn.Module):
    """TopK SAE without encoder bias; see the module docstring for the equations."""

    def __init__(self, d_in: int, n_latents: int, k: int, *, decoder_bias: bool = False,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not 0 < k <= n_latents:
            raise ValueError(f"sae.k must be in [1, n_latents={n_latents}], got {k}")
        self.shape = SAEShape(d_in, n_latents, k, decoder_bias)
        self.k = k
        dictionary = torch.randn(n_latents, d_in, generator=generator)
        dictionary /= dictionary.norm(dim=1, keepdim=True)
        self.dictionary = nn.Parameter(dictionary)  # D (n_latents, d_in), unit rows
        self.encoder = nn.Parameter(dictionary.clone())  # W_enc (n_latents, d_in): tied init W_enc = Dᵀ
        self.bias = nn.Parameter(torch.zeros(d_in), requires_grad=decoder_bias)  # b (d_in,)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, d_in) -> max(W_enc (x - b), 0)  (B, n_latents)."""
        return F.relu((x - self.bias) @ self.encoder.T)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, d_in) -> (values (B, k) >= 0, indices (B, k)): the k largest ReLU pre-activations."""
        return self.pre_acts(x).topk(self.k, dim=-1, sorted=False)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(values (B, k), indices (B, k)) -> x̂ (B, d_in) = Σ_j values_j D[indices_j] + b (see :func:`decode_rows`)."""
        return decode_rows(values, indices, self.dictionary) + self.bias

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, d_in) -> (x̂ (B, d_in), values (B, k), indices (B, k), pre-activations (B, n_latents))."""
        pre = self.pre_acts(x)
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return self.decode(values, indices), values, indices, pre

    def dense_codes(self, x: torch.Tensor) -> torch.Tensor:
        """z (B, n_latents) with the k selected values in place (for analysis and tests)."""
        values, indices = self.encode(x)
        return torch.zeros(x.shape[0], self.shape.n_latents, dtype=values.dtype, device=x.device).scatter_(1, indices, values)

    @torch.no_grad()
    def unit_norm_dictionary_(self) -> None:
        """Renormalise every dictionary row to unit norm, in place."""
        self.dictionary /= self.dictionary.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Remove from the dictionary's gradient the component parallel to each row, in place."""
        g, d = self.dictionary.grad, self.dictionary
        if g is not None:
            g -= (g * d).sum(dim=1, keepdim=True) * d


DENSE_DECODE_DENSITY = 0.1
"""k / n_latents at and above which :func:`decode_rows` multiplies a dense code matrix instead of
gathering rows. ``benchmarks/sae_decode.py`` (CPU, 2 threads, batch 4096, forward + backward), dense
time / sparse time: k 32 of 4096 (density 1/128) 6.2x at d 384, 7.4x at d 1024; k 64 of 2048 and
128 of 4096 (1/32) 2.0x and 1.5x; k 128 of 2048 and 256 of 4096 (1/16) 1.2x; k 512 of 4096 (1/8)
0.52x; k 512 of 2048 (1/4) 0.23x. So the TopK codes (k 32) gather rows and the AuxK codes (k_aux
512 of 2048 or 4096) use the dense product."""


def decode_rows(values: torch.Tensor, indices: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
    """Σ_j values_j D[indices_j] per row: values, indices (B, k), D (n, d) -> (B, d); indices distinct per row.

    Sparse (embedding_bag gathers the k rows) when k / n < :data:`DENSE_DECODE_DENSITY`; otherwise the
    codes are scattered into a dense (B, n) matrix and multiplied by D, whose backward is two matrix
    products where embedding_bag's is a scatter-add of B x k rows. Same value and gradients either way
    (up to float rounding).
    """
    n = dictionary.shape[0]
    if indices.shape[-1] < DENSE_DECODE_DENSITY * n:
        # embedding_bag is not on autocast's lists: under bfloat16 autocast the values arrive in bfloat16
        # beside a float32 dictionary, and it takes one dtype (a no-op otherwise)
        return F.embedding_bag(indices, dictionary, per_sample_weights=values.to(dictionary.dtype), mode="sum")
    codes = torch.zeros(values.shape[0], n, dtype=values.dtype, device=values.device).scatter(1, indices, values)
    return codes @ dictionary


def fvu(target: torch.Tensor, recon: torch.Tensor, total: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of variance unexplained: ‖target − recon‖² / ‖target − mean(target)‖², both (B, d).

    ``total`` (scalar): the denominator when it is a statistic of a larger batch than ``target`` (a
    rank's share of a global batch under torchrun), else computed from ``target``.
    """
    if total is None:
        total = (target - target.mean(dim=0, keepdim=True)).pow(2).sum()
    return (target - recon).pow(2).sum() / total.clamp_min(1e-12)


def auxk_loss(sae: TopKSAE, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, k_aux: int,
              total: torch.Tensor | None = None, *, sync_free: bool = False) -> torch.Tensor:
    """FVU of the residual e (B, d) reconstructed by the top-``k_aux`` dead latents of ``pre`` (B, n).

    ``dead`` (n_latents,) bool. Zero (with a graph, so callers need no branch) when nothing is dead.
    ``total``: the FVU's denominator when it is a global-batch statistic (see :func:`fvu`).

    ``sync_free``: never read the number of dead latents on the host, which would stall a GPU's queue
    every step. The top ``k_aux`` are always taken (live latents, masked to -1, enter with value 0)
    and the loss is multiplied by ``dead.any()``. The codes are the default path's; the loss and the
    gradients are its bits when nothing is dead or both decode densely (min(k_aux, n_dead) / n at or
    above :data:`DENSE_DECODE_DENSITY`), else the same sums rounded in another order. The default
    path skips the work when nothing is dead (cheaper where a sync costs nothing: the CPU).
    """
    masked = pre.masked_fill(~dead, -1.0)
    if sync_free:
        values, indices = masked.topk(min(k_aux, pre.shape[-1]), dim=-1, sorted=False)
        return fvu(residual, decode_rows(values.clamp_min(0.0), indices, sae.dictionary), total) * dead.any()
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.sum() * 0.0
    values, indices = masked.topk(min(k_aux, n_dead), dim=-1, sorted=False)
    values = values.clamp_min(0.0)  # a live latent's -1 can never be chosen over a dead one's >= 0
    return fvu(residual, decode_rows(values, indices, sae.dictionary), total)


def fired_latents(values: torch.Tensor, indices: torch.Tensor, n_latents: int) -> torch.Tensor:
    """(n_latents,) bool: the latents selected with a positive value by some row of (values, indices)
    (B, k). A scatter, not boolean indexing, so no host sync (indexing by a mask reads its count)."""
    hits = (values > 0).to(torch.uint8).flatten()
    fired = torch.zeros(n_latents, dtype=torch.uint8, device=values.device)
    return fired.scatter_reduce_(0, indices.flatten(), hits, reduce="amax").bool()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``sae.precision`` / ``guides.precision`` on ``device``, or None for float32:
    ``auto`` is bfloat16 on CUDA only."""
    if precision == "bfloat16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    if precision in ("float32", "auto"):
        return None
    raise ValueError(f"precision {precision!r} is not one of auto, float32, bfloat16")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type; a no-op context for None (float32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# ----------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainStats:
    """What a training run reports besides the weights (``reports/<A>/sae.json`` and the curve)."""

    tokens_per_s: float
    """Measured speed inside the optimisation steps; for logs and benchmarks, never a tracked metric."""
    epochs: int
    tokens_seen: int
    curve: list[dict]
    """One row per logged step: step, epoch, tokens, loss, fvu, auxk, dead (running, by dead_tokens)."""


RUNNING_TERMS = ("loss", "fvu", "auxk")
"""The loss terms :class:`TrainState` sums between curve rows, in the order the steps return them."""


def _zero_running() -> dict:
    return {**dict.fromkeys(RUNNING_TERMS, 0.0), "n": 0}


@dataclass
class TrainState:
    """Everything :func:`train` carries from one step to the next besides the weights and Adam's moments.

    With those, it is enough to continue a run bit for bit: the token stream of epoch ``epoch`` is
    regenerated from ``epoch_rng`` and its first ``batches_done`` batches are read and skipped.
    """

    since_fired: torch.Tensor
    """(n_latents,) int64: tokens seen since each latent last fired (dead at ``dead_tokens``)."""
    epoch_rng: dict
    """``numpy.random.Generator.bit_generator.state`` at the start of ``epoch`` (JSON-serialisable)."""
    epoch: int = 0
    """The epoch in progress (``epochs`` once training is over)."""
    batches_done: int = 0
    """Batches of ``epoch`` already trained on."""
    step: int = 0
    tokens_seen: int = 0
    train_time: float = 0.0
    """Seconds inside optimisation steps, for tokens/s only (not part of the result)."""
    curve: list[dict] = field(default_factory=list)
    running: dict = field(default_factory=_zero_running)
    """Sums of loss, fvu and auxk over the ``n`` steps since the last curve row."""

    def to_json(self) -> dict:
        """Every field but ``since_fired`` (a tensor, saved with the weights)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "since_fired"}

    @classmethod
    def from_json(cls, data: dict, since_fired: torch.Tensor) -> "TrainState":
        return cls(since_fired=since_fired, **data)


def _curve_row(state: TrainState, epoch: int, dead_tokens: int) -> dict:
    n = state.running["n"]
    return {"step": state.step, "epoch": epoch, "tokens": state.tokens_seen, "loss": state.running["loss"] / n,
            "fvu": state.running["fvu"] / n, "auxk": state.running["auxk"] / n,
            "dead": float((state.since_fired >= dead_tokens).float().mean())}


def _local_step(sae: TopKSAE, opt: torch.optim.Optimizer, x: torch.Tensor, state: TrainState, *, k_aux: int,
                auxk_coef: float, dead_tokens: int, dtype: torch.dtype | None = None,
                sync_free: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimisation step of a single process on x (B, d); returns (loss, fvu, auxk) scalars, on
    x's device. ``dtype``: the forward's autocast dtype (None: float32); the backward, Adam and the
    weights stay float32. ``sync_free``: as in :func:`auxk_loss`."""
    with autocast(x.device, dtype):
        recon, values, indices, pre = sae(x)
        main = fvu(x, recon)
        state.since_fired += len(x)
        state.since_fired.masked_fill_(fired_latents(values, indices, sae.shape.n_latents), 0)
        aux = auxk_loss(sae, pre, (x - recon).detach(), state.since_fired >= dead_tokens, k_aux, sync_free=sync_free)
        loss = main + auxk_coef * aux
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_parallel_grad_()
    opt.step()
    sae.unit_norm_dictionary_()
    return loss, main, aux


def _distributed_step(sae: TopKSAE, opt: torch.optim.Optimizer, x: torch.Tensor, state: TrainState,
                      params: Sequence[nn.Parameter], *, k_aux: int, auxk_coef: float, dead_tokens: int,
                      comm: Any, dtype: torch.dtype | None = None,
                      sync_free: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """One step of the global batch whose rows x (b_r, d) are this rank's (b_r may be 0).

    Three all-reduces: (Σx, Σe, fired, count) for the global means, the dead latents and the end of
    the epoch; (Σ‖x − x̄‖², Σ‖e − ē‖²), the FVU denominators of the global batch; then the gradients
    with the loss terms. Each rank's loss is its share of the numerators over the global denominators,
    so the summed gradient is the global batch's. Returns (loss, fvu, auxk, global count), or None
    when no rank has rows left. The global count is read on the host every step (a sync): it is what
    tells every rank at once that the epoch is over.
    """
    n_latents, d = sae.shape.n_latents, sae.shape.d_in
    with autocast(x.device, dtype):
        recon, values, indices, pre = sae(x)
        residual = (x - recon).detach().float()
        fired = fired_latents(values, indices, n_latents).to(torch.float32)
        count = torch.full((1,), float(len(x)), dtype=torch.float32, device=x.device)
        sums = comm.all_reduce_sum_(torch.cat([x.float().sum(0), residual.sum(0), fired, count]))
        n_global = int(sums[-1])
        if n_global == 0:
            return None
        mean_x, mean_e = sums[:d] / n_global, sums[d : 2 * d] / n_global
        totals = comm.all_reduce_sum_(torch.stack([(x - mean_x).pow(2).sum(), (residual - mean_e).pow(2).sum()]))
        state.since_fired += n_global
        state.since_fired.masked_fill_(sums[2 * d : 2 * d + n_latents] > 0, 0)
        main = fvu(x, recon, totals[0].clamp_min(1e-12))
        aux = auxk_loss(sae, pre, residual, state.since_fired >= dead_tokens, k_aux, totals[1].clamp_min(1e-12),
                        sync_free=sync_free)
        loss = main + auxk_coef * aux
    opt.zero_grad(set_to_none=True)
    loss.backward()
    terms = comm.all_reduce_grads_(params, torch.stack([loss, main, aux]).detach())
    sae.remove_parallel_grad_()
    opt.step()
    sae.unit_norm_dictionary_()
    return terms[0], terms[1], terms[2], n_global


def train(sae: TopKSAE, read: Callable[[int], np.ndarray], n_chunks: int, *, tokens_per_image: int,
          batch_images: int, epochs: int, lr: float, betas: tuple[float, float], k_aux: int,
          auxk_coef: float, dead_tokens: int, buffer_tokens: int, seed: int,
          device: torch.device = torch.device("cpu"), mean: torch.Tensor | None = None,
          log_every: int = 10, checkpoint: "TrainCheckpoint | None" = None, shards: int = 1,
          comm: Any = None, dtype: torch.dtype | None = None, sync_free: bool | None = None) -> TrainStats:
    """Train ``sae`` in place on tokens streamed from ``read(chunk) -> (n, L, d)`` for ``epochs`` epochs.

    Batches hold ``batch_images * tokens_per_image`` tokens. ``mean`` (d,) initialises the decoder bias
    when the model has one. Deterministic on CPU for a given seed. The ``dead_mask`` is not computed
    here: see :func:`evaluate`.

    ``checkpoint``: when it holds a snapshot of a run with the same key (:meth:`TrainCheckpoint.load`),
    training continues from it (weights, Adam, dead-latent counters, stream position, curve) instead of
    from ``sae``'s initial weights, and ends with the same weights as an uninterrupted run. After every
    step it is offered the state, and saves it when its interval is due (rank 0 only).

    ``shards``: the epoch's stream as that many interleaved shards (:func:`local_token_steps`); 1 is
    the single stream. ``comm`` (a :class:`pipeline.method.distributed.Comm`, under torchrun): this process
    trains on its shards' rows of every global step; the FVU and AuxK denominators, the fired latents
    and the gradients are summed over the ranks, so every rank takes the same step, the one a single
    process with the same ``shards`` takes, up to float rounding. None: one process, the plain single-stream step.

    ``dtype``: the autocast dtype of the forward pass (:func:`autocast_dtype`; None: float32). The
    weights, Adam's moments, the snapshots and the saved model stay float32.

    ``sync_free`` (default: on any device but the CPU): a step reads nothing back on the host, so a
    GPU's queue never drains between steps: the loss sums stay on the device until a curve row or a
    snapshot needs them and the AuxK loss takes its static path (:func:`auxk_loss`: the default path's
    bits while its decode is dense, else up to rounding). ``tokens_per_s`` then times whole epochs
    (reading included) after a device sync, since a step's host time says nothing of the device's.
    """
    rank, world = (comm.rank, comm.world) if comm is not None else (0, 1)
    if world > 1 and shards % world:
        raise ValueError(f"shards {shards} is not a multiple of the world size {world}")
    sync_free = device.type != "cpu" if sync_free is None else sync_free
    rng = np.random.default_rng(seed)
    sae.to(device)
    if sae.shape.decoder_bias and mean is not None:
        with torch.no_grad():
            sae.bias.copy_(mean.to(device))
    named = [(name, p) for name, p in sae.named_parameters() if p.requires_grad]
    opt = torch.optim.Adam([p for _, p in named], lr=lr, betas=betas)
    batch_tokens = batch_images * tokens_per_image
    state = TrainState(since_fired=torch.zeros(sae.shape.n_latents, dtype=torch.long, device=device),
                       epoch_rng=rng.bit_generator.state)
    snapshot = checkpoint.load() if checkpoint is not None else None
    if snapshot is not None:
        state = snapshot.restore(sae, opt, [name for name, _ in named], device)
        log.info("resuming training at epoch %d, step %d (%d batches of the epoch done) from %s",
                 state.epoch, state.step, state.batches_done, checkpoint.folder)
    # Python floats add in float64, so float64 sums on the device add the same bits as the host's did
    pending = torch.tensor([state.running[k] for k in RUNNING_TERMS], dtype=torch.float64, device=device)

    def flush() -> None:  # the device's sums into the (JSON-serialisable) state: one host read
        state.running.update(zip(RUNNING_TERMS, pending.tolist()))

    # as a context manager, the bar ends its line even when a step raises, so an error prints on its own
    with tqdm(total=epochs, initial=min(state.epoch, epochs), unit="epoch", desc="train_sae", mininterval=1.0) as bar:
        while state.epoch < epochs:
            # The epoch's stream is a function of the generator's state at its start, so a resumed run
            # regenerates it and skips (reads, but does not train on) the batches already done.
            rng.bit_generator.state = state.epoch_rng
            skip = state.batches_done
            t_epoch = time.perf_counter()
            for batch in local_token_steps(read, n_chunks, batch_tokens, buffer_tokens, rng, shards=shards,
                                           rank=rank, world=world, width=sae.shape.d_in):
                if skip:
                    skip -= 1
                    continue
                t0 = time.perf_counter()
                x = torch.from_numpy(batch).to(device, non_blocking=True)
                if world > 1:
                    step = _distributed_step(sae, opt, x, state, [p for _, p in named], k_aux=k_aux,
                                             auxk_coef=auxk_coef, dead_tokens=dead_tokens, comm=comm,
                                             dtype=dtype, sync_free=sync_free)
                    if step is None:  # every rank's shards are exhausted: the epoch is over
                        break
                    loss, main, aux, n_global = step
                else:
                    n_global = len(x)
                    loss, main, aux = _local_step(sae, opt, x, state, k_aux=k_aux, auxk_coef=auxk_coef,
                                                  dead_tokens=dead_tokens, dtype=dtype, sync_free=sync_free)
                if not sync_free:
                    state.train_time += time.perf_counter() - t0
                state.tokens_seen += n_global
                state.step += 1
                state.batches_done += 1
                pending += torch.stack([loss, main, aux]).detach().to(torch.float64)
                state.running["n"] += 1
                if state.step % log_every == 0:
                    flush()
                    state.curve.append(_curve_row(state, state.epoch, dead_tokens))
                    state.running = _zero_running()
                    pending.zero_()
                if checkpoint is not None and rank == 0:  # the other ranks hold the same state
                    checkpoint.offer(sae, opt, state, before_save=flush)
            if sync_free:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                state.train_time += time.perf_counter() - t_epoch
            state.epoch, state.batches_done, state.epoch_rng = state.epoch + 1, 0, rng.bit_generator.state
            bar.set_postfix(fvu=f"{state.curve[-1]['fvu']:.3f}" if state.curve else "-",
                            tok_s=f"{state.tokens_seen / max(state.train_time, 1e-9):.0f}")
            bar.update(1)
    if state.running["n"]:
        flush()
        state.curve.append(_curve_row(state, epochs - 1, dead_tokens))
    return TrainStats(tokens_per_s=state.tokens_seen / max(state.train_time, 1e-9),
                      epochs=epochs, tokens_seen=state.tokens_seen, curve=state.curve)


@torch.no_grad()
def evaluate(sae: TopKSAE, read: Callable[[int], np.ndarray], n_chunks: int, *, batch_tokens: int = 8192,
             device: torch.device = torch.device("cpu"), comm: Any = None) -> tuple[float, torch.Tensor]:
    """One pass over every token: (FVU over the whole set, dead_mask (n_latents,) bool = never fired,
    on ``device``). ``sae`` is moved to ``device`` (in place, as :func:`train` does), so a model on
    another device than the one asked for is not combined with tokens and counters on this one.

    ``comm`` (under torchrun): rank r reads chunks r, r+world, ...; the error, the moments and the
    fired latents are summed over the ranks, so every rank returns the whole set's values.
    """
    sae.to(device)
    rank, world = (comm.rank, comm.world) if comm is not None else (0, 1)
    fired = torch.zeros(sae.shape.n_latents, dtype=torch.bool, device=device)
    err, total_sq, total_sum, count = 0.0, 0.0, None, 0
    for _, tokens in ChunkReader(read, range(rank, n_chunks, world)):
        flat = torch.from_numpy(np.asarray(tokens, dtype=np.float32).reshape(-1, tokens.shape[-1]))
        for i in range(0, len(flat), batch_tokens):
            x = flat[i : i + batch_tokens].to(device)
            recon, values, indices, _ = sae(x)
            fired |= fired_latents(values, indices, fired.numel())
            err += float((x - recon).pow(2).sum(dtype=torch.float64))
            total_sq += float(x.pow(2).sum(dtype=torch.float64))
            s = x.sum(dim=0, dtype=torch.float64)
            total_sum = s if total_sum is None else total_sum + s
            count += len(x)
    if world > 1:
        if total_sum is None:  # a rank without chunks
            total_sum = torch.zeros(sae.shape.d_in, dtype=torch.float64, device=device)
        packed = torch.cat([torch.tensor([err, total_sq, count], dtype=torch.float64, device=device),
                            total_sum, fired.to(torch.float64)])
        packed = comm.all_reduce_sum_(packed)
        err, total_sq, count = float(packed[0]), float(packed[1]), int(packed[2])
        total_sum, fired = packed[3 : 3 + sae.shape.d_in], packed[3 + sae.shape.d_in :] > 0
    # Σ‖x − mean‖² = Σ‖x‖² − ‖Σx‖² / N, accumulated in float64 over the stream.
    variance = total_sq - float(total_sum.pow(2).sum()) / count
    return err / variance, ~fired


# ----------------------------------------------------------------------------------------------------
# Checkpoints: config.json + sae.safetensors (docs/design.md#artifacts); never pickle.


class SAEError(PipelineError):
    """A missing, truncated or inconsistent SAE checkpoint; the message names the file and what to run."""


def save(sae: TopKSAE, folder: str | Path, dead_mask: torch.Tensor, extra: dict | None = None) -> None:
    """Write ``folder/sae.safetensors`` (dictionary, encoder, bias, dead_mask), then ``folder/config.json``,
    each atomically: a kill leaves each file whole, the old one or the new (a kill between the two leaves
    new tensors beside the previous config.json, whose md5 then differs from dvc.lock's, so the stage
    re-runs)."""
    from safetensors.torch import save as save_bytes

    folder = Path(folder)
    # float32 whatever the model was cast to (a bf16/fp16 model for speed): the checkpoint format is fp32
    tensors = {
        "dictionary": sae.dictionary.detach().cpu().float().contiguous(),
        "encoder": sae.encoder.detach().cpu().float().contiguous(),
        "dead_mask": dead_mask.detach().cpu().to(torch.bool).contiguous(),
    }
    if not all(torch.isfinite(t).all() for name, t in tensors.items() if name != "dead_mask"):
        raise SAEError(f"{folder}: refusing to save an SAE with NaN/Inf weights (the previous checkpoint, if "
                       "any, is kept); lower sae.lr or check the store")
    if sae.shape.decoder_bias:
        tensors["bias"] = sae.bias.detach().cpu().float().contiguous()
    write_bytes(folder / "sae.safetensors", save_bytes(tensors))
    write_bytes(folder / "config.json", (json.dumps({**asdict(sae.shape), **(extra or {})}, indent=2) + "\n").encode())


def _hint(folder: Path) -> str:
    return f"re-run `dvc repro train_sae@{folder.name}` (or `dvc pull` it)"


def load(folder: str | Path, device: str | torch.device = "cpu") -> tuple[TopKSAE, torch.Tensor, dict]:
    """Rebuild a saved SAE: (model, dead_mask (n_latents,) bool, the config dict).

    A missing folder or file, a config.json that is not JSON or lacks a shape key, and a tensors file
    that is truncated or does not fit the config raise :class:`SAEError` naming the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, tensors_path = folder / "config.json", folder / "sae.safetensors"
    where = "file missing" if folder.is_dir() else f"no folder {folder}"
    for path in (config_path, tensors_path):
        if not path.is_file():
            raise SAEError(f"{path}: no SAE checkpoint here ({where}); {_hint(folder)}")
    try:
        config = json.loads(config_path.read_text())
        shape = SAEShape(**{k: config[k] for k in ("d_in", "n_latents", "k", "decoder_bias")})
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise SAEError(f"{config_path}: not an SAE config ({type(err).__name__}: {err}); {_hint(folder)}") from None
    try:
        tensors = load_file(str(tensors_path), device=str(device))
        dead = tensors.pop("dead_mask")
        tensors.setdefault("bias", torch.zeros(shape.d_in, device=device))
        with torch.device(device):  # built where it runs: no CPU copy of a large dictionary first
            sae = TopKSAE(shape.d_in, shape.n_latents, shape.k, decoder_bias=shape.decoder_bias)
        sae.load_state_dict(tensors, strict=True)
    except (SafetensorError, OSError, KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SAEError(f"{tensors_path}: cannot be read as the SAE of {config_path.name} ({first}); "
                       f"{_hint(folder)}") from None
    return sae, dead, config
