"""Where a stage runs: device choice and the torchrun rank, shared by every stage."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError


class DeviceError(PipelineError, RuntimeError):
    """A device asked for that this machine does not have (``device: cuda`` without a GPU). A
    RuntimeError too, as it was before it became a PipelineError, so callers catching that still do."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a ``torchrun`` job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "DistInfo":
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )


def resolve_device(name: str, dist_info: DistInfo = DistInfo()) -> torch.device:
    """``auto`` -> this rank's CUDA device when there is one, else CPU; ``cuda`` without one is an error."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError("device is 'cuda' but torch sees no CUDA device")
    return torch.device("cuda", dist_info.local_rank)
