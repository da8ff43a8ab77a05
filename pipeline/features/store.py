"""The Zarr feature store: one Zarr v3 group per dataset (docs/design.md#artifacts).

Layout of ``features/<D>/``::

    tokens    (N, L, d) float16   patch tokens of one block, chunked along N only
    cls       (N, d)    float16   CLS token of the same block
    masks     (N, S, S) uint8     ground truth at the evaluation resolution S, {0, 1}
    images    (N, S, S, 3) uint8  the RGB image resized to S (overlays and reports read it here, so
                                  evaluating needs the store only, never the dataset's files)
    labels    (N,)      uint8     1 = anomalous
    category  (N,)      int16     index into attrs["categories"]
    defect    (N,)      int16     index into attrs["defects"] ("good" for normal images)
    attrs: backbone, weights_sha256, layer, image_size, grid, paths, categories, defects, schema, ...,
           and ``complete: true`` written last.

Every array is chunked by ``chunk_images`` along N, so a writer (a rank, a resumed run) owns whole chunks
and never shares a chunk file with another writer. Crash safety comes from three facts: zarr's local
store writes each chunk file atomically (temp file + rename); a chunk's bit in the ``_done`` array
(one file per chunk) is set only after all of that chunk's arrays are written; ``complete`` is set only
after every bit is set, and ``_done`` is then removed. A killed run is re-run against the same store,
skips the chunks whose bit is set and rewrites the others.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import zarr

from pipeline.errors import NonFiniteError, PipelineError

log = logging.getLogger(__name__)

SCHEMA = 2
"""Version of the layout above; bump it when arrays or attrs change meaning (2: ``images`` added)."""

TOKEN_SPACE = ("backbone", "weights_sha256", "layer", "image_size")
"""The attrs that fix which space the tokens live in: two stores (or a store and a checkpoint fitted on
one) whose values differ here cannot be scored against each other (``open_store(..., expect=)``)."""

NORMALS_ABSENT = "absent.json"
"""The one file of a ``normals/<D>`` folder whose dataset has no train/good image (stage normals@D)."""
NORMALS_ABSENT_FORMAT = "pipeline.normals_absent/1"

_DONE = "_done"

CHUNK_FILES = "chunk_files"
"""Attr written at finalize: every chunk file of the complete store (path relative to the store ->
size in bytes). Zarr reads a missing chunk as its fill value, so a deleted tokens chunk would read as
zeros and every stage downstream would score garbage with exit 0; :func:`open_store` stats each file
against this list instead (a few hundred ``stat`` calls, no reading)."""

# Tokens are not compressed: lossless compression of fp16 tokens measured only ~1.09x here, for a
# real cost in write and read throughput. Small arrays keep zarr's default (zstd).
_UNCOMPRESSED = ("tokens", "cls")


class StoreError(PipelineError, RuntimeError):
    """A store is missing, incomplete, or does not match what the reader expects. Names the attr."""


@dataclass(frozen=True)
class StoreLayout:
    """Shapes of one store: N images of L tokens of width d, masks S x S, chunks of C images."""

    n_images: int
    n_tokens: int
    dim: int
    mask_size: int
    chunk_images: int

    @property
    def n_chunks(self) -> int:
        return -(-self.n_images // self.chunk_images)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """Image indices [start, stop) of chunk ``chunk``."""
        start = chunk * self.chunk_images
        return start, min(start + self.chunk_images, self.n_images)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        n, s = self.n_images, self.mask_size
        return {
            "tokens": ((n, self.n_tokens, self.dim), "float16"),
            "cls": ((n, self.dim), "float16"),
            "masks": ((n, s, s), "uint8"),
            "images": ((n, s, s, 3), "uint8"),
            "labels": ((n,), "uint8"),
            "category": ((n,), "int16"),
            "defect": ((n,), "int16"),
        }


def _jsonable(value: Any) -> Any:
    """Normalise attrs for comparison (tuples -> lists, numpy scalars -> python), as JSON would store them."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _layout_of(group: zarr.Group) -> StoreLayout | None:
    try:
        tokens = group["tokens"]
        masks = group["masks"]
    except KeyError:
        return None
    n, l, d = tokens.shape
    return StoreLayout(n, l, d, masks.shape[1], tokens.chunks[0])


