"""The Ray wait's own loop (roles/ray_cluster/files/ray_nodes_alive.py): which GCS answers end it,
and that it ends at its deadline whatever the queries do. The GCS client is replaced by canned
answers here; the lab's deploy runs the script against the real GCS in the head's container."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "roles" / "ray_cluster" / "files" / "ray_nodes_alive.py"


def _load():
    spec = importlib.util.spec_from_file_location("ray_nodes_alive_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ALIVE = _load()


class Clock:
    """Time that moves only when the loop sleeps or a query takes time."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def _info(ip, state=0, cpus=2.0):
    return SimpleNamespace(node_manager_address=ip, state=state, resources_total={"CPU": cpus})


class NodeId(str):
    def hex(self):
        return "id-" + self


def test_dead_nodes_are_left_out_and_records_carry_ip_id_and_resources():
    nodes = {NodeId("b"): _info("10.0.0.2"), NodeId("a"): _info("10.0.0.1"),
             NodeId("c"): _info("10.0.0.3", state=1)}
    got = ALIVE.alive_nodes(nodes)
    assert [n["node_ip"] for n in got] == ["10.0.0.1", "10.0.0.2"]
    assert got[0] == {"node_ip": "10.0.0.1", "node_id": "id-a", "state": "ALIVE",
                      "resources_total": {"CPU": 2.0}}


def test_ends_as_soon_as_every_wanted_ip_is_alive():
    clock, lines = Clock(), []
    answers = iter([
        RuntimeError("GCS not up"),
        [{"node_ip": "10.0.0.1"}],
        [{"node_ip": "10.0.0.1"}, {"node_ip": "10.0.0.2"}, {"node_ip": "10.0.0.9"}],
    ])

    def query(timeout_s):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    ok, last = ALIVE.wait(query, ["10.0.0.1", "10.0.0.2"], clock() + 60, clock, clock.sleep, lines.append)
    assert ok
    assert {n["node_ip"] for n in last} >= {"10.0.0.1", "10.0.0.2"}
    assert any("GCS query failed: RuntimeError: GCS not up" in line for line in lines)
    assert any(line.endswith("not alive yet: 10.0.0.2") for line in lines)


def test_stops_at_the_deadline_with_the_last_answer_and_says_what_is_missing():
    clock, lines, timeouts = Clock(), [], []

    def query(timeout_s):
        timeouts.append(timeout_s)
        clock.now += timeout_s  # every call hangs for its whole timeout, as a dead GCS does
        return [{"node_ip": "10.0.0.1"}]

    ok, last = ALIVE.wait(query, ["10.0.0.1", "10.0.0.2"], clock() + 25, clock, clock.sleep, lines.append)
    assert not ok
    assert last == [{"node_ip": "10.0.0.1"}]
    assert clock() <= 1025.0  # no query or pause runs past the deadline
    assert max(timeouts) <= ALIVE.ATTEMPT_TIMEOUT_S and timeouts[-1] <= 25
    assert lines == [lines[0]] and lines[0].endswith("not alive yet: 10.0.0.2")  # said once, not per try


def test_a_deadline_already_past_asks_nothing():
    clock = Clock()

    def query(timeout_s):
        raise AssertionError("queried after the deadline")

    assert ALIVE.wait(query, ["10.0.0.1"], clock() - 1, clock, clock.sleep, lambda line: None) == (False, [])
