"""Stage 1 of SPG: a TopK sparse autoencoder over patch tokens (DESIGN §5).

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

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.store import ChunkReader

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
        return F.embedding_bag(indices, dictionary, per_sample_weights=values, mode="sum")
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
              total: torch.Tensor | None = None) -> torch.Tensor:
    """FVU of the residual e (B, d) reconstructed by the top-``k_aux`` dead latents of ``pre`` (B, n).

    ``dead`` (n_latents,) bool. Zero (with a graph, so callers need no branch) when nothing is dead.
    ``total``: the FVU's denominator when it is a global-batch statistic (see :func:`fvu`).
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.sum() * 0.0
    values, indices = pre.masked_fill(~dead, -1.0).topk(min(k_aux, n_dead), dim=-1, sorted=False)
    values = values.clamp_min(0.0)  # a live latent's -1 can never be chosen over a dead one's >= 0
    return fvu(residual, decode_rows(values, indices, sae.dictionary), total)


# ----------------------------------------------------------------------------------------------------
# Streaming tokens from the feature store


def token_batches(read: Callable[[int], np.ndarray], n_chunks: int | Sequence[int], batch_tokens: int,
                  buffer_tokens: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """One epoch of shuffled token batches (b, d) float32 from chunks read in a seeded random order.

    ``n_chunks``: every chunk ``0 .. n_chunks-1``, or the chunk indices of one shard (a sequence).

    Chunks (n, L, d) are flattened to tokens and mixed in a buffer of at most ``buffer_tokens`` rows:
    whenever it holds that many, it is shuffled and its first half (rounded down, but at least one
    row) is emitted in batches, the other half stays to mix with the next chunk. At the end
    everything left is shuffled and emitted, so an epoch yields every token exactly once. Memory is bounded by the buffer plus two chunks, whatever
    the store's size. Non-finite tokens stop the run, naming the chunk.
    """
    if isinstance(n_chunks, (int, np.integer)):
        order = rng.permutation(n_chunks)
    else:
        order = np.asarray(n_chunks, dtype=np.int64)[rng.permutation(len(n_chunks))]
    buffer: np.ndarray | None = None
    carry: np.ndarray | None = None  # rows emitted from the buffer but not yet a full batch

    def emit(rows: np.ndarray) -> Iterator[np.ndarray]:
        nonlocal carry
        rows = rows if carry is None else np.concatenate([carry, rows])
        n_full = len(rows) // batch_tokens * batch_tokens
        for i in range(0, n_full, batch_tokens):
            yield rows[i : i + batch_tokens]
        carry = rows[n_full:]

    for chunk, tokens in ChunkReader(read, order):
        flat = np.asarray(tokens, dtype=np.float32).reshape(-1, tokens.shape[-1])
        if not np.isfinite(flat).all():
            raise FloatingPointError(f"chunk {chunk} of the feature store has NaN/Inf tokens; re-extract it")
        buffer = flat if buffer is None else np.concatenate([buffer, flat])
        while len(buffer) >= buffer_tokens:
            buffer = buffer[rng.permutation(len(buffer))]
            # At least one row, or a one-row buffer (buffer_tokens 1) would emit nothing and spin forever.
            half = max(1, len(buffer) // 2)
            yield from emit(buffer[:half])
            buffer = buffer[half:]
    if buffer is not None and len(buffer):
        yield from emit(buffer[rng.permutation(len(buffer))])
    if carry is not None and len(carry):
        yield carry  # the last, smaller batch: no token is dropped


def split_sizes(total: int, parts: int) -> list[int]:
    """``total`` items over ``parts`` shards, the first ``total % parts`` one larger: [5, 5, 4] for 14 over 3."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def shard_seeds(rng: np.random.Generator, shards: int) -> list[int]:
    """One seed per shard for an epoch, drawn from the run's generator (the same on every rank)."""
    return [int(v) for v in rng.integers(0, 2**63 - 1, size=shards)]


def sharded_steps(streams: Sequence[Iterator[np.ndarray]], width: int) -> Iterator[np.ndarray]:
    """Zip shard streams into steps: step t is the concatenation of every shard's t-th batch (rows of
    a shard whose stream has ended count as none). Ends when every stream has; each yield (b, width)."""
    streams = list(streams)
    while True:
        parts = [part for part in (next(it, None) for it in streams) if part is not None]
        if not parts:
            return
        yield np.concatenate(parts) if len(parts) > 1 else parts[0]


def local_token_steps(read: Callable[[int], np.ndarray], n_chunks: int, batch_tokens: int, buffer_tokens: int,
                      rng: np.random.Generator, *, shards: int = 1, rank: int = 0, world: int = 1,
                      width: int = 0) -> Iterator[np.ndarray]:
    """This process's rows of each step of one epoch: (b_local, d) float32.

    ``shards`` 1: :func:`token_batches` over every chunk, as a single process always did. ``shards`` S
    > 1: the epoch is S streams, shard s over chunks s, s+S, ... with its own buffer and a generator
    seeded by :func:`shard_seeds`, batches of ``batch_tokens / S`` tokens (:func:`split_sizes`);
    the global step is the concatenation of the shards' batches, so it holds ``batch_tokens`` tokens
    whatever the number of processes. Rank r of ``world`` computes shards r, r+world, ...; once its
    shards are exhausted it yields empty (0, ``width``) rows until the caller sees that every rank's
    are (the global count is 0). One process with ``shards`` S sees exactly the global steps of S ranks.
    """
    if shards == 1:
        yield from token_batches(read, n_chunks, batch_tokens, buffer_tokens, rng)
    else:
        seeds, sizes = shard_seeds(rng, shards), split_sizes(batch_tokens, shards)
        buffers = split_sizes(buffer_tokens, shards)
        mine = range(rank, shards, world)
        yield from sharded_steps([token_batches(read, list(range(s, n_chunks, shards)), sizes[s], max(1, buffers[s]),
                                                np.random.default_rng(seeds[s])) for s in mine], width)
    if world > 1:
        while True:
            yield np.zeros((0, width), dtype=np.float32)


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


def _zero_running() -> dict:
    return {"loss": 0.0, "fvu": 0.0, "auxk": 0.0, "n": 0}


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
                auxk_coef: float, dead_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimisation step of a single process on x (B, d); returns (loss, fvu, auxk) scalars."""
    recon, values, indices, pre = sae(x)
    main = fvu(x, recon)
    fired = torch.zeros_like(state.since_fired, dtype=torch.bool)
    fired[indices[values > 0]] = True
    state.since_fired += len(x)
    state.since_fired[fired] = 0
    aux = auxk_loss(sae, pre, (x - recon).detach(), state.since_fired >= dead_tokens, k_aux)
    loss = main + auxk_coef * aux
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_parallel_grad_()
    opt.step()
    sae.unit_norm_dictionary_()
    return loss, main, aux


def _distributed_step(sae: TopKSAE, opt: torch.optim.Optimizer, x: torch.Tensor, state: TrainState,
                      params: Sequence[nn.Parameter], *, k_aux: int, auxk_coef: float, dead_tokens: int,
                      comm: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """One step of the global batch whose rows x (b_r, d) are this rank's (b_r may be 0).

    Three all-reduces: (Σx, Σe, fired, count) for the global means, the dead latents and the end of
    the epoch; (Σ‖x − x̄‖², Σ‖e − ē‖²), the FVU denominators of the global batch; then the gradients
    with the loss terms. Each rank's loss is its share of the numerators over the global denominators,
    so the summed gradient is the global batch's. Returns (loss, fvu, auxk, global count), or None
    when no rank has rows left.
    """
    n_latents, d = sae.shape.n_latents, sae.shape.d_in
    recon, values, indices, pre = sae(x)
    residual = (x - recon).detach()
    fired = torch.zeros(n_latents, dtype=x.dtype, device=x.device)
    fired[indices[values > 0]] = 1.0
    count = torch.full((1,), float(len(x)), dtype=x.dtype, device=x.device)
    sums = comm.all_reduce_sum_(torch.cat([x.sum(0), residual.sum(0), fired, count]))
    n_global = int(sums[-1])
    if n_global == 0:
        return None
    mean_x, mean_e = sums[:d] / n_global, sums[d : 2 * d] / n_global
    totals = comm.all_reduce_sum_(torch.stack([(x - mean_x).pow(2).sum(), (residual - mean_e).pow(2).sum()]))
    state.since_fired += n_global
    state.since_fired[sums[2 * d : 2 * d + n_latents] > 0] = 0
    main = fvu(x, recon, totals[0].clamp_min(1e-12))
    aux = auxk_loss(sae, pre, residual, state.since_fired >= dead_tokens, k_aux, totals[1].clamp_min(1e-12))
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
          comm: Any = None) -> TrainStats:
    """Train ``sae`` in place on tokens streamed from ``read(chunk) -> (n, L, d)`` for ``epochs`` epochs.

    Batches hold ``batch_images * tokens_per_image`` tokens. ``mean`` (d,) initialises the decoder bias
    when the model has one. Deterministic on CPU for a given seed. The ``dead_mask`` is not computed
    here: see :func:`evaluate`.

    ``checkpoint``: when it holds a snapshot of a run with the same key (:meth:`TrainCheckpoint.load`),
    training continues from it (weights, Adam, dead-latent counters, stream position, curve) instead of
    from ``sae``'s initial weights, and ends with the same weights as an uninterrupted run. After every
    step it is offered the state, and saves it when its interval is due (rank 0 only).

    ``shards``: the epoch's stream as that many interleaved shards (:func:`local_token_steps`); 1 is
    the single stream. ``comm`` (a :class:`pipeline.distributed.Comm`, under torchrun): this process
    trains on its shards' rows of every global step; the FVU and AuxK denominators, the fired latents
    and the gradients are summed over the ranks, so every rank takes the same step, the one a single
    process with the same ``shards`` takes, up to float rounding. None: one process, today's step.
    """
    rank, world = (comm.rank, comm.world) if comm is not None else (0, 1)
    if world > 1 and shards % world:
        raise ValueError(f"shards {shards} is not a multiple of the world size {world}")
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
    # as a context manager, the bar ends its line even when a step raises, so an error prints on its own
    with tqdm(total=epochs, initial=min(state.epoch, epochs), unit="epoch", desc="train_sae", mininterval=1.0) as bar:
        while state.epoch < epochs:
            # The epoch's stream is a function of the generator's state at its start, so a resumed run
            # regenerates it and skips (reads, but does not train on) the batches already done.
            rng.bit_generator.state = state.epoch_rng
            skip = state.batches_done
            for batch in local_token_steps(read, n_chunks, batch_tokens, buffer_tokens, rng, shards=shards,
                                           rank=rank, world=world, width=sae.shape.d_in):
                if skip:
                    skip -= 1
                    continue
                t0 = time.perf_counter()
                x = torch.from_numpy(batch).to(device, non_blocking=True)
                if world > 1:
                    step = _distributed_step(sae, opt, x, state, [p for _, p in named], k_aux=k_aux,
                                             auxk_coef=auxk_coef, dead_tokens=dead_tokens, comm=comm)
                    if step is None:  # every rank's shards are exhausted: the epoch is over
                        break
                    loss, main, aux, n_global = step
                else:
                    n_global = len(x)
                    loss, main, aux = _local_step(sae, opt, x, state, k_aux=k_aux, auxk_coef=auxk_coef,
                                                  dead_tokens=dead_tokens)
                state.train_time += time.perf_counter() - t0
                state.tokens_seen += n_global
                state.step += 1
                state.batches_done += 1
                for key, value in (("loss", loss), ("fvu", main), ("auxk", aux)):
                    state.running[key] += value.item()
                state.running["n"] += 1
                if state.step % log_every == 0:
                    state.curve.append(_curve_row(state, state.epoch, dead_tokens))
                    state.running = _zero_running()
                if checkpoint is not None and rank == 0:  # the other ranks hold the same state
                    checkpoint.offer(sae, opt, state)
            state.epoch, state.batches_done, state.epoch_rng = state.epoch + 1, 0, rng.bit_generator.state
            bar.set_postfix(fvu=f"{state.curve[-1]['fvu']:.3f}" if state.curve else "-",
                            tok_s=f"{state.tokens_seen / max(state.train_time, 1e-9):.0f}")
            bar.update(1)
    if state.running["n"]:
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
            fired[indices[values > 0]] = True
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
# Resumable training snapshots: safetensors + JSON, written atomically; never pickle.


class CheckpointError(PipelineError):
    """A checkpoint folder holds, where a training snapshot goes, a file this code did not write."""


_STATE_FORMAT = "pipeline.sae.TrainCheckpoint/1"
"""Marker in the snapshot JSON and in its tensors file's metadata: only files carrying it are deleted."""
_STATE_JSON = "train_state.json"
_PARTIAL = ".partial"


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temp file beside it, flushed to disk, then renamed over it.

    Not :func:`pipeline.files.atomic_write`: the temp name here is fixed (``<name>.partial``), so the
    cleanup after a kill finds a half-written snapshot by name and deletes only that; and snapshots are
    fsync'd, since resuming from a file the OS had not written yet would be worse than starting over.
    """
    partial = path.with_name(path.name + _PARTIAL)
    with partial.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, path)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the keys the log names when two checkpoint keys differ."""
    if isinstance(value, dict):
        return {k: v for name, sub in value.items() for k, v in _flatten(sub, f"{prefix}{name}.").items()}
    return {prefix[:-1]: value}


@dataclass
class Snapshot:
    """A loaded training snapshot: ``tensors`` (``model.<param>``, ``adam.<param>.<moment>``,
    ``since_fired``) and ``state``, the JSON fields of :class:`TrainState`."""

    tensors: dict[str, torch.Tensor]
    state: dict

    def restore(self, sae: TopKSAE, opt: torch.optim.Optimizer, names: Sequence[str],
                device: torch.device) -> TrainState:
        """Load the weights into ``sae`` and the moments into ``opt`` (whose parameters are ``names``,
        in order); return the loop state."""
        sae.load_state_dict({name: self.tensors[f"model.{name}"] for name in sae.state_dict()}, strict=True)
        moments = [{key.rsplit(".", 1)[1]: t for key, t in self.tensors.items() if key.startswith(f"adam.{name}.")}
                   for name in names]
        opt.load_state_dict({"state": dict(enumerate(moments)), "param_groups": opt.state_dict()["param_groups"]})
        return TrainState.from_json(self.state, self.tensors["since_fired"].to(device))


class TrainCheckpoint:
    """A resumable snapshot of :func:`train` kept in ``folder`` while it runs.

    ``train_state.json`` names the tensors file ``train_state.<step>.safetensors`` (weights, Adam
    moments, dead-latent counters) and holds the loop state (stream position, generator state, curve,
    counters) and the key. Each file is written to a temp file and renamed into place, tensors first
    and the JSON last, so a kill at any moment leaves the previous snapshot or the new one, whole.

    ``key``: a JSON-able mapping of everything that determines the result (config, input fingerprint,
    code). A snapshot saved under another key is ignored, with a log line naming what differs, and
    replaced by the next save. Saves happen every ``every_s`` seconds (0: after every step), or every
    ``every_steps`` steps when that is given. Only files carrying this class's marker are ever deleted.
    """

    def __init__(self, folder: str | Path, key: Mapping[str, Any], *, every_s: float = 600.0,
                 every_steps: int | None = None) -> None:
        self.folder = Path(folder)
        self.key_fields = json.loads(json.dumps(key, sort_keys=True))  # as it reads back from JSON
        self.key = hashlib.sha256(json.dumps(self.key_fields, sort_keys=True).encode()).hexdigest()
        self.every_s, self.every_steps = every_s, every_steps
        self._last = time.monotonic()

    @property
    def json_path(self) -> Path:
        return self.folder / _STATE_JSON

    def _read_json(self) -> dict | None:
        """The snapshot JSON, or None when there is none; refuses a file of that name this code did not write."""
        if self.folder.exists() and not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: checkpoint folder is a file; move it or pass another "
                                  "--checkpoint-dir")
        if not self.json_path.exists():
            return None
        try:
            meta = json.loads(self.json_path.read_text())
        except (OSError, ValueError) as err:
            meta = {"error": str(err)}
        if not isinstance(meta, dict) or meta.get("format") != _STATE_FORMAT:
            raise CheckpointError(f"{self.json_path}: not a training snapshot written by this code (no "
                                  f"format {_STATE_FORMAT!r}); move it away or pass another --checkpoint-dir")
        return meta

    def _ours(self, path: Path) -> bool:
        """True when ``path`` is a tensors file this class wrote (its metadata carries the marker)."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                return (fh.metadata() or {}).get("format") == _STATE_FORMAT
        except Exception:  # unreadable: cannot prove it is ours, so it is kept
            return False

    def load(self) -> Snapshot | None:
        """The saved snapshot when its key is this one; None (saying why in the log) otherwise."""
        from safetensors.torch import load_file

        meta = self._read_json()
        if meta is None:
            return None
        if meta.get("key") != self.key:
            old, new = _flatten(meta.get("key_fields", {})), _flatten(self.key_fields)
            diff = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)]
            log.warning("%s: not resuming, the snapshot was made with other inputs (%s%s); starting afresh",
                        self.json_path, "; ".join(diff[:3]) or "unknown key",
                        f"; {len(diff) - 3} more" if len(diff) > 3 else "")
            return None
        tensors_path = self.folder / str(meta.get("tensors"))
        try:
            tensors = load_file(str(tensors_path))
        except Exception as err:
            log.warning("%s: not resuming, its tensors file %s cannot be read (%s); starting afresh",
                        self.json_path, tensors_path.name, err)
            return None
        return Snapshot(tensors, meta["state"])

    def offer(self, sae: TopKSAE, opt: torch.optim.Optimizer, state: TrainState) -> None:
        """Save when due: every ``every_steps`` steps, else when ``every_s`` seconds have passed."""
        if self.every_steps is not None:
            due = state.step % self.every_steps == 0
        else:
            due = time.monotonic() - self._last >= self.every_s
        if due:
            self.save(sae, opt, state)
            self._last = time.monotonic()

    def save(self, sae: TopKSAE, opt: torch.optim.Optimizer, state: TrainState) -> None:
        """Write the snapshot (tensors, then the JSON naming them) and delete the one it replaces."""
        from safetensors.torch import save

        self._read_json()  # refuses to write over a file of that name that is not ours
        self.folder.mkdir(parents=True, exist_ok=True)
        names = {id(p): name for name, p in sae.named_parameters()}
        tensors = {f"model.{name}": t for name, t in sae.state_dict().items()}
        for group in opt.param_groups:
            for p in group["params"]:
                tensors.update({f"adam.{names[id(p)]}.{k}": t for k, t in opt.state[p].items()})
        tensors["since_fired"] = state.since_fired
        tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
        name = f"train_state.{state.step:09d}.safetensors"
        _write_atomic(self.folder / name, save(tensors, metadata={"format": _STATE_FORMAT, "key": self.key}))
        meta = {"format": _STATE_FORMAT, "key": self.key, "tensors": name, "state": state.to_json(),
                "key_fields": self.key_fields}
        _write_atomic(self.json_path, (json.dumps(meta, indent=1) + "\n").encode())
        self._remove_tensors(keep=name)
        log.debug("%s: snapshot at step %d", self.folder, state.step)

    def _remove_tensors(self, keep: str | None = None) -> None:
        for path in self.folder.glob("train_state.*.safetensors"):
            if path.name != keep and self._ours(path):
                path.unlink()

    def remove(self) -> None:
        """Delete the snapshot once the run it belongs to is saved: this class's files only, and the
        folder when that leaves it empty."""
        if not self.folder.is_dir():
            return
        try:
            self._read_json()
        except CheckpointError as err:  # someone else's file: leave it and the folder alone
            log.warning("%s", err)
            return
        # The JSON first: a kill half-way through leaves marked tensors files (deleted by the next save
        # or remove), never a JSON naming a tensors file that is gone.
        self.json_path.unlink(missing_ok=True)
        self._remove_tensors()
        # temp files of a save that was killed half-way: named by this class, never complete
        (self.folder / (_STATE_JSON + _PARTIAL)).unlink(missing_ok=True)
        for partial in self.folder.glob(f"train_state.*.safetensors{_PARTIAL}"):
            partial.unlink()
        try:
            self.folder.rmdir()
        except OSError:  # other files are in it: not ours to delete
            pass


# ----------------------------------------------------------------------------------------------------
# Checkpoints: config.json + sae.safetensors (DESIGN §4); never pickle.


def save(sae: TopKSAE, folder: str | Path, dead_mask: torch.Tensor, extra: dict | None = None) -> None:
    """Write ``folder/config.json`` and ``folder/sae.safetensors`` (dictionary, encoder, bias, dead_mask)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # float32 whatever the model was cast to (a bf16/fp16 model for speed): the checkpoint format is fp32
    tensors = {
        "dictionary": sae.dictionary.detach().cpu().float().contiguous(),
        "encoder": sae.encoder.detach().cpu().float().contiguous(),
        "dead_mask": dead_mask.detach().cpu().to(torch.bool).contiguous(),
    }
    if sae.shape.decoder_bias:
        tensors["bias"] = sae.bias.detach().cpu().float().contiguous()
    save_file(tensors, str(folder / "sae.safetensors"))
    (folder / "config.json").write_text(json.dumps({**asdict(sae.shape), **(extra or {})}, indent=2) + "\n")


def load(folder: str | Path, device: str | torch.device = "cpu") -> tuple[TopKSAE, torch.Tensor, dict]:
    """Rebuild a saved SAE: (model, dead_mask (n_latents,) bool, the config dict)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    shape = SAEShape(**{k: config[k] for k in ("d_in", "n_latents", "k", "decoder_bias")})
    sae = TopKSAE(shape.d_in, shape.n_latents, shape.k, decoder_bias=shape.decoder_bias)
    tensors = load_file(str(folder / "sae.safetensors"), device=str(device))
    dead = tensors.pop("dead_mask")
    tensors.setdefault("bias", torch.zeros(shape.d_in))
    sae.load_state_dict(tensors, strict=True)
    return sae.to(device), dead, config
