"""fleet_launch_state (teardown, rolling restart) through Ansible's real module call: only the
deployment's own launch directories (by recorded deployment, never by name prefix) and the /dev/shm
segments its dead processes recorded are removed; other deployments' state, unrecorded segments and
segments still in use stay."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.fixtures.ansible_adhoc import REPO, run_module

SRC = REPO / "images" / "vllm_fleet" / "src"

# A process of launch VLLM_FLEET_LAUNCH_ID that creates a SharedMemory segment in the host's
# /dev/shm through the plugin's recording hook (as a container with the host's IPC would), prints
# its path and sleeps; SIGKILL leaks the segment like a crashed vLLM.
OWNER = r"""
import time
from multiprocessing import shared_memory, resource_tracker
from vllm_fleet import state
from vllm_fleet.hooks import shm
state.register_member()
shm._record_shm_segments()
shm = shared_memory.SharedMemory(create=True, size=4096)
resource_tracker.unregister(shm._name, "shared_memory")
print("/dev/shm/" + shm.name, flush=True)
time.sleep(600)
"""


def _launch(root: Path, launch: str, deployment: str | None, created: float) -> Path:
    d = root / "launches" / launch
    d.mkdir(parents=True)
    if deployment is not None:
        (d / "launch.json").write_text(json.dumps({"launch_id": launch, "deployment": deployment,
                                                   "created": created}))
    return d


@pytest.fixture
def owners(tmp_path):
    procs, paths = [], []

    def start(deployment: str, launch: str) -> tuple[subprocess.Popen, str]:
        env = dict(os.environ, PYTHONPATH=str(SRC), VLLM_FLEET_STATE_DIR=str(tmp_path / "state"),
                   VLLM_FLEET_DEPLOYMENT=deployment, VLLM_FLEET_LAUNCH_ID=launch)
        p = subprocess.Popen([sys.executable, "-c", OWNER], env=env, stdout=subprocess.PIPE, text=True)
        path = p.stdout.readline().strip()
        assert os.path.exists(path), path
        procs.append(p)
        paths.append(path)
        return p, path

    yield start
    for p in procs:
        p.kill()
        p.wait(10)
    for path in paths:
        if os.path.exists(path):
            os.unlink(path)


def test_teardown_of_x_leaves_x_y_and_unrecorded_state(tmp_path, owners):
    root = tmp_path / "state"
    x_old = _launch(root, "x-100-aaaaaa", "x", 100)
    x_y = _launch(root, "x-y-200-bbbbbb", "x-y", 200)
    unrecorded = _launch(root, "x-300-cccccc", None, 300)  # name says x, no record says so
    dead, dead_seg = owners("x", "x-400-dddddd")
    live, live_seg = owners("x", "x-500-eeeeee")
    other, other_seg = owners("x-y", "x-y-200-bbbbbb")
    for p in (dead, other):
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    foreign = Path("/dev/shm") / f"nccl-{uuid.uuid4().hex[:8]}"  # someone else's NCCL segment
    foreign.write_bytes(b"x")
    try:
        args = {"deployment": "x", "state": "absent", "root": str(root)}
        plan = run_module("fleet_launch_state", args, check=True, timeout=300)
        assert plan["changed"] and os.path.exists(dead_seg) and x_old.exists(), plan
        result = run_module("fleet_launch_state", args, timeout=300)
        assert result["changed"], result
        assert sorted(Path(p).name for p in result["removed_launches"]) == ["x-100-aaaaaa", "x-400-dddddd"]
        assert result["removed_shm"] == [dead_seg] and not os.path.exists(dead_seg)
        assert result["kept_shm"] == [live_seg] and os.path.exists(live_seg), "a live process maps it"
        assert [Path(p).name for p in result["kept_launches"]] == ["x-500-eeeeee"]  # its record stays
        assert x_y.exists() and (x_y / "shm").is_dir() and os.path.exists(other_seg)
        assert unrecorded.exists() and foreign.exists()
        again = run_module("fleet_launch_state", args, timeout=300)
        assert not again["changed"] and again["removed_launches"] == [] and again["kept_shm"] == [live_seg]
    finally:
        foreign.unlink()


def test_pruning_keeps_the_newest_launches_of_the_deployment_only(tmp_path):
    root = tmp_path / "state"
    for i in range(4):
        _launch(root, f"x-{i}-aaaaaa", "x", float(i))
    _launch(root, "x-y-0-aaaaaa", "x-y", 0.0)
    result = run_module("fleet_launch_state", {"deployment": "x", "state": "pruned", "keep": 2,
                                               "root": str(root)}, timeout=300)
    assert sorted(Path(p).name for p in result["removed_launches"]) == ["x-0-aaaaaa", "x-1-aaaaaa"]
    assert sorted(p.name for p in (root / "launches").iterdir()) == [
        "x-2-aaaaaa", "x-3-aaaaaa", "x-y-0-aaaaaa"]
    refused = run_module("fleet_launch_state", {"deployment": "x", "state": "pruned", "keep": 0,
                                                "root": str(root)}, timeout=300)
    assert refused["failed"] and "keeps at least the newest" in refused["msg"]