def _remove_partials(path: Path) -> None:
    """Delete temp files a killed zarr write left behind (they are never read, but DVC would cache them)."""
    for stray in path.rglob("*.partial"):
        stray.unlink(missing_ok=True)


# Every array name any schema of ours has used: an interrupted creation leaves a subset of these.
_ARRAY_NAMES = frozenset(StoreLayout(1, 1, 1, 1, 1).shapes()) | {_DONE}


def _is_our_schema(value: Any) -> bool:
    """True for a ``schema`` attr this project has written (1 ... SCHEMA; 1 had no ``images``)."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= SCHEMA


def _metadata_only(folder: Path) -> bool:
    """True when ``folder`` holds only ``zarr.json`` (and temp files of a killed zarr metadata write)."""
    return all(p.is_file() and (p.name == "zarr.json" or p.name.endswith(".partial")) for p in folder.iterdir())


def _why_not_ours(path: Path) -> str | None:
    """Why ``path`` may not be deleted, or None when it is ours to replace.

    Ours: an empty folder; a Zarr group whose ``schema`` attr is one of ours (any version); or a store
    whose creation was killed before its attrs were written (``_create`` writes attrs after the
    arrays and before any chunk), i.e. a group with no attrs whose other entries are only folders
    named after our arrays, each holding only array metadata. Anything else may be a user's data.
    """
    if path.is_symlink() or not path.is_dir():
        return "it is not a folder"
    entries = sorted(path.iterdir())
    if not entries:
        return None
    try:
        group_attrs: dict[str, Any] | None = dict(zarr.open_group(str(path), mode="r", zarr_format=3).attrs)
    except Exception:  # no zarr.json or unreadable metadata: not something we can recognise
        group_attrs = None
    if group_attrs and _is_our_schema(group_attrs.get("schema")):
        return None
    if group_attrs == {}:
        strays = [
            p.name for p in entries
            if p.name != "zarr.json" and not p.name.endswith(".partial")
            and not (p.is_dir() and not p.is_symlink() and p.name in _ARRAY_NAMES and _metadata_only(p))
        ]
        if not strays:
            return None
        what, label, shown = "a Zarr group with no attrs", ", unexpected", strays
    elif group_attrs:
        schema = group_attrs.get("schema")
        newer = isinstance(schema, int) and not isinstance(schema, bool) and schema > SCHEMA
        what = f"a store of schema {schema}, newer than this code's {SCHEMA}" if newer else (
            "a Zarr group with no 'schema' attr of this pipeline")
        label, shown = "", [p.name for p in entries]
    else:
        what, label, shown = "not a Zarr group", "", [p.name for p in entries]
    names = ", ".join(shown[:5]) + (", ..." if len(shown) > 5 else "")
    return f"{what}; {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}{label}: {names}"


def check_ours(path: Path) -> None:
    """Raise :class:`StoreError` unless ``path`` is absent or ours to delete (:func:`_why_not_ours`)."""
    if not path.exists() and not path.is_symlink():
        return
    why = _why_not_ours(path)
    if why is not None:
        raise StoreError(
            f"{path}: refusing to overwrite it: not a feature store written by this pipeline ({why}); "
            "choose another output path, or move those files away yourself"
        )


def _create(path: Path, layout: StoreLayout, attrs: Mapping[str, Any]) -> zarr.Group:
    """Create an empty store at ``path``, deleting what is there only if it is ours (:func:`check_ours`)."""
    check_ours(path)
    if path.exists():
        shutil.rmtree(path)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    c = layout.chunk_images
    for name, (shape, dtype) in layout.shapes().items():
        group.create_array(
            name,
            shape=shape,
            chunks=(c,) + shape[1:],
            dtype=dtype,
            fill_value=0,
            **({"compressors": None} if name in _UNCOMPRESSED else {}),
        )
    group.create_array(_DONE, shape=(layout.n_chunks,), chunks=(1,), dtype="uint8", fill_value=0, compressors=None)
    # attrs go last: a store whose attrs are readable has all its arrays.
    group.attrs.update({**_jsonable(dict(attrs)), "schema": SCHEMA, "complete": False})
    return group


def prepare(path: str | Path, layout: StoreLayout, attrs: Mapping[str, Any]) -> tuple[zarr.Group, list[int]]:
    """Open the store at ``path`` for writing, resuming when it was made with the same attrs and layout.

    Returns the group and the chunks still to write (empty for a complete store). A store of ours made
    with other attrs (backbone, weights, image list, schema, ...) or another layout, or one whose
    creation was interrupted, is deleted and created anew; the reason is logged. Anything at ``path``
    that this pipeline did not write (a user's files, a dataset, another tool's Zarr group) raises
    :class:`StoreError` naming what is there, and is left untouched.
    """
    path = Path(path)
    check_ours(path)
    wanted = {**_jsonable(dict(attrs)), "schema": SCHEMA}
    if path.exists():
        reason = None
        try:
            group = zarr.open_group(str(path), mode="r+", zarr_format=3)
            have = dict(group.attrs)
            if not have:
                reason = "it has no attrs (creation was interrupted)"
            else:
                ignored = {"complete", CHUNK_FILES}
                diff = sorted(k for k in (set(wanted) | set(have)) - ignored if have.get(k) != wanted.get(k))
                if diff:
                    reason = f"attr {diff[0]!r} differs (store {have.get(diff[0])!r}, now {wanted.get(diff[0])!r})"
                elif _layout_of(group) != layout:
                    reason = f"layout differs (store {_layout_of(group)}, now {layout})"
        except Exception as err:  # unreadable metadata: nothing in it can be trusted
            reason = f"it cannot be read ({err})"
        if reason is None:
            _remove_partials(path)
            if have.get("complete") is True:
                damage = _chunk_file_problem(path, have)
                if damage is None:
                    log.info("%s: complete and matching, nothing to extract", path)
                    return group, []
                reason = damage
            elif _DONE not in group:
                reason = "it is marked incomplete but has no progress array"
            else:
                done = group[_DONE][:]
                pending = [int(c) for c in np.flatnonzero(done == 0)]
                log.info("%s: resuming, %d of %d chunks already written", path, layout.n_chunks - len(pending), layout.n_chunks)
                return group, pending
        log.warning("%s: starting afresh because %s", path, reason)
    return _create(path, layout, attrs), list(range(layout.n_chunks))


def open_for_writing(path: str | Path) -> zarr.Group:
    """Open a store another process has prepared (the ranks other than 0)."""
    return zarr.open_group(str(path), mode="r+", zarr_format=3)


def pending_chunks(group: zarr.Group) -> list[int]:
    """Chunks whose ``_done`` bit is not set (all chunks are done in a complete store)."""
    if group.attrs.get("complete") is True:
        return []
    return [int(c) for c in np.flatnonzero(group[_DONE][:] == 0)]


def write_chunk(group: zarr.Group, layout: StoreLayout, chunk: int, arrays: Mapping[str, np.ndarray]) -> None:
    """Write every array of chunk ``chunk``, then set its ``_done`` bit.

    ``arrays`` maps each name of :meth:`StoreLayout.shapes` to the rows [start, stop) of that chunk.
    """
    start, stop = layout.chunk_range(chunk)
    missing = sorted(set(layout.shapes()) - set(arrays))
    if missing:
        raise ValueError(f"chunk {chunk}: arrays missing: {missing}")
    for name, (shape, dtype) in layout.shapes().items():
        value = np.asarray(arrays[name])
        if value.shape != (stop - start,) + shape[1:]:
            raise ValueError(f"chunk {chunk}: {name} has shape {value.shape}, expected {(stop - start,) + shape[1:]}")
        group[name][start:stop] = value.astype(dtype, copy=False)
    group[_DONE][chunk] = 1


def chunk_files(path: str | Path) -> dict[str, int]:
    """Every chunk file of the store at ``path`` (``<array>/c/...`` relative to it) and its size.

    A chunk that holds only the fill value is never written by zarr (the masks of normal images, say),
    so it is absent here and absent on disk: only files present at finalize are expected later.
    """
    root = Path(path)
    files = {}
    for array in sorted(p for p in root.iterdir() if p.is_dir() and (p / "c").is_dir()):
        for f in sorted((array / "c").rglob("*")):
            if f.is_file() and not f.name.endswith(".partial"):
                files[f.relative_to(root).as_posix()] = f.stat().st_size
    return files


def _chunk_file_problem(path: Path, attrs: Mapping[str, Any]) -> str | None:
    """What is wrong with the first chunk file of ``attrs[CHUNK_FILES]`` that is missing or has another
    size, or None. A store finalized before this attr existed is not checked."""
    expected = attrs.get(CHUNK_FILES)
    if not isinstance(expected, dict):
        return None
    for rel, size in expected.items():
        f = path / rel
        if not f.is_file():
            problem = "is missing (zarr would read it as zeros)"
        elif f.stat().st_size != size:
            problem = f"has {f.stat().st_size} bytes, {size} when the store was finalized"
        else:
            continue
        return f"array {rel.split('/', 1)[0]!r}: chunk file {rel} {problem}"
    return None


def finalize(group: zarr.Group, path: str | Path) -> None:
    """Check every chunk is written, drop the progress array and set ``complete: true`` (last)."""
    if group.attrs.get("complete") is True:
        return  # already final: rewriting the metadata would change files DVC has cached
    pending = pending_chunks(group)
    if pending:
        raise StoreError(f"{path}: chunks {pending[:10]} were never written; cannot mark complete")
    if _DONE in group:
        del group[_DONE]
    _remove_partials(Path(path))
    # one metadata write: the list of chunk files and the completion mark land together
    group.attrs.update({CHUNK_FILES: chunk_files(path), "complete": True})


def write(path: str | Path, layout: StoreLayout, attrs: Mapping[str, Any],
          chunk: Callable[[int, int], Mapping[str, np.ndarray]]) -> FeatureStore:
    """Write a complete store chunk by chunk from ``chunk(start, stop)``, the arrays of images
    [start, stop), and open it: for features computed outside the extract stage (hand-built tests,
    synthetic benchmarks, tokens a user imports). Arrays left out get what an unlabelled set of
    normal images would hold: ``cls`` the mean patch token, zero ``masks`` and ``images``, label 0,
    category and defect 0. Chunks already written (a resumed write) are not asked for again."""
    group, pending = prepare(path, layout, attrs)
    for c in pending:
        a, b = layout.chunk_range(c)
        arrays = dict(chunk(a, b))
        n, size = b - a, layout.mask_size
        tokens = arrays["tokens"]
        arrays.setdefault("cls", np.asarray(tokens).mean(axis=1))
        arrays.setdefault("masks", np.zeros((n, size, size), np.uint8))
        arrays.setdefault("images", np.zeros((n, size, size, 3), np.uint8))
        for name in ("labels", "category", "defect"):
            arrays.setdefault(name, np.zeros(n, np.int16 if name != "labels" else np.uint8))
        write_chunk(group, layout, c, arrays)
    finalize(group, path)
    return open_store(path)


class FeatureStore:
    """A complete store, opened read-only. Arrays are zarr arrays: slice them to read."""

    def __init__(self, path: str | Path, group: zarr.Group) -> None:
        self.path = Path(path)
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.tokens = group["tokens"]
        self.cls = group["cls"]
        self.masks = group["masks"]
        self.images = group["images"]
        self.labels = group["labels"]
        self.category = group["category"]
        self.defect = group["defect"]

    @property
    def n_images(self) -> int:
        return self.tokens.shape[0]

    @property
    def chunk_images(self) -> int:
        return self.tokens.chunks[0]

    @property
    def n_chunks(self) -> int:
        return -(-self.n_images // self.chunk_images)

    def read(self, chunk: int, names: Sequence[str] = ("tokens",), *, finite: bool = False) -> dict[str, np.ndarray]:
        """The rows of chunk ``chunk`` of each array in ``names``, e.g. {"tokens": (n, L, d) float16}.

        ``finite=True`` checks every float array read (:meth:`check_finite`).
        """
        c = self.chunk_images
        out = {name: self.group[name][chunk * c : (chunk + 1) * c] for name in names}
        if finite:
            for name, values in out.items():
                self.check_finite(name, values, chunk * c)
        return out

    def check_finite(self, name: str, values: np.ndarray, start: int) -> None:
        """Raise :class:`~pipeline.errors.NonFiniteError` naming this store, the array, the chunk and the
        first image (index and path) of ``values`` (rows ``start`` ...) that holds a NaN or an Inf."""
        if not np.issubdtype(values.dtype, np.floating):
            return
        finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if finite.all():
            return
        bad = np.flatnonzero(~finite)
        first = start + int(bad[0])
        paths = self.attrs.get("paths") or []
        where = f" ({paths[first]})" if first < len(paths) else ""
        raise NonFiniteError(
            f"{self.path}: {name} of image {first}{where}, chunk {first // self.chunk_images}, holds NaN/Inf "
            f"({len(bad)} image(s) of rows {start}-{start + len(values) - 1} affected); re-extract the store "
            "(delete it, then dvc repro) or remove the image from the dataset"
        )

    def iter_chunks(self, order: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first image index, tokens (n, L, d) float16) chunk by chunk, in ``order`` if given."""
        c = self.chunk_images
        for chunk in range(self.n_chunks) if order is None else order:
            start = chunk * c
            yield start, self.tokens[start : start + c]


