"""Benchmark: images/s of predict against the bare backbone forward on the same images, side by side.

    python benchmarks/predict_throughput.py --detector models/synth_a/detector [--image-sizes 224 448]
        [--images 64] [--batch-size 16] [--source-size 640 480] [--device auto] [--repeats 3]

Three timings per repeat, interleaved (bare, detector, predict, bare, ...) so that machine noise hits all:

- **bare**: the backbone alone (``pipeline.features.backbones.create_backbone`` with the detector's backbone, layer
  and weights) on tensors already decoded, resized and normalised in memory, tokens copied back to the
  host; bf16 autocast on CUDA, as the extract stage runs it.
- **detector**: ``Detector.predict`` on the same images as decoded PIL images at their original size
  (``--source-size``): the project's resize and normalisation, the forward, fp16 rounding, the guide part
  (two cosines per patch), the blur and the image score. Target: detector / bare >= 0.85.
- **predict**: ``pipeline.cli.predict.predict_files`` from the PNG files to the written outputs (decode,
  the detector, the map resized to the original size as a 16-bit PNG, the JPEG overlay of each flagged
  image, scores.csv, report.html), the whole command minus the detector's load; the same with
  ``overlays="all"`` (an overlay for every image); and with ``overlay_format="png"`` (PNG overlays, exact
  to the pixel, the format before JPEG became the default). The flagged count is printed: it sets the
  default's cost. ``none flagged``: the default with a threshold above every score (maps alone, no
  overlay), the cost on a line whose parts are good.

With ``--onnx``, two more timings per repeat, printed in a second table: the exported graph
(:mod:`pipeline.method.onnx_graph`: the forward, the guide scoring, upsampling, blur and image score)
run by onnxruntime on the same normalised tensors as ``bare``, and predict through it
(``predict --runtime onnxruntime``: :class:`pipeline.method.onnx_graph.OnnxDetector`), so the whole
command's speed on each runtime is side by side.

First, the map PNG encoders side by side (:func:`png_encoders`): PIL's writer at compress level 1 with
the Huffman-only strategy (what predict used before) and :func:`pipeline.data.png.encode_png`, on
16-bit maps of ``--source-size``: ms per map and bytes.

Needs the real Detector (pipeline/method/detector.py) and its backbone weights. A detector is exported at one
image size; for every other size in ``--image-sizes`` a temporary copy of its folder is written with
that ``image_size`` and grid (the guide vectors do not depend on the size, so the work per image is that
of a detector exported at it; the maps are not meant to be good). Random images: speed does not depend
on the pixels.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.features import backbones
from pipeline.data.images import load_image
from pipeline.data.png import encode_png
from pipeline.method.detector import Detector
from pipeline.cli.predict import map_pixels, map_top, predict_files
from pipeline.launch import resolve_device


def write_images(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """``n`` smooth random RGB PNGs of ``size`` (W, H) (low-frequency colour blobs plus mild noise)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        blobs = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
        pixels = np.asarray(blobs).astype(np.int16) + rng.integers(-8, 9, (size[1], size[0], 3))
        paths.append(folder / f"{i:04d}.png")
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(paths[-1])
    return paths


def png_encoders(size: tuple[int, int], repeats: int, n: int = 8) -> None:
    """Print ms per map and bytes of PIL's PNG writer against ``encode_png`` on ``n`` smooth 16-bit maps
    of ``size`` (W, H), alternated ``repeats`` times; both must decode to the same pixels."""
    from pipeline.method.tiles import map_at_size

    rng = np.random.default_rng(1)
    maps = [map_pixels(map_at_size(np.asarray(Image.fromarray(rng.random((16, 16), np.float32)).resize(
        (224, 224), Image.Resampling.BICUBIC)).clip(0, 1), size)) for _ in range(n)]

    def pil(pixels: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=1, compress_type=2)  # 2: Z_HUFFMAN_ONLY
        return buf.getvalue()

    seconds, sizes = {"PIL": 0.0, "encode_png": 0.0}, {"PIL": 0, "encode_png": 0}
    for _ in range(repeats):
        for pixels in maps:
            for name, encode in (("PIL", pil), ("encode_png", encode_png)):
                t0 = time.perf_counter()
                data = encode(pixels)
                seconds[name] += time.perf_counter() - t0
                sizes[name] += len(data)
                assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)
    k = repeats * n
    for name in seconds:
        print(f"map PNG {size[0]}x{size[1]} 16-bit, {name:>10}: {seconds[name] / k * 1e3:6.2f} ms, "
              f"{sizes[name] // k:>8} bytes")
    print(f"map PNG encode time PIL / encode_png: {seconds['PIL'] / seconds['encode_png']:.2f}\n", flush=True)


