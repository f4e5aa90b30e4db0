"""launch id -> ports: deterministic, collision-free, launch.json contract."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import SRC, child_env
from vllm_fleet import launch
from tests.launch_ids import colliding_launch_ids


def test_base_port_is_deterministic_block_aligned_and_in_range():
    a = launch.base_port("dep-1700000000-abcd")
    assert a == launch.base_port("dep-1700000000-abcd")
    assert launch.PORT_LO <= a < launch.PORT_HI and (a - launch.PORT_LO) % launch.BLOCK == 0
    spread = {launch.base_port(f"dep-{i}") for i in range(50)}
    assert len(spread) > 40  # a hash, not a constant


def test_allocate_skips_taken_and_busy_ports():
    lid = "dep-x"
    first = launch.allocate(lid, is_free=lambda p: True)
    assert first == launch.block_ports(launch.base_port(lid))
    # the master port of the hashed block is taken by another launch: next block
    second = launch.allocate(lid, taken={first["master"]}, is_free=lambda p: True)
    assert second["master"] == first["master"] + launch.BLOCK or second["master"] == launch.PORT_LO
    # a port inside the vLLM span is bound: the whole block is skipped too
    busy = first["vllm"] + 5
    third = launch.allocate(lid, is_free=lambda p: p != busy)
    assert busy not in range(third["vllm"], third["vllm"] + launch.VLLM_PORT_SPAN)
    assert third != first


def test_real_bound_port_is_detected():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        assert not launch.port_is_free(s.getsockname()[1])
    finally:
        s.close()


def test_two_launches_never_collide_even_when_their_hash_does(state_dir):
    a, b = colliding_launch_ids()
    doc_a = launch.ensure_launch(a, "dep")
    doc_b = launch.ensure_launch(b, "dep")  # nothing bound yet: launch.json reservation protects
    ports_a = set(doc_a["ports"].values()) | set(range(doc_a["ports"]["vllm"],
                                                        doc_a["ports"]["vllm"] + 16))
    ports_b = set(doc_b["ports"].values()) | set(range(doc_b["ports"]["vllm"],
                                                        doc_b["ports"]["vllm"] + 16))
    assert not ports_a & ports_b
    # idempotent: the same launch gets the same ports back
    assert launch.ensure_launch(a, "dep")["ports"] == doc_a["ports"]


def test_stale_launch_reservation_is_released(state_dir):
    a, b = colliding_launch_ids()
    doc_a = launch.ensure_launch(a, "dep")
    # make launch a old and without processes: its ports are free again for b
    path = state_dir / "launches" / a / "launch.json"
    doc = json.loads(path.read_text())
    doc["created"] = time.time() - 3600
    path.write_text(json.dumps(doc))
    doc_b = launch.ensure_launch(b, "dep")
    assert doc_b["ports"]["master"] == doc_a["ports"]["master"]


def test_launch_json_format_and_merge_with_entrypoint_keys(state_dir, monkeypatch):
    monkeypatch.setenv("FLEET_NODE_NAME", "node1")
    d = state_dir / "launches" / "dep-1"
    d.mkdir(parents=True)
    (d / "launch.json").write_text(json.dumps({"launch_id": "dep-1", "deployment": "dep",
                                                 "host": "node1", "created": 1.0,
                                                 "ports": {"api": 8000}}))
    doc = launch.ensure_launch("dep-1", "dep")
    on_disk = json.loads((d / "launch.json").read_text())
    assert on_disk == doc
    assert set(on_disk) >= {"launch_id", "deployment", "host", "created", "ports"}
    assert on_disk["ports"]["api"] == 8000 and on_disk["created"] == 1.0
    assert set(launch.PORT_NAMES) <= set(on_disk["ports"])
    assert not list(d.glob("*.tmp"))


def test_cli_prints_env_for_the_entrypoint(state_dir):
    out = subprocess.run([sys.executable, "-m", "vllm_fleet.launch", "--launch-id", "dep-9",
                          "--deployment", "dep"], capture_output=True, text=True, check=True,
                         env=child_env(VLLM_FLEET_STATE_DIR=state_dir)).stdout
    env = dict(line.split("=", 1) for line in out.split())
    doc = json.loads((state_dir / "launches" / "dep-9" / "launch.json").read_text())
    assert env["VLLM_PORT"] == str(doc["ports"]["vllm"])
    assert env["MASTER_PORT"] == str(doc["ports"]["master"])
    assert env["VLLM_FLEET_LAUNCH_ID"] == "dep-9" and env["VLLM_FLEET_DEPLOYMENT"] == "dep"


def test_block_layout_keeps_vllm_run_clear_of_the_dp_master_range():
    ports = launch.block_ports(launch.base_port("dep-layout"))
    # vLLM skips VLLM_DP_MASTER_PORT..+9 when it picks ports from VLLM_PORT upward
    dp_reserved = set(range(ports["dp_master"], ports["dp_master"] + 10))
    vllm_run = set(range(ports["vllm"], ports["vllm"] + launch.VLLM_PORT_SPAN))
    assert not dp_reserved & vllm_run
    assert {ports["master"], ports["fabric"]}.isdisjoint(dp_reserved | vllm_run)
    assert max(launch.expand(ports)) < ports["master"] + launch.BLOCK  # blocks never overlap


def test_shared_port_is_the_hashed_slot_without_a_walk():
    lid = "dep-shared"
    assert launch.shared_port(lid) == launch.block_ports(launch.base_port(lid))["master"]
    assert launch.shared_port(lid, "fabric") == launch.shared_port(lid) + 1


def test_fixed_port_to_bind_must_be_free_and_unreserved(state_dir, monkeypatch):
    monkeypatch.setenv("FLEET_NODE_NAME", "node0")
    a, b = colliding_launch_ids()
    doc_a = launch.ensure_launch(a, "dep")
    taken_by_a = doc_a["ports"]["vllm"] + 3
    with pytest.raises(launch.PortBusy, match=f"port {taken_by_a} of launch {b} on host node0 is "
                                              "reserved by another live launch"):
        launch.ensure_launch(b, "dep", fixed={"master": taken_by_a}, bind_fixed=["master"])
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        busy = s.getsockname()[1]
        with pytest.raises(launch.PortBusy, match="already bound"):
            launch.ensure_launch(b, "dep", fixed={"master": busy}, bind_fixed=["master"])
        # the same port fixed but not bound here (a peer connects to it): accepted and recorded
        doc = launch.ensure_launch(b, "dep", fixed={"master": busy})
    assert doc["ports"]["master"] == busy
    assert busy not in launch.expand({k: v for k, v in doc["ports"].items() if k != "master"})


def test_fixed_shared_master_keeps_the_hashed_block(state_dir):
    lid = "dep-fixed-1"
    doc = launch.ensure_launch(lid, "dep", fixed={"master": launch.shared_port(lid)},
                               bind_fixed=["master"], is_free=lambda p: True)
    assert doc["ports"] == launch.block_ports(launch.base_port(lid))


def test_write_false_computes_without_touching_the_state_root(tmp_path, monkeypatch):
    root = tmp_path / "absent"
    monkeypatch.setenv("VLLM_FLEET_STATE_DIR", str(root))
    doc = launch.ensure_launch("dep-dry", "dep", write=False)
    assert set(launch.PORT_NAMES) <= set(doc["ports"]) and not root.exists()
