"""A detector as one ONNX graph: backbone to the chosen block, guide scoring, upsampling, blur, image score.

    python -m pipeline.cli.export_onnx --detector models/synth_a/detector      # -> <detector>/detector.onnx

The graph takes ``images`` (B, 3, S, S) float32, resized to S x S and normalised as the metadata says
(the project's own :func:`pipeline.features.backbones.transform_for` does it), and returns ``maps`` (B, S, S)
float32 and ``scores`` (B,) float32: what :meth:`pipeline.method.detector.Detector.predict` returns for the
mean of the seeds (the default), computed the same way:

- tokens and CLS rounded through float16, as the feature store and the detector keep them;
- per seed the patch signal of :func:`pipeline.method.scoring.patch_signal` (the same function), upsampled
  bilinearly (``align_corners`` False), then the mean over the seeds;
- the Gaussian blur of scipy's ``gaussian_filter`` (σ in pixels of S, ``truncate`` 4, ``mode`` reflect: the
  edge pixel repeated), written as two 1-D convolutions, which is what that filter is; blurring the mean
  of the seeds' maps equals the mean of their blurred maps (the blur is linear);
- the image score of ``image_score`` (:func:`pipeline.method.scoring.image_scores`'s formulas; ``global``
  from the CLS token and the global guides).

The ONNX file's metadata (``metadata_props``) records: format :data:`FORMAT`, opset, image_size, mean,
std, interpolation, threshold, pixel_threshold, image_score, seeds, map_range and the sha256 of the
``detector.safetensors`` it was exported from. :class:`OnnxDetector` runs it with onnxruntime behind the
Detector contract ``predict`` uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError
from pipeline.files import sha256_file
from pipeline.method import guides as G
from pipeline.method import scoring

FORMAT = "spg-detector-onnx/1"
OPSET = 18
TRUNCATE = 4.0
"""scipy.ndimage.gaussian_filter's default: the kernel reaches int(4 σ + 0.5) pixels each side."""


class OnnxError(PipelineError):
    """A detector that cannot be exported, or an ONNX file that is not a detector's."""


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """The 1-D kernel scipy's gaussian_filter uses at ``sigma`` (radius int(4σ + 0.5), weights summing to 1)."""
    radius = int(TRUNCATE * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def blur(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """maps (B, H, W) -> blurred, each image alone, with scipy's ``reflect`` edges (d c b a | a b c d)."""
    r = (len(kernel) - 1) // 2
    if r == 0:
        return maps
    x = maps[:, None]
    x = torch.cat([x[:, :, :r].flip(2), x, x[:, :, -r:].flip(2)], dim=2)
    x = F.conv2d(x, kernel.reshape(1, 1, -1, 1))
    x = torch.cat([x[:, :, :, :r].flip(3), x, x[:, :, :, -r:].flip(3)], dim=3)
    x = F.conv2d(x, kernel.reshape(1, 1, 1, -1))
    return x[:, 0]


class ScoringGraph(nn.Module):
    """images (B, 3, S, S) normalised -> (maps (B, S, S), scores (B,)), the mean of the seeds' maps."""

    def __init__(self, backbone: nn.Module, vectors: torch.Tensor, settings: scoring.ScoreSettings,
                 grid: Sequence[int], image_size: int):
        super().__init__()
        if settings.image_score not in scoring.IMAGE_SCORES:
            raise OnnxError(f"image_score {settings.image_score!r} is not one of {scoring.IMAGE_SCORES}")
        self.backbone = backbone
        self.register_buffer("vectors", vectors.float().clone())
        self.register_buffer("kernel", gaussian_kernel(settings.blur_sigma) if settings.blur_sigma > 0
                             else torch.ones(1))
        self.settings = settings
        self.grid = (int(grid[0]), int(grid[1]))
        self.size = int(image_size)
        if (len(self.kernel) - 1) // 2 >= self.size:
            raise OnnxError(f"blur_sigma {settings.blur_sigma}: the kernel is wider than the {self.size}-pixel map")

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, cls = self.backbone(images)
        tokens, cls = tokens.to(torch.float16).float(), cls.to(torch.float16).float()
        b = tokens.shape[0]
        gh, gw = self.grid
        maps, global_probs = [], []
        for i in range(self.vectors.shape[0]):
            signal = scoring.patch_signal(tokens, self.vectors[i], temperature=self.settings.temperature,
                                          fusion=self.settings.fusion)
            maps.append(F.interpolate(signal.reshape(b, 1, gh, gw), size=(self.size, self.size), mode="bilinear",
                                      align_corners=False)[:, 0])
            logits = G.global_logits(cls, self.vectors[i, G.NORMAL_GLOBAL], self.vectors[i, G.ANOMALY_GLOBAL])
            global_probs.append(logits.softmax(dim=-1)[:, 1])
        mean_map = blur(torch.stack(maps).mean(dim=0), self.kernel)
        flat = mean_map.reshape(b, -1)
        mode = self.settings.image_score
        if mode == "max":
            score = flat.amax(dim=1)
        elif mode == "lse":
            t = self.settings.lse_temperature
            top = flat.amax(dim=1, keepdim=True)
            score = top[:, 0] + t * torch.log(torch.exp((flat - top) / t).mean(dim=1))
        elif mode == "top_mean":
            k = max(1, int(round(self.settings.top_fraction * flat.shape[1])))
            score = flat.topk(k, dim=1).values.mean(dim=1)
        else:  # global
            score = torch.stack(global_probs).mean(dim=0)
        return mean_map, score


def metadata(det: Any, folder: Path, opset: int) -> dict[str, str]:
    """The ONNX file's metadata_props (strings; lists and numbers as JSON)."""
    tf = det.transform
    info = det.info
    return {"format": FORMAT, "opset": str(opset), "image_size": str(det.image_size),
            "input": "images (B, 3, S, S) float32: RGB resized to S x S (no crop), then (x / 255 - mean) / std",
            "mean": json.dumps(list(tf.mean)), "std": json.dumps(list(tf.std)), "interpolation": tf.interpolation,
            "threshold": json.dumps(info.get("threshold")), "pixel_threshold": json.dumps(info.get("pixel_threshold")),
            "image_score": det.settings.image_score, "seeds": json.dumps(det.seeds),
            "map_range": json.dumps(info.get("map_range", [0.0, 1.0])), "backbone": info["backbone"],
            "detector_sha256": sha256_file(folder / "detector.safetensors"),
            "detector_json": json.dumps(info)}


def export(folder: str | Path, out: str | Path, *, weights: str | Path | None = None, opset: int = OPSET) -> dict:
    """Write the graph of the detector in ``folder`` to ``out`` (atomically); returns its metadata."""
    import onnx

    from pipeline.files import atomic_write
    from pipeline.method.detector import Detector

    folder, out = Path(folder), Path(out)
    det = Detector.load(folder, weights=weights)
    graph = ScoringGraph(det.backbone, det.vectors, det.settings, det.grid, det.image_size).eval()
    example = torch.zeros(1, 3, det.image_size, det.image_size)
    with torch.no_grad():
        program = torch.onnx.export(graph, (example,), dynamo=True, opset_version=opset, input_names=["images"],
                                    output_names=["maps", "scores"],
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},), verbose=False)
    model = program.model_proto
    meta = metadata(det, folder, opset)
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    atomic_write(out, lambda tmp: onnx.save_model(model, str(tmp)))
    return meta


