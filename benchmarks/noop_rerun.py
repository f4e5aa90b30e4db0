#!/usr/bin/env python3
"""No-op re-run of deploy.yml under two Ansible strategies, side by side (issue 18: <= 60 s on the
4-host lab; issue 14: every task of a heal's relaunch pays the same per-task cost).

    .venv/bin/python benchmarks/noop_rerun.py [-i .lab/inventory.ini] [--rounds 2]
        [--strategies linear,mitogen_linear] [--playbook deploy.yml] [--json OUT] [--log-dir DIR]

Each round runs the playbook once per strategy, the order alternating between rounds (a warm-up
effect then favours neither); with --warmup each strategy's rounds run in one block after an
uncounted run that may still change something. Every run must end with changed=0 on every host (a no-op): a run that
changed something or failed stops the benchmark, since its time would not be a re-run's. Printed
per run: wall time, the controller's CPU time (this process's children), tasks started; then the
median per strategy and the ratio of each to the first.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+skipped=(\d+)", re.M)
TASK = re.compile(r"^TASK \[", re.M)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(inventory: str, playbook: str, strategy: str, log: Path | None, timeout: float,
             require_noop: bool = True) -> dict:
    """One ansible-playbook run; stops the benchmark unless it succeeded (and, with require_noop,
    changed nothing on any host)."""
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"))
    if strategy:  # else ansible.cfg's
        env["ANSIBLE_STRATEGY"] = strategy
    cpu0, t0 = children_cpu(), time.monotonic()
    proc = subprocess.run([str(REPO / ".venv/bin/ansible-playbook"), "-i", inventory, playbook],
                          cwd=REPO, env=env, text=True, capture_output=True, timeout=timeout)
    wall, cpu = time.monotonic() - t0, children_cpu() - cpu0
    if log:
        log.write_text(proc.stdout + proc.stderr)
    recap = {m[0]: {"ok": int(m[1]), "changed": int(m[2]), "unreachable": int(m[3]), "failed": int(m[4]),
                    "skipped": int(m[5])}
             for m in RECAP.findall(proc.stdout)}
    bad = {h: r for h, r in recap.items() if (r["changed"] and require_noop) or r["failed"] or r["unreachable"]}
    if proc.returncode or bad or not recap:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-2000:])
        raise SystemExit(f"{strategy}: {'not a clean no-op re-run' if require_noop else 'failed'} (rc "
                         f"{proc.returncode}, hosts {bad or 'none'}) after {wall:.0f} s" + (f"; log {log}" if log else ""))
    return {"strategy": strategy, "wall_s": round(wall, 1), "controller_cpu_s": round(cpu, 1),
            "tasks": len(TASK.findall(proc.stdout)), "hosts": len(recap),
            # Ansible's ok counts the changed ones too
            "host_results": sum(r["ok"] for r in recap.values()),
            "skipped": sum(r["skipped"] for r in recap.values()),
            "changed": sum(r["changed"] for r in recap.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-i", "--inventory", default=str(REPO / ".lab" / "inventory.ini"))
    ap.add_argument("--playbook", default="deploy.yml")
    ap.add_argument("--strategies", default="linear,mitogen_linear")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    ap.add_argument("--warmup", action="store_true",
                    help="run each strategy's rounds in one block after an uncounted run that may change "
                         "things (a lab deployed from other code, or by the other strategy's first run)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--log-dir", help="keep each run's output here (<strategy>-<round>.log)")
    args = ap.parse_args()
    strategies = [s for s in args.strategies.split(",") if s]
    log_dir = Path(args.log_dir) if args.log_dir else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    if args.warmup:  # each strategy's runs in one block, after a run that may change things
        plan = [(rnd, s) for s in strategies for rnd in range(0, args.rounds + 1)]
    else:
        plan = [(rnd, s) for rnd in range(1, args.rounds + 1)
                for s in (strategies if rnd % 2 else list(reversed(strategies)))]
    for rnd, strategy in plan:
        if rnd == 0:
            print(f"[noop] warm-up: {strategy} ...", flush=True)
            warm = run_once(args.inventory, args.playbook, strategy,
                            log_dir / f"{strategy}-warmup.log" if log_dir else None, args.timeout, require_noop=False)
            print(f"[noop] warm-up: {strategy}: {warm['wall_s']} s, changed={warm['changed']} (not counted)", flush=True)
            continue
        print(f"[noop] round {rnd}: {strategy} ...", flush=True)
        run = run_once(args.inventory, args.playbook, strategy,
                       log_dir / f"{strategy}-{rnd}.log" if log_dir else None, args.timeout)
        run["round"] = rnd
        runs.append(run)
        print(f"[noop] round {rnd}: {strategy}: {run['wall_s']} s wall, {run['controller_cpu_s']} s "
              f"controller CPU, {run['tasks']} tasks, {run['hosts']} hosts, changed=0", flush=True)
    medians = {s: statistics.median(r["wall_s"] for r in runs if r["strategy"] == s) for s in strategies}
    cpu = {s: statistics.median(r["controller_cpu_s"] for r in runs if r["strategy"] == s) for s in strategies}
    base = strategies[0]
    print(f"\n{'strategy':<16} {'median wall':>12} {'ratio':>7} {'median ctl CPU':>15}")
    for s in strategies:
        print(f"{s:<16} {medians[s]:>10.1f} s {medians[s] / medians[base]:>6.2f}x {cpu[s]:>13.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "median_wall_s": medians,
                                               "median_controller_cpu_s": cpu}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
