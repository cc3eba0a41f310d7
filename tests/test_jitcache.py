"""The compiled-code cache follows the package's source: a change to any file (a callee too) is a new
cache directory, and the old one goes; processes that start together compile into it once
(docs/architecture.md, "Compiled code")."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO, VBATT


def _copy_tree(tmp: Path) -> Path:
    root = tmp / "src"
    for top in ("runtime", "drivers", "programs"):
        shutil.copytree(REPO / top, root / top, ignore=shutil.ignore_patterns("__pycache__", "*.nb?"))
    return root


def _configure(root: Path, home: Path) -> str:
    """configure() of the copy's jitcache.py, run in a fresh interpreter (numba not imported)."""
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('jc', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); print(m.configure())")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")} | {"HOME": str(home)}
    out = subprocess.run([sys.executable, "-c", code, str(root / "runtime/kernel/jitcache.py")],
                         env=env, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


def test_a_changed_callee_is_a_new_cache_directory_and_the_old_one_goes(tmp_path):
    root = _copy_tree(tmp_path)
    first = _configure(root, tmp_path)
    assert Path(first).is_dir() and Path(first).parent == root / "runtime" / "__pycache__"
    assert _configure(root, tmp_path) == first  # same source, same cache
    callee = root / "programs" / "energy" / "rules.py"
    callee.write_text(callee.read_text() + "\n# a change in a callee only\n")
    second = _configure(root, tmp_path)
    assert second != first and Path(second).is_dir()
    assert not Path(first).exists()


def test_read_only_package_uses_the_user_cache(tmp_path):
    root = _copy_tree(tmp_path)
    pyc = root / "runtime" / "__pycache__"
    pyc.mkdir()
    pyc.chmod(0o500)
    try:
        if os.access(pyc, os.W_OK):  # root ignores modes: make the folder a file instead
            pyc.chmod(0o700)
            pyc.rmdir()
            pyc.write_text("")
        got = _configure(root, tmp_path)
    finally:
        if pyc.is_dir():
            pyc.chmod(0o700)
    assert Path(got).parent == tmp_path / ".cache" / "vbatt"


def test_the_users_setting_wins(tmp_path):
    env = os.environ | {"NUMBA_CACHE_DIR": str(tmp_path / "mine")}
    out = subprocess.run([sys.executable, "-c", "import vbatt, os; print(os.environ['NUMBA_CACHE_DIR'])"],
                         env=env, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == str(tmp_path / "mine")


def test_controllers_started_together_on_a_cold_cache_compile_once(tmp_path):
    """Two `vbatt run` started at once on an empty cache: one compiles the kernels, the other waits for it
    and loads them (numba itself takes no lock across processes: each compiled them all); a third, on the
    warm cache, compiles nothing and takes no lock."""
    cfg = tmp_path / "plant.yaml"
    cfg.write_text("cycle: {cycle_ms: 50, realtime: false}\nplant: {main_limit_w: 100}\n"
                   "nodes:\n  - {id: a, demand_w: 50, max_discharge_w: 100, capacity_wh: 500, soc: 0.5}\n")
    env = os.environ | {"NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    procs = [subprocess.Popen([*VBATT, "run", str(cfg), "--cycles", "1", "-q", "-v"], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    compiled = []
    for log in logs:
        m = re.search(r"programs compiled/loaded in [\d.]+ s: (\d+) functions? compiled", log)
        assert m, log
        compiled.append(int(m[1]))
    # the other compiled none, or the one function it missed before it waited (numba had decided to)
    assert min(compiled) <= 1 < max(compiled), (compiled, logs)
    warm = subprocess.run([*VBATT, "run", str(cfg), "--cycles", "1", "-q", "-v"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert re.search(r"in [\d.]+ s: 0 functions compiled, 0.00 s of it waiting", warm.stderr), warm.stderr
