"""Disk space and failed writes, for everything that saves: checkpoints and final/ (training),
merged exports (merge.py), predictions (infer.py) and the tokenized-data cache (data.pipeline)."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors import SafetensorError


class SaveError(RuntimeError):
    """Something the run made could not be written (a full disk, a quota, permissions); the
    message names it and the free space. A partial write is removed, earlier saves are kept."""


def is_write_error(e: BaseException) -> bool:
    """A failed write (disk full, quota, file size limit, permissions), however the writer says
    it: Python's OSError, safetensors' SafetensorError ("I/O error: No space left on device"),
    or torch.save's RuntimeError from its zip writer ("[enforce fail at inline_container.cc]")."""
    return isinstance(e, (OSError, SafetensorError)) or (isinstance(e, RuntimeError) and "inline_container" in str(e))


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path``, or would hold it once created."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def free_space_line(path: Path) -> str:
    return f"{gib(free_bytes(path))} free on the disk of {path}"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"
