"""Stuck-collective watchdog: a real rank blocked in a gloo all-reduce is reported in time."""
import json
import os
import subprocess
import time

from conftest import child_env
from vllm_fleet import watchdog

# Two gloo ranks. Rank 0 enters an all_reduce under the watchdog; rank 1 never joins it
# (it sleeps), so rank 0 really blocks inside gloo, like a rank whose peer hung.
RANKS = r"""
import os, sys, time, datetime, logging
import torch, torch.distributed as dist
from vllm_fleet import watchdog
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=rank,
                        world_size=2, timeout=datetime.timedelta(seconds=600))
wd = watchdog.get(); wd.rank = rank; wd.local_rank = rank; wd.start()
t = torch.ones(1024)
tok = wd.begin("tp", "all_reduce", 4096); dist.all_reduce(t); wd.end(tok)  # completes
print("first done", flush=True)
if rank == 0:
    tok = wd.begin("tp", "all_reduce", t.numel() * 4)
    dist.all_reduce(t)  # blocks: rank 1 never calls it
    wd.end(tok)
else:
    time.sleep(3600)  # killed by the test
"""


def test_snapshot_marks_stuck_only_after_threshold(tmp_path):
    wd = watchdog.Watchdog(path=str(tmp_path / "c.json"), threshold_s=10)
    tok = wd.begin("tp", "all_reduce", 1024)
    start = wd._current[4]
    assert wd.snapshot(now=start + 9.9)["stuck"] is False
    snap = wd.snapshot(now=start + 10.1)
    assert snap["stuck"] is True
    assert snap["current"] == {"group": "tp", "op": "all_reduce", "size_bytes": 1024, "seq": 1,
                               "start": start}
    inner = wd.begin("tp", "all_gather", 8)  # nested: the outer op stays the reported one
    assert inner == 0 and wd.snapshot()["current"]["op"] == "all_reduce"
    wd.end(inner)
    wd.end(tok)
    snap = wd.snapshot()
    assert snap["current"] is None and snap["stuck"] is False and snap["completed_total"] == 1
    wd.flush()
    on_disk = json.loads((tmp_path / "c.json").read_text())
    assert set(on_disk) == {"launch_id", "host", "pid", "rank", "local_rank", "updated",
                            "threshold_s", "completed_total", "current", "stuck"}


def test_threshold_from_env(monkeypatch):
    monkeypatch.setenv("VLLM_FLEET_STUCK_THRESHOLD_S", "2.5")
    assert watchdog.threshold_from_env() == 2.5
    monkeypatch.setenv("VLLM_FLEET_STUCK_THRESHOLD_S", "bogus")
    assert watchdog.threshold_from_env() == 10.0


def test_rank_blocked_in_real_gloo_collective_is_reported_within_threshold(torch_py, state_dir,
                                                                          tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threshold = 2.0
    env = child_env(VLLM_FLEET_STATE_DIR=state_dir, VLLM_FLEET_LAUNCH_ID="wd-1",
                    FLEET_NODE_NAME="wdhost", VLLM_FLEET_STUCK_THRESHOLD_S=threshold)
    logs = [open(tmp_path / f"rank{r}.log", "w+") for r in (0, 1)]
    procs = [subprocess.Popen([torch_py, "-c", RANKS, str(r), str(port)], env=env,
                              stdout=logs[r], stderr=subprocess.STDOUT) for r in (0, 1)]
    try:
        launch = state_dir / "launches" / "wd-1"
        path0 = launch / f"collective-wdhost-{procs[0].pid}.json"
        path1 = launch / f"collective-wdhost-{procs[1].pid}.json"
        # wait until rank 0 has entered the blocking all_reduce (the second collective); both
        # ranks import torch first, which takes long on a busy machine
        deadline = time.time() + 300
        entered = None
        while time.time() < deadline:
            doc = _read(path0)
            if doc and doc["current"] and doc["current"]["seq"] == 2:
                entered = doc["current"]["start"]
                break
            time.sleep(0.05)
        assert entered, (tmp_path / "rank0.log").read_text()
        # reported stuck once the threshold has passed (the watchdog flushes every second); the
        # wall-clock bound is for a busy machine, the file's own times are exact
        while time.time() < entered + threshold + 60:
            doc = _read(path0)
            if doc and doc["stuck"]:
                break
            time.sleep(0.05)
        assert doc["stuck"] is True, doc
        assert doc["updated"] - entered >= threshold, "not before the threshold"
        assert doc["rank"] == 0 and doc["current"]["op"] == "all_reduce"
        assert doc["current"]["group"] == "tp" and doc["current"]["size_bytes"] == 4096
        assert doc["completed_total"] == 1
        other = _read(path1)
        assert other["stuck"] is False and other["current"] is None  # rank 1 is not in one
        deadline, log0 = time.time() + 60, ""
        while "tp all_reduce size=4096 seq=2" not in log0 and time.time() < deadline:
            time.sleep(0.2)
            log0 = (tmp_path / "rank0.log").read_text()
        assert "rank 0" in log0 and "stuck" in log0 and "tp all_reduce size=4096 seq=2" in log0
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
        for f in logs:
            f.close()


def _read(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
