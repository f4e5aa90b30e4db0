"""Alert/recording rules: promtool check + promtool unit tests, and coverage of every rule."""

import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "roles/monitoring/files/rules/vllm-fleet.rules.yml"
TESTS = Path(__file__).parent / "rules" / "vllm-fleet.rules_test.yml"


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_rules_are_valid(promtool):
    r = _run([promtool, "check", "rules", str(RULES)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_unit_tests_pass(promtool):
    r = _run([promtool, "test", "rules", str(TESTS)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_every_alert_fires_and_not_fires_in_tests():
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    records = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    tests = yaml.safe_load(TESTS.read_text())["tests"]
    firing, quiet, exprs = set(), set(), set()
    for t in tests:
        for a in t.get("alert_rule_test") or []:
            (firing if a.get("exp_alerts") else quiet).add(a["alertname"])
        for e in t.get("promql_expr_test") or []:
            exprs.add(e["expr"])
    assert alerts, "no alerts parsed"
    assert alerts - firing == set(), "alerts never shown firing"
    assert alerts - quiet == set(), "alerts never shown not firing"
    assert records - exprs == set(), "recording rules without a promql_expr_test"


def test_unit_tests_catch_a_broken_rule(promtool, tmp_path):
    """Mutation check: the tests must fail when a rule's threshold is wrong."""
    rules_dir = tmp_path / "roles/monitoring/files/rules"
    rules_dir.mkdir(parents=True)
    original = RULES.read_text()
    mutated = original.replace("vllm_fleet_engine_up == 0", "vllm_fleet_engine_up == 2")
    assert mutated != original, "the mutation no longer applies: EngineDown's expression changed"
    (rules_dir / RULES.name).write_text(mutated)
    tdir = tmp_path / "tests/exporter/rules"
    tdir.mkdir(parents=True)
    shutil.copy(TESTS, tdir / TESTS.name)
    r = _run([promtool, "test", "rules", str(tdir / TESTS.name)])
    assert r.returncode != 0 and "VllmFleetEngineDown" in r.stdout + r.stderr
