"""The Grafana dashboard's panel queries, for the tests that check them (offline and on the lab)."""
from __future__ import annotations

import json
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[1] / "roles/monitoring/files/grafana/dashboards/vllm-fleet.json"


def panel_queries(dashboard: dict | None = None, annotations: bool = True) -> list[tuple[str, str]]:
    """[(panel title, expr)] over all panels, rows' nested panels included, and the annotations'
    queries (titled "annotation: <name>"; they have data only around events)."""
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
    for a in (dashboard.get("annotations") or {}).get("list") or [] if annotations else []:
        if a.get("expr"):
            out.append((f"annotation: {a.get('name', '')}", a["expr"]))
    return out
