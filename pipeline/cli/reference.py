"""Give a detector the known-good images of a line, once: a detector folder that carries its reference.

    python -m pipeline.cli.reference --detector models/synth_a/detector --normals line/good \
        --out models/line/detector [--max-patches 20000] [--device auto]

Copies the detector (``detector.json``, ``detector.safetensors``) into ``--out`` (unless it is the same
folder) and writes beside them ``reference.safetensors`` and ``reference.json``
(:mod:`pipeline.method.reference`): the patch tokens of every decodable image under ``--normals``
through the detector's backbone, and the bank of them searched, all or a greedy coreset of
``--max-patches``. ``predict`` with that folder scores against the reference and sets its threshold on
it, with no ``--normals`` to pass again; ``predict --normals`` still replaces it for one run.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from pipeline.cli.predict import Options, PredictError, collect_images, reference_of
from pipeline.files import sha256_file

log = logging.getLogger("pipeline.cli.reference")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", required=True, type=Path, help="models/<A>/detector")
    parser.add_argument("--normals", required=True, nargs="+", help="known-good images (folders, files, patterns)")
    parser.add_argument("--out", required=True, type=Path, help="the detector folder to write")
    parser.add_argument("--max-patches", type=int, default=None, help="bank size (greedy coreset); default all")
    parser.add_argument("--weights", type=Path, default=None, help="backbone weights; default detector.json's")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    from pipeline.launch import resolve_device, setup_logging
    from pipeline.method.detector import Detector

    setup_logging()
    opts = Options(batch_size=args.batch_size, reference_normals=tuple(args.normals), max_patches=args.max_patches)
    if not collect_images(opts.reference_normals).files:
        raise PredictError(f"--normals: no image in {' '.join(args.normals)}")
    det = Detector.load(args.detector, weights=args.weights, device=str(resolve_device(args.device)))
    skipped = []
    reference = reference_of(det, opts, args.out, lambda path, reason: skipped.append((path, reason)))
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.out.resolve() != args.detector.resolve():
        for name in ("detector.safetensors", "detector.json"):  # the JSON last, as the export stage writes them
            shutil.copyfile(args.detector / name, args.out / name)
    token_space = {k: det.info[k] for k in ("backbone", "weights_sha256", "layer", "image_size", "grid")}
    reference.save(args.out, sha256_file(args.out / "detector.safetensors"), token_space)
    log.info("%s: reference of %d images, %d of their patches searched (%s) -> %s", args.detector,
             reference.n_images, len(reference.bank), reference.info["subsampling"], args.out)


def console() -> None:
    """The ``spg-reference`` command: :func:`main` with errors as one line."""
    from pipeline.launch import run

    run(main)


if __name__ == "__main__":
    console()
