"""The replica verdict on the deployed lab (real engines, real HAProxy, real exporters).

Every replica is judged healthy with its own launch; HAProxy asks each head's exporter (agent-check)
and has a /health-only backup entry per replica. A TP worker stopped with SIGSTOP takes its replica
out of rotation within seconds while vLLM's /health stays 200, status.yml names the stopped process,
and SIGCONT brings the replica back with nobody acting. The replica's alerts are silenced in the
lab's Alertmanager meanwhile (as an operator who investigates would): the healer must not relaunch
it under this test. (Healing, alerts and every hang mode under
load: tests/lab/test_hang.py, day 2.)
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from tests.lab.conftest import am_silence, am_unsilence, run_playbook

pytestmark = pytest.mark.lab


def verdict(address: str, port: int = 9445) -> dict:
    try:
        # 30 s: one answer of a busy exporter, not a latency bound (that is the out-of-rotation time)
        with urllib.request.urlopen(f"http://{address}:{port}/verdict", timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def servers(lab) -> dict[str, str]:
    lb = lab["groups"]["fleet_loadbalancer"][0]
    out = lab["hosts"][lb].run("echo 'show stat' | sudo socat stdio /run/haproxy/admin.sock").stdout.splitlines()
    cols = out[0][2:].split(",")
    rows = [dict(zip(cols, line.split(","))) for line in out[1:] if line]
    return {r["svname"]: r["status"] for r in rows if r["pxname"] == "vllm" and r["svname"] not in
            ("FRONTEND", "BACKEND")}


def wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout}s (last {last!r})")


@pytest.fixture(scope="module")
def replicas(deployed_lab):
    hv = deployed_lab["inventory_vars"]["_meta"]["hostvars"]
    heads = deployed_lab["groups"]["fleet_head"]
    return {hv[h]["fleet_replica"]: (h, hv[h]["ansible_host"]) for h in heads}


def test_every_replica_is_healthy_and_the_balancer_asks_its_verdict(deployed_lab, replicas):
    for name, (head, address) in replicas.items():
        v = wait(lambda: verdict(address)["state"] == "healthy" and verdict(address), 300, f"{name} healthy")
        assert v["problems"] == [] and v["launch_id"].startswith("fleetlab-")
        assert v["host_verdict"]["state"] == "healthy"
    cfg = deployed_lab["hosts"][deployed_lab["groups"]["fleet_loadbalancer"][0]].run(
        "sudo cat /etc/haproxy/haproxy.cfg").stdout
    for name, (_, address) in replicas.items():
        assert f"server {name} {address}:8009 agent-check agent-port 9446 agent-inter 1s" in cfg
        assert f"server {name}-fallback {address}:8009 backup" in cfg
    assert wait(lambda: all(st == "UP" for st in servers(deployed_lab).values()), 120, "all UP")


def test_a_stopped_worker_takes_its_replica_out_and_status_names_it(deployed_lab, replicas):
    name, (head, address) = next((n, r) for n, r in replicas.items()
                                 if int(deployed_lab["inventory_vars"]["_meta"]["hostvars"][r[0]]
                                        .get("fleet_tensor_parallel_size", 1)) > 1)
    host = deployed_lab["hosts"][head]
    wait(lambda: servers(deployed_lab)[name] == "UP", 300, f"{name} UP")
    pid = host.run("pgrep -f '^VLLM::Worker_TP1'").stdout.split()[0]
    am_url, silence_id = am_silence(deployed_lab, {"replica": name, "fleet_deployment": deployed_lab["deployment"]},
                                    "the verdict test stops a worker on purpose", minutes=15)
    t0 = time.monotonic()
    host.run(f"sudo kill -STOP {pid}")
    try:
        wait(lambda: servers(deployed_lab)[name].startswith("DOWN"), 60, f"{name} out of rotation")
        out_s = time.monotonic() - t0
        v = verdict(address)
        assert v["state"] == "unhealthy" and "member_stopped" in {p["reason"] for p in v["problems"]}
        lb = deployed_lab["hosts"][deployed_lab["groups"]["fleet_loadbalancer"][0]]  # where HAProxy asks from
        health = lb.run("python3 -c 'import sys, urllib.request; "
                        f"print(urllib.request.urlopen(\"http://{address}:8009/health\", timeout=10).status)'").stdout
        assert health.strip() == "200", "vLLM's own /health still says all is well"
        assert servers(deployed_lab)[f"{name}-fallback"] == "UP", "its backup entry is only for all-hung"
        status = run_playbook("status.yml", "--limit", ",".join([head] + deployed_lab["groups"]["fleet_loadbalancer"]),
                              timeout=600)
        assert status.rc == 0, status.output[-6000:]
        assert "verdict unhealthy" in status.output and "is stopped" in status.output
        print(f"\nreplica {name} out of rotation {out_s:.1f}s after SIGSTOP")
    finally:
        host.run(f"sudo kill -CONT {pid}", check=False)
        am_unsilence(am_url, silence_id)  # the replica is running again: its rule's 10 s `for` resets
    wait(lambda: servers(deployed_lab)[name] == "UP", 120, f"{name} back UP after SIGCONT")
    wait(lambda: verdict(address)["state"] == "healthy", 60, f"{name} healthy after SIGCONT")
