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

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

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


def fvu(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: ‖target − recon‖² / ‖target − mean(target)‖², both (B, d)."""
    total = (target - target.mean(dim=0, keepdim=True)).pow(2).sum()
    return (target - recon).pow(2).sum() / total.clamp_min(1e-12)


def auxk_loss(sae: TopKSAE, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """FVU of the residual e (B, d) reconstructed by the top-``k_aux`` dead latents of ``pre`` (B, n).

    ``dead`` (n_latents,) bool. Zero (with a graph, so callers need no branch) when nothing is dead.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.sum() * 0.0
    values, indices = pre.masked_fill(~dead, -1.0).topk(min(k_aux, n_dead), dim=-1, sorted=False)
    values = values.clamp_min(0.0)  # a live latent's -1 can never be chosen over a dead one's >= 0
    return fvu(residual, decode_rows(values, indices, sae.dictionary))


# ----------------------------------------------------------------------------------------------------
# Streaming tokens from the feature store


def token_batches(read: Callable[[int], np.ndarray], n_chunks: int, batch_tokens: int, buffer_tokens: int,
                  rng: np.random.Generator) -> Iterator[np.ndarray]:
    """One epoch of shuffled token batches (b, d) float32 from chunks read in a seeded random order.

    Chunks (n, L, d) are flattened to tokens and mixed in a buffer of at most ``buffer_tokens`` rows:
    whenever it holds that many, it is shuffled and its first half (rounded down, but at least one
    row) is emitted in batches, the other half stays to mix with the next chunk. At the end everything left is shuffled and emitted, so an
    epoch yields every token exactly once. Memory is bounded by the buffer plus two chunks, whatever
    the store's size. Non-finite tokens stop the run, naming the chunk.
    """
    order = rng.permutation(n_chunks)
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


# ----------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainStats:
    """What a training run reports besides the weights (``reports/<A>/sae.json`` and the curve)."""

    tokens_per_s: float
    epochs: int
    tokens_seen: int
    curve: list[dict]
    """One row per logged step: step, epoch, tokens, loss, fvu, auxk, dead (running, by dead_tokens)."""


def train(sae: TopKSAE, read: Callable[[int], np.ndarray], n_chunks: int, *, tokens_per_image: int,
          batch_images: int, epochs: int, lr: float, betas: tuple[float, float], k_aux: int,
          auxk_coef: float, dead_tokens: int, buffer_tokens: int, seed: int,
          device: torch.device = torch.device("cpu"), mean: torch.Tensor | None = None,
          log_every: int = 10) -> TrainStats:
    """Train ``sae`` in place on tokens streamed from ``read(chunk) -> (n, L, d)`` for ``epochs`` epochs.

    Batches hold ``batch_images * tokens_per_image`` tokens. ``mean`` (d,) initialises the decoder bias
    when the model has one. Deterministic on CPU for a given seed. The ``dead_mask`` is not computed
    here: see :func:`dead_latents`.
    """
    rng = np.random.default_rng(seed)
    sae.to(device)
    if sae.shape.decoder_bias and mean is not None:
        with torch.no_grad():
            sae.bias.copy_(mean.to(device))
    params = [p for p in sae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, betas=betas)
    batch_tokens = batch_images * tokens_per_image
    since_fired = torch.zeros(sae.shape.n_latents, dtype=torch.long, device=device)
    curve: list[dict] = []
    tokens_seen, step, train_time = 0, 0, 0.0
    run = {"loss": 0.0, "fvu": 0.0, "auxk": 0.0, "n": 0}
    bar = tqdm(total=epochs, unit="epoch", desc="train_sae", mininterval=1.0)
    for epoch in range(epochs):
        for batch in token_batches(read, n_chunks, batch_tokens, buffer_tokens, rng):
            t0 = time.perf_counter()
            x = torch.from_numpy(batch).to(device, non_blocking=True)
            recon, values, indices, pre = sae(x)
            main = fvu(x, recon)
            fired = torch.zeros_like(since_fired, dtype=torch.bool)
            fired[indices[values > 0]] = True
            since_fired += len(x)
            since_fired[fired] = 0
            aux = auxk_loss(sae, pre, (x - recon).detach(), since_fired >= dead_tokens, k_aux)
            loss = main + auxk_coef * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sae.remove_parallel_grad_()
            opt.step()
            sae.unit_norm_dictionary_()
            train_time += time.perf_counter() - t0
            tokens_seen += len(x)
            step += 1
            run["loss"] += loss.item()
            run["fvu"] += main.item()
            run["auxk"] += aux.item()
            run["n"] += 1
            if step % log_every == 0:
                n = run["n"]
                curve.append({"step": step, "epoch": epoch, "tokens": tokens_seen, "loss": run["loss"] / n,
                              "fvu": run["fvu"] / n, "auxk": run["auxk"] / n,
                              "dead": float((since_fired >= dead_tokens).float().mean())})
                run = {"loss": 0.0, "fvu": 0.0, "auxk": 0.0, "n": 0}
        bar.set_postfix(fvu=f"{curve[-1]['fvu']:.3f}" if curve else "-",
                        tok_s=f"{tokens_seen / max(train_time, 1e-9):.0f}")
        bar.update(1)
    bar.close()
    if run["n"]:
        n = run["n"]
        curve.append({"step": step, "epoch": epochs - 1, "tokens": tokens_seen, "loss": run["loss"] / n,
                      "fvu": run["fvu"] / n, "auxk": run["auxk"] / n,
                      "dead": float((since_fired >= dead_tokens).float().mean())})
    return TrainStats(tokens_per_s=tokens_seen / max(train_time, 1e-9),
                       epochs=epochs, tokens_seen=tokens_seen, curve=curve)


@torch.no_grad()
def evaluate(sae: TopKSAE, read: Callable[[int], np.ndarray], n_chunks: int, *, batch_tokens: int = 8192,
             device: torch.device = torch.device("cpu")) -> tuple[float, torch.Tensor]:
    """One pass over every token: (FVU over the whole set, dead_mask (n_latents,) bool = never fired)."""
    fired = torch.zeros(sae.shape.n_latents, dtype=torch.bool, device=device)
    err, total_sq, total_sum, count = 0.0, 0.0, None, 0
    for _, tokens in ChunkReader(read, range(n_chunks)):
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
    # Σ‖x − mean‖² = Σ‖x‖² − ‖Σx‖² / N, accumulated in float64 over the stream.
    variance = total_sq - float(total_sum.pow(2).sum()) / count
    return err / variance, ~fired


# ----------------------------------------------------------------------------------------------------
# Checkpoints: config.json + sae.safetensors (DESIGN §4); never pickle.


def save(sae: TopKSAE, folder: str | Path, dead_mask: torch.Tensor, extra: dict | None = None) -> None:
    """Write ``folder/config.json`` and ``folder/sae.safetensors`` (dictionary, encoder, bias, dead_mask)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "dictionary": sae.dictionary.detach().cpu().contiguous(),
        "encoder": sae.encoder.detach().cpu().contiguous(),
        "dead_mask": dead_mask.detach().cpu().to(torch.bool).contiguous(),
    }
    if sae.shape.decoder_bias:
        tensors["bias"] = sae.bias.detach().cpu().contiguous()
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
