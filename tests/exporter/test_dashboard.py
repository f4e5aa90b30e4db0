"""Grafana dashboard: its shape, and every panel query parses (promtool). That every vllm_fleet_*
series a panel or rule reads is one the exporter (or a recording rule) really produces is checked
on the exporter's output against the real engine and Ray: test_exporter_engine.py (engine tier)."""

import json
import subprocess
from pathlib import Path

import yaml

from tests.grafana_panels import panel_queries

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "roles/monitoring/files/grafana"
DASHBOARD = GRAFANA / "dashboards/vllm-fleet.json"


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
