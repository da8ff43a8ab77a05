"""The dictionary atoms behind a decision: the local anomaly score decomposed over SAE atoms.

A patch token t is scored by the two local guides g_a = Σ_j a_j D_j and g_n = Σ_j n_j D_j (effective
codes a, n ≥ 0 over the unit-norm atoms D_j). Its anomaly probability is the softmax of the two cosines
at temperature τ, i.e. p = sigmoid(ℓ) with the logit

    ℓ(t) = (cos(t, g_a) − cos(t, g_n)) / τ = Σ_j w_j ⟨D_j, t/‖t‖⟩ / τ,   w_j = a_j/‖g_a‖ − n_j/‖g_n‖,

because cos(t, g) = ⟨t, Σ_j c_j D_j⟩ / (‖t‖ ‖g‖) is linear in the codes. So each atom's share of the
patch's logit is

    s_j(t) = w_j ⟨D_j, t/‖t‖⟩ / τ,   and   Σ_j s_j(t) = ℓ(t)   exactly (no remainder term).

``w`` (:func:`direction_weights`) is the score direction Σ_j w_j D_j = g_a/‖g_a‖ − g_n/‖g_n‖ written
in atoms; :func:`concentration` says how much of it the top atoms carry, as the fraction of Σ_j |w_j|
(the atoms are unit vectors, so |w_j| is atom j's length in the direction). With several guide seeds the
detector's map is the mean of the seeds' probabilities: explanations decompose each seed's logit and
report the mean share over seeds, which sums to the mean logit.

Category-general or -specific (:func:`kind_of`): over the auxiliary set's anomalous patches, the share
of an atom's firings (SAE code > 0) in each category; ``specific`` when one category holds at least
:data:`SPECIFIC_SHARE` of them, ``general`` when the normalised entropy of the shares is at least
:data:`GENERAL_ENTROPY` (spread over the categories), else ``mixed``; ``silent`` when it never fires.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.files import write_bytes
from pipeline.method import guides as G

TOPS = (1, 5, 10, 50)
"""Concentration is reported for the top 1, 5, 10 and 50 atoms."""
SPECIFIC_SHARE = 0.75
GENERAL_ENTROPY = 0.75


def direction_weights(codes: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
    """Effective codes (4, n_latents) of one seed and the unit-norm dictionary (n_latents, d) -> w
    (n_latents,) float64: a_j/‖g_a‖ − n_j/‖g_n‖ of the local guides (module docstring)."""
    codes, dictionary = codes.double(), dictionary.double()
    a, n = codes[G.ANOMALY_LOCAL], codes[G.NORMAL_LOCAL]
    return a / (a @ dictionary).norm() - n / (n @ dictionary).norm()


def contributions(tokens: torch.Tensor, weights: torch.Tensor, dictionary: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """tokens (B, d), w (n_latents,) -> (B, n_latents) float64: each atom's share s_j of each token's
    anomaly logit; a row sums to (cos(t, g_a) − cos(t, g_n)) / τ."""
    unit = F.normalize(tokens.double(), dim=-1)
    return unit @ dictionary.double().T * weights.double() / temperature


def logits(tokens: torch.Tensor, codes: torch.Tensor, dictionary: torch.Tensor, temperature: float) -> torch.Tensor:
    """The local anomaly logit (B,) of tokens (B, d) computed directly from the two guide cosines,
    the value :func:`contributions` must sum to."""
    g = G.guide_vectors(codes.double(), dictionary.double())
    cos = F.normalize(tokens.double(), dim=-1) @ F.normalize(g[[G.NORMAL_LOCAL, G.ANOMALY_LOCAL]], dim=-1).T
    return (cos[:, 1] - cos[:, 0]) / temperature


def concentration(weights: torch.Tensor, tops: Sequence[int] = TOPS) -> dict[str, float]:
    """Fraction of Σ|w_j| carried by the ``top`` atoms of largest |w_j|, for each top in ``tops``."""
    mass = weights.abs().double().sort(descending=True).values
    total = float(mass.sum())
    return {f"top_{k}": (float(mass[:k].sum()) / total if total > 0 else 0.0) for k in tops}


def active_atoms(codes: torch.Tensor) -> dict[str, int]:
    """Non-zero effective coefficients per guide row: how sparse the codes are."""
    return {name: int((row > 0).sum()) for name, row in zip(G.ROWS, codes)}


def kind_of(firings_by_category: Mapping[str, float]) -> dict:
    """The rule of the module docstring for one atom: {kind, shares, normalised_entropy}."""
    total = float(sum(firings_by_category.values()))
    if total <= 0:
        return {"kind": "silent", "shares": {c: 0.0 for c in firings_by_category}, "normalised_entropy": None}
    shares = {c: v / total for c, v in firings_by_category.items()}
    p = np.array([v for v in shares.values() if v > 0])
    entropy = float(-(p * np.log(p)).sum() / math.log(len(shares))) if len(shares) > 1 else 0.0
    kind = ("specific" if max(shares.values()) >= SPECIFIC_SHARE else
            "general" if entropy >= GENERAL_ENTROPY else "mixed")
    return {"kind": kind, "shares": shares, "normalised_entropy": entropy}


def top_atoms(weights: torch.Tensor, n: int) -> list[int]:
    """The ``n`` atoms of largest |w_j| that are not zero, largest first."""
    order = torch.argsort(weights.abs(), descending=True)
    return [int(j) for j in order[:n] if weights[j] != 0]


# ----------------------------------------------------------------------------------------------------
# The atoms a detector carries, for explanations at inference (``predict --explain``)

TENSORS = "atoms.safetensors"


class AtomsError(PipelineError):
    """A detector's atoms file that is missing, damaged or not the one its guide vectors were decoded from."""


