"""state.register_member: the launch's member registry and the roles the verdict judges."""

import json
import os

import pytest

from vllm_fleet import state
from vllm_fleet.ownership import ns_id


def test_role_is_kept_by_a_later_plain_registration(state_dir, monkeypatch):
    monkeypatch.setenv("VLLM_FLEET_LAUNCH_ID", "dep-1-x")
    monkeypatch.setenv("VLLM_FLEET_DEPLOYMENT", "dep")
    path = state.register_member(role="main")  # fleet-serve, just before it execs vLLM
    state.register_member()                   # the plugin in the exec'd vLLM process (same pid)
    doc = json.loads(open(path).read())
    assert doc == {"pid": os.getpid(), "start_ticks": state.proc_start_ticks(os.getpid()), "pid_ns": ns_id("pid"),
                   "launch_id": "dep-1-x", "deployment": "dep", "role": "main"}
    state.register_member(role="engine")
    assert json.loads(open(path).read())["role"] == "engine"
    with pytest.raises(ValueError, match="not one of"):
        state.register_member(role="helper")


def test_a_plain_registration_has_no_role(state_dir, monkeypatch):
    monkeypatch.setenv("VLLM_FLEET_LAUNCH_ID", "dep-2-y")
    doc = json.loads(open(state.register_member()).read())
    assert "role" not in doc
