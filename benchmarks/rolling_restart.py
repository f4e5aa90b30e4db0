#!/usr/bin/env python3
"""Latency cost of a rolling restart: tools/loadgen.py before and during rolling_restart.yml.

  benchmarks/rolling_restart.py -i .lab/inventory.ini [--before 60] [--concurrency 4] [--think-time 0] \
      [--json build/bench-rolling-restart.json] [--playbook-log build/rolling-restart.log] \
      [--max-p99-ratio 2] [-- EXTRA ANSIBLE ARGS]

1. `before`: loadgen alone for --before seconds through the balancer.
2. `during`: loadgen started, then `ansible-playbook rolling_restart.yml`; when the playbook ends,
   loadgen gets SIGTERM (no new requests, in-flight ones finish) and reports.
Prints both side by side (requests, failed, p50/p99 latency and TTFT) and p99 during / before.
Exit 1 when the playbook failed, any request failed, or (with --max-p99-ratio) the p99 ratio is
above it or could not be measured.
The endpoint defaults to the first fleet_loadbalancer host's loadbalancer_frontend_port.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from fleet_endpoint import front_door, inventory_list  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LOADGEN = REPO / "tools" / "loadgen.py"


def ansible_tool(name: str) -> str:
    """The tool beside this interpreter (.venv/bin) when there is one, else from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def endpoint_from_inventory(inventory: str) -> dict:
    """The first balancer's front door: url, lab CA, a generated tenant key file, served model."""
    try:
        return front_door(inventory, inventory_list(inventory, ansible_tool("ansible-inventory")))
    except LookupError:
        raise SystemExit("no host in fleet_loadbalancer: give --base-url")


def loadgen_cmd(args, duration: float, json_path: str) -> list[str]:
    cmd = [sys.executable, str(LOADGEN), "--base-url", args.base_url, "--requests", str(args.max_requests),
           "--duration", str(duration), "--concurrency", str(args.concurrency), "--stream-ratio",
           str(args.stream_ratio), "--max-tokens", str(args.max_tokens), "--timeout", str(args.timeout),
           "--think-time", str(args.think_time), "--json", json_path]
    if args.model:
        cmd += ["--model", args.model]
    if args.api_key_file:
        cmd += ["--api-key-file", args.api_key_file]
    if args.ca_file:
        cmd += ["--ca-file", args.ca_file]
    return cmd


def fmt(v) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms"


