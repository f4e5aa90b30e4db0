#!/usr/bin/env python3
"""Exporter scrape latency (p50/p99; goal p99 <= 20 ms) and CPU use at a 15 s scrape interval
(goal <= 1 % of one core). Prints figures; asserts nothing.

  .venv/bin/python benchmarks/exporter_scrape.py                 # local stand-in engine
  .venv/bin/python benchmarks/exporter_scrape.py --engine-url http://HEAD:8000 --duration 300

Without --engine-url a small local HTTP server answers /health and streams canary completions,
and a synthetic launch dir (8 ranks, 4 sizes x 2 backends of all-reduce histograms) stands in
for the plugin's files. Background jobs run at their production defaults (health 5 s, canary
30 s, processes 5 s, NCCL logs 15 s) so the CPU figure includes them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOUNDS = [1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
          0.25, 0.5, 1, 2.5, "+Inf"]


class Engine(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        body = b'{"data":[{"id":"m"}]}' if self.path == "/v1/models" else b""
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for tok in ("O", "K"):
            self.wfile.write(b'data: {"choices":[{"delta":{"content":"%s"}}]}\n\n' % tok.encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True


def synthetic_state(root: Path) -> None:
    ld = root / "launches" / "bench-1-x"
    ld.mkdir(parents=True)
    (ld / "launch.json").write_text(json.dumps({"launch_id": "bench-1-x", "deployment": "bench",
                                                "created": time.time()}))
    now = time.time()
    for rank in range(8):
        hists = [{"backend": b, "size_bytes": s, "group": "tp", "scope": "intra", "source": src,
                  "bucket_counts": [0] * 6 + [10] * 12, "sum_s": 0.01, "count": 10}
                 for b in ("nccl", "custom_ar") for s in (4096, 65536, 1 << 20, 16 << 20)
                 for src in ("probe", "eager")]
        (ld / f"allreduce-h-{1000 + rank}.json").write_text(json.dumps(
            {"pid": 1000 + rank, "rank": rank, "updated": now, "bucket_bounds_s": BOUNDS,
             "histograms": hists}))
        (ld / f"collective-h-{1000 + rank}.json").write_text(json.dumps(
            {"pid": os.getpid(), "rank": rank, "updated": now, "threshold_s": 60,
             "completed_total": 100, "current": None}))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(url: str) -> float:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as r:
        r.read()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine-url", default="")
    ap.add_argument("--state-dir", default="", help="real state root (default: synthetic)")
    ap.add_argument("--scrapes", type=int, default=300, help="back-to-back scrapes for latency")
    ap.add_argument("--interval", type=float, default=15.0, help="scrape interval for CPU")
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of the CPU phase")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="exporter-bench-"))
    httpd = None
    engine = args.engine_url
    if not engine:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Engine)
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        engine = f"http://127.0.0.1:{httpd.server_address[1]}"
    state = Path(args.state_dir) if args.state_dir else tmp / "state"
    if not args.state_dir:
        synthetic_state(state)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp / "exporter.json"
    cfg.write_text(json.dumps({
        "listen": f"127.0.0.1:{port}", "state_dir": str(state), "engine_url": engine,
        "fabric_file": str(tmp / "fabric.json"),
        "processes": [{"name": "engine", "pattern": r"vllm serve|fleet-serve", "expected": 1}]}))
    env = dict(os.environ, PYTHONPATH=str(REPO / "exporter"))
    proc = subprocess.Popen([sys.executable, "-m", "vllm_fleet_exporter", "--config", str(cfg)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        for _ in range(100):
            try:
                scrape(url)
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(1.0)
        size = len(urllib.request.urlopen(url, timeout=10).read())
        lat = sorted(scrape(url) for _ in range(args.scrapes))
        p50 = statistics.median(lat)
        p99 = lat[min(len(lat) - 1, int(round(0.99 * len(lat))) - 1)]
        print(f"exposition size           : {size} bytes")
        print(f"scrape latency  (n={len(lat)}) : p50 {p50 * 1e3:.2f} ms   p99 {p99 * 1e3:.2f} ms"
              f"   (goal p99 <= 20 ms)")
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        while time.monotonic() - t0 < args.duration:
            scrape(url)
            time.sleep(max(0.0, min(args.interval, args.duration - (time.monotonic() - t0))))
        cpu = cpu_seconds(proc.pid) - c0
        wall = time.monotonic() - t0
        print(f"CPU at {args.interval:g} s scrape interval : {100 * cpu / wall:.3f} % of one core"
              f" over {wall:.0f} s (goal <= 1 %), background jobs included")
    finally:
        proc.terminate()
        proc.wait(10)
        if httpd:
            httpd.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
