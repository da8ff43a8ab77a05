"""Patch-token extraction into the feature store: decode, forward, write, overlapped.

DataLoader workers decode images and masks while the model runs; a writer thread puts finished chunks
into Zarr while the next batches are computed. Under ``torchrun`` each rank takes whole chunks
(chunk ``c`` belongs to rank ``c % world_size``), so no two processes write one chunk file, and the
result equals a single-process run.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import sys
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.features import store
from pipeline.data.tables import Sample
from pipeline.data.images import load_image, load_mask
from pipeline.errors import PipelineError
from pipeline.launch import DistInfo

log = logging.getLogger(__name__)


class WeightsError(PipelineError, ValueError):
    """The backbone weights file or its JSON record is missing or does not match the config."""


def fingerprint(samples: Sequence[Sample]) -> str:
    """sha256 over every image's and mask's relative path and bytes.

    Stored in the attrs so that a resumed or re-used store is never one made from other pixels under
    the same file names (e.g. a synthetic dataset regenerated with another seed).
    """
    h = hashlib.sha256()
    for s in samples:
        for path in (s.image, s.mask):
            if path is None:
                continue
            h.update(str(path.name).encode() + b"\0")
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


class _Images(Dataset):
    """Decoded, normalised images (3, S, S) and masks (S, S) uint8 of the given sample indices."""

    def __init__(self, samples: Sequence[Sample], indices: Sequence[int], transform: Callable, mask_size: int,
                 max_pixels: int, allow_empty_masks: bool = False):
        self.samples = samples
        self.indices = list(indices)
        self.transform = transform
        self.mask_size = mask_size
        self.max_pixels = max_pixels
        self.allow_empty_masks = allow_empty_masks

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sample index, model input (3, S', S'), mask (S, S) uint8, RGB image resized to S (S, S, 3) uint8)."""
        index = self.indices[i]
        sample = self.samples[index]
        image = load_image(sample.image, self.max_pixels)
        mask = load_mask(sample.mask, image.size, resize_to=self.mask_size, allow_empty=self.allow_empty_masks)
        # np.array, not asarray: a writable copy (torch warns on wrapping a read-only array)
        small = np.array(image.resize((self.mask_size, self.mask_size), Image.Resampling.BILINEAR))
        return (index, self.transform(image), torch.from_numpy(np.ascontiguousarray(mask)),
                torch.from_numpy(small))


def _worker_error(err: PipelineError) -> PipelineError:
    """The user error a DataLoader worker raised, with its own one-line message.

    PyTorch re-raises a worker's exception as ``type(err)("Caught X in DataLoader worker process 0.\\n
    Original Traceback ...")``: the worker's whole traceback in the message, which would defeat the
    stage's one-line ``error:`` output. The original message is the traceback's last line.
    """
    text = str(err)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return err
    last = text.rstrip().splitlines()[-1]
    cls = type(err)
    for prefix in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
        if last.startswith(prefix):
            clean = cls(last[len(prefix):])
            clean.__cause__ = err
            return clean
    return err


