"""fleet_rolling_restart_plan (ansible/plugins/filter/fleet_topology.py): what rolling_restart.yml
restarts, head first, in which batches, and why a selection is refused (pure Python)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ansible/plugins/filter"))
import fleet_topology as t  # noqa: E402

# Three replicas behind a balancer; r1 and r2 span two hosts each (r1's worker w1 is listed before
# its head in fleet_serving: the plan still restarts the head first).
GROUPS = {"fleet_head": ["h1", "h2", "h3"], "fleet_workers": ["w1", "w2"],
          "fleet_serving": ["w1", "h1", "h2", "w2", "h3"], "fleet_loadbalancer": ["lb"]}
HV = {"h1": {"fleet_replica": "r1"}, "w1": {"fleet_replica": "r1"},
      "h2": {"fleet_replica": "r2"}, "w2": {"fleet_replica": "r2"},
      "h3": {"fleet_replica": "r3"}}
ALL = GROUPS["fleet_serving"]


def plan(play_hosts=ALL, groups=GROUPS, **kw):
    return t.fleet_rolling_restart_plan(groups, HV, play_hosts, **kw)


def test_every_replica_head_first_one_at_a_time():
    p = plan()
    assert p["problems"] == []
    assert p["replicas"] == [{"name": "r1", "head": "h1", "hosts": ["h1", "w1"]},
                             {"name": "r2", "head": "h2", "hosts": ["h2", "w2"]},
                             {"name": "r3", "head": "h3", "hosts": ["h3"]}]
    assert p["all_replicas"] == ["r1", "r2", "r3"]
    assert p["batches"] == [["r1"], ["r2"], ["r3"]]
    assert p["serial"] == [2, 2, 1], "hosts per batch"


def test_batch_sizes_sum_the_hosts_of_each_batch():
    p = plan(batch=2)
    assert p["batches"] == [["r1", "r2"], ["r3"]] and p["serial"] == [4, 1] and p["problems"] == []
    assert plan(batch="2")["serial"] == [4, 1], "-e rolling_restart_batch=2 is a string"


@pytest.mark.parametrize("replicas", [["r3", "r1"], "r3, r1", "r1,r3,", [" r1", "", "r3"]])
def test_a_subset_as_a_list_or_a_comma_separated_string(replicas):
    p = plan(replicas=replicas)
    assert [r["name"] for r in p["replicas"]] == ["r1", "r3"] and p["problems"] == []
    assert p["serial"] == [2, 1]


def test_an_unknown_replica_is_named_with_the_replicas_there_are():
    p = plan(replicas="r1,r9")
    assert p["problems"] == ["rolling_restart_replicas names r9, which is no replica (replicas: r1, r2, r3)"]


def test_a_limit_covering_part_of_a_replica_is_refused():
    p = plan(play_hosts=["w1", "h3"])
    assert p["problems"] == ["--limit covers part of replica r1 but not h1: a replica restarts as a whole; "
                             "add its hosts or use -e rolling_restart_replicas=r1"]


def test_a_limit_covering_whole_replicas_selects_them_only():
    p = plan(play_hosts=["h2", "w2"])
    assert [r["name"] for r in p["replicas"]] == ["r2"] and p["problems"] == []
    assert plan(play_hosts=["h2", "w2"], replicas="r1")["problems"] == ["no replica selected"]


def test_a_batch_that_takes_out_every_replica_behind_a_balancer_is_refused():
    p = plan(batch=3)
    assert p["problems"] == ["rolling_restart_batch=3 would take out all 3 replica(s) at once; lower it or set "
                             "rolling_restart_allow_full_outage to true "
                             "(-e '{\"rolling_restart_allow_full_outage\": true}')"]
    assert plan(batch=3, allow_full_outage=True)["problems"] == []
    no_balancer = {k: v for k, v in GROUPS.items() if k != "fleet_loadbalancer"}
    assert plan(batch=3, groups=no_balancer)["problems"] == [], "no balancer: nothing to keep serving through"
    assert plan(batch=0, allow_full_outage=True)["problems"][0].startswith("rolling_restart_batch=0 ")


def test_no_fleet_replica_is_the_replica_main():
    groups = {"fleet_head": ["a"], "fleet_workers": ["b"], "fleet_serving": ["b", "a"]}
    p = t.fleet_rolling_restart_plan(groups, {"a": {}, "b": {"fleet_replica": ""}}, ["a", "b"])
    assert p["replicas"] == [{"name": "main", "head": "a", "hosts": ["a", "b"]}] and p["serial"] == [2]


def test_the_role_names_its_own_facts_with_an_underscore():
    """Every rolling_restart_* name the role's tasks set (set_fact, register, loop_var, task vars) is
    a setting of its defaults; its own facts are _rolling_restart_*, which the validator never
    takes for a (misspelled) setting."""
    import re

    import yaml

    role = Path(__file__).resolve().parents[2] / "roles/rolling_restart"
    settings = set(yaml.safe_load((role / "defaults/main.yml").read_text()))
    specs = yaml.safe_load((role / "meta/argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    assert set(specs) == settings, "one spec per default"
    set_here = set()
    for path in (role / "tasks").glob("*.yml"):
        text = path.read_text()
        set_here |= set(re.findall(r"(?:register|loop_var):\s*(rolling_restart_\w+)", text))
        set_here |= set(re.findall(r"^\s+(rolling_restart_\w+):", text, re.M))
    assert set_here <= settings, sorted(set_here - settings)
