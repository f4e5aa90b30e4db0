"""The verdict's rules (verdict.py) and how members are found and judged on a real /proc.

Member states come from real processes: a child registered like a vLLM process, then stopped
with SIGSTOP, frozen through a real cgroup freezer, killed. The rules are checked on values."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from exporter_testlib import wait_for_cmdline

from vllm_fleet_exporter.launchstate import Collective
from vllm_fleet_exporter.members import (Member, MemberTracker, cgroup_frozen, read_registry,
                                         read_roles)
from vllm_fleet_exporter.verdict import (CanaryStreak, MemberReport, ReplicaJudge, host_problems,
                                         read_maintenance)


def start_ticks(pid: int) -> int:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return int(data[data.rindex(b")") + 2:].split()[19])


def register(launch_dir: Path, pid: int, role: str | None = "worker") -> None:
    d = launch_dir / "members"
    d.mkdir(parents=True, exist_ok=True)
    doc = {"pid": pid, "start_ticks": start_ticks(pid)}
    if role:
        doc["role"] = role
    (d / str(pid)).write_text(json.dumps(doc))


@pytest.fixture
def child():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield p
    p.kill()
    p.wait()


def wait_state(tracker, reg, want, timeout=30.0):
    deadline = time.time() + timeout
    states = None
    while time.time() < deadline:
        states = [m.state for m in tracker.states(reg)]
        if states == want:
            return
        time.sleep(0.05)
    raise AssertionError(f"member states {states}, wanted {want}")


def test_member_running_stopped_exited(tmp_path, child):
    register(tmp_path, child.pid)
    reg = read_registry(str(tmp_path))
    assert reg == [(child.pid, start_ticks(child.pid))]
    tracker = MemberTracker()
    wait_state(tracker, reg, ["running"])
    assert tracker.states(reg)[0].host_pid == child.pid
    child.send_signal(signal.SIGSTOP)
    wait_state(tracker, reg, ["stopped"])
    child.send_signal(signal.SIGCONT)
    wait_state(tracker, reg, ["running"])
    child.kill()
    child.wait()
    wait_state(tracker, reg, ["exited"])


def test_reused_pid_is_not_the_member(tmp_path, child):
    """Same pid, other start time: the registered process is gone."""
    d = tmp_path / "members"
    d.mkdir()
    (d / str(child.pid)).write_text(json.dumps({"pid": child.pid, "role": "worker",
                                               "start_ticks": start_ticks(child.pid) - 1}))
    assert [m.state for m in MemberTracker().states(read_registry(str(tmp_path)))] == ["exited"]


def test_only_long_lived_members_are_judged(tmp_path, child):
    """A helper vLLM starts and that exits (no role) is not a member the verdict judges."""
    helper = subprocess.Popen([sys.executable, "-c", "pass"])
    register(tmp_path, helper.pid, role=None)
    helper.wait()
    register(tmp_path, child.pid, role="engine")
    assert read_registry(str(tmp_path)) == [(child.pid, start_ticks(child.pid))]
    assert dict(read_roles(str(tmp_path))) == {(child.pid, start_ticks(child.pid)): "engine"}


def _freezer_cgroup(name: str):
    """A real freezer: cgroup v1's freezer controller, else a cgroup v2 directory."""
    v1 = Path("/sys/fs/cgroup/freezer")
    if (v1 / "freezer.state").exists() or (v1 / "cgroup.procs").exists():
        cg = v1 / name
        cg.mkdir(exist_ok=True)
        return cg, lambda on: (cg / "freezer.state").write_text("FROZEN" if on else "THAWED")
    for base in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if (base / "cgroup.controllers").exists():
            cg = base / name
            cg.mkdir(exist_ok=True)
            return cg, lambda on: (cg / "cgroup.freeze").write_text("1" if on else "0")
    pytest.fail("no cgroup freezer on this machine (needs root and cgroup v1 freezer or v2)")


def test_member_frozen_by_cgroup_freezer(tmp_path, child):
    """What `docker pause` does: the process's cgroup is frozen."""
    cg, freeze = _freezer_cgroup(f"fleet-verdict-test-{os.getpid()}")
    try:
        (cg / "cgroup.procs").write_text(str(child.pid))
        register(tmp_path, child.pid)
        reg = read_registry(str(tmp_path))
        tracker = MemberTracker()
        wait_state(tracker, reg, ["running"])
        freeze(True)
        wait_state(tracker, reg, ["frozen"])
        assert cgroup_frozen("/proc", "/sys/fs/cgroup", child.pid)
        freeze(False)
        wait_state(tracker, reg, ["running"])
    finally:
        freeze(False)
        child.kill()
        child.wait()
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def coll(rank, updated, stuck=False, inflight=0.0):
    return Collective(str(rank), 100 + rank, updated, inflight, stuck, 10.0, 5, "all_reduce", "tp")


