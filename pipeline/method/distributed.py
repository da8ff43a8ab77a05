"""Training across processes with torch.distributed (``torchrun``), and no-ops when run plainly.

The group itself is opened by the entry point (:func:`pipeline.launch.process_group`). The reductions
below return their input untouched when there is no group, so one process computes what it always did.

Why an explicit all-reduce and not DistributedDataParallel: the SAE's loss is an FVU whose denominator
is a statistic of the *global* batch (‖x − mean‖² over every rank's tokens), the AuxK term needs the
dead-latent counters of the global batch before the forward is done, and the dictionary's gradient is
projected and its rows renormalised after the reduction. DDP averages per-rank gradients of per-rank
losses, which would be the wrong loss here; one all-reduce of the flattened gradients after a loss
scaled by the global denominator is the exact global gradient and keeps every step visible.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.distributed as dist

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


class DistributedError(PipelineError):
    """A multi-process launch that cannot work as asked (shards vs world size, batch too small)."""


def rank() -> int:
    """This process's rank in the group, 0 without one."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the group, 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on the one process that writes files (rank 0, or the only process)."""
    return rank() == 0


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place, and return it; unchanged without a group."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_grads_(params: Sequence[torch.nn.Parameter], extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """Sum the gradients of ``params`` (and the 1-d ``extra``) over the ranks in one call, in place.

    A parameter without a gradient (no tokens on this rank) counts as zeros. Returns ``extra`` summed.
    One flat buffer, so a step costs one all-reduce whatever the number of parameters.
    """
    if world_size() == 1:
        return extra
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    parts = [g.reshape(-1) for g in grads] + ([extra.reshape(-1)] if extra is not None else [])
    flat = torch.cat(parts)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
        offset += g.numel()
    return flat[offset:].clone() if extra is not None else None


class Comm:
    """The reductions the training loops need, as one object they receive (``comm=``): ``rank``,
    ``world``, :func:`all_reduce_sum_`, :func:`all_reduce_grads_`. The library takes it as an argument
    instead of importing this module, so stages that only load models do not depend on it."""

    @property
    def rank(self) -> int:
        return rank()

    @property
    def world(self) -> int:
        return world_size()

    all_reduce_sum_ = staticmethod(all_reduce_sum_)
    all_reduce_grads_ = staticmethod(all_reduce_grads_)


def check_shards(shards: int, world: int, per_step: int, what: str, n_chunks: int | None = None) -> None:
    """Refuse a shard count the world size does not divide, one above the store's ``n_chunks`` (a shard
    with no chunk adds nothing to a step, so each step would hold fewer tokens than the batch says), or
    a step too small to give every shard one item."""
    if shards < 1 or shards % world:
        raise DistributedError(f"--shards {shards} must be a positive multiple of the {world} processes "
                               f"torchrun started; pass --shards {world} (or a multiple)")
    if n_chunks is not None and shards > n_chunks:
        raise DistributedError(f"--shards {shards} is more than the store's {n_chunks} chunks: the shards "
                               f"without a chunk would leave every step short of its batch; pass at most "
                               f"--shards {n_chunks} (and as many processes or fewer), or extract with smaller "
                               "chunks (extract.chunk_images)")
    if per_step < shards:
        raise DistributedError(f"{what} {per_step} per step cannot be split over {shards} shards; raise "
                               f"{what} or lower --shards")
