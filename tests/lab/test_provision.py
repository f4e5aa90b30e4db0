"""Provision + fabric stages for real on the lab (issue 3).

Needs `python3 tests/lab/lab.py up`. After the session's deploy.yml, runs `deploy.yml --tags
provision,fabric` again (it must report changed=0), then checks on each host: a Docker engine
inside it, our daemon.json keys, and fabric settings whose interface is the one routing to its
replica's head (fab0 on node3).
"""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.lab.conftest import REPO, run_playbook

pytestmark = pytest.mark.lab

TAGS = ("--tags", "provision,fabric")


@pytest.fixture(scope="session")
def provisioned(deployed_lab):
    """The session's deploy.yml provisioned the hosts; running these two stages again is the
    second run that must change nothing."""
    second = run_playbook("deploy.yml", *TAGS, timeout=1800)
    assert second.rc == 0, second.output[-20000:]
    return dict(deployed_lab, second=second)


def serving(lab):
    return [lab["hosts"][n] for n in lab["groups"]["fleet_head"] + lab["groups"]["fleet_workers"]]


def sudo_read(host, path):
    return host.run("sudo cat %s" % path).stdout


def test_second_run_reports_changed_zero(provisioned):
    recap = provisioned["second"].recap()
    assert set(recap) >= set(provisioned["hosts"]), recap
    assert provisioned["second"].changed_total() == 0, {h: r["changed"] for h, r in recap.items()}
    assert all(r["failed"] == 0 and r["unreachable"] == 0 for r in recap.values())


def test_check_mode_run_changes_nothing(provisioned):
    run = run_playbook("deploy.yml", *TAGS, "--check")
    assert run.rc == 0, run.output[-20000:]
    assert run.changed_total() == 0


def test_gpu_less_hosts_skip_the_driver_with_one_line(provisioned):
    out = provisioned["second"].output
    for name in provisioned["groups"]["fleet_head"] + provisioned["groups"]["fleet_workers"]:
        assert out.count("%s: fleet_gpu_less=true: no NVIDIA driver" % name) == 1


def test_docker_engine_runs_inside_every_host_with_our_daemon_json(provisioned):
    for host in provisioned["hosts"].values():
        version = host.run("sudo docker version --format '{{.Server.Version}}'").stdout.strip()
        assert version, host.name
        daemon = json.loads(sudo_read(host, "/etc/docker/daemon.json"))
        assert daemon["live-restore"] is True
        assert daemon["log-driver"] == "json-file"
        assert daemon["log-opts"] == {"max-size": "100m", "max-file": "5"}
        assert "runtimes" not in daemon  # GPU-less lab hosts: no nvidia runtime
        assert host.run("sudo systemctl is-enabled docker").stdout.strip() == "enabled"


def test_fabric_nic_is_chosen_by_route_to_the_head(provisioned):
    hosts, hostvars = provisioned["hosts"], provisioned["inventory_vars"]["_meta"]["hostvars"]
    head_ip_of = {}
    for name in provisioned["groups"]["fleet_head"]:
        head_fabric = json.loads(sudo_read(hosts[name], "/etc/vllm-fleet/fabric.json"))
        assert head_fabric["role"] == "head" and head_fabric["interface"] == "eth1"  # fleet_fabric_interface
        assert head_fabric["address"].startswith("172.28.20.")
        default_dev = hosts[name].run("ip -4 route show default").stdout.split("dev ")[1].split()[0]
        assert default_dev != head_fabric["interface"]
        head_ip_of[hostvars[name].get("fleet_replica", "main")] = head_fabric["address"]

    workers = []
    for host in serving(provisioned):
        head_ip = head_ip_of[hostvars[host.name].get("fleet_replica", "main")]
        fabric = json.loads(sudo_read(host, "/etc/vllm-fleet/fabric.json"))
        route = host.run("ip route get %s" % head_ip).stdout.split()
        routed_dev = route[route.index("dev") + 1]
        if fabric["role"] == "worker":  # heads: fleet_fabric_interface, checked above
            workers.append(host.name)
            assert fabric["interface"] == routed_dev, (host.name, fabric, route)
            assert "via" not in route
        assert fabric["address"].startswith("172.28.20."), (host.name, fabric)
        assert fabric["head_address"] == head_ip
        env_lines = sudo_read(host, "/etc/vllm-fleet/fabric.env").splitlines()[1:]
        assert env_lines == [
            "NCCL_SOCKET_IFNAME==%s" % fabric["interface"], "GLOO_SOCKET_IFNAME=%s" % fabric["interface"],
            "VLLM_HOST_IP=%s" % fabric["address"], "FLEET_RAY_NODE_IP=%s" % fabric["address"],
            "NCCL_IB_DISABLE=1"], host.name
        nccl = sudo_read(host, "/etc/nccl.conf").splitlines()[1:]
        assert nccl == ["NCCL_SOCKET_IFNAME==%s" % fabric["interface"], "NCCL_IB_DISABLE=1"]

    assert set(workers) == set(provisioned["groups"].get("fleet_workers", [])) and workers, workers
    renamed = json.loads(sudo_read(hosts["node3"], "/etc/vllm-fleet/fabric.json"))
    assert renamed["interface"] == "fab0", renamed  # the renamed NIC, found by route


