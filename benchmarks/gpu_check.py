"""Speed of each stage's hot loop at the paper's shape on one device.

    python benchmarks/gpu_check.py --device cuda          # DINOv3 ViT-L/16, 448 px, random weights
    python benchmarks/gpu_check.py --device cpu --tiny    # the same code at tiny shapes, seconds on CPU

Prints one line per measurement, ``<name> key=value ...``:

    extract   images_per_s   backbone forward (bf16 autocast on CUDA, tokens rounded to fp16 and
                             copied to the host, as pipeline/features/extract.py does)
    sae_step  tokens_per_s, tflops, peak_tflops, peak_fraction
                             one TopK SAE training step (forward, FVU + AuxK loss, backward, the
                             dictionary's parallel-gradient removal, Adam, renormalisation), bf16
                             autocast on CUDA
    guides_step images_per_s one step of the guide codes (loss on a batch, backward, Adam), guides.precision auto (bf16 autocast on CUDA)
    evaluate  images_per_s   maps and image scores of a batch (pipeline.method.scoring.score_tokens, blur on CPU)

Weights are random (timm ``pretrained=False``): nothing is downloaded, and speed does not depend on
the values. Every timing is taken after warm-up steps, with the device synchronised.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import numpy as np
import torch

from pipeline.features import backbones
from pipeline.method import guides
from pipeline.method import sae
from pipeline.method import scoring

PEAK_BF16_TFLOPS = (  # dense bf16 tensor-core peaks from the vendors' data sheets, matched in this order
    ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0),
    ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0),
)
"""Substring of ``torch.cuda.get_device_name()`` -> TFLOPS; unknown cards print n/a."""

PAPER = dict(backbone="dinov3_vitl16", image_size=448, batch=16, n_latents=4096, k=32, k_aux=512,
             sae_batch_images=8, guide_batch=8, steps=10)
TINY = dict(backbone="dinov3_vits16", image_size=32, batch=2, n_latents=64, k=4, k_aux=16,
            sae_batch_images=2, guide_batch=2, steps=2)


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def timed(fn, device: torch.device, steps: int, warmup: int = 2) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls after ``warmup`` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t0) / steps


def sae_step_flops(batch_tokens: int, d: int, n_latents: int, k: int, k_aux: int) -> float:
    """Matrix-multiply FLOPs of one SAE step (2 per multiply-add), from the shapes:
    encoder forward x (B, d) @ W_encᵀ (d, n): 2·B·d·n; its weight gradient: 2·B·d·n (x needs none);
    TopK decode (gather of k rows) forward 2·B·k·d, backward 2·2·B·k·d (values and rows);
    AuxK decode with every latent counted dead (the benchmark marks them all, the costly case):
    k_aux / n >= sae.DENSE_DECODE_DENSITY makes it dense, (B, n) @ (n, d) forward 2·B·n·d and backward
    2·2·B·n·d (codes and dictionary), else a gather like TopK's with k_aux. Elementwise work, topk and
    Adam are not counted."""
    b = batch_tokens
    flops = 4 * b * d * n_latents + 6 * b * k * d
    if k_aux / n_latents >= sae.DENSE_DECODE_DENSITY:
        flops += 6 * b * n_latents * d
    else:
        flops += 6 * b * k_aux * d
    return float(flops)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke test of this script)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    args = parser.parse_args(argv)
    cfg = dict(TINY if args.tiny else PAPER)
    if args.steps:
        cfg["steps"] = args.steps
    device = torch.device(args.device)
    torch.manual_seed(0)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device name={name.replace(' ', '_')} torch={torch.__version__} shapes={'tiny' if args.tiny else 'paper'}",
          flush=True)

    # extract: the backbone forward as pipeline/features/extract.py runs it
    bb = backbones.create_backbone(cfg["backbone"], image_size=cfg["image_size"]).to(device).eval()
    images = torch.randn(cfg["batch"], 3, cfg["image_size"], cfg["image_size"])
    if device.type == "cuda":
        images = images.pin_memory()
    out = {}

    def forward():
        with torch.inference_mode(), autocast():
            tokens, cls = bb(images.to(device, non_blocking=True))
            out["tokens"] = tokens.to(torch.float16).cpu().numpy()
            out["cls"] = cls.to(torch.float16).cpu().numpy()

    s = timed(forward, device, cfg["steps"])
    n_tokens, d = out["tokens"].shape[1:]
    assert out["tokens"].dtype == np.float16
    print(f"extract images_per_s={cfg['batch'] / s:.1f} batch={cfg['batch']} image_size={cfg['image_size']} "
          f"tokens={n_tokens} d={d}", flush=True)
    grid = bb.grid
    bb = None  # frees the backbone (GPU memory) before the SAE step; forward() is not called again

    # sae_step: one training step at d (the backbone's width), n_latents, k, every latent counted dead
    model = sae.TopKSAE(d, cfg["n_latents"], cfg["k"], generator=torch.Generator().manual_seed(0)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.999))
    batch_tokens = cfg["sae_batch_images"] * n_tokens
    x = torch.randn(batch_tokens, d, device=device)
    # train_sae's own step, as sae.precision auto and the sync-free path run it on this device;
    # dead_tokens 0 counts every latent dead at every step (the AuxK term's full cost)
    state = sae.TrainState(since_fired=torch.zeros(cfg["n_latents"], dtype=torch.long, device=device), epoch_rng={})

    def sae_step():
        sae._local_step(model, opt, x, state, k_aux=cfg["k_aux"], auxk_coef=1 / 32, dead_tokens=0,
                        dtype=sae.autocast_dtype("auto", device), sync_free=True)

    s = timed(sae_step, device, cfg["steps"])
    assert model.dictionary.dtype == torch.float32  # autocast leaves the weights (and checkpoints) fp32
    flops = sae_step_flops(batch_tokens, d, cfg["n_latents"], cfg["k"], cfg["k_aux"])
    peak = peak_tflops(device)
    achieved = flops / s / 1e12
    print(f"sae_step tokens_per_s={batch_tokens / s:.0f} batch_tokens={batch_tokens} n_latents={cfg['n_latents']} "
          f"k={cfg['k']} d={d} tflops={achieved:.2f} peak_tflops={'n/a' if peak is None else f'{peak:.0f}'} "
          f"peak_fraction={'n/a' if peak is None else f'{achieved / peak:.3f}'}", flush=True)

    # guides_step: the guide codes' loss on a batch of images, backward, Adam
    size = cfg["image_size"]
    codes = guides.GuideCodes(cfg["n_latents"], torch.zeros(cfg["n_latents"], dtype=torch.bool, device=device),
                              generator=torch.Generator().manual_seed(0))
    gopt = torch.optim.Adam([codes.codes], lr=1e-2)
    dictionary = model.dictionary.detach()
    b = cfg["guide_batch"]
    tokens = torch.randn(b, n_tokens, d, device=device)
    cls = torch.randn(b, d, device=device)
    masks = (torch.rand(b, size, size, device=device) > 0.9).to(torch.uint8)
    labels = torch.arange(b, device=device) % 2

    gdtype = sae.autocast_dtype("auto", device)  # guides.precision auto, as fit_guides resolves it

    def guides_step():
        with sae.autocast(device, gdtype):  # the same context fit_guides enters (guides keeps a copy)
            loss, _ = guides.guide_loss(codes.effective(), dictionary, tokens, cls, masks, labels, grid,
                                        temperature=0.07, gamma=2.0, l1_coef=1e-3)
        gopt.zero_grad(set_to_none=True)
        loss.backward()
        gopt.step()

    s = timed(guides_step, device, cfg["steps"])
    print(f"guides_step images_per_s={b / s:.1f} batch={b} autocast={gdtype}", flush=True)

    # evaluate: maps and image scores of a batch of stored tokens (fp16 on the host, as the store gives)
    stored = out["tokens"]
    stored_cls = out["cls"]
    vectors = guides.guide_vectors(codes.effective().detach(), dictionary)
    settings = scoring.ScoreSettings(blur_sigma=4.0)

    def evaluate():
        t = torch.from_numpy(stored.astype(np.float32)).to(device)
        c = torch.from_numpy(stored_cls.astype(np.float32)).to(device)
        maps, probs = scoring.score_tokens(t, c, vectors, grid, size, settings)
        out["scores"] = scoring.score_images(maps, probs, settings)

    s = timed(evaluate, device, cfg["steps"])
    print(f"evaluate images_per_s={len(stored) / s:.1f} batch={len(stored)}", flush=True)


if __name__ == "__main__":
    main()
