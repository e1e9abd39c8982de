"""Atomic file writes: a reader (a worker polling ``current``, a resumed training run, a second cache
reader) sees the old file or the complete new one, never half of one, even when the writer is killed.

The data goes to a hidden temp file in the same folder (so the rename never crosses file systems), is
flushed and fsynced, then renamed over the target. A killed writer leaves at most a hidden
``.NAME.*.tmp`` file behind, which nothing reads.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (not atomic by itself: see :func:`atomic_write`)."""
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Replace ``path`` atomically with ``data``: bytes, or a function that writes into the open
    binary file (``lambda fh: torch.save(obj, fh)``, ``lambda fh: np.save(fh, array)``). The folder is
    created when missing. The temp file is removed if writing fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("wb") as fh:
            if isinstance(data, bytes):
                fh.write(data)
            else:
                data(fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX: the folder itself must be fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
