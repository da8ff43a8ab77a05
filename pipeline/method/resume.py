"""Resume snapshots of a training run: a killed ``train_sae`` continues where it stopped.

A snapshot is one safetensors file (weights, Adam moments, dead-latent counters) plus
``train_state.json`` (stream position, curve, counters) that names it, both written atomically; the
JSON is written last, so a crash between the two leaves the previous snapshot in force. A snapshot
resumes only a run with the same key (the hash of every setting that changes the steps taken).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from pipeline.errors import PipelineError
from pipeline.method.sae import TopKSAE, TrainState

log = logging.getLogger(__name__)




class CheckpointError(PipelineError):
    """A checkpoint folder holds, where a training snapshot goes, a file this code did not write."""


_STATE_FORMAT = "pipeline.sae.TrainCheckpoint/1"
"""Marker in the snapshot JSON and in its tensors file's metadata: only files carrying it are deleted."""
_STATE_JSON = "train_state.json"
_PARTIAL = ".partial"


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temp file beside it, flushed to disk, then renamed over it.

    Not :func:`pipeline.files.atomic_write`: the temp name here is fixed (``<name>.partial``), so the
    cleanup after a kill finds a half-written snapshot by name and deletes only that; and snapshots are
    fsync'd, since resuming from a file the OS had not written yet would be worse than starting over.
    """
    partial = path.with_name(path.name + _PARTIAL)
    with partial.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, path)


def _state_digest(state: Any) -> str:
    """sha256 of the loop state as canonical JSON. The tensors file (written first) carries it, so a
    train_state.json edited by hand (tokens_seen, epoch) is not resumed with counters that would go,
    wrong, into the tracked sae.json."""
    return hashlib.sha256(json.dumps(state, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the keys the log names when two checkpoint keys differ."""
    if isinstance(value, dict):
        return {k: v for name, sub in value.items() for k, v in _flatten(sub, f"{prefix}{name}.").items()}
    return {prefix[:-1]: value}


@dataclass
class Snapshot:
    """A loaded training snapshot: ``tensors`` (``model.<param>``, ``adam.<param>.<moment>``,
    ``since_fired``) and ``state``, the JSON fields of :class:`TrainState`."""

    tensors: dict[str, torch.Tensor]
    state: dict

    def restore(self, sae: TopKSAE, opt: torch.optim.Optimizer, names: Sequence[str],
                device: torch.device) -> TrainState:
        """Load the weights into ``sae`` and the moments into ``opt`` (whose parameters are ``names``,
        in order); return the loop state."""
        sae.load_state_dict({name: self.tensors[f"model.{name}"] for name in sae.state_dict()}, strict=True)
        moments = [{key.rsplit(".", 1)[1]: t for key, t in self.tensors.items() if key.startswith(f"adam.{name}.")}
                   for name in names]
        opt.load_state_dict({"state": dict(enumerate(moments)), "param_groups": opt.state_dict()["param_groups"]})
        return TrainState.from_json(self.state, self.tensors["since_fired"].to(device))


