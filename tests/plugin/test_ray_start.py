"""entrypoints/ray_start.py: Ray's fixed node-registration wait made a setting, against Ray's own
get_node signature (the engine venv's Ray, the version the images pin)."""

import subprocess

import pytest
from conftest import ENGINE_PY, ENGINE_VENV, engine_has

from vllm_fleet.entrypoints import ray_node
from vllm_fleet.entrypoints.ray_start import patient_get_node


def test_waits_past_rays_30s_until_the_node_registers():
    clock = [0.0]
    calls = []

    def get_node(gcs_address, node_id):
        calls.append(clock[0])
        if clock[0] < 45:  # registers after 45 s: Ray's own loop gave up at 30 s
            raise RuntimeError("node info not available")
        return {"node_id": node_id}

    def sleep(s):
        clock[0] += s
    f = patient_get_node(get_node, 300, sleep=sleep, clock=lambda: clock[0])
    assert f("gcs:6379", "n1") == {"node_id": "n1"} and clock[0] >= 45


def test_gives_up_at_its_own_deadline():
    clock = [0.0]

    def get_node(*_):
        raise RuntimeError("never")

    def sleep(s):
        clock[0] += s
    f = patient_get_node(get_node, 10, sleep=sleep, clock=lambda: clock[0])
    with pytest.raises(RuntimeError):
        f("gcs", "n")
    assert 10 <= clock[0] < 11


def test_rays_node_startup_still_calls_get_node_by_module_attribute():
    """The wrapper only works while Ray's Node looks get_node up on the services module at call
    time, inside its startup loop: check Ray's own source (the engine venv's Ray, the version the
    images pin), so a Ray upgrade that changes it fails here instead of silently bringing back
    the 30 s limit."""
    if not engine_has("ray"):
        pytest.fail(f"needs ray in the engine venv {ENGINE_VENV} (tools/bootstrap.sh engine)")
    code = ("import inspect, ray._private.node as n; s = inspect.getsource(n.Node.__init__); "
            "print('ray._private.services.get_node(' in s and 'raylet_start_wait_time_s' in s)")
    out = subprocess.run([str(ENGINE_PY), "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stdout + out.stderr


def test_fleet_ray_node_runs_ray_start_through_the_wrapper():
    args = ray_node.parser().parse_args(["--head", "--node-ip", "10.0.0.5"])
    argv, _, _, _ = ray_node.build_command(args, {})
    assert argv[1:4] == ["-m", "vllm_fleet.entrypoints.ray_start", "start"]
