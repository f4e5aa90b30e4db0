"""``vllm.ray.ray_env`` hook (driver): per-node fabric variables stay with each Ray node, and the
API key is never copied into Ray workers."""

from __future__ import annotations

import logging
import os

from .core import ACTIVE, log_once


def node_local_env_keys() -> tuple:
    """Variables that belong to each node and must come from each Ray node's own environment
    (its fabric.env, through fleet-ray-node), never from the driver's."""
    from .. import fabric_env

    return tuple(fabric_env.ENV_KEYS) + ("NCCL_HOSTID", "FLEET_NODE_NAME")


def _keep_node_env_local(mod) -> None:
    """vLLM's Ray executor copies the driver's ``VLLM_*`` and ``NCCL_*`` variables into every Ray
    worker (``vllm.ray.ray_env.get_env_vars_to_copy``), which would give a worker node the head's
    NCCL_SOCKET_IFNAME / NCCL_IB_HCA (wrong where NIC or HCA names differ). Its exclusion set is
    a module global read at call time: add the per-node keys to it."""
    if os.environ.get("VLLM_FLEET_RAY_KEEP_NODE_ENV", "1") == "0":
        return
    excluded = getattr(mod, "RAY_NON_CARRY_OVER_ENV_VARS", None)
    if not isinstance(excluded, set):
        log_once("no-ray-env", "vllm-fleet: inactive: per-node fabric settings for Ray workers "
                 "(vllm.ray.ray_env.RAY_NON_CARRY_OVER_ENV_VARS not found): workers get the "
                 "driver's NCCL_* values", level=logging.WARNING)
        return
    keys = node_local_env_keys()
    excluded.update(keys)
    ACTIVE["ray_env"] = "vllm.ray.ray_env.RAY_NON_CARRY_OVER_ENV_VARS"
    log_once("ray-env", "vllm-fleet: Ray workers keep their own node's %s (not copied from the "
             "driver)", ", ".join(keys))


#: Secrets of the API server that vLLM's Ray executor would otherwise copy into every Ray worker
#: (its VLLM_* prefix rule): they would show in the workers' environment and Ray's runtime env.
RAY_SECRET_ENV_KEYS = ("VLLM_API_KEY",)


def _keep_secrets_off_ray_workers(mod) -> None:
    """Always on (unlike the per-node fabric keys): the API key stays with the API server."""
    excluded = getattr(mod, "RAY_NON_CARRY_OVER_ENV_VARS", None)
    if not isinstance(excluded, set):
        log_once("no-ray-secret-env", "vllm-fleet: vllm.ray.ray_env.RAY_NON_CARRY_OVER_ENV_VARS not "
                 "found: cannot keep %s out of Ray workers' environment" % ", ".join(RAY_SECRET_ENV_KEYS),
                 level=logging.WARNING)
        return
    excluded.update(RAY_SECRET_ENV_KEYS)
    ACTIVE["ray_secrets"] = "vllm.ray.ray_env.RAY_NON_CARRY_OVER_ENV_VARS"
