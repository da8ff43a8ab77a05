"""Small file helpers every writer shares: content hashes and whole-or-nothing writes.

Kept apart from the heavy modules so that a stage needing a hash (fit_guides, evaluate) does not import
timm through ``pipeline.features.backbones``, and so that DVC does not re-run it when the backbone code changes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask`` can only be
    read by setting it, which would race with the writer threads of predict); else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(dest: str | Path, write: Callable[[Path], None]) -> None:
    """Make ``dest`` whole or leave the old file: ``write(tmp)`` fills a temp file beside it (same
    folder, so same file system), then ``os.replace`` puts it in place. The folder is created. The
    file gets the mode any new file gets under the umask (0644 under the usual 022), not mkstemp's 0600."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~current_umask())
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (:func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
