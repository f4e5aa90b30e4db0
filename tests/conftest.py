"""Shared pytest setup: the repository root on sys.path, and the engine tier's Ray cluster."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# ansible-playbook run from tests must read the project's ansible.cfg and the venv's tools.
os.environ.setdefault("ANSIBLE_CONFIG", str(REPO / "ansible.cfg"))
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real local Ray cluster (head with dashboard + one worker, tests/engine_parts.py), shared
    by the engine tier's Ray tests (exporter, fabric check): started once, stopped at the end."""
    from tests.engine_parts import ENGINE_VENV, engine_has, start_ray_cluster, stop_ray_cluster

    if not engine_has("ray"):
        pytest.skip(f"needs ray in the engine venv {ENGINE_VENV} (tools/bootstrap.sh engine)")
    nodes = start_ray_cluster(tmp_path_factory)
    try:
        yield nodes
    finally:
        stop_ray_cluster(nodes)
