"""The healer's decision rule (ansible/plugins/filter/fleet_healing.py) on values."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ansible/plugins/filter"))
from fleet_healing import fleet_heal_decision  # noqa: E402

HUNG = {"state": "unhealthy", "problems": [{"reason": "member_stopped",
                                            "detail": "node2: process 7 is stopped"}]}


@pytest.mark.parametrize("state", ["healthy", "starting", "maintenance", "unknown"])
def test_a_replica_that_is_not_unhealthy_is_never_relaunched(state):
    d = fleet_heal_decision({"state": state, "problems": []}, [], "a", 1000, 2)
    assert d["action"] == "skip" and state in d["why"]


def test_a_hung_replica_is_healed_with_its_reason():
    d = fleet_heal_decision(HUNG, [], "a", 1000, 2)
    assert d == {"action": "heal", "why": "node2: process 7 is stopped"}


def test_a_head_that_does_not_answer_is_healed():
    assert fleet_heal_decision(None, [], "a", 1000, 2)["action"] == "heal"


def test_rate_limit_counts_this_replicas_heals_of_the_last_hour_only():
    records = [{"ts": 100, "replica": "a", "result": "started"},      # older than an hour
               {"ts": 9000, "replica": "a", "result": "started"},
               {"ts": 9100, "replica": "a", "result": "healed"},
               {"ts": 9200, "replica": "b", "result": "started"},
               {"ts": 9300, "replica": "a", "result": "skipped"}]
    assert fleet_heal_decision(HUNG, records, "a", 10000, 2)["action"] == "heal"
    records.append({"ts": 9500, "replica": "a", "result": "started"})
    d = fleet_heal_decision(HUNG, records, "a", 10000, 2)
    assert d["action"] == "refuse" and "2 times" in d["why"] and "process 7" in d["why"]
    assert fleet_heal_decision(HUNG, records, "b", 10000, 2)["action"] == "heal"
