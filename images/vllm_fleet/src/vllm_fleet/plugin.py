"""vLLM general plugin (entry point ``vllm.general_plugins: fleet``).

vLLM calls ``register()`` in every process it starts (API server, engine core, each worker,
Ray workers included), sometimes more than once. So ``register`` is idempotent, cheap, stdlib-only
and touches neither torch nor CUDA; the work that needs a GPU happens in hooks that only run in the
worker processes, which own their GPU.

This module is the entry point only; the hooks live in ``hooks/``, one module per family (named
in brackets below), and what they share (logger, log-once, guard, post-import patching, ``ACTIVE``)
in ``hooks/core.py``.

Hook points (patched when their module is imported, or at once if it already is):
  * [groups] ``vllm.distributed.parallel_state.GroupCoordinator.__init__`` -- first call in a
    process marks it as a worker: P2P gate applied before the communicators exist, watchdog
    started after the world group exists;
  * [groups] ``GroupCoordinator._all_reduce_out_place`` -- every all-reduce, both the direct path
    and the ``torch.ops.vllm.all_reduce`` custom-op path go through it: watchdog + eager sampling;
  * [groups] ``GroupCoordinator.all_gather / reduce_scatter / broadcast / barrier`` and the
    synchronous PP transfers ``send_tensor_dict / recv_tensor_dict / send / recv`` -- watchdog
    only;
  * [runner] model runner ``__init__`` (``vllm.v1.worker.gpu_model_runner.GPUModelRunner``, which
    the CPU runner subclasses, and the V2 runner
    ``vllm.v1.worker.gpu.model_runner.GPUModelRunner``) -- wraps the instance's ``execute_model``
    (called once per step on every rank, also by the Ray DAG path) to run the probe at the agreed
    cadence;
  * [pp] the PP group's ``isend_tensor_dict`` / ``irecv_tensor_dict`` (instance attributes, CUDA
    workers) -- sampled per-work NCCL timing of the real pipeline transfers (RayExecutorV2 and mp
    executor), and its device communicator's ``send`` (Ray's compiled-graph executor; pp_timing.py);
  * [members] ``vllm.v1.engine.core.EngineCore.__init__`` -- marks the engine core process a
    long-lived member of the launch (``members/<pid>`` role ``engine``; workers get ``worker``
    after their group init, fleet-serve's exec'd process ``main``): the exporter's verdict judges
    those;
  * [ray_env] ``vllm.ray.ray_env.RAY_NON_CARRY_OVER_ENV_VARS`` (driver) -- the per-node fabric
    variables stay with each Ray node instead of being copied from the driver to every Ray worker,
    and the API key (``VLLM_API_KEY``) is never copied: Ray workers do not serve the API;
  * [shm] ``multiprocessing.shared_memory.SharedMemory.__init__`` -- every segment a process of
    the launch creates is recorded (``launches/<id>/shm/<name>``): a later launch's cleanup deletes
    only recorded segments (ownership.py);
  * [shm] ``vllm.distributed.device_communicators.shm_broadcast.SpinCondition.__init__`` -- only
    with VLLM_FLEET_SHM_BUSY_LOOP_S set: the spin window of shm queue readers (CPU hosts).
A hook point missing in a vLLM version is logged once as inactive; every hook body is wrapped so
that a failure in it is logged and the original vLLM call still runs.
"""

from __future__ import annotations

import os
import sys

from .hooks import core
from .hooks.core import _guard, _PostImportFinder, _setup_logging, log_once, logger, when_imported
from .hooks.groups import _patch_parallel_state
from .hooks.members import _patch_engine_core, _register_member
from .hooks.ray_env import _keep_node_env_local, _keep_secrets_off_ray_workers
from .hooks.shm import _limit_shm_spin, _record_shm_segments

_registered = False


@_guard("cleanup")
def _cleanup_once() -> None:
    """Once per launch, in the first process of it that loads the plugin (its children inherit
    VLLM_FLEET_CLEANUP_DONE and skip): the engine's own processes do not exist yet."""
    launch = os.environ.get("VLLM_FLEET_LAUNCH_ID") or "-"
    if os.environ.get("VLLM_FLEET_CLEANUP", "1") == "0":
        log_once("cleanup-off", "vllm-fleet: stale-state cleanup disabled (VLLM_FLEET_CLEANUP=0)")
        return
    if os.environ.get("VLLM_FLEET_CLEANUP_DONE") == launch:
        return
    os.environ["VLLM_FLEET_CLEANUP_DONE"] = launch
    from . import cleanup

    report = cleanup.run()
    logger.info(cleanup.summary(report))


def register() -> None:
    """vLLM general-plugin entry point. Idempotent; never raises."""
    global _registered
    try:
        with core._lock:
            if _registered:
                return
            _registered = True
            if os.environ.get("VLLM_FLEET_DISABLE") == "1":
                return
            _setup_logging()
            if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
                sys.meta_path.insert(0, _PostImportFinder())
            _cleanup_once()
            _register_member()
            _record_shm_segments()
            when_imported("vllm.distributed.parallel_state", _patch_parallel_state)
            when_imported("vllm.ray.ray_env", _keep_secrets_off_ray_workers)
            when_imported("vllm.v1.engine.core", _patch_engine_core)
            when_imported("vllm.ray.ray_env", _keep_node_env_local)
            when_imported("vllm.distributed.device_communicators.shm_broadcast", _limit_shm_spin)
            logger.debug("vllm-fleet plugin registered in pid %d", os.getpid())
    except Exception:
        logger.warning("vllm-fleet: plugin registration failed; vLLM runs without it",
                       exc_info=True)
