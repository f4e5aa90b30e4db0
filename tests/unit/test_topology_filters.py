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


# --- a replica as this run sees it (fabric, ray_cluster, vllm_serve) and every head (loadbalancer) --

# The lab's layout with 4 hosts (tests/lab/lab.py inventory_text): replica a = node1 (head), node2,
# node3; replica b = node4 (head). fleet_serving lists fleet_head's hosts, then fleet_workers'.
LAB_GROUPS = {"fleet_head": ["node1", "node4"], "fleet_workers": ["node2", "node3"],
              "fleet_serving": ["node1", "node4", "node2", "node3"],
              "fleet_monitoring": ["node3"], "fleet_loadbalancer": ["node3"]}
LAB_REPLICA = {"node1": "a", "node2": "a", "node3": "a", "node4": "b"}


def lab_hostvars(key, ran=None):
    """Every lab host's vars after the role's first set_fact (key = its fleet_replica) on `ran`."""
    ran = LAB_GROUPS["fleet_serving"] if ran is None else ran
    return {h: dict({"inventory_hostname": h, "fleet_replica": r}, **({key: r} if h in ran else {}))
            for h, r in LAB_REPLICA.items()}


def test_run_replica_members_heads_and_order():
    hv = lab_hostvars("_k")
    play = LAB_GROUPS["fleet_serving"]
    assert t.fleet_run_replica(play, LAB_GROUPS, hv, "a", "_k") == {
        "members": ["node1", "node2", "node3"], "heads": ["node1"], "hosts": ["node1", "node2", "node3"]}
    assert t.fleet_run_replica(play, LAB_GROUPS, hv, "b", "_k") == {
        "members": ["node4"], "heads": ["node4"], "hosts": ["node4"]}
    # the order of the hosts given is kept; the head goes first in hosts
    assert t.fleet_run_replica(["node3", "node2", "node1"], LAB_GROUPS, hv, "a", "_k")["hosts"] == [
        "node1", "node3", "node2"]
    # --limit node2,node3: the head is not in this run
    limited = lab_hostvars("_k", ran=["node2", "node3"])
    assert t.fleet_run_replica(["node2", "node3"], LAB_GROUPS, limited, "a", "_k")["heads"] == []
    # a host that did not set the fact (not in the run, or failed before) and a name that is no host
    assert t.fleet_run_replica(play + ["nohost"], LAB_GROUPS, limited, "a", "_k")["members"] == ["node2", "node3"]
    # two heads in one replica: both named, in the order given
    two = dict(LAB_GROUPS, fleet_head=["node1", "node2", "node4"])
    assert t.fleet_run_replica(play, two, hv, "a", "_k")["heads"] == ["node1", "node2"]


def test_replica_heads_in_fleet_head_order():
    hv = lab_hostvars("_k")
    assert t.fleet_replica_heads(LAB_GROUPS, hv) == [{"name": "a", "head": "node1"}, {"name": "b", "head": "node4"}]
    assert t.fleet_replica_heads({"fleet_head": ["n5"]}, HV) == [{"name": "main", "head": "n5"}]
    assert t.fleet_replica_heads({}, HV) == []


# The Jinja each role computed this with before the filters (main before issue 19), evaluated with
# Jinja and Ansible's own filters on the lab layout: the filters give the same values.
OLD_JINJA = {
    "fabric_head": """{{ groups['fleet_head'] | default([])
         | select('in', hostvars) | map('extract', hostvars)
         | selectattr('_fabric_replica', 'defined')
         | selectattr('_fabric_replica', 'equalto', fleet_replica)
         | map(attribute='inventory_hostname') | list }}""",
    "ray_head": """{{ groups['fleet_head'] | default([]) | select('in', ansible_play_hosts)
         | map('extract', hostvars) | selectattr('_ray_cluster_replica', 'defined')
         | selectattr('_ray_cluster_replica', 'equalto', fleet_replica)
         | map(attribute='inventory_hostname') | list }}""",
    "ray_members": """{{ ansible_play_hosts | map('extract', hostvars) | selectattr('_ray_cluster_replica', 'defined')
         | selectattr('_ray_cluster_replica', 'equalto', fleet_replica)
         | map(attribute='inventory_hostname') | list }}""",
    "serve_members": """{{ ansible_play_hosts | map('extract', hostvars) | selectattr('_vllm_serve_replica', 'defined')
      | selectattr('_vllm_serve_replica', 'equalto', fleet_replica) | map(attribute='inventory_hostname') | list }}""",
    "lb_heads": """{%- set ns = namespace(out=[]) -%}
  {%- for head in groups.get('fleet_head', []) -%}
  {%-   set hv = hostvars[head] -%}
  {%-   set ns.out = ns.out + [{'name': hv.fleet_replica | default('main'), 'head': head}] -%}
  {%- endfor -%}
  {{ ns.out | sort(attribute='name') }}""",
}


def old_jinja(name, **variables):
    import ast

    import jinja2
    from ansible.plugins.filter.core import FilterModule as CoreFilters
    env = jinja2.Environment()
    env.filters.update(CoreFilters().filters())
    return ast.literal_eval(env.from_string(OLD_JINJA[name]).render(**variables).strip())


@pytest.mark.parametrize("play", [["node1", "node4", "node2", "node3"],  # deploy.yml (hosts: fleet_serving)
                                  ["node1", "node2", "node3"],  # a rolling restart batch: replica a
                                  ["node2", "node3"],  # --limit without the head
                                  ["node4", "node1", "node3"]])  # a host that failed or was left out
def test_filters_give_what_the_roles_jinja_gave_on_the_lab(play):
    for replica in ("a", "b"):
        fabric_hv = lab_hostvars("_fabric_replica", ran=play)
        assert (t.fleet_run_replica(LAB_GROUPS["fleet_head"], LAB_GROUPS, fabric_hv, replica, "_fabric_replica")["heads"]
                == old_jinja("fabric_head", groups=LAB_GROUPS, hostvars=fabric_hv, fleet_replica=replica))
        ray_hv = lab_hostvars("_ray_cluster_replica", ran=play)
        run = t.fleet_run_replica(play, LAB_GROUPS, ray_hv, replica, "_ray_cluster_replica")
        old_head = old_jinja("ray_head", groups=LAB_GROUPS, hostvars=ray_hv, fleet_replica=replica,
                             ansible_play_hosts=play)
        # the role uses the heads' count, and the head when there is exactly one
        assert (len(run["heads"]), run["heads"][:1]) == (len(old_head), old_head[:1])
        assert run["members"] == old_jinja("ray_members", hostvars=ray_hv, fleet_replica=replica,
                                           ansible_play_hosts=play)
        serve_hv = lab_hostvars("_vllm_serve_replica", ran=play)
        run = t.fleet_run_replica(play, LAB_GROUPS, serve_hv, replica, "_vllm_serve_replica")
        members = old_jinja("serve_members", hostvars=serve_hv, fleet_replica=replica, ansible_play_hosts=play)
        heads = [h for h in members if h in LAB_GROUPS["fleet_head"]]
        assert run["heads"] == heads
        assert run["hosts"] == heads + [h for h in members if h not in heads]
    lab_hv = lab_hostvars("_k")
    # roles/loadbalancer/vars/main.yml sorts the servers by name, as it did
    assert sorted(t.fleet_replica_heads(LAB_GROUPS, lab_hv), key=lambda r: r["name"]) == old_jinja(
        "lb_heads", groups=LAB_GROUPS, hostvars=lab_hv)
