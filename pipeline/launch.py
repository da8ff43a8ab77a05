"""How an entry point runs: logging, one error line, the device, and the torchrun process group.

Every stage and command ends with ``run(main)``: a :class:`~pipeline.errors.PipelineError` (bad params, a
dataset that breaks its layout, a store or checkpoint that does not fit) prints as one ``error:`` line
and exits 1; the traceback is kept for ``--verbose`` or ``PIPELINE_DEBUG=1``. Any other exception is a
bug and keeps its traceback.

Under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`process_group` opens the group (NCCL when the device is
CUDA, gloo on CPU) and pins CUDA device ``LOCAL_RANK``; run plainly it does nothing, so one code path
serves one process and many.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


def setup_logging() -> None:
    """Log to stderr with the stage's rank when run under torchrun."""
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(
        level=os.environ.get("SPG_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def debug_requested(argv: list[str] | None = None) -> bool:
    """True when ``--verbose`` is on the command line or ``PIPELINE_DEBUG`` is set to a non-empty, non-0 value."""
    argv = sys.argv[1:] if argv is None else argv
    return "--verbose" in argv or os.environ.get("PIPELINE_DEBUG", "") not in ("", "0")


def run(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Call a stage's ``main(argv)``; turn a :class:`PipelineError` into one line on stderr and exit 1.

    ``--verbose`` is taken out of ``argv`` here, so stages need not declare it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--verbose"]
    try:
        result = main(argv)
    except PipelineError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    if isinstance(result, int) and result:
        sys.exit(result)


class DeviceError(PipelineError, RuntimeError):
    """A device asked for that this machine does not have (``device: cuda`` without a GPU). A
    RuntimeError too, so that callers catching the error torch raises for a missing device catch it."""


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
    """``auto`` -> this rank's CUDA device when there is one, else CPU; ``cuda`` -> this rank's CUDA
    device (``LOCAL_RANK``); ``cuda:N`` -> that device, in a single process. Anything else, ``cuda``
    without a GPU and an index torch does not see are errors naming what there is."""
    import re

    if name not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", str(name)):
        raise DeviceError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device is {name!r} but torch sees no CUDA device")
    if name.startswith("cuda:"):
        index, count = int(name.split(":")[1]), torch.cuda.device_count()
        if index >= count:
            raise DeviceError(f"device is {name!r} but torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        if dist_info.world_size > 1:
            raise DeviceError(f"device {name!r} under torchrun: each rank takes cuda:LOCAL_RANK; give 'cuda'")
        return torch.device("cuda", index)
    return torch.device("cuda", dist_info.local_rank)


def init(device_name: str) -> tuple[DistInfo, torch.device]:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; under torchrun open the group. Returns (info, device).

    ``device_name`` as in params (``auto``/``cpu``/``cuda``); on CUDA each rank gets device
    ``LOCAL_RANK``. The backend follows the device: NCCL for CUDA, gloo for CPU.
    """
    info = DistInfo.from_env()
    device = resolve_device(device_name, info)
    if info.world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        log.info("process group: rank %d of %d on %s", info.rank, info.world_size, device)
    return info, device


def shutdown() -> None:
    """Close the group when there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device_name: str) -> Iterator[tuple[DistInfo, torch.device]]:
    """:func:`init` for the duration of a ``with`` block, closing the group however it ends."""
    try:
        yield init(device_name)
    finally:
        shutdown()
