"""Reference normals: the patch tokens of k known-good images of a line, scored against by nearest patch.

A detector scores a patch against them by its distance (1 − cos) to the nearest reference patch
(:func:`pipeline.method.neighbours.reference`, the few-shot signal evaluate reports as ``reference``).
:class:`Reference` holds

    tokens  (k, L, d) float32  every patch token of the k images, rounded through float16 as the
                               feature store keeps tokens
    bank    (M,) int64         the flat indices (image · L + patch) of the patches searched: all k · L,
                               or ``max_patches`` of them chosen by greedy k-centre selection
                               (:func:`pipeline.method.neighbours.coreset`), so a line's bank has a
                               bounded size whatever k is

The full tokens stay beside the bank because the threshold is set on the references themselves: each
known-good image is scored against the bank patches of the *other* images (:meth:`leave_one_out`), as
an unseen good part would be.

Saved into a detector folder as ``reference.safetensors`` (``tokens`` float16, ``bank`` int64) and
``reference.json`` (format :data:`FORMAT`, the sha256 of the tensors file and of the detector's
``detector.safetensors``, the token space, the sources and the subsampling), so a reference from
another detector or a swapped tensors file is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.files import sha256_file, write_bytes
from pipeline.method import neighbours

FORMAT = "spg-reference/1"
TENSORS, INFO = "reference.safetensors", "reference.json"
SUBSAMPLING = ("greedy k-centre coreset on the unit tokens (1 − cos), first pick the patch at index seed mod M, "
               "each next the patch farthest from the picks so far")


class ReferenceError(PipelineError):
    """A reference that cannot be used: too few images, another detector's, or a damaged file."""


@dataclass
class Reference:
    """Known-good patch tokens and the bank of them searched; see the module docstring."""

    tokens: torch.Tensor
    bank: np.ndarray
    info: dict

    @classmethod
    def build(cls, tokens: torch.Tensor | np.ndarray, *, max_patches: int | None = None, seed: int = 0,
              sources: Sequence[str] = (), device: torch.device | str = "cpu") -> Reference:
        """tokens (k, L, d) of k known-good images -> a reference searching all k · L patches, or a
        coreset of ``max_patches`` of them."""
        t = torch.as_tensor(np.asarray(tokens) if not torch.is_tensor(tokens) else tokens)
        if t.ndim != 3 or len(t) == 0:
            raise ReferenceError(f"reference tokens {tuple(t.shape)}: expected (k, L, d) with k >= 1")
        t = t.to(torch.float16).float().cpu()
        k, length, dim = t.shape
        if max_patches is not None and (isinstance(max_patches, bool) or not isinstance(max_patches, int)
                                        or max_patches < 1):
            raise ReferenceError(f"--max-patches must be a positive integer, got {max_patches!r}")
        everything = k * length
        bank = (np.arange(everything) if max_patches is None or max_patches >= everything
                else neighbours.coreset(t.reshape(everything, dim), max_patches, seed=seed, device=device))
        info = {"format": FORMAT, "n_images": k, "length": length, "dim": dim, "n_patches": int(len(bank)),
                "max_patches": max_patches, "seed": seed,
                "subsampling": "none" if len(bank) == everything else SUBSAMPLING,
                "sources": [str(s) for s in sources]}
        return cls(t, bank.astype(np.int64), info)

    @property
    def n_images(self) -> int:
        return int(self.tokens.shape[0])

    def patches(self, exclude: int | None = None) -> torch.Tensor:
        """The bank's tokens (M, d); ``exclude``: without the patches of that reference image."""
        flat = self.tokens.reshape(-1, self.tokens.shape[-1])
        rows = self.bank if exclude is None else self.bank[self.bank // self.tokens.shape[1] != exclude]
        return flat[torch.from_numpy(rows)]

    def distances(self, tokens: torch.Tensor, *, device: torch.device | str = "cpu",
                  precision: str = "float32") -> torch.Tensor:
        """tokens (B, L, d) -> (B, L) float32: 1 − cos to the nearest bank patch."""
        if tokens.shape[-1] != self.tokens.shape[-1]:
            raise ReferenceError(f"tokens of width {tokens.shape[-1]} against a reference of width "
                                 f"{self.tokens.shape[-1]}")
        return neighbours.reference(tokens, self.patches(), device=device, precision=precision).cpu()

    def leave_one_out(self, *, device: torch.device | str = "cpu", precision: str = "float32") -> torch.Tensor:
        """(k, L) float32: each reference image's patches against the bank patches of the other images,
        the distances an unseen good part would get. Needs k >= 2."""
        if self.n_images < 2:
            raise ReferenceError("one reference image: setting a threshold on the references scores each against "
                                 "the others, so give at least 2 known-good images")
        rows = []
        for i in range(self.n_images):
            bank = self.patches(exclude=i)
            if len(bank) == 0:
                raise ReferenceError(f"the coreset keeps no patch of any reference image but image {i}; raise "
                                     "--max-patches")
            rows.append(neighbours.reference(self.tokens[i:i + 1], bank, device=device, precision=precision).cpu())
        return torch.cat(rows)

    def save(self, folder: str | Path, detector_sha256: str, token_space: Mapping[str, Any]) -> None:
        """Write reference.safetensors and reference.json (last) into ``folder`` (a detector folder)."""
        from safetensors.torch import save as save_bytes

        folder = Path(folder)
        write_bytes(folder / TENSORS, save_bytes({"tokens": self.tokens.to(torch.float16).contiguous(),
                                                  "bank": torch.from_numpy(self.bank).contiguous()}))
        info = {**self.info, "sha256": sha256_file(folder / TENSORS), "detector_sha256": detector_sha256,
                "token_space": dict(token_space)}
        write_bytes(folder / INFO, (json.dumps(info, indent=2, allow_nan=False) + "\n").encode())
        self.info = info

    @classmethod
    def load(cls, folder: str | Path, *, detector_sha256: str) -> Reference | None:
        """The reference saved in a detector folder, None when it has none; refused (ReferenceError)
        when built for another detector or when its tensors are not the ones recorded."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / INFO).is_file():
            return None
        try:
            info = json.loads((folder / INFO).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ReferenceError(f"{folder / INFO}: not valid JSON ({err})") from None
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise ReferenceError(f"{folder / INFO}: not a reference of format {FORMAT!r}")
        if info.get("detector_sha256") != detector_sha256:
            raise ReferenceError(f"{folder / INFO}: built for another detector (its detector.safetensors had sha256 "
                                 f"{info.get('detector_sha256')}, this one {detector_sha256}); rebuild it with "
                                 "`python -m pipeline.cli.reference`")
        if not (folder / TENSORS).is_file() or sha256_file(folder / TENSORS) != info.get("sha256"):
            raise ReferenceError(f"{folder / TENSORS}: missing or not the file {folder / INFO} records (sha256 "
                                 f"{info.get('sha256')}); rebuild it with `python -m pipeline.cli.reference`")
        try:
            tensors = load_file(str(folder / TENSORS))
            tokens, bank = tensors["tokens"].float(), tensors["bank"].numpy().astype(np.int64)
        except (SafetensorError, KeyError, OSError) as err:
            raise ReferenceError(f"{folder / TENSORS}: unreadable ({err})") from None
        k, length, _ = tokens.shape
        if bank.ndim != 1 or len(bank) == 0 or bank.min() < 0 or bank.max() >= k * length:
            raise ReferenceError(f"{folder / TENSORS}: bank indices outside the {k} x {length} reference patches")
        return cls(tokens, bank, info)
