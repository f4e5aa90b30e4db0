"""ansible/plugins/filter/fleet_topology.py: replica membership, head, engine hosts, addresses."""

import sys
from pathlib import Path

import pytest
from ansible.errors import AnsibleFilterError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ansible/plugins/filter"))
import fleet_topology as t  # noqa: E402

GROUPS = {"fleet_head": ["n1", "n4"], "fleet_workers": ["n2", "n3", "n5"],
          "fleet_serving": ["n1", "n4", "n2", "n3", "n5"], "fleet_monitoring": ["n3"]}
HV = {"n1": {"fleet_replica": "a", "ansible_host": "10.0.0.1"},
      "n2": {"fleet_replica": "a", "ansible_host": "10.0.0.2",
             "ansible_facts": {"default_ipv4": {"address": "192.168.0.2"}}},
      "n3": {"fleet_replica": "a", "exporter_listen_address": "fd00::3"},
      "n4": {"fleet_replica": "b"}, "n5": {}}


def test_replica_hosts_head_first_in_inventory_order():
    assert t.fleet_replica_hosts(GROUPS, HV, "a") == ["n1", "n2", "n3"]
    assert t.fleet_replica_hosts(GROUPS, HV, "main") == ["n5"], "no fleet_replica: main"
    assert t.fleet_replica_head(GROUPS, HV, "b") == "n4"


def test_a_replica_without_exactly_one_head_is_named():
    with pytest.raises(AnsibleFilterError, match="replica 'main' has 0 heads"):
        t.fleet_replica_head(GROUPS, HV, "main")


def test_engine_hosts_cpu_stages_or_every_cuda_host():
    assert t.fleet_engine_hosts(GROUPS, HV, "a", "cpu", 2) == ["n1", "n2"]
    assert t.fleet_engine_hosts(GROUPS, HV, "a", "cuda", 2) == ["n1", "n2", "n3"]


def test_addresses():
    assert t.fleet_exporter_url("n2", HV, 9445) == "http://192.168.0.2:9445", "facts first"
    assert t.fleet_exporter_url("n1", HV, 9445) == "http://10.0.0.1:9445"
    assert t.fleet_exporter_url("n3", HV, 9445) == "http://[fd00::3]:9445"
    assert t.fleet_host_address(dict(HV["n4"], inventory_hostname="n4")) == "n4"
    assert t.fleet_healer_host(GROUPS) == "n3"
    assert t.fleet_healer_host(dict(GROUPS, fleet_healer=["n9"])) == "n9"
    assert t.fleet_healer_host({}) == ""
