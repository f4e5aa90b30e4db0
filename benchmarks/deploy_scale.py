#!/usr/bin/env python3
"""How deploy.yml's time grows with the host count (issue 18): the scale lab, printed side by side.

    .venv/bin/python benchmarks/deploy_scale.py [--sizes 4,8,16,32] [--strategy linear]
        [--json OUT] [--log-dir DIR]

The lab's 4 serving hosts stay (a deployed default lab: `make lab-deploy`); each size N adds light
hosts up to N (`tests/lab/lab.py up --hosts 4 --spares N-4`: [fleet_spare], provisioned, fabric,
firewall, exporter, no image, model or engine; docs/operations.md#spare-hosts). At each size, in
ascending order:
  1. deploy.yml once: the new spares' first deploy (cold for them, a re-run for the others);
  2. deploy.yml again: the no-op re-run at N hosts (must end changed=0 everywhere).
Printed per size: both walls, tasks, host results (ok, skipped) and the controller's CPU; then a
least-squares line through the no-op walls (seconds = a + b x hosts) and the per-added-host cost of
the first deploy. Sizes above the lab's are not extrapolated here: docs/scale.md does that, with
the reasons the line stops holding.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from noop_rerun import REPO, run_once  # noqa: E402

SERVING = 4  # the default lab's serving hosts (two replicas, balancer and Prometheus on node3)


def lab_up(spares: int, log: Path | None) -> float:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "tests/lab/lab.py"), "up", "--hosts", str(SERVING),
                           "--spares", str(spares)], cwd=REPO, text=True, capture_output=True, timeout=3600)
    if log:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"lab.py up --spares {spares} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.monotonic() - t0


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - b * mx, b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4,8,16,32", help="total host counts, ascending, each >= 4")
    ap.add_argument("--strategy", default="", help="ANSIBLE_STRATEGY for every run (empty: ansible.cfg's)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds one deploy may take")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--log-dir", help="keep every run's output here")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if sizes != sorted(sizes) or sizes[0] < SERVING:
        raise SystemExit(f"--sizes {args.sizes}: ascending, each at least {SERVING}")
    log_dir = Path(args.log_dir) if args.log_dir else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    inventory = str(REPO / ".lab" / "inventory.ini")
    strategy = args.strategy
    rows, previous = [], SERVING
    for size in sizes:
        spares = size - SERVING
        print(f"[scale] {size} hosts ({spares} spares): lab up ...", flush=True)
        up_s = lab_up(spares, log_dir / f"lab-up-{size}.log" if log_dir else None)
        print(f"[scale] {size} hosts: first deploy ({size - previous} new) ...", flush=True)
        first = run_once(inventory, "deploy.yml", strategy, log_dir / f"first-{size}.log" if log_dir else None,
                         args.timeout, require_noop=False)
        print(f"[scale] {size} hosts: first deploy {first['wall_s']} s; no-op re-run ...", flush=True)
        noop = run_once(inventory, "deploy.yml", strategy, log_dir / f"noop-{size}.log" if log_dir else None,
                        args.timeout)
        rows.append({"hosts": size, "spares": spares, "new_hosts": size - previous, "lab_up_s": round(up_s, 1),
                     "first": first, "noop": noop})
        print(f"[scale] {size} hosts: no-op {noop['wall_s']} s ({noop['tasks']} tasks, {noop['host_results']} "
              f"host results)", flush=True)
        previous = size
    print(f"\nstrategy {strategy or 'of ansible.cfg'}")
    print(f"{'hosts':>5} {'new':>4} {'first deploy':>13} {'no-op':>8} {'tasks':>6} {'host results':>13} "
          f"{'skipped':>8} {'ctl CPU (no-op)':>16}")
    for r in rows:
        print(f"{r['hosts']:>5} {r['new_hosts']:>4} {r['first']['wall_s']:>11.1f} s {r['noop']['wall_s']:>6.1f} s "
              f"{r['noop']['tasks']:>6} {r['noop']['host_results']:>13} {r['noop']['skipped']:>8} "
              f"{r['noop']['controller_cpu_s']:>14.1f} s")
    fit = None
    if len(rows) >= 2:
        a, b = fit_line([(r["hosts"], r["noop"]["wall_s"]) for r in rows])
        fit = {"a_s": round(a, 1), "b_s_per_host": round(b, 2)}
        print(f"\nno-op re-run ~ {a:.1f} s + {b:.2f} s x hosts (least squares over {len(rows)} sizes)")
        for r in rows[1:]:
            extra = r["first"]["wall_s"] - r["noop"]["wall_s"]
            print(f"first deploy at {r['hosts']}: {extra:.1f} s more than its no-op for {r['new_hosts']} new hosts "
                  f"({extra / max(r['new_hosts'], 1):.1f} s per new host, provisioned in parallel)")
    if args.json:
        Path(args.json).write_text(json.dumps({"strategy": strategy, "rows": rows, "noop_fit": fit}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
