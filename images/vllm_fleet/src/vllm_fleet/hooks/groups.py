"""GroupCoordinator hooks: the first group init in a process marks it a worker (P2P gate before
the communicators exist, watchdog and model-runner hook after), every all-reduce gets the watchdog
and eager sampling, the other collectives and the synchronous PP transfers the watchdog; each new
group also gets the PP timing hook (pp.py)."""

from __future__ import annotations

import functools
import logging
import os
import sys

from . import core
from .core import ACTIVE, _guard, _wrap_init_once, log_once, logger
from .members import _register_member
from .pp import _wrap_pp
from .runner import _patch_model_runners

_worker_ready = False
_gate_decision = None


def _patch_parallel_state(ps) -> None:
    gc = getattr(ps, "GroupCoordinator", None)
    if gc is None:
        log_once("no-gc", "vllm-fleet: inactive: gate, watchdog, eager sampling and probe "
                 "(vllm.distributed.parallel_state.GroupCoordinator not found in this vLLM)",
                 level=logging.WARNING)
        return

    def after(coordinator):
        _after_group_init(coordinator)
        _wrap_pp(coordinator)

    if not _wrap_init_once(gc, after, before=lambda: _before_group_init(ps)):
        return
    ACTIVE["group_init"] = "GroupCoordinator.__init__"

    from .. import probe

    if hasattr(gc, "_all_reduce_out_place"):
        orig_ar = gc._all_reduce_out_place

        @functools.wraps(orig_ar)
        def _all_reduce_out_place(self, input_):
            # Inside a torch.compile trace (the CPU engine compiles its forward with dynamo) the
            # hook's locks and files cannot be traced: the graph gets vLLM's call alone.
            if _tracing():
                return orig_ar(self, input_)
            rec = probe.get() if _worker_ready else None
            if rec is None:
                return orig_ar(self, input_)
            return rec.eager_call(self, orig_ar, input_)

        gc._all_reduce_out_place = _all_reduce_out_place
        ACTIVE["all_reduce"] = "GroupCoordinator._all_reduce_out_place"
    else:
        log_once("no-ar", "vllm-fleet: inactive: eager all-reduce sampling and all-reduce "
                 "watchdog (GroupCoordinator._all_reduce_out_place not found)",
                 level=logging.WARNING)

    # The synchronous point-to-point transfers between pipeline stages (the CPU engine's PP path):
    # a stage waiting for a peer that never sends (a cut link, a frozen stage) is stuck too.
    for op in ("all_gather", "reduce_scatter", "gather", "broadcast", "barrier",
               "send_tensor_dict", "recv_tensor_dict", "send", "recv"):
        if hasattr(gc, op):
            setattr(gc, op, _watched(getattr(gc, op), op))
            ACTIVE[f"watch_{op}"] = f"GroupCoordinator.{op}"


def _tracing() -> bool:
    """True while torch.compile's dynamo traces the caller (a constant inside the trace)."""
    compiler = getattr(sys.modules.get("torch"), "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _watched(fn, op: str):
    from .. import probe, watchdog

    @functools.wraps(fn)
    def inner(self, *args, **kwargs):
        if not _worker_ready or _tracing():
            return fn(self, *args, **kwargs)
        size = 0
        if args and hasattr(args[0], "element_size"):
            size = args[0].numel() * args[0].element_size()
        wd = watchdog.get()
        token = wd.begin(probe.group_label(self), op, size)
        try:
            return fn(self, *args, **kwargs)
        finally:
            wd.end(token)

    return inner


@_guard("p2p gate")
def _apply_gate(ps) -> None:
    """Worker, before its first communicator exists: decide on custom all-reduce / NCCL P2P."""
    global _gate_decision
    from .. import p2p_gate

    if _gate_decision is None:
        # GPU workers share one probe per boot/driver/GPU set (cached); CPU: not_applicable.
        import fcntl

        os.makedirs(p2p_gate.cache_dir(), exist_ok=True)
        with open(os.path.join(p2p_gate.cache_dir(), ".lock"), "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            _gate_decision = p2p_gate.evaluate_isolated()
            logger.info(_gate_decision.log_line())  # the one decision line, in the worker's log
    p2p_gate.apply_to_env(_gate_decision)
    if _gate_decision.decision == "disabled":
        # CudaCommunicator reads this module global when it builds the TP communicator; forcing
        # it (and wrapping the setter) wins over --disable-custom-all-reduce=False.
        if hasattr(ps, "_ENABLE_CUSTOM_ALL_REDUCE"):
            ps._ENABLE_CUSTOM_ALL_REDUCE = False
        else:
            log_once("no-ca-flag", "vllm-fleet: cannot force custom all-reduce off: "
                     "parallel_state._ENABLE_CUSTOM_ALL_REDUCE not found", level=logging.WARNING)


def _before_group_init(ps) -> None:
    if _worker_ready or _gate_decision is not None:
        if _gate_decision is not None and _gate_decision.decision == "disabled":
            ps._ENABLE_CUSTOM_ALL_REDUCE = False
        return
    _apply_gate(ps)


@_guard("worker setup")
def _after_group_init(coordinator) -> None:
    global _worker_ready
    with core._lock:
        if _worker_ready:
            return
        from .. import probe, watchdog

        wd = watchdog.get()
        try:
            import torch.distributed as dist

            wd.rank = dist.get_rank() if dist.is_initialized() else None
        except Exception:
            wd.rank = None
        wd.local_rank = getattr(coordinator, "local_rank", None)
        rec = probe.get()
        rec.rank = wd.rank
        wd.flushers.append(rec.flush)
        wd.start()
        _register_member("worker")
        _patch_model_runners()
        _worker_ready = True
        logger.info("vllm-fleet: hooks active in worker rank %s (pid %d): %s; watchdog threshold "
                    "%.1fs, probe every %s steps", wd.rank, os.getpid(),
                    ", ".join(sorted(set(ACTIVE.values()))), wd.threshold_s,
                    os.environ.get("VLLM_FLEET_PROBE_EVERY_STEPS", probe.DEFAULT_EVERY_STEPS))
