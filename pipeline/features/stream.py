"""Streaming a feature store into training steps, shared by the SAE (tokens) and the guides (images).

Both loops read chunks in a seeded random order through :class:`~pipeline.features.store.ChunkReader`
(one chunk read ahead) and hold at most a buffer plus two chunks, whatever the store's size. With
``shards`` S > 1 an epoch is S independent streams (shard s over chunks s, s+S, ...) whose batches are
concatenated into one global step, so S processes under torchrun take the steps one process with
``shards`` S takes.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from pipeline.features.store import ChunkReader




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


def image_batches(read: Callable[[int], Mapping[str, np.ndarray]], n_chunks: int | Sequence[int], batch_images: int,
                  rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of image batches: chunks in a seeded random order, images shuffled within each chunk,
    every image exactly once. ``read(chunk)`` returns tokens, cls, masks, labels of that chunk.
    ``n_chunks``: every chunk ``0 .. n_chunks-1``, or the chunk indices of one shard (a sequence)."""
    carry: dict[str, np.ndarray] | None = None
    if isinstance(n_chunks, (int, np.integer)):
        order = rng.permutation(n_chunks)
    else:
        order = np.asarray(n_chunks, dtype=np.int64)[rng.permutation(len(n_chunks))]
    for _, arrays in ChunkReader(read, order):
        order = rng.permutation(len(arrays["labels"]))
        arrays = {k: v[order] for k, v in arrays.items()}
        if carry is not None:
            arrays = {k: np.concatenate([carry[k], v]) for k, v in arrays.items()}
        n_full = len(arrays["labels"]) // batch_images * batch_images
        for i in range(0, n_full, batch_images):
            yield {k: v[i : i + batch_images] for k, v in arrays.items()}
        carry = {k: v[n_full:] for k, v in arrays.items()}
    if carry is not None and len(carry["labels"]):
        yield carry


def local_image_steps(read: Callable[[int], Mapping[str, np.ndarray]], n_chunks: int, batch_images: int,
                      rng: np.random.Generator, *, shards: int = 1, rank: int = 0,
                      world: int = 1) -> Iterator[dict[str, np.ndarray] | None]:
    """This process's images of each step of one epoch (None: none left on this rank).

    As :func:`local_token_steps`: ``shards`` 1 is :func:`image_batches` over every chunk;
    S > 1 is S streams (shard s over chunks s, s+S, ..., ``batch_images / S`` images a batch, its own
    generator), a global step the concatenation of the shards' batches, rank r computing shards r,
    r+world, ... Under torchrun (``world`` > 1) the stream then yields None for ever: the caller ends
    the epoch when no rank has images.
    """
    if shards == 1:
        yield from image_batches(read, n_chunks, batch_images, rng)
    else:
        seeds, sizes = shard_seeds(rng, shards), split_sizes(batch_images, shards)
        streams = [image_batches(read, list(range(s, n_chunks, shards)), sizes[s], np.random.default_rng(seeds[s]))
                   for s in range(rank, shards, world)]
        while True:
            parts = [part for part in (next(it, None) for it in streams) if part is not None]
            if not parts:
                break
            yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if len(parts) > 1 else parts[0]
    if world > 1:
        while True:
            yield None