def test_run_summary_shows_each_hosts_fabric(provisioned):
    out = provisioned["second"].output
    for host in serving(provisioned):
        assert "'%s (" % host.name in out and "-> head 172.28.20." in out


def test_route_via_the_management_gateway_is_refused_on_a_real_host(provisioned):
    """A head address only reachable through the default (management) gateway must fail by name."""
    worker = provisioned["groups"]["fleet_workers"][0]
    head = {"address": "172.28.99.1", "env": {"NCCL_IB_DISABLE": "1"}}
    args = json.dumps({"host": worker, "role": "worker", "head_host": "node1", "head": head})
    proc = subprocess.run(["ansible", "-i", str(provisioned["inventory"]), worker, "-m", "fleet_fabric_facts",
                           "-a", args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "host %s:" % worker in proc.stdout and "default gateway" in proc.stdout, proc.stdout


def test_daemon_json_merge_keeps_foreign_keys_and_restarts_only_on_change(provisioned):
    """Someone else's key survives; one of ours drifted is put back (one engine restart, with
    live-restore so running containers survive); the run after that changes nothing."""
    name = provisioned["groups"]["fleet_workers"][-1]
    host = provisioned["hosts"][name]
    daemon = json.loads(sudo_read(host, "/etc/docker/daemon.json"))
    daemon["labels"] = ["fleetlab.owner=someone-else"]
    daemon["log-opts"]["max-file"] = "2"  # drift in one of our keys
    host.run("echo '%s' | sudo tee /etc/docker/daemon.json >/dev/null" % json.dumps(daemon))
    started = host.run("sudo docker inspect -f '{{.State.StartedAt}}' $(sudo docker ps -q) 2>/dev/null || true").stdout
    run = run_playbook("ansible/playbooks/10_provision.yml", "--limit", name)
    assert run.rc == 0, run.output[-20000:]
    assert run.recap()[name]["changed"] == 2, run.output[-5000:]  # daemon.json + the engine restart
    assert "RUNNING HANDLER [container_runtime : Restart docker engine]" in run.output
    merged = json.loads(sudo_read(host, "/etc/docker/daemon.json"))
    assert merged["labels"] == ["fleetlab.owner=someone-else"]
    assert merged["log-opts"]["max-file"] == "5"
    after = host.run("sudo docker inspect -f '{{.State.StartedAt}}' $(sudo docker ps -q) 2>/dev/null || true").stdout
    assert after == started  # live-restore: containers were not restarted
    again = run_playbook("ansible/playbooks/10_provision.yml", "--limit", name)
    assert again.rc == 0 and again.recap()[name]["changed"] == 0
    # leave the file as we found it (a key that is not ours: no restart needed or done)
    merged.pop("labels")
    host.run("echo '%s' | sudo tee /etc/docker/daemon.json >/dev/null" % json.dumps(merged, indent=2))