def test_host_problems_name_each_fault():
    now = 1000.0
    members = [Member(1, 1, "running", 11), Member(2, 2, "stopped", 12),
               Member(3, 3, "frozen", 13), Member(4, 4, "exited", None)]
    got = host_problems("node2", "/x", members,
                        [coll(0, now - 1), coll(1, now - 30), coll(2, now, True, 12.0)],
                        now, 10.0, True)
    reasons = [p.reason for p in got]
    assert reasons == ["member_stopped", "member_frozen", "member_exited", "heartbeat_stale",
                       "collective_stuck"]
    assert "node2" in got[0].detail and "12" in got[0].detail  # host and host pid named
    assert "rank 1" in got[3].detail and "30s" in got[3].detail
    assert host_problems("node2", None, [], [], now, 10.0, True)[0].reason == "no_launch"
    assert host_problems("node3", None, [], [], now, 10.0, False) == []  # a Ray-only host


def test_a_missing_process_class_is_a_host_problem_on_any_serving_host():
    """A Ray node killed on a Ray-only host (no launch there): its raylet's absence in the /proc
    scan makes the host unhealthy, and the head names that host through its member report."""
    now = 1000.0
    got = host_problems("node3", None, [], [], now, 10.0, False, [("raylet", 0, 1)])
    assert [p.reason for p in got] == ["process_missing"]
    assert got[0].detail == "node3: 0 of 1 raylet process(es) running"
    engine_host = host_problems("node2", "/x", [], [], now, 10.0, True, [("raylet", 0, 1)])
    assert [p.reason for p in engine_host] == ["process_missing"]
    j = judge()
    kw = dict(launch_id="L1", launch_created=100.0, own=[], maintenance=None, last_health_ok=now)
    j.judge(now, **kw)
    ray_only = MemberReport("http://n3:9445", now - 1, {
        "state": "unhealthy", "host": "node3", "launch_id": "",
        "problems": [p.to_json() for p in got]})
    v = j.judge(now, members=[ray_only], **kw)
    assert v.state == "unhealthy" and [p.reason for p in v.problems] == ["member_host_unhealthy"]
    assert "node3: 0 of 1 raylet" in v.summary()
    # the member's own reason travels as `cause`, the missing class as `process`: the healer's
    # scope reads both (a missing raylet is Ray's problem, not the engine's)
    assert got[0].to_json()["process"] == "raylet"
    assert v.to_json()["problems"] == [{"reason": "member_host_unhealthy", "cause": "process_missing",
                                        "process": "raylet",
                                        "detail": "node3: 0 of 1 raylet process(es) running"}]


def judge(**kw):
    args = dict(start_timeout_s=600, api_max_silence_s=6, member_max_silence_s=6,
                canary_max_failures=2)
    args.update(kw)
    return ReplicaJudge("node1", is_head=True, **args)


def test_starting_until_first_health_then_healthy_then_unhealthy():
    j = judge()
    kw = dict(launch_id="L1", launch_created=100.0, own=[], maintenance=None)
    assert j.judge(110, last_health_ok=None, **kw).state == "starting"
    # a health answer from before this launch does not count
    assert j.judge(111, last_health_ok=99.0, **kw).state == "starting"
    v = j.judge(200, last_health_ok=199.0, **kw)
    assert v.state == "healthy" and v.phase_since == 200
    v = j.judge(210, last_health_ok=199.0, **kw)  # 11 s without a 200
    assert v.state == "unhealthy" and [p.reason for p in v.problems] == ["api_down"]
    assert j.judge(211, last_health_ok=211.0, **kw).state == "healthy"


def test_problems_during_start_do_not_count_until_start_timeout():
    j = judge(start_timeout_s=300)
    own = host_problems("node1", "/x", [Member(5, 5, "exited", None)], [], 150, 10, True)
    kw = dict(launch_id="L1", launch_created=100.0, own=own, maintenance=None,
              last_health_ok=None)
    assert j.judge(150, **kw).state == "starting"
    v = j.judge(401, **kw)
    assert v.state == "unhealthy" and "start_timeout" in [p.reason for p in v.problems]


def test_new_launch_starts_over():
    j = judge()
    assert j.judge(200, launch_id="L1", launch_created=100.0, own=[], maintenance=None,
                   last_health_ok=199.0).state == "healthy"
    assert j.judge(300, launch_id="L2", launch_created=290.0, own=[], maintenance=None,
                   last_health_ok=199.0).state == "starting"


