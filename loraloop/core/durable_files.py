"""Small helpers for files that must survive a crash (used by the adapter store and the
server's event spill journal)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir"]


def fsync_dir(path: Path | str) -> None:
    """fsync a directory, so that files created, renamed or removed in it stay so after a
    crash (fsyncing a file does not persist its directory entry)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