@dataclass
class DetectorAtoms:
    """The atoms a detector's guide codes use: ``index`` (m,) their ids in the SAE dictionary,
    ``dictionary`` (m, d) their unit rows, ``codes`` (n_seeds, 4, m) the effective guide codes on them.
    Every other atom has a zero code in every seed, so ``codes @ dictionary`` is the detector's vectors."""

    index: torch.Tensor
    dictionary: torch.Tensor
    codes: torch.Tensor

    @classmethod
    def from_codes(cls, codes_per_seed: torch.Tensor, dictionary: torch.Tensor) -> DetectorAtoms:
        """codes (n_seeds, 4, n_latents), the whole dictionary (n_latents, d) -> the used atoms only."""
        used = torch.nonzero((codes_per_seed != 0).any(dim=0).any(dim=0)).ravel()
        return cls(used.long(), dictionary[used].detach().float().cpu(), codes_per_seed[:, :, used].detach().float().cpu())

    def vectors(self) -> torch.Tensor:
        """(n_seeds, 4, d): the guide vectors these codes decode to."""
        return torch.stack([G.guide_vectors(c.double(), self.dictionary.double()) for c in self.codes]).float()

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save as save_bytes

        write_bytes(Path(folder) / TENSORS, save_bytes({"index": self.index.contiguous(),
                                                        "dictionary": self.dictionary.contiguous(),
                                                        "codes": self.codes.contiguous()}))

    @classmethod
    def load(cls, folder: str | Path, vectors: torch.Tensor) -> DetectorAtoms | None:
        """The atoms file of a detector folder (None when it has none), refused when its codes do not
        decode to ``vectors`` (n_seeds, 4, d), the detector's own: a file from another export."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(folder) / TENSORS
        if not path.is_file():
            return None
        try:
            t = load_file(str(path))
            atoms = cls(t["index"].long(), t["dictionary"].float(), t["codes"].float())
        except (SafetensorError, KeyError, OSError) as err:
            raise AtomsError(f"{path}: unreadable ({err}); re-run the export stage") from None
        m = len(atoms.index)
        if atoms.dictionary.shape != (m, vectors.shape[-1]) or atoms.codes.shape != (*vectors.shape[:2], m):
            raise AtomsError(f"{path}: shapes index {m}, dictionary {tuple(atoms.dictionary.shape)}, codes "
                             f"{tuple(atoms.codes.shape)} do not fit the detector's vectors {tuple(vectors.shape)}; "
                             "re-run the export stage")
        error = float((atoms.vectors() - vectors).abs().max())
        scale = float(vectors.abs().max()) or 1.0
        if not error <= 1e-4 * scale:
            raise AtomsError(f"{path}: its codes decode to vectors {error:.3g} away from detector.safetensors' (scale "
                             f"{scale:.3g}): not the atoms of this detector; re-run the export stage")
        return atoms

    def shares(self, tokens: torch.Tensor, temperature: float, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """tokens (B, d) -> (B, m) float64: each atom's share of each token's local anomaly logit, the
        mean over ``seeds`` (positions in the codes; None: all), so a row sums to the mean logit."""
        chosen = range(len(self.codes)) if seeds is None else seeds
        return torch.stack([contributions(tokens, direction_weights(self.codes[i], self.dictionary), self.dictionary,
                                          temperature) for i in chosen]).mean(dim=0)

    def logits(self, tokens: torch.Tensor, temperature: float, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """tokens (B, d) -> (B,) the mean over seeds of the local anomaly logit, from the two cosines."""
        chosen = range(len(self.codes)) if seeds is None else seeds
        return torch.stack([logits(tokens, self.codes[i], self.dictionary, temperature) for i in chosen]).mean(dim=0)


DECOMPOSITION = ("local anomaly logit at a patch = (cos(t, g_a) - cos(t, g_n)) / temperature = sum over atoms j of "
                 "w_j <D_j, t/|t|> / temperature, w_j = a_j/|g_a| - n_j/|g_n| (pipeline/method/atoms.py); "
                 "with several guide seeds, the mean over seeds of the logit and of each share")


def explain_image(atoms: DetectorAtoms, tokens: torch.Tensor, signal: torch.Tensor, grid: Sequence[int],
                  temperature: float, seeds: Sequence[int] | None = None, top: int = 5) -> tuple[dict, torch.Tensor]:
    """One image's tokens (L, d) and guide signal (L,) (the patch values its guide map upsamples) ->
    (the explanation of its peak patch, the ``top`` atoms' share maps (top, L) float64).

    The explanation: the peak patch (row, col on the grid), the mean logit there computed from the two
    cosines and the sum of every atom's share (equal up to rounding), and the ``top`` atoms by |share|
    with their share, their fraction of the logit, their weight in the score direction and the cosine
    of the token with the atom; ``rest`` is what the other atoms carry."""
    tokens = torch.as_tensor(tokens).double().cpu()
    signal = torch.as_tensor(signal).double().cpu().reshape(-1)
    if tokens.ndim != 2 or len(tokens) != len(signal) or len(signal) != int(grid[0]) * int(grid[1]):
        raise ValueError(f"tokens {tuple(tokens.shape)}, signal {tuple(signal.shape)}, grid {tuple(grid)}: "
                         "expected (L, d), (L,) and L = gh * gw")
    peak = int(torch.argmax(signal))
    shares = atoms.shares(tokens, temperature, seeds)  # (L, m)
    logit = float(atoms.logits(tokens[peak:peak + 1], temperature, seeds)[0])
    row = shares[peak]
    order = [int(j) for j in torch.argsort(row.abs(), descending=True)[:top] if row[j] != 0]
    chosen = range(len(atoms.codes)) if seeds is None else seeds
    weights = torch.stack([direction_weights(atoms.codes[i], atoms.dictionary) for i in chosen]).mean(dim=0)
    cosines = F.normalize(tokens[peak], dim=0) @ atoms.dictionary.double().T
    explained = {
        "peak": {"patch": peak, "row": peak // int(grid[1]), "col": peak % int(grid[1]), "grid": [int(g) for g in grid],
                 "guide_signal": float(signal[peak]), "logit": logit, "sum_of_shares": float(row.sum())},
        "atoms": [{"atom": int(atoms.index[j]), "share": float(row[j]),
                   "fraction_of_logit": float(row[j]) / logit if logit != 0 else None,
                   "weight": float(weights[j]), "cosine": float(cosines[j])} for j in order],
        "rest": float(row.sum() - row[order].sum()),
        "decomposition": DECOMPOSITION,
    }
    return explained, shares[:, order].T.contiguous()
