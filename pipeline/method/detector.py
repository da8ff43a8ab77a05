"""The deployable detector: decoded guide vectors + the settings that turn an image into a map.

A detector folder (``models/<A>/detector``, written by the export stage) holds

    detector.safetensors   ``vectors`` (n_seeds, 4, d) float32: each guide seed's ``c·D``, rows in
                           :data:`pipeline.method.guides.ROWS` order (no SAE is needed at inference)
    detector.json          format ``spg-detector/1``; backbone, weights_sha256, weights_path, layer,
                           image_size, grid, temperature, blur_sigma, image_score, lse_temperature,
                           top_fraction, threshold, threshold_rule, seeds, map_range, aux, sae_sha256,
                           guides (provenance), integrity (sha256 of the tensor file and of every other
                           key, verified at load: an edited or swapped file is refused, not scored)
    atoms.safetensors      the SAE atoms the guide codes use and the codes on them
                           (:class:`pipeline.method.atoms.DetectorAtoms`): what ``predict --explain``
                           decomposes a score over; optional (older exports lack it)

:class:`Detector` loads it with the backbone weights it was made for (checked by sha256) and maps PIL
images or tokens to anomaly maps (B, S, S) in [0, 1] and image scores (B,). Maps come from
:func:`pipeline.method.scoring.score_tokens`, the function the evaluate stage scores with; tokens are rounded
to float16 first, as the feature store keeps them, so ``predict`` equals evaluate on the same images.

Seeds: ``seed=None`` (the default) averages the seeds' maps and scores that mean map (global mode: the
mean of the seeds' global-guide probabilities), :func:`pipeline.method.scoring.mean_of_seeds`; the threshold in
detector.json was chosen on the auxiliary set with that same scoring. ``seed=s`` scores with one seed.
"""

from __future__ import annotations

import json
import math
import typing
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from pipeline.method import scoring
from pipeline.errors import PipelineError
from pipeline.files import sha256_file, write_bytes

FORMAT = "spg-detector/1"
REQUIRED = ("format", "backbone", "weights_sha256", "weights_path", "layer", "image_size", "grid", "temperature",
            "blur_sigma", "image_score", "lse_temperature", "top_fraction", "threshold", "threshold_rule",
            "seeds", "map_range", "aux", "sae_sha256", "guides")
"""Keys every detector.json holds (the contract shared with ``pipeline.cli.predict``)."""
SETTINGS = ("image_score", "blur_sigma", "lse_temperature", "top_fraction", "fusion")
"""detector.json keys that come from params ``evaluate`` (temperature comes from the guides)."""


class DetectorError(PipelineError):
    """A missing or mismatched detector or backbone weights; the message says what to run."""


INTEGRITY = "integrity"
"""detector.json key written by :func:`save`: ``vectors_sha256`` (of detector.safetensors) and
``settings_sha256`` (of every other key, :func:`settings_digest`). check_info cannot tell a layer of 11
from the exported 12, nor one detector's vectors from another's of the same shape; these hashes can."""


