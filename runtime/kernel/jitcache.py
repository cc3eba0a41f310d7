"""Where numba keeps its compiled programs: one directory per version of vbatt's own source.

numba's on-disk cache (`cache=True`) is invalidated by the timestamp of the file that defines a
function, not by the files of the functions it calls: after an update that changes only a callee
(programs/energy/rules.py under programs/energy/kernel.py, say), a warm cache would keep running
the old machine code of the caller, silently. Keying the cache directory by a digest of every
source file of the package makes any change to any of them a fresh directory, so a `git pull`
recompiles once and never mixes two versions. Directories of other versions are removed.

`NUMBA_CACHE_DIR` set by the user wins (numba then behaves as it documents).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

__all__ = ["configure", "source_digest", "compiling_once"]

_PREFIX = "numba-"


def _roots() -> list[Path]:
    # runtime/ is `vbatt`; drivers/ and programs/ are mapped into it (pyproject.toml): beside it in a
    # checkout, inside it when installed
    here = Path(__file__).resolve().parent.parent
    roots = [here]
    for name in ("drivers", "programs"):
        inside, beside = here / name, here.parent / name
        roots.append(inside if inside.is_dir() else beside)
    return [r for r in roots if r.is_dir()]


def source_digest() -> str:
    h = hashlib.sha256()
    for root in _roots():
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _writable(d: Path) -> bool:
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / ".probe"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def configure() -> str | None:
    """Point numba at this version's cache directory (before any `cache=True` function is defined);
    return it, or None when the user set NUMBA_CACHE_DIR."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    digest = source_digest()
    base = Path(__file__).resolve().parent.parent / "__pycache__"
    if not _writable(base / f"{_PREFIX}{digest}"):
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        base = Path(xdg) / "vbatt"
        if not _writable(base / f"{_PREFIX}{digest}"):
            return None  # nowhere to write: numba's own default (and its own warning) applies
    target = base / f"{_PREFIX}{digest}"
    for old in base.glob(f"{_PREFIX}*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    os.environ["NUMBA_CACHE_DIR"] = str(target)
    cfg = sys.modules.get("numba.core.config")
    if cfg is not None:  # numba imported already: it read its environment at import
        cfg.CACHE_DIR = str(target)
    return str(target)


WAIT_S = 120.0  # the longest a start waits for another process's compile (a cold cache compiles in ~30-60 s)


@contextlib.contextmanager
def compiling_once():
    """While held, this process compiles only when no other does. Yields a record of what it did:
    `compiled` (functions numba compiled, not loaded from the cache) and `waited_s`.

    numba takes no lock across processes: controllers started together on a cold cache (the levels of a
    tree on one host, the first start after an update) each compiled the same kernels at once, N times the
    CPU of one. Here the first function that misses the cache takes a lock file in the cache directory,
    held to the end of the block: the first process compiles what the cache lacks, another waits for it
    at its own first miss, compiles that one function (numba had already decided to) and loads the rest,
    which its callees already are. A process whose functions are all in the cache never takes the lock, so
    controllers started on a warm cache load in parallel. Without a cache directory: no lock."""
    from numba.core import event

    d = os.environ.get("NUMBA_CACHE_DIR")

    class Record(event.Listener):
        compiled = 0
        waited_s = 0.0
        held = None

        def on_start(self, ev) -> None:
            self.compiled += 1
            if self.held is None and d:
                try:
                    Path(d).mkdir(parents=True, exist_ok=True)
                    self.held = open(Path(d) / ".compile.lock", "ab")
                except OSError:  # nowhere to write: nothing to share either
                    self.held = False
                    return
                t = time.monotonic()
                while True:  # a process frozen while it compiles must not hold every other start: at most WAIT_S
                    try:
                        fcntl.flock(self.held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() - t > WAIT_S:
                            self.held.close()
                            self.held = False  # compile beside it, as without the lock
                            break
                        time.sleep(0.05)
                self.waited_s = time.monotonic() - t

        def on_end(self, ev) -> None:
            pass

    rec = Record()
    try:
        with event.install_listener("numba:compile", rec):
            yield rec
    finally:
        if rec.held:
            rec.held.close()  # releases the lock (the kernel does too when a process dies holding it)
