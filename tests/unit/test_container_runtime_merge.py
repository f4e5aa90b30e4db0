"""daemon.json merge (module fleet_json_merge): our keys go in, nobody else's keys go out."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "fixtures"))

from ansible_adhoc import run_module  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "fleet_json_merge_under_test", REPO / "ansible" / "plugins" / "modules" / "fleet_json_merge.py")
jm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(jm)

OURS_GPU = {"log-driver": "json-file", "log-opts": {"max-size": "100m", "max-file": "5"}, "live-restore": True,
            "runtimes": {"nvidia": {"path": "nvidia-container-runtime", "args": []}}}


def test_missing_file_gets_our_keys():
    changed, merged, text = jm.plan(None, OURS_GPU)
    assert changed and merged == OURS_GPU and json.loads(text) == OURS_GPU


def test_empty_file_is_an_empty_object():
    assert jm.plan("  \n", {"live-restore": True})[1] == {"live-restore": True}


def test_others_keys_are_kept_and_nested_objects_merge():
    theirs = {"data-root": "/data/docker", "registry-mirrors": ["https://mirror.example"],
              "log-opts": {"labels": "team", "max-size": "10m"},
              "runtimes": {"kata": {"path": "/usr/bin/kata-runtime"}}}
    changed, merged, _ = jm.plan(json.dumps(theirs), OURS_GPU)
    assert changed
    assert merged == {
        "data-root": "/data/docker", "registry-mirrors": ["https://mirror.example"],
        "log-driver": "json-file", "live-restore": True,
        "log-opts": {"labels": "team", "max-size": "100m", "max-file": "5"},  # ours win on conflicts
        "runtimes": {"kata": {"path": "/usr/bin/kata-runtime"},
                     "nvidia": {"path": "nvidia-container-runtime", "args": []}}}


def test_already_merged_file_is_unchanged_even_if_formatted_differently():
    text = json.dumps(dict(OURS_GPU, **{"data-root": "/x"}), separators=(",", ":"))
    changed, _, new_text = jm.plan(text, OURS_GPU)
    assert not changed and new_text == text  # their formatting is left alone


def test_lists_and_scalars_replace_not_append():
    changed, merged, _ = jm.plan(json.dumps({"dns": ["1.1.1.1"], "debug": True}), {"dns": ["10.0.0.2"]})
    assert merged == {"dns": ["10.0.0.2"], "debug": True}


def test_remove_drops_a_key_we_used_to_own():
    existing = dict(OURS_GPU, **{"default-runtime": "nvidia"})
    changed, merged, _ = jm.plan(json.dumps(existing), {"live-restore": True}, remove=["default-runtime",
                                                                                         "runtimes.nvidia"])
    assert changed and "default-runtime" not in merged and merged["runtimes"] == {}


@pytest.mark.parametrize("text,fragment", [("{not json", "is not valid JSON"), ("[1, 2]", "holds a JSON list")])
def test_bad_existing_file_fails_without_change(text, fragment):
    with pytest.raises(jm.MergeError, match=fragment):
        jm.plan(text, OURS_GPU, path="/etc/docker/daemon.json")


def test_module_merges_is_idempotent_and_honours_check_mode(tmp_path):
    path = tmp_path / "daemon.json"
    path.write_text(json.dumps({"data-root": "/data/docker"}))
    args = {"path": str(path), "content": OURS_GPU}

    dry = run_module("fleet_json_merge", args, check=True, diff=True)
    assert dry["changed"] is True and json.loads(path.read_text()) == {"data-root": "/data/docker"}
    assert '"live-restore": true' in dry["diff"]["after"]

    first = run_module("fleet_json_merge", args)
    assert first["changed"] is True
    assert json.loads(path.read_text()) == dict(OURS_GPU, **{"data-root": "/data/docker"})
    second = run_module("fleet_json_merge", args)
    assert second["changed"] is False

    path.write_text("{broken")
    failed = run_module("fleet_json_merge", dict(args, host="node9"))
    assert failed["failed"] and path.read_text() == "{broken"
    assert failed["msg"].startswith("host node9: %s is not valid JSON" % path)