def settings_digest(info: Mapping[str, Any]) -> str:
    """sha256 of detector.json's keys other than ``integrity``, in a canonical JSON (sorted keys, no
    spaces): a float read back from JSON prints the same, so a file that was not edited hashes the same."""
    import hashlib

    body = {k: v for k, v in info.items() if k != INTEGRITY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def _export_hint(folder: Path) -> str:
    aux = folder.parent.name if folder.name == "detector" else "<aux>"
    return f"run `dvc repro export@{aux}` (or `dvc pull` it)"


def save(folder: str | Path, vectors: torch.Tensor, info: Mapping[str, Any]) -> None:
    """Write ``detector.safetensors`` (vectors (n_seeds, 4, d) float32) and ``detector.json``.

    Refuses non-finite vectors or an info without every :data:`REQUIRED` key before writing; each file
    is replaced atomically, the JSON last (a JSON newer than the tensors means both are from one run).
    """
    from safetensors.torch import save as save_bytes

    folder = Path(folder)
    vectors = vectors.detach().cpu().float().contiguous()
    missing = [k for k in REQUIRED if k not in info]
    if missing:
        raise ValueError(f"{folder}: detector.json would lack {missing}")
    if vectors.ndim != 3 or vectors.shape[1] != 4 or vectors.shape[0] != len(info["seeds"]):
        raise ValueError(f"{folder}: vectors {tuple(vectors.shape)}: expected ({len(info['seeds'])}, 4, d)")
    if not torch.isfinite(vectors).all():
        raise DetectorError(f"{folder}: refusing to save non-finite guide vectors; re-run fit_guides")
    import hashlib

    tensors = save_bytes({"vectors": vectors})
    info = {k: v for k, v in info.items() if k != INTEGRITY}
    info[INTEGRITY] = {"vectors_sha256": hashlib.sha256(tensors).hexdigest(), "settings_sha256": settings_digest(info)}
    text = json.dumps(info, indent=2, allow_nan=False) + "\n"
    write_bytes(folder / "detector.safetensors", tensors)
    write_bytes(folder / "detector.json", text.encode())


def read(folder: str | Path) -> tuple[dict, torch.Tensor]:
    """(detector.json as a dict, vectors (n_seeds, 4, d) float32), checked against each other.

    Raises DetectorError for a missing folder or file (saying to run ``dvc repro export@<A>``), a JSON
    of another format or lacking a key, vectors that are not finite or not one set per seed, and a
    JSON or tensor file that is not the pair export wrote (:func:`check_integrity`).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    hint = _export_hint(folder)
    for name in ("detector.json", "detector.safetensors"):
        if not (folder / name).is_file():
            raise DetectorError(f"{folder / name}: no detector here; {hint}")
    try:
        info = json.loads((folder / "detector.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DetectorError(f"{folder / 'detector.json'}: not valid JSON ({err}); {hint}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise DetectorError(f"{folder / 'detector.json'}: format {found!r}, this code reads {FORMAT!r}; {hint}")
    missing = [k for k in REQUIRED if k not in info]
    if missing:
        raise DetectorError(f"{folder / 'detector.json'}: missing key(s) {missing}; {hint}")
    check_info(info, folder / "detector.json", hint)
    try:
        vectors = load_file(str(folder / "detector.safetensors"))["vectors"].float()
    except (SafetensorError, KeyError, OSError) as err:
        raise DetectorError(f"{folder / 'detector.safetensors'}: no readable 'vectors' ({err}); {hint}") from None
    seeds = info["seeds"]
    if vectors.ndim != 3 or vectors.shape[0] != len(seeds) or vectors.shape[1] != 4:
        raise DetectorError(f"{folder / 'detector.safetensors'}: vectors {tuple(vectors.shape)} do not fit "
                            f"detector.json's {len(seeds)} seed(s) (expected ({len(seeds)}, 4, d)); {hint}")
    if not torch.isfinite(vectors).all():
        raise DetectorError(f"{folder / 'detector.safetensors'}: vectors hold NaN/Inf; {hint}")
    # last: the checks above name what is wrong; this one catches what they cannot see
    check_integrity(info, folder)
    return info, vectors


def check_integrity(info: Mapping[str, Any], folder: Path) -> None:
    """Refuse a detector whose detector.json or tensor file is not the pair export wrote (:data:`INTEGRITY`).
    A detector exported before the key existed is read unchecked."""
    seal = info.get(INTEGRITY)
    if seal is None:
        return
    hint = _export_hint(folder)
    if not (isinstance(seal, dict) and isinstance(seal.get("vectors_sha256"), str)
            and isinstance(seal.get("settings_sha256"), str)):
        raise DetectorError(f"{folder / 'detector.json'}: {INTEGRITY} {seal!r} is not what export writes; {hint}")
    if settings_digest(info) != seal["settings_sha256"]:
        raise DetectorError(
            f"{folder / 'detector.json'}: its settings were changed after export (sha256 "
            f"{settings_digest(info)[:12]}..., export recorded {seal['settings_sha256'][:12]}...); a detector scores "
            "only with the settings it was exported and thresholded with: change params.yaml and "
            f"{hint.removeprefix('run ')} (predict --threshold overrides the threshold without an edit)")
    digest = sha256_file(folder / "detector.safetensors")
    if digest != seal["vectors_sha256"]:
        raise DetectorError(
            f"{folder / 'detector.safetensors'}: sha256 {digest[:12]}... is not the {seal['vectors_sha256'][:12]}... "
            f"detector.json was exported with: the vectors belong to another export; {hint}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_info(info: Mapping[str, Any], where: Path, hint: str) -> None:
    """Refuse a detector.json whose values cannot be what export wrote (an edit, a damaged file): a
    DetectorError naming the key, instead of a traceback or a silently wrong map later."""
    from pipeline.features.backbones import BACKBONES

    def bad(key: str, why: str) -> typing.NoReturn:
        raise DetectorError(f"{where}: {key} {info.get(key)!r} {why}; {hint}")

    spec = BACKBONES.get(info["backbone"]) if isinstance(info["backbone"], str) else None
    if spec is None:
        bad("backbone", f"is not a backbone this code knows ({', '.join(BACKBONES)})")
    layer, size = info["layer"], info["image_size"]
    if not isinstance(layer, int) or isinstance(layer, bool) or not 1 <= abs(layer) <= spec.depth:
        bad("layer", f"is not a block of {spec.name} (1 to {spec.depth})")
    # image_size and grid against the backbone itself: Detector.load, once the backbone is built
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        bad("image_size", "must be a positive integer")
    grid = info["grid"]
    if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(g, int) and g > 0 for g in grid)):
        bad("grid", "must be two positive integers")
    for key, low, strict in (("temperature", 0.0, True), ("blur_sigma", 0.0, False), ("lse_temperature", 0.0, True)):
        value = info[key]
        if not _number(value) or value < low or (strict and value == low):
            bad(key, f"must be a finite number {'>' if strict else '>='} {low:g}")
    if not _number(info["top_fraction"]) or not 0 < info["top_fraction"] <= 1:
        bad("top_fraction", "must be a number in (0, 1]")
    if info["image_score"] not in scoring.IMAGE_SCORES:
        bad("image_score", f"is not one of {', '.join(scoring.IMAGE_SCORES)}")
    if info.get("fusion", "none") not in scoring.FUSIONS:
        bad("fusion", f"is not one of {', '.join(scoring.FUSIONS)}")
    for key in ("threshold", "pixel_threshold"):
        if info.get(key) is not None and not _number(info[key]):
            bad(key, "must be a finite number or null")
    seeds = info["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        bad("seeds", "must be a non-empty list of integers")
    span = info["map_range"]
    if not (isinstance(span, list) and len(span) == 2 and all(_number(x) for x in span) and span[0] < span[1]):
        bad("map_range", "must be two finite numbers, low < high")


def settings_of(info: Mapping[str, Any]) -> scoring.ScoreSettings:
    """The scoring settings recorded in a detector.json."""
    return scoring.ScoreSettings(temperature=float(info["temperature"]), blur_sigma=float(info["blur_sigma"]),
                                 image_score=str(info["image_score"]), lse_temperature=float(info["lse_temperature"]),
                                 top_fraction=float(info["top_fraction"]),
                                 # detectors exported before the option scored the guide map alone
                                 fusion=str(info.get("fusion", "none")))


class Detector:
    """Guide vectors of one auxiliary set, ready to score images or tokens.

    Build it with :meth:`load`. Attributes: ``info`` (detector.json), ``threshold`` (image-score
    threshold chosen on the auxiliary set), ``image_size`` S, ``grid`` (gh, gw), ``seeds``, ``seed``
    (the one scoring, or None for the mean of all), ``settings`` (:class:`scoring.ScoreSettings`),
    ``vectors`` (n_seeds, 4, d), ``backbone`` and ``transform`` (None when loaded without backbone).
    """

    def __init__(self, info: Mapping[str, Any], vectors: torch.Tensor, *, seed: int | None = None,
                 backbone: torch.nn.Module | None = None, transform=None, device: str | torch.device = "cpu",
                 where: str = "detector"):
        self.info = dict(info)
        self.device = torch.device(device)
        self.vectors = vectors.float().to(self.device)
        self.seeds: list[int] = [int(s) for s in info["seeds"]]
        if seed is not None and seed not in self.seeds:
            raise DetectorError(f"{where}: no guide seed {seed}; it has seeds {self.seeds} (omit --seed for "
                                "the mean of all seeds' maps)")
        self.seed = seed
        self.threshold = None if info.get("threshold") is None else float(info["threshold"])
        self.image_size = int(info["image_size"])
        self.grid = tuple(int(g) for g in info["grid"])
        self.settings = settings_of(info)
        self.backbone = backbone
        self.transform = transform
        self.reference = None
        """A :class:`pipeline.method.reference.Reference` of the line's known-good images, when the
        folder carries one (``reference.json``) or one is set."""
        self.atoms = None
        """The :class:`pipeline.method.atoms.DetectorAtoms` of the folder's ``atoms.safetensors``, checked
        to decode to ``vectors``; None when it has none."""

    @classmethod
    def load(cls, folder: str | Path, *, weights: str | Path | None = None, device: str | torch.device = "cpu",
             seed: int | None = None, with_backbone: bool = True) -> "Detector":
        """folder: models/<A>/detector. weights: the backbone .safetensors (None: detector.json's
        ``weights_path``, relative to the current directory). A missing detector or weights file, or
        weights whose sha256 differs from detector.json's ``weights_sha256``, is a DetectorError saying
        what to run. seed: which guide seed scores (None: the mean of every seed's map).
        with_backbone=False loads only the vectors (for scoring tokens from a store)."""
        folder = Path(folder)
        info, vectors = read(folder)
        backbone = transform = None
        if with_backbone:
            from pipeline.features import backbones

            path = Path(info["weights_path"] if weights is None else weights)
            if not path.is_file():
                raise DetectorError(f"{path}: backbone weights of detector {folder} not found; run `dvc repro weights` "
                                    "(or `dvc pull`), or pass the weights file of backbone "
                                    f"{info['backbone']!r} with sha256 {info['weights_sha256']}")
            digest = sha256_file(path)
            if digest != info["weights_sha256"]:
                raise DetectorError(f"{path}: sha256 {digest} differs from {folder / 'detector.json'}'s weights_sha256 "
                                    f"{info['weights_sha256']}: these are not the weights the detector was made with; "
                                    "pass those, or re-run the pipeline with these (dvc repro)")
            backbone = backbones.create_backbone(info["backbone"], layer=int(info["layer"]),
                                                 image_size=int(info["image_size"]), weights=path)
            if backbone.layer != int(info["layer"]) or list(backbone.grid) != list(info["grid"]):
                raise DetectorError(f"{folder / 'detector.json'}: layer {info['layer']} / grid {info['grid']} but the "
                                    f"backbone gives {backbone.layer} / {list(backbone.grid)}; {_export_hint(folder)}")
            transform = backbones.image_transform(backbone)
            backbone = backbone.to(device).eval()
        from pipeline.method.reference import Reference

        det = cls(info, vectors, seed=seed, backbone=backbone, transform=transform, device=device, where=str(folder))
        from pipeline.method.atoms import DetectorAtoms

        det.reference = Reference.load(folder, detector_sha256=sha256_file(folder / "detector.safetensors"))
        det.atoms = DetectorAtoms.load(folder, vectors)
        return det

    def chosen_seeds(self) -> list[int]:
        """Positions (in ``seeds``) of the seeds that score: all, or the one of ``seed``."""
        return list(range(len(self.seeds))) if self.seed is None else [self.seeds.index(self.seed)]

    def guide_signal(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, d) -> (B, L) float32 on the CPU: the patch values the guide map upsamples
        (:func:`scoring.patch_signal`), the mean over the seeds (or the chosen seed's), before any blur:
        what the fusion with reference and batch distances takes."""
        tokens = torch.as_tensor(tokens).float().to(self.device)
        chosen = range(len(self.seeds)) if self.seed is None else [self.seeds.index(self.seed)]
        signal = [scoring.patch_signal(tokens, self.vectors[i], temperature=self.settings.temperature,
                                       fusion=self.settings.fusion) for i in chosen]
        return torch.stack(signal).mean(dim=0).cpu()

    def maps_from_tokens(self, tokens, cls) -> tuple[np.ndarray, np.ndarray]:
        """tokens (B, L, d), cls (B, d) float tensors or arrays -> maps (B, S, S) float32 in [0, 1]
        (anomaly probability after the per-image blur), scores (B,) float64 (``settings.image_score``).

        seed None: the mean of the seeds' maps and its score (:func:`scoring.mean_of_seeds`), made as the
        upsampled and blurred mean of the seeds' patch values (:meth:`guide_signal`): upsampling and blur
        are linear, so this is that mean map to float rounding, with one upsampling and one blur an
        image instead of one a seed (at 224 px about 2.4 ms each on 2 cores).
        """
        tokens = torch.as_tensor(np.asarray(tokens, dtype=np.float32) if not torch.is_tensor(tokens) else tokens)
        cls = torch.as_tensor(np.asarray(cls, dtype=np.float32) if not torch.is_tensor(cls) else cls)
        tokens, cls = tokens.float().to(self.device), cls.float().to(self.device)
        if tokens.ndim != 3 or cls.shape != (tokens.shape[0], tokens.shape[2]):
            raise ValueError(f"tokens {tuple(tokens.shape)} and cls {tuple(cls.shape)}: expected (B, L, d) and (B, d)")
        if tokens.shape[2] != self.vectors.shape[2]:
            raise DetectorError(f"tokens of width {tokens.shape[2]}, but the detector's guides have width "
                                f"{self.vectors.shape[2]} (backbone {self.info['backbone']!r})")
        if self.seed is not None or len(self.seeds) == 1:
            maps, global_probs = scoring.score_tokens(tokens, cls, self.vectors[self.chosen_seeds()[0]], self.grid,
                                                      self.image_size, self.settings)
        else:
            maps = scoring.patch_maps(self.guide_signal(tokens), self.grid, self.image_size,
                                      sigma=self.settings.blur_sigma)
            global_probs = np.mean([scoring.global_probability(cls, self.vectors[i]) for i in self.chosen_seeds()],
                                   axis=0, dtype=np.float32)
        return maps, scoring.score_images(maps, global_probs, self.settings)

    @torch.inference_mode()
    def features(self, images: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL images (any size and mode :func:`pipeline.data.tables.to_rgb` accepts) -> tokens (B, L, d) and
        cls (B, d) float32 on the detector's device, rounded through float16 as the feature store keeps them."""
        from pipeline.data.images import to_rgb

        if self.backbone is None:
            raise DetectorError("this detector was loaded with with_backbone=False; it scores tokens only")
        if len(images) == 0:
            raise ValueError("no images to score")
        batch = torch.stack([self.transform(to_rgb(im, getattr(im, "filename", "") or "<image>")) for im in images])
        # as the extract stage runs it (bf16 autocast on GPU), so tokens match the store's
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        with autocast:
            tokens, cls = self.backbone(batch.to(self.device))
        return tokens.to(torch.float16).float(), cls.to(torch.float16).float()

    def predict(self, images: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """images: a sequence of PIL images (any size; converted with the project's own rules) -> maps
        (B, S, S) float32 in [0, 1] and scores (B,) float64, as :meth:`maps_from_tokens`. Tokens are
        rounded to float16 before scoring, exactly as the feature store keeps them, so the maps equal
        the evaluate stage's for the same images."""
        tokens, cls = self.features(images)
        return self.maps_from_tokens(tokens, cls)
