"""Grafana dashboard: every panel query parses (promtool), and every vllm_fleet_* series a panel
or rule reads is one the exporter (or a recording rule) really produces."""

import json
import re
import subprocess
from pathlib import Path

import yaml
from exporter_testlib import full_setup, run_exporter

from tests.grafana_panels import panel_queries

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "roles/monitoring/files/grafana"
DASHBOARD = GRAFANA / "dashboards/vllm-fleet.json"
RULES = REPO / "roles/monitoring/files/rules/vllm-fleet.rules.yml"


def test_dashboard_shape():
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] == "vllm-fleet"
    titles = " | ".join(p["title"] for p in d["panels"])
    for needle in ("Engine up", "Time to first token", "Inter-token", "throughput",
                   "All-reduce", "Stuck collectives", "Ray nodes"):
        assert needle.lower() in titles.lower(), needle
    ds = {t["datasource"]["uid"] for p in d["panels"] for t in p.get("targets", [])}
    assert ds == {"vllm-fleet-prometheus"}
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/vllm-fleet.yml").read_text())
    assert provider["providers"][0]["type"] == "file"


def test_every_panel_query_parses(promtool, tmp_path):
    queries = panel_queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) >= 20
    wrapper = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard_query_{i}", "expr": q} for i, (_, q) in enumerate(queries)]}]}
    f = tmp_path / "dashboard-queries.yml"
    f.write_text(yaml.safe_dump(wrapper))
    r = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # the wrapper does reject a broken query
    wrapper["groups"][0]["rules"].append({"record": "broken", "expr": "sum by (le (x)"})
    f.write_text(yaml.safe_dump(wrapper))
    assert subprocess.run([promtool, "check", "rules", str(f)], capture_output=True).returncode


def _exporter_series(tmp_path, stub, state_dir) -> set:
    setup = full_setup(tmp_path, stub, state_dir)
    p = run_exporter(["--config", str(setup["config"]), "--once"], env=dict(setup["env"]),
                     capture=True)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    return {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", out.decode(), re.M)}


def test_dashboard_and_rules_read_real_series(tmp_path, stub, state_dir):
    produced = _exporter_series(tmp_path, stub, state_dir)
    rules = yaml.safe_load(RULES.read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    exprs = [q for _, q in panel_queries(json.loads(DASHBOARD.read_text()))]
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = set()
    for e in exprs:
        used.update(re.findall(r"\bvllm_fleet[a-zA-Z0-9_:]*", e))
    assert used, "no vllm_fleet series referenced"
    missing = sorted(used - produced - recorded)
    assert missing == [], f"queried but never exported: {missing}"
