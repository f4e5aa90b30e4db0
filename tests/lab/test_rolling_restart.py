"""Rolling restart, day-2 playbooks and fail-fast on the lab.

Needs a lab with TWO replicas and a balancer: the default `python3 tests/lab/lab.py up` (4 hosts)
makes one:
  fleet_head:         node1 (fleet_replica=a), node4 (fleet_replica=b, TP=2)
  fleet_workers:      node2, node3 (a)          -- any split works, every replica whole
  fleet_loadbalancer: node3 (a serving host is fine when loadbalancer_frontend_port is free there)
Fails (does not skip) when the lab has another layout, so a wrong lab never passes as green.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.lab.conftest import INVENTORY, REPO, front_door, run_playbook

# The whole module is day-2 (make test-day2); the rolling restart under load also runs in the lab
# tier, i.e. in `make test` and CI (README: Tests).
pytestmark = pytest.mark.day2
LOADGEN = REPO / "tools" / "loadgen.py"


@pytest.fixture(scope="module")
def fleet(deployed_lab):
    inv = deployed_lab["inventory_vars"]
    hostvars = inv["_meta"]["hostvars"]
    heads = inv.get("fleet_head", {}).get("hosts", [])
    balancers = inv.get("fleet_loadbalancer", {}).get("hosts", [])
    if len(heads) < 2 or not balancers:
        pytest.fail(f"this test needs 2 replicas and a balancer in {INVENTORY} (has heads {heads}, balancers "
                    f"{balancers}); see this file's docstring for the layout")
    serving = heads + inv.get("fleet_workers", {}).get("hosts", [])
    replicas: dict[str, list[str]] = {}
    for h in serving:
        replicas.setdefault(hostvars[h].get("fleet_replica", "main"), []).append(h)
    head_of = {hostvars[h].get("fleet_replica", "main"): h for h in heads}
    lb = balancers[0]
    deployment = hostvars[heads[0]].get("fleet_deployment", "vllm-fleet")
    door = front_door(deployed_lab)  # https with the lab CA, the "lab" tenant's key file
    return dict(deployed_lab, replicas=replicas, head_of=head_of, lb=lb, url=door["url"], door=door,
                deployment=deployment, model=hostvars[heads[0]].get("fleet_served_model_name", ""))


def haproxy_servers(fleet) -> dict[str, str]:
    """replica -> HAProxy status (UP, MAINT, DRAIN, DOWN ...) on the first balancer."""
    out = fleet["hosts"][fleet["lb"]].run(
        "echo 'show stat' | sudo socat stdio /run/haproxy/admin.sock").stdout.splitlines()
    cols = out[0][2:].split(",")
    rows = [dict(zip(cols, line.split(","))) for line in out[1:] if line]
    return {r["svname"]: r["status"] for r in rows if r["pxname"] == "vllm" and r["svname"] not in ("FRONTEND",
                                                                                                      "BACKEND")}


def vllm_started_at(fleet, replica: str) -> str:
    host = fleet["hosts"][fleet["head_of"][replica]]
    return host.run(f"sudo docker inspect -f '{{{{.State.StartedAt}}}}' {fleet['deployment']}-vllm").stdout.strip()


def start_load(fleet, tmp_path: Path, name: str, duration: float = 1800) -> tuple[subprocess.Popen, Path]:
    """Steady, light load through the balancer (the same as the benchmark's). Light on purpose: on
    the 2-core lab machine a busy replica starves the restarting one (its Ray head must register
    within Ray's fixed 30 s); the point here is that no request fails, not throughput."""
    out = tmp_path / f"{name}.json"
    door = fleet["door"]
    proc = subprocess.Popen([sys.executable, str(LOADGEN), "--base-url", fleet["url"], "--model", fleet["model"],
                             "--api-key-file", door["key_file"], "--ca-file", door["ca_file"],
                             "--requests", "100000", "--duration", str(duration), "--concurrency", "1",
                             "--think-time", "1", "--max-tokens", "8", "--timeout", "120", "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, out


# (load, clients, think time, p99 gate): the light load also runs in the lab tier (make test, CI);
# the heavy one, issue 14's "3 concurrent clients with no think time" (the load a heal relaunches
# under), in make test-day2. Only the heavy run gates p99 during / before (issue 14's <= 2x): at one
# client with 1 s pauses a minute holds ~40 requests, so its p99 is its slowest request, and while
# one replica's engines start on the same 2 cores as the other's, that ratio measures the lab's
# shared CPU and CI's background load (2.21x seen in CI, 1.74x on an idle machine). The light run
# prints the ratio and keeps it in its JSON; the claim it proves is its name's.
LOADS = [pytest.param("light", 1, 1, 0, id="light", marks=pytest.mark.lab),
         pytest.param("heavy", 3, 0, 2, id="heavy")]


@pytest.mark.parametrize("load,clients,think_time,max_p99_ratio", LOADS)
def test_rolling_restart_under_load_has_zero_failed_requests(fleet, load, clients, think_time, max_p99_ratio):
    """benchmarks/rolling_restart.py: the load alone, then during rolling_restart.yml; it exits 1
    on a failed playbook, any failed request, or (heavy load) p99 during / before above 2x. Its
    figures and the playbook's log stay in build/day2/ (docs/benchmarks/ records a run)."""
    before = {r: vllm_started_at(fleet, r) for r in fleet["replicas"]}
    out = REPO / "build" / "day2"
    out.mkdir(parents=True, exist_ok=True)
    name = "rolling-restart" if load == "light" else f"rolling-restart-{load}"
    bench = subprocess.run([sys.executable, str(REPO / "benchmarks" / "rolling_restart.py"), "-i", str(INVENTORY),
                            "--concurrency", str(clients), "--think-time", str(think_time), "--before", "60",
                            "--max-p99-ratio", str(max_p99_ratio), "--json", str(out / f"{name}.json"),
                            "--playbook-log", str(out / f"{name}-playbook.log")],
                           cwd=REPO, capture_output=True, text=True, timeout=4000)
    (out / f"{name}-bench.txt").write_text(bench.stdout + bench.stderr)
    assert bench.returncode == 0, bench.stdout[-6000:] + bench.stderr[-3000:]
    result = json.loads((out / f"{name}.json").read_text())
    assert result["during"]["failed"] == 0 and result["during"]["ok"] > 0
    assert result["p99_ratio"] is not None, "no p99 before or during: nothing was measured"
    if max_p99_ratio:
        assert result["p99_ratio"] <= max_p99_ratio
    for replica in fleet["replicas"]:
        assert vllm_started_at(fleet, replica) != before[replica], f"replica {replica} was not restarted"
    assert set(haproxy_servers(fleet).values()) == {"UP"}


def test_limit_restarts_only_the_replicas_it_covers(fleet):
    first, second = sorted(fleet["replicas"])[:2]
    before = {r: vllm_started_at(fleet, r) for r in (first, second)}
    run = run_playbook("rolling_restart.yml", "--limit", ",".join(fleet["replicas"][second]), timeout=3600)
    assert run.rc == 0, run.output[-20000:]
    assert vllm_started_at(fleet, first) == before[first]
    assert vllm_started_at(fleet, second) != before[second]


def test_limit_to_part_of_a_replica_is_refused_and_restarts_nothing(fleet):
    """--limit naming only the head of a multi-host replica (the default lab's replica a: node1-3)."""
    multi = [r for r, members in sorted(fleet["replicas"].items()) if len(members) > 1]
    assert multi, f"this test needs a replica of several hosts: {fleet['replicas']} (see the docstring)"
    replica = multi[0]
    before = vllm_started_at(fleet, replica)
    partial = run_playbook("rolling_restart.yml", "--limit", fleet["head_of"][replica], timeout=600)
    assert partial.rc != 0 and "a replica restarts as a whole" in partial.output, partial.output[-5000:]
    assert vllm_started_at(fleet, replica) == before
    assert set(haproxy_servers(fleet).values()) == {"UP"}, "nothing was drained"


def test_failed_gate_keeps_the_replica_out_while_the_others_serve(fleet, tmp_path):
    first = sorted(fleet["replicas"])[0]
    failed = run_playbook("rolling_restart.yml", "-e", f"rolling_restart_replicas={first}",
                          "-e", "rolling_restart_canary_model=no-such-model", "-e", "rolling_restart_canary_retries=1",
                          timeout=3600)
    assert failed.rc != 0
    assert f"replica {first} failed and is kept out of the balancer (maint)" in failed.output
    servers = haproxy_servers(fleet)
    assert servers[first] == "MAINT" and servers[f"{first}-fallback"] == "MAINT", "its backup entry too"
    assert all(status == "UP" for name, status in servers.items() if not name.startswith(first))
    load, out = start_load(fleet, tmp_path, "degraded", duration=20)
    load.wait(timeout=300)
    assert json.loads(out.read_text())["failed"] == 0, "the other replicas keep serving"
    # deploy.yml repairs it: its serve stage smoke-tests the replica, its loadbalancer stage puts it back.
    fixed = run_playbook("deploy.yml", "--tags", "serve,loadbalancer", timeout=3600)
    assert fixed.rc == 0, fixed.output[-20000:]
    assert set(haproxy_servers(fleet).values()) == {"UP"}


def test_status_reports_every_host_with_one_image_and_model_per_replica(fleet, tmp_path):
    out = tmp_path / "status.json"
    run = run_playbook("status.yml", "-e", f"status_json={out}", timeout=600)
    assert run.rc == 0, run.output[-10000:]
    hosts = {h["host"]: h for h in json.loads(out.read_text())}
    for replica, members in fleet["replicas"].items():
        assert len({hosts[m]["image_id"] for m in members}) == 1
        assert len({hosts[m]["model_hash"] for m in members}) == 1 and hosts[members[0]]["model_hash"]
        assert hosts[fleet["head_of"][replica]]["health"] == 200
        assert any(c["component"] == "vllm" for c in hosts[fleet["head_of"][replica]]["containers"])
    assert "same on every host" in run.output


def test_collect_logs_writes_one_tarball_with_every_host(fleet, tmp_path):
    run = run_playbook("collect_logs.yml", "-e", f"collect_logs_dest={tmp_path}", timeout=900)
    assert run.rc == 0, run.output[-10000:]
    tarballs = list(tmp_path.glob("vllm-fleet-logs-*.tar.gz"))
    assert len(tarballs) == 1 and str(tarballs[0]) in run.output
    names = tarfile.open(tarballs[0]).getnames()
    for host in fleet["hosts"]:
        assert any(f"/{host}/kernel/dmesg.txt" in n for n in names)
    assert any(n.endswith(f"{fleet['deployment']}-vllm.log") for n in names)


def test_unreachable_host_fails_fast_and_is_named(fleet, tmp_path):
    worker = next(h for members in fleet["replicas"].values() for h in members if h not in fleet["head_of"].values())
    text = INVENTORY.read_text()
    address = fleet["hosts"][worker].address
    broken = tmp_path / "inventory.ini"
    broken.write_text(text.replace(f"ansible_host={address}", "ansible_host=172.28.10.250", 1))
    started = time.monotonic()
    run = run_playbook("rolling_restart.yml", inventory=broken, timeout=300)
    assert run.rc != 0
    assert time.monotonic() - started < 120
    assert worker in run.output and "UNREACHABLE" in run.output
    assert set(haproxy_servers(fleet).values()) == {"UP"}, "nothing was drained"


def test_teardown_needs_the_deployment_name_and_check_mode_changes_nothing(fleet):
    refused = run_playbook("teardown.yml", timeout=600)
    assert refused.rc != 0 and f"teardown_confirm={fleet['deployment']}" in refused.output
    before = {r: vllm_started_at(fleet, r) for r in fleet["replicas"]}
    checked = run_playbook("teardown.yml", "--check", "-e", f"teardown_confirm={fleet['deployment']}", timeout=600)
    assert checked.rc == 0, checked.output[-10000:]
    assert {r: vllm_started_at(fleet, r) for r in fleet["replicas"]} == before
    assert set(haproxy_servers(fleet).values()) == {"UP"}
