"""Patch scores that depend on the target alone: computed once per target, reused by every run.

The batch signal (``mutual``, :func:`pipeline.method.neighbours.mutual`) of a target needs no SAE, no
guides and no auxiliary set, yet it is the costliest step of evaluate (N² image pairs per category).
The ``neighbours@<T>`` stage computes it once into ``neighbours/<T>/patch_scores.safetensors``:

- ``mutual`` (N, L) float32, store row order; each category scored against its own images only; NaN
  for the rows of a category of one image (no other image to compare with);
- ``reference/<k>`` (draws, N, L) float32, the few-shot signal: for each seeded draw, k normal images
  of each category are its reference, and every other image of the category gets, per patch, the
  distance to the nearest patch of those k images (:func:`pipeline.method.neighbours.reference`). The
  images are drawn from the category's ``train/good`` (the store of stage normals@<T>, :func:`open_pool`)
  where the dataset has one, k capped at their number, and every test image is scored. A category
  without train/good images draws from its own test/good images: those references are NaN (a draw's
  references are never scored) and k is capped at half of them (:func:`reference_k`), so as many
  normal images stay scored as serve as references; such a category with fewer than 2 good images has
  NaN rows and its reason in the info.

- ``normals/<k>/<category>/{reference,batch}`` (draws, k, L): for the categories drawn from train/good,
  the references' own signals the rule threshold needs (:func:`compute_normals`);

with the metadata ``{"format", "store", "precision", "fraction", "one_image_categories", "reference":
{"ks", "seeds", "k_used": {k: {category: k used}}, "pool": {category: "train/good" | "test/good"},
"images": {k: {category: [[paths] per draw]}}, "skipped": {category: reason}}}`` as JSON under
the safetensors metadata key ``info``. ``store`` is the target's fingerprint
(:func:`pipeline.method.guides.store_fingerprint`): :func:`load` refuses scores of another store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors.numpy import load_file, save

from pipeline.errors import PipelineError
from pipeline.features import store
from pipeline.files import write_bytes
from pipeline.method import guides, neighbours
from pipeline.method.reference import Reference

FORMAT = "pipeline.target_scores/1"
FILE = "patch_scores.safetensors"
MUTUAL = "mutual"


class TargetScoresError(PipelineError, ValueError):
    """Patch scores that do not belong to the store they are used with."""


def category_ranges(target: store.FeatureStore) -> dict[str, tuple[int, int]]:
    """Category name -> [start, stop) rows; the extract stage writes each category contiguously."""
    category = target.category[:]
    out = {}
    for i, name in enumerate(target.attrs["categories"]):
        rows = np.flatnonzero(category == i)
        if len(rows) == 0:
            continue
        if rows[-1] - rows[0] + 1 != len(rows):
            raise ValueError(f"{target.path}: category {name!r} is not contiguous in the store")
        out[name] = (int(rows[0]), int(rows[-1]) + 1)
    return out


class _Rows:
    """``read(i, j)`` over rows [start + i, start + j) of the store's tokens, checked finite as read."""

    def __init__(self, target: store.FeatureStore, start: int) -> None:
        self.target, self.start = target, start

    def __call__(self, i: int, j: int) -> np.ndarray:
        a, b = self.start + i, self.start + j
        values = self.target.tokens[a:b]
        self.target.check_finite("tokens", values, a)
        return values


def compute_mutual(target: store.FeatureStore, *, precision: str = "float32", device: torch.device | str = "cpu",
                   fraction: float = neighbours.MUTUAL_FRACTION) -> tuple[np.ndarray, list[str]]:
    """(N, L) float32 mutual patch scores of every category of ``target`` (module docstring) and the
    categories of one image (their rows NaN)."""
    n, length = target.tokens.shape[:2]
    out = np.full((n, length), np.nan, dtype=np.float32)
    alone = []
    for name, (start, stop) in category_ranges(target).items():
        scores = mutual_of(target, start, stop, precision=precision, device=device, fraction=fraction)
        if scores is None:
            alone.append(name)
        else:
            out[start:stop] = scores
    return out, alone