def test_members_ray_and_canary():
    j = judge()
    now = 500.0
    good = MemberReport("http://n2:9445", now - 1, {"state": "healthy", "host": "node2",
                                                     "launch_id": "L1", "problems": []})
    bad = MemberReport("http://n3:9445", now - 1, {
        "state": "unhealthy", "host": "node3", "launch_id": "L1",
        "problems": [{"reason": "member_stopped", "detail": "node3: process 7 is stopped"}]})
    silent = MemberReport("http://n4:9445", now - 30, {"state": "healthy", "launch_id": "L1",
                                                        "problems": []}, "timed out")
    other = MemberReport("http://n5:9445", now, {"state": "healthy", "host": "node5",
                                                  "launch_id": "L0", "problems": []})
    kw = dict(launch_id="L1", launch_created=100.0, own=[], maintenance=None,
              last_health_ok=now)
    j.judge(now, **kw)
    v = j.judge(now, members=[good], ray_alive=2, ray_expected=2, canary_failures=1, **kw)
    assert v.state == "healthy"
    v = j.judge(now, members=[good, bad, silent, other], ray_alive=1, ray_expected=2,
                canary_failures=2, **kw)
    assert [p.reason for p in v.problems] == ["member_host_unhealthy", "member_host_unreachable",
                                              "member_launch_mismatch", "ray_nodes_missing",
                                              "canary_failing"]
    assert "node3: process 7 is stopped" in v.summary()


def test_canary_failures_count_only_for_the_launch_serving_after_them():
    """A rolling restart's probes fail while its engine is stopped (maintenance) and before the new
    launch serves: none of them may make the relaunched replica canary_failing once the maintenance
    ends (CI saw that page: replica b "canary_failing" right after its restart). Failures of the
    launch that serves count, and a success ends the streak."""
    s = CanaryStreak()
    assert s.observe(100, "L1", None) == 0
    s.result(False, 101)
    s.result(False, 102)
    assert s.observe(103, "L1", None) == 2  # the serving launch's own failures count
    assert s.observe(110, "L1", "rolling restart") == 0
    s.result(False, 111)  # the engine is stopped on purpose
    s.result(False, 112)
    assert s.observe(113, "L2", "rolling restart") == 0  # relaunched, still in maintenance
    s.result(False, 112.5)  # started in maintenance, answered after the last look
    assert s.observe(120, "L2", None) == 0
    j = judge()
    kw = dict(launch_id="L2", launch_created=113.0, own=[], maintenance=None, last_health_ok=120.0)
    j.judge(120, canary_failures=0, **kw)
    assert j.judge(121, canary_failures=s.observe(121, "L2", None), **kw).state == "healthy"
    s.result(False, 121)
    s.result(False, 125)
    assert s.observe(126, "L2", None) == 2
    assert j.judge(126, canary_failures=2, **dict(kw, last_health_ok=126.0)).state == "unhealthy"
    s.result(True, 127)
    assert s.observe(128, "L2", None) == 0
    s.result(False, 129)
    assert s.observe(130, "L3", None) == 0  # a new launch (e.g. a heal without maintenance) starts over


def test_maintenance_marker(tmp_path):
    (tmp_path / "maintenance-dep.json").write_text(json.dumps({"until": 2000, "reason": "heal"}))
    assert read_maintenance(str(tmp_path), "dep", 1000) == "heal"
    assert read_maintenance(str(tmp_path), "dep", 2001) is None  # expired: no silence for good
    assert read_maintenance(str(tmp_path), "other", 1000) is None
    j = judge()
    v = j.judge(1000, launch_id="L1", launch_created=100.0, maintenance="heal",
                own=host_problems("node1", "/x", [Member(1, 1, "exited", None)], [], 1000, 10,
                                  True), last_health_ok=None)
    assert v.state == "maintenance"


def test_exporter_host_verdict_sees_a_dead_process_of_a_class_it_must_run(tmp_path):
    """The exporter end to end on the real /proc: a process class it must run (here a child with a
    marker, standing for a raylet) is counted by the processes job; once the child is killed the
    next scan and verdict name it, a Ray-only host (no launch) included."""
    from vllm_fleet_exporter.collector import FleetExporter
    from vllm_fleet_exporter.config import load_config

    marker = f"fleet-raylet-stand-in-{os.getpid()}-{time.time_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", marker])
    try:
        wait_for_cmdline(proc.pid, marker)  # else a scan can find no raylet (it failed so once)
        cfg = load_config(["--state-dir", str(tmp_path), "--nvml", "off", "--host", "node3",
                           "--verdict", "--no-expect-engine", "--process", f"raylet={marker}"])
        exp = FleetExporter(cfg)
        exp.run_all_once()
        assert exp.verdict.latest().state == "healthy", exp.verdict.latest().summary()
        proc.kill()
        proc.wait(30)
        exp.run_all_once()
        v = exp.verdict.latest()
        assert v.state == "unhealthy" and [p.reason for p in v.problems] == ["process_missing"]
        assert "node3: 0 of 1 raylet process(es) running" in v.summary()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