class TrainCheckpoint:
    """A resumable snapshot of :func:`train` kept in ``folder`` while it runs.

    ``train_state.json`` names the tensors file ``train_state.<step>.safetensors`` (weights, Adam
    moments, dead-latent counters) and holds the loop state (stream position, generator state, curve,
    counters) and the key. Each file is written to a temp file and renamed into place, tensors first
    and the JSON last, so a kill at any moment leaves the previous snapshot or the new one, whole.

    ``key``: a JSON-able mapping of everything that determines the result (config, input fingerprint,
    code). A snapshot saved under another key is ignored, with a log line naming what differs, and
    replaced by the next save. Saves happen every ``every_s`` seconds (0: after every step), or every
    ``every_steps`` steps when that is given. Only files carrying this class's marker are ever deleted.
    """

    def __init__(self, folder: str | Path, key: Mapping[str, Any], *, every_s: float = 600.0,
                 every_steps: int | None = None) -> None:
        self.folder = Path(folder)
        self.key_fields = json.loads(json.dumps(key, sort_keys=True))  # as it reads back from JSON
        self.key = hashlib.sha256(json.dumps(self.key_fields, sort_keys=True).encode()).hexdigest()
        self.every_s, self.every_steps = every_s, every_steps
        self._last = time.monotonic()

    @property
    def json_path(self) -> Path:
        return self.folder / _STATE_JSON

    def _read_json(self) -> dict | None:
        """The snapshot JSON, or None when there is none; refuses a file of that name this code did not write."""
        if self.folder.exists() and not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: checkpoint folder is a file; move it or pass another "
                                  "--checkpoint-dir")
        if not self.json_path.exists():
            return None
        try:
            meta = json.loads(self.json_path.read_text())
        except (OSError, ValueError) as err:
            meta = {"error": str(err)}
        if not isinstance(meta, dict) or meta.get("format") != _STATE_FORMAT:
            raise CheckpointError(f"{self.json_path}: not a training snapshot written by this code (no "
                                  f"format {_STATE_FORMAT!r}); move it away or pass another --checkpoint-dir")
        return meta

    def _ours(self, path: Path) -> bool:
        """True when ``path`` is a tensors file this class wrote (its metadata carries the marker)."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                return (fh.metadata() or {}).get("format") == _STATE_FORMAT
        except Exception:  # unreadable: cannot prove it is ours, so it is kept
            return False

    def load(self) -> Snapshot | None:
        """The saved snapshot when its key is this one; None (saying why in the log) otherwise."""
        from safetensors import safe_open

        meta = self._read_json()
        if meta is None:
            return None
        if meta.get("key") != self.key:
            old, new = _flatten(meta.get("key_fields", {})), _flatten(self.key_fields)
            diff = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)]
            log.warning("%s: not resuming, the snapshot was made with other inputs (%s%s); starting afresh",
                        self.json_path, "; ".join(diff[:3]) or "unknown key",
                        f"; {len(diff) - 3} more" if len(diff) > 3 else "")
            return None
        tensors_path = self.folder / str(meta.get("tensors"))
        try:  # one open for the tensors and the metadata that vouches for the JSON's state
            with safe_open(str(tensors_path), framework="pt") as fh:
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
                recorded = (fh.metadata() or {}).get("state_sha256")
        except Exception as err:
            log.warning("%s: not resuming, its tensors file %s cannot be read (%s); starting afresh",
                        self.json_path, tensors_path.name, err)
            return None
        if recorded != _state_digest(meta.get("state")):
            log.warning("%s: not resuming, its state is not the one saved with %s (edited by hand, or the "
                        "pair is from two saves); starting afresh", self.json_path, tensors_path.name)
            return None
        return Snapshot(tensors, meta["state"])

    def offer(self, sae: TopKSAE, opt: torch.optim.Optimizer, state: TrainState,
              before_save: Callable[[], None] | None = None) -> None:
        """Save when due: every ``every_steps`` steps, else when ``every_s`` seconds have passed.
        ``before_save`` runs first when it is (the training loop brings its device-side sums into ``state``)."""
        if self.every_steps is not None:
            due = state.step % self.every_steps == 0
        else:
            due = time.monotonic() - self._last >= self.every_s
        if due:
            if before_save is not None:
                before_save()
            self.save(sae, opt, state)
            self._last = time.monotonic()

    def save(self, sae: TopKSAE, opt: torch.optim.Optimizer, state: TrainState) -> None:
        """Write the snapshot (tensors, then the JSON naming them) and delete the one it replaces."""
        from safetensors.torch import save

        self._read_json()  # refuses to write over a file of that name that is not ours
        self.folder.mkdir(parents=True, exist_ok=True)
        names = {id(p): name for name, p in sae.named_parameters()}
        tensors = {f"model.{name}": t for name, t in sae.state_dict().items()}
        for group in opt.param_groups:
            for p in group["params"]:
                tensors.update({f"adam.{names[id(p)]}.{k}": t for k, t in opt.state[p].items()})
        tensors["since_fired"] = state.since_fired
        tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
        name = f"train_state.{state.step:09d}.safetensors"
        state_json = json.loads(json.dumps(state.to_json()))  # as it reads back
        _write_atomic(self.folder / name, save(tensors, metadata={"format": _STATE_FORMAT, "key": self.key,
                                                                  "state_sha256": _state_digest(state_json)}))
        meta = {"format": _STATE_FORMAT, "key": self.key, "tensors": name, "state": state_json,
                "key_fields": self.key_fields}
        _write_atomic(self.json_path, (json.dumps(meta, indent=1) + "\n").encode())
        self._remove_tensors(keep=name)
        log.debug("%s: snapshot at step %d", self.folder, state.step)

    def _remove_tensors(self, keep: str | None = None) -> None:
        for path in self.folder.glob("train_state.*.safetensors"):
            if path.name != keep and self._ours(path):
                path.unlink()

    def remove(self) -> None:
        """Delete the snapshot once the run it belongs to is saved: this class's files only, and the
        folder when that leaves it empty."""
        if not self.folder.is_dir():
            return
        try:
            self._read_json()
        except CheckpointError as err:  # someone else's file: leave it and the folder alone
            log.warning("%s", err)
            return
        # The JSON first: a kill half-way through leaves marked tensors files (deleted by the next save
        # or remove), never a JSON naming a tensors file that is gone.
        self.json_path.unlink(missing_ok=True)
        self._remove_tensors()
        # temp files of a save that was killed half-way: named by this class, never complete
        (self.folder / (_STATE_JSON + _PARTIAL)).unlink(missing_ok=True)
        for partial in self.folder.glob(f"train_state.*.safetensors{_PARTIAL}"):
            partial.unlink()
        try:
            self.folder.rmdir()
        except OSError:  # other files are in it: not ours to delete
            pass
