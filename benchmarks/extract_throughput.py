"""Benchmark: images/s of the extract path vs the bare backbone forward, side by side in one run.

    python benchmarks/extract_throughput.py [--images 96] [--image-size 224] [--backbone dinov2_vits14]

The bare forward runs on tensors already decoded and normalised in memory; the extract path decodes
PNGs in a DataLoader worker, runs the same forward, casts to fp16 and writes the Zarr store. The two
are interleaved (bare, extract, bare, extract, ...) so that machine noise hits both, and the ratio of
medians is printed. Target: ratio >= 0.90 at 224 px on 2 cores. Random weights: speed does
not depend on the values.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.features import backbones
from pipeline.data import images, tables
from pipeline.data import synthetic
from pipeline.features.extract import extract
from pipeline.launch import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="dinov2_vits14")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=128, help="images per timed pass")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    bb = backbones.create_backbone(args.backbone, image_size=args.image_size).to(device).eval()
    transform = backbones.image_transform(bb)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        per_cat = max(1, args.images // 3)
        good = max(1, per_cat // 3)
        synthetic.generate(tmp / "data", "synth_a", seed=0, image_size=256, train_good=1,
                           test_good=good, test_anomalous=max(1, per_cat - good))
        samples = tables.load_table("mvtec", tmp / "data")[: args.images]
        n = len(samples)
        batch = torch.stack([transform(images.load_image(s.image)) for s in samples])
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

        def bare() -> float:
            t0 = time.perf_counter()
            with torch.inference_mode(), autocast:
                for i in range(0, n, args.batch_size):
                    tok, cls = bb(batch[i : i + args.batch_size].to(device))
                    tok.float().cpu(), cls.float().cpu()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return n / (time.perf_counter() - t0)

        def full(rep: int) -> float:
            t0 = time.perf_counter()
            extract(samples, bb, transform, tmp / f"store{rep}", {"bench": rep},
                    categories=sorted({s.category for s in samples}), defects=sorted({s.defect for s in samples}),
                    batch_size=args.batch_size, chunk_images=32, num_workers=args.num_workers, device=device)
            return n / (time.perf_counter() - t0)

        bare()  # warm-up: first-call allocations and kernel selection
        rows = []
        for rep in range(args.repeats):
            rows.append((bare(), full(rep)))
            print(f"repeat {rep}: bare forward {rows[-1][0]:7.2f} img/s   extract {rows[-1][1]:7.2f} img/s   "
                  f"ratio {rows[-1][1] / rows[-1][0]:.3f}", flush=True)
    b = statistics.median(r[0] for r in rows)
    e = statistics.median(r[1] for r in rows)
    print(f"\n{args.backbone} @ {args.image_size}px, {n} images, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, device {device}")
    r = statistics.median(row[1] / row[0] for row in rows)
    print(f"median bare forward: {b:.2f} img/s | median extract: {e:.2f} img/s | "
          f"median of per-repeat ratios {r:.3f} (target >= 0.90)")


if __name__ == "__main__":
    main()