class _ChunkWriter:
    """A background thread writing finished chunks; the bounded queue caps memory at ``depth`` chunks."""

    def __init__(self, group, layout: store.StoreLayout, depth: int = 2, after_write: Callable[[int], None] | None = None):
        self.group, self.layout, self.after_write = group, layout, after_write
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="zarr-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain: the main thread raises at its next put or at close
            chunk, arrays = item
            try:
                store.write_chunk(self.group, self.layout, chunk, arrays)
                if self.after_write is not None:
                    self.after_write(chunk)
            except BaseException as err:  # re-raised in the main thread
                self.error = err

    def put(self, chunk: int, arrays: Mapping[str, np.ndarray]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((chunk, arrays))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def extract(
    samples: Sequence[Sample],
    backbone: torch.nn.Module,
    transform: Callable,
    out: str | Path,
    attrs: Mapping[str, Any],
    *,
    categories: Sequence[str],
    defects: Sequence[str],
    batch_size: int = 16,
    chunk_images: int = 32,
    num_workers: int = 1,
    max_pixels: int = 50_000_000,
    allow_empty_masks: bool = False,
    device: torch.device = torch.device("cpu"),
    dist_info: DistInfo = DistInfo(),
    after_write: Callable[[int], None] | None = None,
) -> None:
    """Write the tokens, CLS, masks and labels of ``samples`` into the store at ``out``.

    ``backbone(images (B,3,S,S)) -> (tokens (B,L,d), cls (B,d))`` with attributes ``grid``,
    ``embed_dim`` and ``image_size``. Resumes a store made with the same ``attrs`` and layout; writes
    ``complete: true`` last. Under torch.distributed (already initialised), rank 0 prepares and
    finalises the store and every rank writes its own chunks. ``after_write`` is a test hook.

    An anomalous image whose mask file binarises empty is an error unless ``allow_empty_masks``
    (:func:`pipeline.data.tables.load_mask`). One whose defect is smaller than a pixel at S and vanishes
    in the nearest-neighbour resize is kept and logged as a warning: the image is still anomalous (image
    metrics count it), S and the resize are the paper's protocol, and refusing it would make real
    datasets with tiny defects (VisA) unusable at the paper's resolution without also switching off the
    check for truly empty masks.
    """
    if not samples:
        raise ValueError("no samples to extract")
    gh, gw = backbone.grid
    size = backbone.image_size
    layout = store.StoreLayout(len(samples), gh * gw, backbone.embed_dim, size, chunk_images)
    category_ix = {c: i for i, c in enumerate(categories)}
    defect_ix = {d: i for i, d in enumerate(defects)}
    distributed = dist_info.world_size > 1
    if distributed:
        if dist_info.rank == 0:
            group, _ = store.prepare(out, layout, attrs)
        dist.barrier()
        if dist_info.rank != 0:
            group = store.open_for_writing(out)
        pending = store.pending_chunks(group)
        dist.barrier()  # every rank has read the progress before anyone writes
    else:
        group, pending = store.prepare(out, layout, attrs)
    mine = [c for c in pending if c % dist_info.world_size == dist_info.rank]
    indices = [i for c in mine for i in range(*layout.chunk_range(c))]

    if indices:
        _run(samples, backbone, transform, group, layout, mine, indices, category_ix, defect_ix,
             batch_size, num_workers, max_pixels, allow_empty_masks, device, dist_info, after_write)
    if distributed:
        dist.barrier()
    if dist_info.rank == 0:
        store.finalize(group, out)
    if distributed:
        dist.barrier()  # nobody reads the store before it is complete


def _batches(loader: DataLoader):
    """Iterate ``loader``, re-raising a worker's PipelineError with its one-line message."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except PipelineError as err:
            raise _worker_error(err)
        yield batch


def _run(samples, backbone, transform, group, layout, chunks, indices, category_ix, defect_ix,
         batch_size, num_workers, max_pixels, allow_empty_masks, device, dist_info, after_write) -> None:
    loader = DataLoader(
        _Images(samples, indices, transform, layout.mask_size, max_pixels, allow_empty_masks),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        # a worker per rank would oversubscribe small machines; one decoding worker keeps up with a ViT.
        prefetch_factor=4 if num_workers > 0 else None,
    )
    backbone = backbone.to(device).eval()
    # fp16 is what the store keeps; bf16 autocast on GPU keeps fp32 range through the blocks.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    chunk_of = {i: c for c in chunks for i in range(*layout.chunk_range(c))}
    buffers: dict[int, dict[str, np.ndarray]] = {}
    filled: dict[int, int] = {}
    writer = _ChunkWriter(group, layout, after_write=after_write)
    vanished: list[str] = []  # anomalous images whose mask is empty at S (see extract's docstring)
    bar = tqdm(total=len(indices), unit="img", desc=f"extract[{dist_info.rank}]" if dist_info.world_size > 1 else "extract",
               file=sys.stderr, mininterval=1.0)  # on under DVC too (not a TTY): a person waits for it
    try:
        with torch.inference_mode(), autocast:
            for index, images, masks, small in _batches(loader):
                tokens, cls = backbone(images.to(device, non_blocking=True))
                tokens = tokens.to(torch.float16).cpu().numpy()
                cls = cls.to(torch.float16).cpu().numpy()
                if not (np.isfinite(tokens).all() and np.isfinite(cls).all()):
                    bad = [samples[i].relpath for i, t in zip(index.tolist(), tokens) if not np.isfinite(t).all()]
                    raise FloatingPointError(f"non-finite tokens in float16 for {bad[:5] or 'a CLS token'} "
                                             "(overflow beyond 65504?)")
                masks, small = masks.numpy(), small.numpy()
                for row, i in enumerate(index.tolist()):
                    c = chunk_of[i]
                    start, stop = layout.chunk_range(c)
                    if c not in buffers:
                        n = stop - start
                        buffers[c] = {name: np.zeros((n,) + shape[1:], dtype) for name, (shape, dtype) in layout.shapes().items()}
                        filled[c] = 0
                    buf, r = buffers[c], i - start
                    s = samples[i]
                    buf["tokens"][r] = tokens[row]
                    buf["cls"][r] = cls[row]
                    buf["masks"][r] = masks[row]
                    if s.label and s.mask is not None and not masks[row].any():
                        vanished.append(s.relpath)
                    buf["images"][r] = small[row]
                    buf["labels"][r] = s.label
                    buf["category"][r] = category_ix[s.category]
                    buf["defect"][r] = defect_ix[s.defect]
                    filled[c] += 1
                    if filled[c] == stop - start:
                        writer.put(c, buffers.pop(c))
                bar.update(len(index))
    finally:
        bar.close()
    writer.close()
    if vanished:
        log.warning("%d anomalous image(s) have no anomalous pixel at %dx%d (a defect smaller than a pixel "
                    "after the nearest-neighbour resize, or an empty mask allowed by data.allow_empty_masks); "
                    "they count for image metrics only: %s%s",
                    len(vanished), layout.mask_size, layout.mask_size, ", ".join(vanished[:5]),
                    f" and {len(vanished) - 5} more" if len(vanished) > 5 else "")
    if buffers:  # every index belongs to a chunk that is written once full
        raise RuntimeError(f"chunks {sorted(buffers)} were left unfilled")
