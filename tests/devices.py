"""Device checks for tests: collect every tensor an object returns or keeps, and assert
they all live on the device asked for.

CPU-only machines cannot hold a CUDA tensor, so the unit tests use ``meta`` as the second device:
torch refuses to combine a meta tensor with a CPU tensor exactly as it refuses CPU with CUDA
("Tensor on device meta is not on the expected device cpu!"), and meta tensors carry shapes and
dtypes, so any code path made of tensor operations (no ``.item()``, no ``.numpy()``) runs on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import torch
from torch import nn


def tensors_of(obj: Any, where: str = "result", _seen: set | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (path, tensor) for every tensor in ``obj``: a tensor itself, a module's parameters,
    buffers and plain tensor attributes, a dataclass's fields, the items of dicts, lists and tuples."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield where, obj
    elif isinstance(obj, nn.Module):
        for name, t in [*obj.named_parameters(), *obj.named_buffers()]:
            yield f"{where}.{name}", t
        for module_name, module in obj.named_modules():
            for name, value in vars(module).items():
                if isinstance(value, torch.Tensor) and not name.startswith("_"):
                    yield f"{where}.{module_name + '.' if module_name else ''}{name}", value
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from tensors_of(getattr(obj, f.name), f"{where}.{f.name}", seen)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from tensors_of(value, f"{where}[{key!r}]", seen)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from tensors_of(value, f"{where}[{i}]", seen)


def assert_on(obj: Any, device: str | torch.device, where: str = "result") -> int:
    """Assert that every tensor of ``obj`` (:func:`tensors_of`) is on ``device`` (``cuda`` matches any
    ``cuda:N``); returns how many were checked, and fails when there is none (a check of nothing)."""
    want = torch.device(device)
    found = list(tensors_of(obj, where))
    assert found, f"{where}: no tensor to check"
    wrong = [f"{path} on {t.device}" for path, t in found
             if t.device.type != want.type or (want.index is not None and t.device.index != want.index)]
    assert not wrong, f"expected every tensor on {want}, but: {'; '.join(wrong)}"
    return len(found)


def devices() -> list:
    """``cpu``, plus ``cuda`` (marked ``cuda``) for tests parametrised over the devices torch has."""
    import pytest

    no_gpu = not torch.cuda.is_available()
    return ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        no_gpu, reason="no CUDA device: torch.cuda.is_available() is False (run benchmarks/gpu_check.sh on a GPU)")])]
