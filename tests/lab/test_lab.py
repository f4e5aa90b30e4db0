"""The lab itself: real hosts over SSH, two networks, systemd, and up/down behaviour."""
from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab
REPO = Path(__file__).resolve().parents[2]
LAB = [sys.executable, str(REPO / "tests" / "lab" / "lab.py")]


def test_at_least_three_hosts_reachable_over_ssh_with_sudo(lab):
    hosts = lab["hosts"]
    assert len(hosts) >= 3
    for name, host in hosts.items():
        assert host.run("hostname").stdout.strip() == name
        assert host.run("sudo -n id -u").stdout.strip() == "0"
        assert host.run("ps -p 1 -o comm=").stdout.strip() == "systemd"


def test_management_is_default_route_and_fabric_is_a_separate_subnet(lab):
    for host in lab["hosts"].values():
        default = host.run("ip -4 route show default").stdout.split()
        mgmt_nic = default[default.index("dev") + 1]
        out = host.run("ip -o -4 addr show to 172.28.0.0/16").stdout.splitlines()  # lab subnets only
        addrs = {line.split()[1]: ipaddress.ip_interface(line.split()[3]) for line in out}
        assert str(addrs[mgmt_nic].ip) == host.address, "the management address carries the default route"
        fabric = [nic for nic in addrs if nic != mgmt_nic]
        assert len(fabric) == 1
        assert addrs[fabric[0]].network != addrs[mgmt_nic].network


def test_fabric_nic_names_differ_between_hosts(lab):
    names = set()
    for host in lab["hosts"].values():
        out = host.run("ip -o -4 addr show to 172.28.0.0/16").stdout.splitlines()
        default_nic = host.run("ip -4 route show default").stdout.split()[4]
        names |= {line.split()[1] for line in out if line.split()[1] != default_nic}
    assert {"eth1", "fab0"} <= names


def test_inventory_has_two_replicas_a_balancer_and_monitoring(lab):
    groups, hostvars = lab["groups"], lab["inventory_vars"]["_meta"]["hostvars"]
    assert len(groups["fleet_head"]) == 2
    assert {hostvars[h]["fleet_replica"] for h in groups["fleet_head"]} == {"a", "b"}
    replica_a = [h for h in lab["serving"] if hostvars[h]["fleet_replica"] == "a"]
    assert len(replica_a) >= 2 and hostvars[groups["fleet_head"][0]]["fleet_pipeline_parallel_size"] == 2
    assert groups["fleet_monitoring"] and groups["fleet_loadbalancer"]


def test_second_lab_up_is_idempotent_and_down_removes_everything(tmp_path):
    """A separate small lab (own prefix and subnets) so the shared lab stays untouched."""
    env = dict(os.environ, FLEETLAB_PREFIX="fleetlabt", FLEETLAB_NET_INDEX="11", FLEETLAB_DIR=str(tmp_path))

    def lab_cmd(*args):
        return subprocess.run(LAB + list(args), env=env, capture_output=True, text=True, timeout=900)

    def ids():
        return subprocess.run(["docker", "ps", "-aq", "--filter", "name=^fleetlabt-node"],
                              capture_output=True, text=True, check=True).stdout.split()
    try:
        first = lab_cmd("up", "--hosts", "3")
        assert first.returncode == 0, first.stdout + first.stderr
        assert "lab up in" in first.stdout
        before = sorted(ids())
        assert len(before) == 3
        second = lab_cmd("up", "--hosts", "3")
        assert second.returncode == 0, second.stdout + second.stderr
        assert "creating" not in second.stdout
        assert sorted(ids()) == before
        assert lab_cmd("status").returncode == 0
        assert (tmp_path / "inventory.ini").read_text().count("ansible_host=172.28.11.") == 3
    finally:
        down = lab_cmd("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert ids() == []
    nets = subprocess.run(["docker", "network", "ls", "-q", "--filter", "name=fleetlabt-"],
                          capture_output=True, text=True, check=True).stdout.split()
    vols = [v for v in subprocess.run(["docker", "volume", "ls", "-q"], capture_output=True, text=True,
                                      check=True).stdout.split() if v.startswith("fleetlabt-")]
    assert nets == [] and vols == []
    assert not (tmp_path / "inventory.ini").exists()


def test_deploy_runs_over_ssh_on_every_host(deployed_lab):
    """The re-run (changed=0 while serving) is tests/lab/test_serve.py's."""
    first = deployed_lab["first_run"].recap()
    assert set(deployed_lab["hosts"]) <= set(first), "every lab host took part over SSH"
    assert all(r["unreachable"] == 0 and r["failed"] == 0 for r in first.values())
