"""The Grafana dashboard's panel queries, for the tests that check them (offline and on the lab)."""
from __future__ import annotations

import json
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[1] / "roles/monitoring/files/grafana/dashboards/vllm-fleet.json"


def panel_queries(dashboard: dict | None = None) -> list[tuple[str, str]]:
    """[(panel title, expr)] over all panels, rows' nested panels included."""
    if dashboard is None:
        dashboard = json.loads(DASHBOARD.read_text())
    out: list[tuple[str, str]] = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets") or []:
                if t.get("expr"):
                    out.append((p.get("title", ""), t["expr"]))
            walk(p.get("panels") or [])
    walk(dashboard.get("panels") or [])
    return out
