"""benchmarks/rolling_restart.py's pass/fail rule, on the reports its load generator writes."""
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("rolling_restart_bench", REPO / "benchmarks" / "rolling_restart.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)

CLEAN = {"failed": 0}


def test_a_clean_run_within_the_gate_passes():
    assert bench.verdict(0, CLEAN, CLEAN, 1.9, 2) == []


def test_without_a_gate_the_ratio_is_only_printed():
    assert bench.verdict(0, CLEAN, CLEAN, 5.0, 0) == []
    assert bench.verdict(0, CLEAN, CLEAN, None, 0) == []


def test_a_ratio_above_the_gate_fails_and_is_named():
    assert bench.verdict(0, CLEAN, CLEAN, 2.21, 2) == ["p99 ratio 2.21 is above 2"]


def test_an_unmeasured_ratio_fails_a_gate():
    (problem,) = bench.verdict(0, CLEAN, CLEAN, None, 2)
    assert "not measured" in problem


def test_failed_requests_and_a_failed_playbook_each_fail():
    problems = bench.verdict(2, {"failed": 1}, {"failed": 3}, 1.0, 0)
    assert problems == ["rolling_restart.yml failed (rc 2)", "1 request(s) failed before the restart",
                        "3 request(s) failed during the restart"]