class OnnxDetector:
    """An exported graph behind the Detector contract ``predict`` uses: ``predict(images)`` (PIL) -> maps
    (B, S, S) float32 and scores (B,) float64, ``threshold``, ``info``, ``image_size``, ``seeds``, ``settings``."""

    def __init__(self, path: str | Path, *, providers: Sequence[str] | None = None):
        import onnxruntime as ort

        from pipeline.features.backbones import transform_for
        from pipeline.method.detector import settings_of

        path = Path(path)
        if not path.is_file():
            raise OnnxError(f"{path}: no ONNX file here; write one with `python -m pipeline.cli.export_onnx`")
        available = ort.get_available_providers()
        chosen = list(providers) if providers else [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                                                    if p in available]
        try:
            self.session = ort.InferenceSession(str(path), providers=chosen)
        except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
            raise OnnxError(f"{path}: onnxruntime cannot load it ({err})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("format") != FORMAT:
            raise OnnxError(f"{path}: metadata format {meta.get('format')!r}, this code reads {FORMAT!r}")
        self.meta = meta
        self.info: Mapping[str, Any] = json.loads(meta["detector_json"])
        self.image_size = int(meta["image_size"])
        self.seeds = json.loads(meta["seeds"])
        self.seed = None
        threshold = json.loads(meta["threshold"])
        self.threshold = None if threshold is None else float(threshold)
        self.settings = settings_of(self.info)
        self.reference = None
        self.atoms = None
        self.transform = transform_for(self.image_size, json.loads(meta["mean"]), json.loads(meta["std"]),
                                       meta["interpolation"])
        self.providers = self.session.get_providers()

    def predict(self, images: Sequence) -> tuple[np.ndarray, np.ndarray]:
        from pipeline.data.images import to_rgb

        if len(images) == 0:
            raise ValueError("no images to score")
        batch = torch.stack([self.transform(to_rgb(im, getattr(im, "filename", "") or "<image>")) for im in images])
        maps, scores = self.session.run(["maps", "scores"], {"images": batch.numpy()})
        return maps.astype(np.float32), scores.astype(np.float64)

