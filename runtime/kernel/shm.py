"""A named shared-memory segment in /dev/shm, without multiprocessing's resource tracker.

The tracker of Python 3.11 unlinks a segment when any attaching process exits, so
the image uses a plain file in /dev/shm: the creator unlinks it on exit, and a
segment whose creating process is dead is removed at the next start.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
from pathlib import Path

__all__ = ["Segment", "SHM_DIR", "remove_stale_segments", "PREFIX"]

SHM_DIR = Path("/dev/shm")
PREFIX = "vbatt-"
log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_segments(directory: Path = SHM_DIR) -> list[str]:
    """Unlink segments left by a creator that died without cleaning up (kill -9)."""
    removed = []
    for path in directory.glob(PREFIX + "*"):
        try:
            pid = int(path.name[len(PREFIX):].split("-")[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        log.warning("removed %d stale shared-memory segment(s): %s", len(removed), ", ".join(removed))
    return removed


class Segment:
    """A fixed-size mapping shared by name between processes."""

    def __init__(self, name: str, size: int, *, create: bool, directory: Path = SHM_DIR):
        self.name = name
        self.size = size
        self.path = directory / name
        self.owner = create
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            elif os.fstat(fd).st_size != size:
                raise ValueError(f"segment {name}: size {os.fstat(fd).st_size} B, expected {size} B")
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    @classmethod
    def create(cls, size: int, directory: Path = SHM_DIR) -> "Segment":
        remove_stale_segments(directory)
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        return cls(name, size, create=True, directory=directory)

    @classmethod
    def attach(cls, name: str, size: int, directory: Path = SHM_DIR) -> "Segment":
        return cls(name, size, create=False, directory=directory)

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Safe to call twice. The owner also unlinks the name."""
        if self.owner:
            self.unlink()
        try:
            self.map.close()
        except BufferError:
            # numpy views still point into the mapping; the OS releases it at exit.
            pass
