"""Every setting carries a rule the validate stage can read, and every default obeys its own rule.

The rules live in the roles' meta/argument_specs.yml (`Valid:` description items, grammar in
docs/design.md); these tests keep a new setting from arriving without one. Pure Python: the
validator's module is loaded as a file, no ansible-playbook run.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


validator = _load("fleet_validate_inventory_under_test", REPO / "ansible/plugins/action/fleet_validate_inventory.py")
fleet_ini = _load("fleet_ini_under_test", REPO / "ansible/plugins/inventory/fleet_ini.py")
SPECS, DEFAULTS = validator.load_specs(str(REPO / "roles"))


def test_every_scalar_setting_has_a_valid_rule():
    missing = sorted(f"roles/{s['role']}/meta/argument_specs.yml: {name}" for name, s in SPECS.items()
                     if s.get("type", "str") in ("int", "float", "str", "path") and not s.get("choices")
                     and s.get("rule") is None)
    assert not missing, ("add a description item 'Valid: ...' (docs/design.md, Variables) to: "
                         + ", ".join(missing))


def _default(name: str):
    return DEFAULTS.get(name, SPECS[name].get("default"))


# A templated default ('{{ fleet_deployment }}-ray') is rendered by its role, not here.
@pytest.mark.parametrize("name", sorted(n for n in SPECS if "{{" not in str(_default(n))))
def test_default_obeys_its_own_rule(name):
    spec = SPECS[name]
    default = _default(name)
    checker = validator.Checker({"h": {}}, {}, SPECS, DEFAULTS)
    assert checker.check_value(spec, default, name) is None, (name, default)


def test_a_rule_the_validator_cannot_read_is_refused_naming_the_kind():
    with pytest.raises(validator.SpecError, match="unknown kind 'lightyears'"):
        validator.parse_rule("Valid: lightyears >0.")
    with pytest.raises(validator.SpecError, match="only 'same in a replica'"):
        validator.parse_rule("Valid: port; same everywhere.")


@pytest.mark.parametrize("rule,value,message", [
    ("Valid: seconds >0 (0 spins).", 0, "must be more than 0 seconds (0 spins)"),
    ("Valid: -1 or count >=1.", 0, "must be -1 or at least 1"),
    ("Valid: fraction >0 <=1.", 1.5, "must be in (0, 1]"),
    ("Valid: KiB >=64 or 'unlimited'.", "lots", "must be a whole number of KiB (or 'unlimited')"),
    ("Valid: HAProxy time >0.", "30", "has no unit: HAProxy reads a bare number as milliseconds"),
    ("Valid: Prometheus duration >0 or empty.", "0s", "must be a Prometheus duration more than 0 or empty"),
])
def test_rule_messages_say_what_is_wanted(rule, value, message):
    reason = validator.check_rule(validator.parse_rule(rule), value, validator.Context())
    assert reason.startswith(message), reason


@pytest.mark.parametrize("rule,value", [
    ("Valid: seconds >0.", 0.5), ("Valid: -1 or count >=1.", -1), ("Valid: KiB >=64 or 'unlimited'.", "unlimited"),
    ("Valid: HAProxy time >0.", "15m"), ("Valid: Docker size >=67108864.", "64m"),
    ("Valid: Prometheus duration >0 or empty.", ""), ("Valid: Prometheus duration >0.", "1h30m"),
])
def test_values_that_obey_the_rule_pass(rule, value):
    assert validator.check_rule(validator.parse_rule(rule), value, validator.Context()) is None


def test_inventory_lint_passes_a_clean_file_and_names_each_slip_by_line():
    clean = (REPO / "inventory.example.ini").read_text().splitlines()
    assert fleet_ini.find_slips(clean) == []
    broken = ["[fleet_head]", "gpu-a ansible_host: 10.0.0.1", "[fleet_serving:vars]", "fleet_engine: cuda",
              "fleet_fabric_interface=eth1 # fabric", "[fleet_workers", "gpu-b"]
    assert [(n, why.split(":")[0]) for n, _text, why in fleet_ini.find_slips(broken)] == [
        (2, "'ansible_host"), (4, "YAML-style 'key"), (5, "the value of fleet_fabric_interface would include the comment ('eth1 # fabric')"),
        (6, "not a section header")]


def test_a_raw_setting_takes_a_list_or_a_string():
    """rolling_restart_replicas (type raw): a list, or names separated by commas."""
    spec = SPECS["rolling_restart_replicas"]
    checker = validator.Checker({"h": {}}, {}, SPECS, DEFAULTS)
    assert checker.check_value(spec, ["r1", "r2"], "rolling_restart_replicas") is None
    assert checker.check_value(spec, "r1,r2", "rolling_restart_replicas") is None


def test_a_misspelled_setting_is_named_and_internal_facts_are_not():
    """Settings are <role>_*; a role's own facts are _<role>_* (never taken for a setting)."""
    hosts = {"h": {"rolling_restart_bach": 2, "_rolling_restart_plan": {}, "_rolling_restart_is_head": True}}
    problems = validator.Checker(hosts, {}, SPECS, DEFAULTS).run()
    named = [(p.host, p.variable, p.message) for p in problems if "rolling_restart" in p.variable]
    assert named == [("h", "rolling_restart_bach",
                      "unknown rolling_restart_* variable; did you mean rolling_restart_batch?")], named