class ChunkReader:
    """Reads chunks of a token array in a given order on a background thread, ``depth`` ahead.

    ``read(chunk) -> np.ndarray (n, L, d)``; iterating yields (chunk, tokens) in ``order``.
    """

    def __init__(self, read: Callable[[int], np.ndarray], order: Sequence[int], depth: int = 2) -> None:
        self.read, self.order = read, list(order)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="chunk-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for chunk in self.order:
                item = (chunk, self.read(chunk))
                while not self.stop.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
            self.queue.put(None)
        except BaseException as err:  # handed to the consumer
            self.queue.put(err)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        try:
            while (item := self.queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.stop.set()


def open_store(path: str | Path, expect: Mapping[str, Any] | None = None) -> FeatureStore:
    """Open a complete store read-only; refuse an incomplete one or one whose attrs differ from ``expect``.

    ``expect`` maps attr names (``backbone``, ``weights_sha256``, ``layer``, ``image_size``, ...) to the
    values the caller's config implies; the first mismatch raises :class:`StoreError` naming the attr.
    """
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path}: no feature store here (run the extract stage first)")
    try:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        attrs = dict(group.attrs)
    except Exception as err:  # a truncated or hand-edited zarr.json: zarr's own errors vary by version
        raise StoreError(f"{path}: zarr.json cannot be read ({type(err).__name__}: {err}); "
                         "re-run its extract stage") from err
    if attrs.get("complete") is not True:
        raise StoreError(f"{path}: store is incomplete (attr 'complete' is not true); re-run its extract stage")
    if attrs.get("schema") != SCHEMA:
        raise StoreError(f"{path}: attr 'schema' is {attrs.get('schema')!r}, this code reads schema {SCHEMA}")
    damage = _chunk_file_problem(path, attrs)
    if damage is not None:
        raise StoreError(
            f"{path}: {damage}; the store is damaged: re-run its extract stage "
            f"(dvc repro -f extract@<dataset>, or delete the folder and dvc repro)"
        )
    for key, value in _jsonable(dict(expect or {})).items():
        if attrs.get(key) != value:
            raise StoreError(f"{path}: attr {key!r} is {attrs.get(key)!r} in the store but {value!r} in the config")
    try:
        store = FeatureStore(path, group)
    except Exception as err:  # an array's own zarr.json missing or unreadable
        raise StoreError(f"{path}: an array's metadata cannot be read ({type(err).__name__}: {err}); "
                         "re-run its extract stage") from err
    paths = attrs.get("paths")
    if paths is not None and (not isinstance(paths, list) or len(paths) != store.n_images):
        count = len(paths) if isinstance(paths, list) else type(paths).__name__
        raise StoreError(f"{path}: attr 'paths' holds {count} entries for {store.n_images} images; "
                         "re-run its extract stage")
    return store
