"""A REAL haproxy (configured by the loadbalancer role) obeys the REAL exporter's replica verdict.

Each replica: a fake_vllm backend (its API; the engine itself cannot run in the unit tier) and a
real exporter process (verdict on, HAProxy agent-check port) whose launch has one registered
member, a real child process. SIGSTOP of that member is a hung replica with /health still 200:
the agent says down, HAProxy takes the replica out, the stream in flight on it is cut at once,
new requests go to the other replica; SIGCONT brings it back with nobody acting. When every
replica is judged hung, the /health-checked backup entries keep serving (the verdict never drains
the last replica that answers). Times are printed, not asserted (benchmarks/hang_detection.py
measures them on the lab); every wait is bounded.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.unit.fake_vllm import FakeVLLM, free_port
from tests.unit.test_loadbalancer_runtime import Balancer, chat

REPO = Path(__file__).resolve().parents[2]


def start_ticks(pid: int) -> int:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return int(data[data.rindex(b")") + 2:].split()[19])


class Replica:
    """A fake API plus a real exporter judging a launch whose one member is a real process."""

    def __init__(self, tmp: Path, name: str, api_key: str = ""):
        self.name = name
        self.api = FakeVLLM(name, token_delay=0.05, api_key=api_key).start()
        self.member = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        state = tmp / f"state-{name}"
        launch = state / "launches" / f"dep-{name}-1"
        (launch / "members").mkdir(parents=True)
        (launch / "launch.json").write_text(json.dumps(
            {"launch_id": f"dep-{name}-1", "deployment": "dep", "created": time.time() - 5}))
        (launch / "members" / str(self.member.pid)).write_text(json.dumps(
            {"pid": self.member.pid, "start_ticks": start_ticks(self.member.pid), "role": "worker"}))
        self.agent_port = free_port()
        self.port = free_port()
        cfg = tmp / f"exporter-{name}.json"
        cfg.write_text(json.dumps({
            "listen": f"127.0.0.1:{self.port}", "state_dir": str(state), "engine_url": self.api.url,
            "health_interval_s": 0.3, "health_timeout_s": 2, "canary_enabled": False,
            "nvml": "off", "verdict_enabled": True, "deployment": "dep", "expect_engine": True,
            "agent_listen": f"127.0.0.1:{self.agent_port}", "fabric_file": str(tmp / "none.json")}))
        env = dict(os.environ, PYTHONPATH=str(REPO / "exporter"))
        self.log = open(tmp / f"exporter-{name}.log", "w")
        self.exporter = subprocess.Popen([sys.executable, "-m", "vllm_fleet_exporter", "--config", str(cfg)],
                                         env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def verdict(self) -> dict:
        r = requests.get(f"http://127.0.0.1:{self.port}/verdict", timeout=5)
        return r.json()

    def stop(self) -> None:
        for p in (self.member, self.exporter):
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait()
        self.api.stop()
        self.log.close()


def wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except (requests.RequestException, OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


def start_fleet(tmp_path, api_key: str = "", **balancer_overrides):
    replicas = {n: Replica(tmp_path, n, api_key) for n in ("r1", "r2")}
    try:
        for r in replicas.values():  # the launch serves (/health 200): healthy, not starting
            wait(lambda r=r: r.verdict()["state"] == "healthy", 90, f"{r.name} healthy")
        balancer = Balancer(tmp_path, {n: r.api for n, r in replicas.items()},
                            head_vars={n: f"fleet_exporter_agent_port={r.agent_port}"
                                       for n, r in replicas.items()}, **balancer_overrides)
    except BaseException:
        for r in replicas.values():
            r.stop()
        raise
    return balancer, replicas


def stop_fleet(balancer, replicas) -> None:
    balancer.stop()
    for r in replicas.values():
        r.stop()


@pytest.fixture
def fleet(tmp_path):
    balancer, replicas = start_fleet(tmp_path)
    yield balancer, replicas
    stop_fleet(balancer, replicas)


def served_by(url: str, n: int) -> list[str]:
    out = []
    for _ in range(n):
        r = chat(url)
        assert r.status_code == 200, r.text
        out.append(r.headers["x-fake-backend"])
    return out


def test_a_hung_replica_leaves_rotation_its_stream_is_cut_and_it_comes_back(fleet):
    balancer, replicas = fleet
    assert set(served_by(balancer.url, 10)) == {"r1", "r2"}

    # a long stream on r1 (about 10 s of tokens) when r1 hangs
    replicas["r1"].api.token_delay = 0.5
    replicas["r2"].api.token_delay = 0.5
    stream_result = {}

    def stream():
        t0 = time.monotonic()
        try:
            with requests.post(f"{balancer.url}/v1/chat/completions", stream=True, timeout=120, json={
                    "model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 20, "stream": True}) as r:
                stream_result["backend"] = r.headers.get("x-fake-backend")
                for _ in r.iter_lines():
                    pass
            stream_result["ended"] = "complete"
        except requests.RequestException as exc:
            stream_result["ended"] = f"cut: {type(exc).__name__}"
        stream_result["seconds"] = time.monotonic() - t0

    # leastconn: with one stream open on each replica, the next goes to either; open streams until
    # one is on r1
    threads = []
    for _ in range(4):
        t = threading.Thread(target=stream)
        t.start()
        threads.append(t)
        wait(lambda: "backend" in stream_result, 30, "stream started")
        if stream_result["backend"] == "r1":
            break
        t.join(60)
        stream_result.clear()
    assert stream_result.get("backend") == "r1", "no stream landed on r1"

    t0 = time.monotonic()
    replicas["r1"].member.send_signal(signal.SIGSTOP)
    wait(lambda: balancer.servers()["r1"]["status"].startswith("DOWN"), 60, "HAProxy takes r1 out")
    out_s = time.monotonic() - t0
    verdict = replicas["r1"].verdict()
    assert verdict["state"] == "unhealthy"
    assert [p["reason"] for p in verdict["problems"]] == ["member_stopped"]
    assert str(replicas["r1"].member.pid) in verdict["problems"][0]["detail"]
    threads[-1].join(60)
    assert stream_result["ended"].startswith("cut"), f"stream on the hung replica: {stream_result}"
    assert stream_result["seconds"] < 10, "cut when r1 went down, not at the end of its 10 s of tokens"
    replicas["r1"].api.token_delay = replicas["r2"].api.token_delay = 0.01
    assert set(served_by(balancer.url, 10)) == {"r2"}, "no request is sent to a hung replica"
    assert replicas["r2"].verdict()["state"] == "healthy"

    t1 = time.monotonic()
    replicas["r1"].member.send_signal(signal.SIGCONT)
    wait(lambda: balancer.servers()["r1"]["status"] == "UP", 60, "r1 back in rotation")
    back_s = time.monotonic() - t1
    assert set(served_by(balancer.url, 10)) == {"r1", "r2"}
    print(f"\nout of rotation after {out_s:.1f}s, back {back_s:.1f}s after SIGCONT")


def test_every_replica_judged_hung_still_serves_through_the_fallback(fleet):
    balancer, replicas = fleet
    for r in replicas.values():
        r.member.send_signal(signal.SIGSTOP)
    wait(lambda: all(balancer.servers()[n]["status"].startswith("DOWN") for n in replicas), 60, "both out")
    servers = balancer.servers()
    assert servers["r1-fallback"]["status"] == "UP" and servers["r2-fallback"]["status"] == "UP"
    assert set(served_by(balancer.url, 10)) <= {"r1", "r2"}, "the backups serve: no outage"
    for r in replicas.values():
        r.member.send_signal(signal.SIGCONT)
    wait(lambda: all(balancer.servers()[n]["status"] == "UP" for n in replicas), 60, "both back")


ENGINE_KEY = "engine-key-only-the-balancer-knows-0002"


def test_the_verdict_and_its_fallback_work_behind_the_front_door(tmp_path):
    """The lockdown's front door (TLS from the lab CA, tenant keys swapped for the engine key) and
    the verdict's agent-check and /health-only backups in one HAProxy: a tenant is served while
    both replicas are judged hung, a request without a key is still refused."""
    tls_port = free_port()
    balancer, replicas = start_fleet(
        tmp_path, api_key=ENGINE_KEY, loadbalancer_tls=True, loadbalancer_tls_port=tls_port,
        fleet_api_auth="on", fleet_api_key=ENGINE_KEY, loadbalancer_api_keys=[{"name": "team"}],
        loadbalancer_tls_names=["127.0.0.1"])
    try:
        secrets = tmp_path / "fleet-secrets" / "lbtest"
        key, ca = (secrets / "api-keys" / "team").read_text().strip(), str(secrets / "lab-ca" / "ca.crt")
        assert "agent-check" in balancer.config and "r1-fallback" in balancer.config

        def tenant_chat(with_key: bool = True) -> requests.Response:
            return requests.post(f"https://127.0.0.1:{tls_port}/v1/chat/completions", verify=ca, timeout=60,
                                 headers={"Authorization": f"Bearer {key}"} if with_key else {},
                                 json={"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}],
                                       "max_tokens": 4})

        for r in replicas.values():
            r.member.send_signal(signal.SIGSTOP)
        wait(lambda: all(balancer.servers()[n]["status"].startswith("DOWN") for n in replicas), 60, "both out")
        served = [tenant_chat() for _ in range(6)]
        assert all(r.status_code == 200 for r in served), [r.text for r in served]
        assert {r.headers["x-fake-backend"] for r in served} <= {"r1", "r2"}, "the backups serve: no outage"
        assert tenant_chat(with_key=False).status_code == 401
        # vLLM saw the engine's key, never the tenant's
        seen = [a for r in replicas.values() for a in r.api.auth_seen]
        assert seen and set(seen) == {f"Bearer {ENGINE_KEY}"}
    finally:
        for r in replicas.values():
            r.member.send_signal(signal.SIGCONT)
        stop_fleet(balancer, replicas)