def mutual_of(target: store.FeatureStore, start: int, stop: int, *, precision: str = "float32",
              device: torch.device | str = "cpu", fraction: float = neighbours.MUTUAL_FRACTION) -> np.ndarray | None:
    """(stop − start, L) float32 mutual scores of rows [start, stop), one whole category, read block by
    block from the store; None for a category of one image."""
    if stop - start < 2:
        return None
    return neighbours.mutual(_Rows(target, start), stop - start, target.tokens.shape[1], fraction, device=device,
                             precision=precision)


FEW_GOOD = "fewer than 2 good images: no reference can be drawn with a normal image left to score"


def reference_k(k: int, n_good: int) -> int:
    """The k used for a category of ``n_good`` good images: at most half of them (0: none drawable)."""
    return min(k, n_good // 2)


TRAIN_POOL, TEST_POOL = "train/good", "test/good"
"""The two places a category's reference images are drawn from (info ``pool``)."""


def open_pool(folder: str | Path, target: store.FeatureStore) -> tuple[store.FeatureStore | None, dict[str, str]]:
    """The train/good store of ``target`` written by stage normals@<T> at ``folder`` (None where its
    dataset has none) and {category: reason} for the categories it lacks. Refused when it was extracted
    from another dataset or into another token space than ``target``."""
    folder = Path(folder)
    absent = folder / store.NORMALS_ABSENT
    if absent.is_file():
        record = json.loads(absent.read_text())
        if record.get("format") != store.NORMALS_ABSENT_FORMAT or record.get("dataset") != target.attrs.get("dataset"):
            raise TargetScoresError(f"{absent}: not the normals record of dataset {target.attrs.get('dataset')!r} "
                                    f"(format {record.get('format')!r}, dataset {record.get('dataset')!r})")
        return None, dict(record.get("categories", {}))
    pool = store.open_store(folder, expect={k: target.attrs.get(k) for k in store.TOKEN_SPACE})
    for key in ("dataset", "root"):
        if pool.attrs.get(key) != target.attrs.get(key):
            raise TargetScoresError(f"{folder}: the train/good store of {key} {pool.attrs.get(key)!r}, but the "
                                    f"target {target.path} has {target.attrs.get(key)!r}; re-run stage normals")
    if pool.attrs.get("splits") != ["train"] or (pool.labels[:] != 0).any():
        raise TargetScoresError(f"{folder}: not a train/good store (splits {pool.attrs.get('splits')}); "
                                "write it with python -m pipeline.stages.normals")
    return pool, dict(pool.attrs.get("train_good_missing", {}))


def compute_reference(target: store.FeatureStore, ks: Sequence[int], seeds: Sequence[int], *,
                      pool: store.FeatureStore | None = None, precision: str = "float32",
                      device: torch.device | str = "cpu", max_patches: int | None = None,
                      ) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
    """{k: (draws, N, L) float32} few-shot reference scores (module docstring) and their info. Each
    draw's bank is a :class:`pipeline.method.reference.Reference` of its images, as predict builds one:
    all their patches, or a greedy coreset of ``max_patches``.

    A category with images in ``pool`` (the target's train/good store) draws its references there: k
    is capped at the pool's size and every test image is scored. Any other category draws from its
    own test/good images, which are then left unscored (NaN) in that draw, with k capped by
    :func:`reference_k`. info ``pool`` says which, per category; ``images`` lists the drawn images'
    paths (relative to the dataset root)."""
    n, length = target.tokens.shape[:2]
    out = {k: np.full((len(seeds), n, length), np.nan, dtype=np.float32) for k in ks}
    info: dict[str, Any] = {"ks": list(ks), "seeds": list(seeds), "max_patches": max_patches,
                            "k_used": {str(k): {} for k in ks}, "pool": {},
                            "images": {str(k): {} for k in ks}, "skipped": {}}
    labels = target.labels[:]
    paths = target.attrs["paths"]
    pools = category_ranges(pool) if pool is not None else {}
    for name, (start, stop) in category_ranges(target).items():
        tokens = _Rows(target, start)(0, stop - start)  # one category, float16 as stored
        if name in pools:
            # the draws run over the category's whole train/good list; the store holds the drawable ones
            p_start, p_stop = pools[name]
            held = pool.attrs.get("train_good_drawn", {}).get(name, list(range(p_stop - p_start)))
            n_train = pool.attrs.get("train_good_counts", {}).get(name, p_stop - p_start)
            rows = np.full(n_train, -1)
            rows[held] = np.arange(p_stop - p_start)
            bank_tokens, bank_paths = _Rows(pool, p_start)(0, p_stop - p_start), pool.attrs["paths"][p_start:p_stop]
            good, cap, drawn_in_target = np.arange(n_train), n_train, False
        else:
            good = np.flatnonzero(labels[start:stop] == 0)
            if len(good) < 2:
                info["skipped"][name] = FEW_GOOD
                continue
            bank_tokens, bank_paths = tokens, paths[start:stop]
            cap, drawn_in_target = None, True
        info["pool"][name] = TEST_POOL if drawn_in_target else TRAIN_POOL
        for k in ks:
            used = reference_k(k, len(good)) if drawn_in_target else min(k, cap)
            info["k_used"][str(k)][name] = used
            info["images"][str(k)][name] = []
            for d, pick in enumerate(neighbours.draws(len(good), used, seeds)):
                refs = good[pick]
                if not drawn_in_target:
                    if (rows[refs] < 0).any():
                        raise TargetScoresError(
                            f"{pool.path}: the draw of seed {seeds[d]} for k={used} in category {name!r} picks "
                            f"train/good images the store does not hold (it was extracted for other "
                            f"neighbours.reference_k or reference_seeds); re-run stage normals@{target.attrs.get('dataset')}")
                    refs = rows[refs]
                bank = Reference.build(bank_tokens[refs], max_patches=max_patches, device=device)
                scores = bank.distances(torch.from_numpy(tokens), device=device, precision=precision).numpy()
                if drawn_in_target:
                    scores[refs] = np.nan
                out[k][d, start:stop] = scores
                info["images"][str(k)][name].append([bank_paths[r] for r in refs])
    return out, info


NORMALS = "normals"
"""Key prefix of the references' own signals of the draws from a train/good pool (:func:`compute_normals`)."""


def compute_normals(target: store.FeatureStore, pool: store.FeatureStore, info: Mapping[str, Any], *,
                    max_patches: int | None = None, device: torch.device | str = "cpu",
                    fraction: float = neighbours.MUTUAL_FRACTION) -> dict[str, np.ndarray]:
    """What the rule threshold of a draw from the train/good pool needs, since its references are not
    rows of the target: per k and category of pool ``info["pool"]``, ``normals/<k>/<category>/reference``
    (draws, k, L), each reference against the bank of the others (:meth:`Reference.leave_one_out`, the
    draw's ``max_patches``; NaN for k = 1), and ``normals/<k>/<category>/batch`` (draws, k, L), each
    reference scored by the mutual rule against the category's test images (:func:`neighbours.against`;
    in predict the references join the batch, here the batch is the test images alone)."""
    out: dict[str, np.ndarray] = {}
    ranges, pool_rows = category_ranges(target), {p: i for i, p in enumerate(pool.attrs["paths"])}
    for k in info["ks"]:
        for name, drawn in info["images"][str(k)].items():
            if info["pool"].get(name) != TRAIN_POOL:
                continue
            start, stop = ranges[name]
            loo, batch = [], []
            for paths in drawn:
                rows = [pool_rows[p] for p in paths]
                for r in rows:
                    pool.check_finite("tokens", pool.tokens[r:r + 1], r)
                tokens = np.stack([pool.tokens[r] for r in rows])
                loo.append(Reference.build(tokens, max_patches=max_patches, device=device).leave_one_out(
                    device=device).numpy() if len(rows) >= 2 else np.full(tokens.shape[:2], np.nan, np.float32))
                batch.append(neighbours.against(tokens, _Rows(target, start), stop - start, fraction, device=device))
            out[f"{NORMALS}/{k}/{name}/reference"] = np.stack(loo).astype(np.float32)
            out[f"{NORMALS}/{k}/{name}/batch"] = np.stack(batch).astype(np.float32)
    return out


def category_normals(arrays: Mapping[str, np.ndarray], k: int, category: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(reference, batch) (draws, k, L) of :func:`compute_normals` for one category, None where its
    draws came from its own test/good images."""
    key = f"{NORMALS}/{k}/{category}"
    if f"{key}/reference" not in arrays:
        return None
    return arrays[f"{key}/reference"], arrays[f"{key}/batch"]


def write(folder: str | Path, target: store.FeatureStore, mutual: np.ndarray, *, precision: str, fraction: float,
          one_image: list[str], reference: Mapping[int, np.ndarray] | None = None,
          reference_info: Mapping[str, Any] | None = None, normals: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write ``folder/patch_scores.safetensors`` (whole or not at all) and return its path."""
    info = {"format": FORMAT, "store": guides.store_fingerprint(target.attrs), "precision": precision,
            "fraction": fraction, "one_image_categories": one_image, "reference": dict(reference_info or {})}
    tensors = {MUTUAL: np.ascontiguousarray(mutual, dtype=np.float32)}
    tensors.update({f"reference/{k}": np.ascontiguousarray(v, dtype=np.float32) for k, v in (reference or {}).items()})
    tensors.update({key: np.ascontiguousarray(v, dtype=np.float32) for key, v in (normals or {}).items()})
    path = Path(folder) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, save(tensors, metadata={"info": json.dumps(info, sort_keys=True)}))
    return path


def load(folder: str | Path, target: store.FeatureStore) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and info of ``folder``'s patch scores, checked to belong to ``target``."""
    path = Path(folder) / FILE
    if not path.is_file():
        raise TargetScoresError(f"{path}: no target patch scores; run the neighbours stage "
                                f"(dvc repro neighbours@{target.attrs.get('dataset')})")
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        info = json.loads((fh.metadata() or {}).get("info", "{}"))
    if info.get("format") != FORMAT:
        raise TargetScoresError(f"{path}: not written by this code (format {info.get('format')!r}, "
                                f"expected {FORMAT!r})")
    have = guides.store_fingerprint(target.attrs)
    if info["store"] != have:
        diff = {k: (info["store"].get(k), v) for k, v in have.items() if info["store"].get(k) != v}
        raise TargetScoresError(f"{path}: computed from another store than {target.path} "
                                f"(recorded vs the store's: {diff}); re-run the neighbours stage")
    arrays = load_file(str(path))
    expect = tuple(target.tokens.shape[:2])
    for name, values in arrays.items():
        if not name.startswith(f"{NORMALS}/") and tuple(values.shape[-2:]) != expect:
            raise TargetScoresError(f"{path}: {name} scores {values.shape}, the store has {expect} (images, patches)")
    return arrays, info


def category_reference(arrays: Mapping[str, np.ndarray], k: int, start: int, stop: int) -> np.ndarray | None:
    """(draws, stop − start, L) reference scores of one category for ``k`` (NaN rows: that draw's
    references), or None where the category had no draw."""
    values = arrays[f"reference/{k}"][:, start:stop]
    return None if np.isnan(values).all() else values


def category_mutual(arrays: Mapping[str, np.ndarray], start: int, stop: int) -> np.ndarray | None:
    """The mutual scores of rows [start, stop), or None for a category of one image."""
    values = arrays[MUTUAL][start:stop]
    return None if np.isnan(values).any() else values