def table(before: dict, during: dict) -> str:
    rows = [("requests", "total", str), ("failed", "failed", str), ("latency p50", "latency_p50_s", fmt),
            ("latency p99", "latency_p99_s", fmt), ("TTFT p50", "ttft_p50_s", fmt), ("TTFT p99", "ttft_p99_s", fmt),
            ("req/s", "requests_per_s", lambda v: f"{v:.1f}")]
    lines = [f"{'':14}{'before':>12}{'during':>12}"]
    for label, key, f in rows:
        lines.append(f"{label:14}{f(before.get(key)):>12}{f(during.get(key)):>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-i", "--inventory", required=True)
    p.add_argument("--base-url", default="", help="default: the first balancer of the inventory")
    p.add_argument("--model", default="", help="default: fleet_served_model_name of the inventory")
    p.add_argument("--api-key-file", default="",
                   help="tenant key file (default: the inventory's generated key of its first tenant)")
    p.add_argument("--ca-file", default="", help="CA bundle (default: the inventory's lab CA when generated)")
    p.add_argument("--before", type=float, default=60.0, help="seconds of load before the restart")
    p.add_argument("--warmup", type=float, default=30.0,
                   help="seconds of the same load first, not counted: a freshly started engine's first "
                        "requests (compilation, caches) would inflate the 'before' p99 and flatter the ratio")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--think-time", type=float, default=0.0,
                   help="seconds each load worker waits between requests (the 2-core lab: 1)")
    p.add_argument("--stream-ratio", type=float, default=0.5)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="request cap per phase")
    p.add_argument("--playbook-timeout", type=float, default=3600.0)
    p.add_argument("--playbook-log", help="write rolling_restart.yml's whole output here (raw log)")
    p.add_argument("--max-p99-ratio", type=float, default=0.0, help="fail when p99 during/before is above (0: off)")
    p.add_argument("--json", dest="json_path", default="")
    p.add_argument("extra", nargs="*", help="extra ansible-playbook arguments (after --)")
    args = p.parse_args(argv)
    if not args.base_url or not args.model:
        door = endpoint_from_inventory(args.inventory)
        args.base_url = args.base_url or door["url"]
        args.model = args.model or door["model"]
        args.api_key_file = args.api_key_file or door["key_file"]
        args.ca_file = args.ca_file or door["ca_file"]

    with tempfile.TemporaryDirectory() as tmp:
        if args.warmup > 0:
            print(f"[bench] warm-up: {args.warmup:.0f}s of load, not counted", flush=True)
            subprocess.run(loadgen_cmd(args, args.warmup, os.path.join(tmp, "warmup.json")), check=False,
                           timeout=args.warmup + args.timeout + 60)
        print(f"[bench] before: {args.before:.0f}s of load on {args.base_url}", flush=True)
        before_json = os.path.join(tmp, "before.json")
        subprocess.run(loadgen_cmd(args, args.before, before_json), check=False,
                       timeout=args.before + args.timeout + 60)
        before = json.loads(Path(before_json).read_text())

        print("[bench] during: load + rolling_restart.yml", flush=True)
        during_json = os.path.join(tmp, "during.json")
        load = subprocess.Popen(loadgen_cmd(args, args.playbook_timeout, during_json))
        time.sleep(2)
        t0 = time.monotonic()
        try:
            play = subprocess.run([ansible_tool("ansible-playbook"), "-i", args.inventory, str(REPO / "rolling_restart.yml"),
                                   *args.extra], cwd=REPO, capture_output=True, text=True,
                                  timeout=args.playbook_timeout)
            play_rc, play_out = play.returncode, play.stdout + play.stderr
        except subprocess.TimeoutExpired as exc:
            play_rc, play_out = 124, f"rolling_restart.yml ran past {exc.timeout}s"
        play_s = time.monotonic() - t0
        load.send_signal(signal.SIGTERM)
        load.wait(timeout=args.timeout + 60)
        during = json.loads(Path(during_json).read_text())

    if args.playbook_log:
        Path(args.playbook_log).parent.mkdir(parents=True, exist_ok=True)
        Path(args.playbook_log).write_text(play_out)
    ratio = (during["latency_p99_s"] / before["latency_p99_s"]
             if during.get("latency_p99_s") and before.get("latency_p99_s") else None)
    print()
    print(table(before, during))
    print(f"p99 during / before: {ratio:.2f}x" if ratio is not None else "p99 ratio: n/a")
    print(f"rolling_restart.yml: rc {play_rc} in {play_s:.0f}s")
    if play_rc:
        print(play_out[-4000:])
    result = {"before": {k: v for k, v in before.items() if k != "requests"},
              "during": {k: v for k, v in during.items() if k != "requests"},
              "p99_ratio": ratio, "playbook_rc": play_rc, "playbook_s": round(play_s, 1)}
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(result, indent=1))
    problems = verdict(play_rc, before, during, ratio, args.max_p99_ratio)
    for problem in problems:
        print(problem)
    return 1 if problems else 0


def verdict(play_rc: int, before: dict, during: dict, ratio: float | None, max_ratio: float) -> list[str]:
    """Why the run fails, empty when it passes. With a gate (max_ratio > 0) an unmeasured ratio fails:
    a gate that no data can trip proves nothing."""
    problems = []
    if play_rc:
        problems.append(f"rolling_restart.yml failed (rc {play_rc})")
    for phase, report in (("before", before), ("during", during)):
        if report["failed"]:
            problems.append(f"{report['failed']} request(s) failed {phase} the restart")
    if max_ratio and ratio is None:
        problems.append("p99 ratio: not measured (no completed request before or during), so not within the gate")
    elif max_ratio and ratio > max_ratio:
        problems.append(f"p99 ratio {ratio:.2f} is above {max_ratio}")
    return problems


if __name__ == "__main__":
    sys.exit(main())
