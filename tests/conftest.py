"""Shared test helpers: run the real `vbatt` command, write configs into tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VBATT = [sys.executable, "-m", "vbatt.cli"]


def run_vbatt(*args: str, timeout: float = 120, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run `vbatt ARGS` as a real process; returns the completed process (text mode)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.run([*VBATT, *args], capture_output=True, text=True, timeout=timeout, check=check,
                          env=env, cwd=kw.pop("cwd", REPO), **kw)


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture
def write_config(tmp_path):
    """write_config(text, name="plant.yaml") -> path of a config file in tmp_path."""

    def _write(text: str, name: str = "plant.yaml") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    return _write
