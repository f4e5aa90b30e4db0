"""TEST-ONLY, never in an image: freezes one fabric-check rank for real (SIGSTOP of its own
process) at a chosen step, so the SIGSTOP tests stop the rank inside the sweep every time.

An outside stopper that polled the coordinator raced a sweep that lasts under a second; on a busy
machine it lost (CI: "no coordinator of fc-ray-stop"). Python imports this module at start-up when
its directory is on PYTHONPATH (tests/engine_parts.py: freeze_env), in every process of the chain:
the Ray worker, the node's launcher and each spawned rank.

A plan is a file ``$FLEET_TEST_FREEZE_DIR/<launch id>`` holding ``<rank> <step>``; the frozen rank
writes ``<pid> <time> <step name>`` to ``<launch id>.stopped`` just before it stops itself.
"""
import importlib.abc
import importlib.util
import os
import signal
import sys
import time

PLAN_DIR = os.environ.get("FLEET_TEST_FREEZE_DIR")
TARGET = "vllm_fleet.fabric_check.launcher"


def _freeze_if_planned(timer) -> None:
    plan = os.path.join(PLAN_DIR, timer.coord.launch_id)
    try:
        with open(plan, encoding="utf-8") as fh:
            rank, step = (int(x) for x in fh.read().split())
    except (OSError, ValueError):
        return
    if (timer.coord.rank, timer.step) != (rank, step):
        return
    report = plan + ".stopped"
    with open(report + ".tmp", "w", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()} {time.time()} {timer.what}\n")
    os.replace(report + ".tmp", report)  # the test never reads half a report
    os.kill(os.getpid(), signal.SIGSTOP)


def _patch(module) -> None:
    enter = module._HardTimer.enter

    def enter_then_maybe_freeze(self, what):
        enter(self, what)  # progress published first: the peer sees this rank at this step
        _freeze_if_planned(self)

    module._HardTimer.enter = enter_then_maybe_freeze


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # once, and so that the lookup below finds the real module
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_then_patch
        return spec


if PLAN_DIR:
    sys.meta_path.insert(0, _PatchOnImport())