def detector_at(folder: Path, size: int, tmp: Path) -> Path:
    """``folder`` itself when it was exported at ``size``, else a copy whose detector.json says ``size``."""
    info = json.loads((folder / "detector.json").read_text())
    if int(info["image_size"]) == size:
        return folder
    patch = backbones.get_spec(info["backbone"]).patch_size
    copy = tmp / f"detector_{size}"
    copy.mkdir()
    shutil.copy2(folder / "detector.safetensors", copy / "detector.safetensors")
    info.update(image_size=size, grid=[size // patch, size // patch],
                weights_path=str(Path(info["weights_path"]).resolve()))  # the copy lives elsewhere
    if "integrity" in info:  # the copy's settings differ on purpose: reseal them as export would
        from pipeline.method.detector import settings_digest

        info["integrity"] = {**info["integrity"], "settings_sha256": settings_digest(info)}
    (copy / "detector.json").write_text(json.dumps(info, indent=2))
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", required=True, type=Path, help="models/<A>/detector")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--images", type=int, default=64, help="images per timed pass")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--source-size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"),
                        help="size of the image files")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--onnx", action="store_true", help="also time the exported graph and predict through "
                        "onnxruntime (CPU provider)")
    args = parser.parse_args()

    device = resolve_device(args.device)
    info = json.loads((args.detector / "detector.json").read_text())
    weights = Path(info["weights_path"])
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext())
    png_encoders(tuple(args.source_size), args.repeats)
    results, ort_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = write_images(tmp / "images", args.images, tuple(args.source_size))
        pil = [load_image(p) for p in files]
        n = len(files)
        for size in args.image_sizes:
            folder = detector_at(args.detector, size, tmp)
            detector = Detector.load(folder, device=str(device))
            bb = backbones.create_backbone(info["backbone"], layer=info["layer"], image_size=size,
                                           weights=weights).to(device)
            transform = backbones.image_transform(bb)
            batch = torch.stack([transform(im) for im in pil])

            def sync() -> None:
                if device.type == "cuda":
                    torch.cuda.synchronize()

            def bare() -> float:
                t0 = time.perf_counter()
                with torch.inference_mode(), autocast:
                    for i in range(0, n, args.batch_size):
                        tokens, cls = bb(batch[i : i + args.batch_size].to(device))
                        tokens.float().cpu(), cls.float().cpu()
                sync()
                return n / (time.perf_counter() - t0)

            def scored() -> float:
                t0 = time.perf_counter()
                for i in range(0, n, args.batch_size):
                    detector.predict(pil[i : i + args.batch_size])
                sync()
                return n / (time.perf_counter() - t0)

            flagged = []
            ort = None
            if args.onnx:
                from pipeline.method import onnx_graph

                onnx_graph.export(folder, tmp / f"detector_{size}.onnx")
                ort = onnx_graph.OnnxDetector(tmp / f"detector_{size}.onnx", providers=["CPUExecutionProvider"])

            def ort_graph() -> float:
                t0 = time.perf_counter()
                for i in range(0, n, args.batch_size):
                    ort.session.run(["maps", "scores"], {"images": batch[i : i + args.batch_size].numpy()})
                return n / (time.perf_counter() - t0)

            def ort_full(rep: int) -> float:
                t0 = time.perf_counter()
                predict_files([tmp / "images"], ort, tmp / f"ort_{size}_{rep}", batch_size=args.batch_size)
                return n / (time.perf_counter() - t0)

            def full(rep: int, overlays: str = "flagged", fmt: str = "jpeg", threshold: float | None = None) -> float:
                t0 = time.perf_counter()
                summary = predict_files([tmp / "images"], detector,
                                        tmp / f"out_{size}_{rep}_{overlays}_{fmt}_{threshold}",
                                        batch_size=args.batch_size, overlays=overlays, overlay_format=fmt,
                                        threshold=threshold)
                sync()
                if threshold is None:
                    flagged.append(summary["n_anomalous"])
                elif summary["n_anomalous"]:
                    raise SystemExit(f"a threshold of {threshold} still flagged {summary['n_anomalous']} images")
                return n / (time.perf_counter() - t0)

            bare(), scored()  # warm-up: first-call allocations and kernel selection
            rows = []
            above = map_top(detector) + 1.0  # every map value is at most map_top, and so is every image score
            for rep in range(args.repeats):
                rows.append((bare(), scored(), full(rep), full(rep, "all"), full(rep, "flagged", "png"),
                             full(rep, threshold=above)))
                if ort is not None:
                    ort_rows.append((size, rows[-1][0], rows[-1][2], ort_graph(), ort_full(rep)))
                    print(f"{size}px repeat {rep}: onnxruntime graph {ort_rows[-1][3]:8.2f} img/s   predict through it "
                          f"{ort_rows[-1][4]:8.2f} img/s", flush=True)
                b, d, p, a, g, q = rows[-1]
                print(f"{size}px repeat {rep}: bare {b:8.2f} img/s   detector {d:8.2f} img/s ({d / b:.3f})   "
                      f"predict {p:8.2f} img/s ({p / b:.3f})   --overlays all {a:8.2f} img/s ({a / b:.3f})   "
                      f"--overlay-format png {g:8.2f} img/s ({g / b:.3f})   none flagged {q:8.2f} img/s "
                      f"({q / b:.3f})   flagged {flagged[-1]}/{n}", flush=True)
            results.append((size, *(statistics.median(r[i] for r in rows) for i in range(6)),
                            *(statistics.median(r[i] / r[0] for r in rows) for i in (1, 2, 3, 4, 5))))
            detector = bb = batch = None  # freed before the next size is loaded
    print(f"\n{info['backbone']} layer {info['layer']}, {n} images of {args.source_size[0]}x{args.source_size[1]}, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads, device {device}; medians of {args.repeats}")
    print(f"{'size':>5} {'bare img/s':>11} {'detector':>10} {'predict':>10} {'all ovl':>10} {'png ovl':>10} "
          f"{'none flg':>10} {'detector/bare':>14} {'predict/bare':>13} {'all/bare':>9} {'png/bare':>9} "
          f"{'none/bare':>10}")
    for size, b, d, p, a, g, q, rd, rp, ra, rg, rq in results:
        print(f"{size:>5} {b:>11.2f} {d:>10.2f} {p:>10.2f} {a:>10.2f} {g:>10.2f} {q:>10.2f} {rd:>14.3f} {rp:>13.3f} "
              f"{ra:>9.3f} {rg:>9.3f} {rq:>10.3f}")
    if ort_rows:
        print(f"\n{'size':>5} {'bare img/s':>11} {'predict':>10} {'ort graph':>10} {'ort predict':>12} "
              f"{'ort predict/ort graph':>22} {'ort predict/predict':>20}")
        for size in args.image_sizes:
            mine = [r for r in ort_rows if r[0] == size]
            med = [statistics.median(r[i] for r in mine) for i in (1, 2, 3, 4)]
            print(f"{size:>5} {med[0]:>11.2f} {med[1]:>10.2f} {med[2]:>10.2f} {med[3]:>12.2f} "
                  f"{statistics.median(r[4] / r[3] for r in mine):>22.3f} "
                  f"{statistics.median(r[4] / r[2] for r in mine):>20.3f}")
    print("targets: detector/bare and predict/bare >= 0.85; predict adds decoding the files, the 16-bit map PNG "
          "of every image and the JPEG overlay of each flagged one (--overlays all: of every image; png: PNG "
          "overlays)")


if __name__ == "__main__":
    main()
