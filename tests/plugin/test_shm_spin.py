"""VLLM_FLEET_SHM_BUSY_LOOP_S: a real vLLM shm MessageQueue (writer + local reader, engine venv),
reader waiting 1.5 s for its next message. With vLLM's 1 s spin window the waiting reader burns
CPU; with the lab's 0.05 s it sleeps until the writer's notification, and still gets the message.
Spinning is measured as the reader's runnable time (on a CPU or waiting for one, from
/proc/self/schedstat), which a busy machine does not change; its CPU seconds are only printed, as
they shrink with the share of a core it gets. Serving latency with each window:
benchmarks/shm_spin.py."""
import json
import logging
import subprocess

import pytest

from conftest import ENGINE_PY, child_env, engine_has
from vllm_fleet.hooks import core, shm

READER = r"""
import json, threading, time
from vllm_fleet import plugin
plugin.register()
from vllm.distributed.device_communicators.shm_broadcast import MessageQueue
writer = MessageQueue(n_reader=1, n_local_reader=1)
reader = MessageQueue.create_from_handle(writer.export_handle(), 0)
ready = threading.Thread(target=writer.wait_until_ready)
ready.start(); reader.wait_until_ready(); ready.join()
writer.enqueue("first"); assert reader.dequeue(timeout=30) == "first"
def runnable_ns():  # this (main) thread: on a CPU + waiting on the run queue
    with open("/proc/self/schedstat") as fh:
        on_cpu, waiting = fh.read().split()[:2]
    return int(on_cpu) + int(waiting)
threading.Timer(1.5, writer.enqueue, args=("second",)).start()
cpu, wall, runnable = time.process_time(), time.monotonic(), runnable_ns()
assert reader.dequeue(timeout=30) == "second"
print("RESULT " + json.dumps({"cpu_s": time.process_time() - cpu, "wall_s": time.monotonic() - wall,
                              "runnable_s": (runnable_ns() - runnable) / 1e9,
                              "busy_loop_s": reader._spin_condition.busy_loop_s}))
"""


def idle_reader(tmp_path, busy_loop: str) -> tuple[dict, str]:
    env = child_env(VLLM_FLEET_STATE_DIR=tmp_path, VLLM_FLEET_CLEANUP="0", VLLM_FLEET_SHM_BUSY_LOOP_S=busy_loop)
    out = subprocess.run([str(ENGINE_PY), "-c", READER], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.split("RESULT ", 1)[1]), out.stderr


def test_short_spin_window_lets_an_idle_reader_sleep_and_still_get_its_message(tmp_path):
    if not engine_has("vllm"):
        pytest.skip(f"needs vllm in {ENGINE_PY}")
    default, _ = idle_reader(tmp_path, "")
    short, log = idle_reader(tmp_path, "0.05")
    print(f"idle reader over 1.5 s, runnable / CPU: vLLM default {default['runnable_s']:.3f} s / "
          f"{default['cpu_s']:.3f} s, VLLM_FLEET_SHM_BUSY_LOOP_S=0.05 {short['runnable_s']:.3f} s / "
          f"{short['cpu_s']:.3f} s")
    assert default["busy_loop_s"] == 1 and short["busy_loop_s"] == 0.05
    assert "shm queue readers spin 0.050 s" in log and "below" not in log
    # vLLM's window: runnable for most of its 1 s of spinning; 0.05 s: asleep nearly all the wait
    assert default["runnable_s"] > 0.7 and short["runnable_s"] < 0.3, (default, short)
    assert short["cpu_s"] < 0.1, short
    # 1.5 s until the message; vLLM's recheck would wake the reader only at 5 s
    assert short["wall_s"] < 4.5, "woken by the writer's notification, not by the 5 s recheck"


@pytest.mark.parametrize("raw", ["soon", "-1", "61"])
def test_bad_spin_window_is_logged_and_vllm_default_kept(raw, monkeypatch, caplog):
    monkeypatch.setenv(shm.SHM_BUSY_LOOP_ENV, raw)
    core._logged_once.discard("bad-busy-loop")

    class Module:
        class SpinCondition:
            def __init__(self):
                self.is_reader, self.busy_loop_s = True, 1

    with caplog.at_level(logging.WARNING, logger="vllm_fleet"):
        shm._limit_shm_spin(Module)
    assert Module.SpinCondition().busy_loop_s == 1
    assert f"VLLM_FLEET_SHM_BUSY_LOOP_S='{raw}' is not a number of seconds" in caplog.text


def test_zero_spin_window_is_applied_with_a_warning(monkeypatch, caplog):
    monkeypatch.setenv(shm.SHM_BUSY_LOOP_ENV, "0")
    core._logged_once.discard("low-busy-loop")
    with caplog.at_level(logging.WARNING, logger="vllm_fleet"):
        assert shm.shm_busy_loop_s() == 0.0
    assert "leaves a reader asleep until its 5 s recheck" in caplog.text
