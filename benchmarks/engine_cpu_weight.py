#!/usr/bin/env python3
"""What a lower CPU weight for the serving containers (docker --cpu-shares) would buy the control
plane while the engines serve under load, and what it would cost the clients. The question behind
it: would heals and relaunches under load (issue 14) finish sooner if the engines yielded the CPU
to sshd and Ansible? On the lab it did not (docs/benchmarks/2026-12-07-lab-engine-cpu-weight.md),
so the vllm_serve role sets no weight.

  benchmarks/engine_cpu_weight.py -i .lab/inventory.ini [--shares 1024,256] [--rounds 2]
      [--concurrency 3] [--load-s 20] [--json out.json] [--log-dir DIR]

Each round sets one weight on every serving container of the fleet (`docker update --cpu-shares`,
live), puts steady load on the front door (tools/loadgen.py), and after --load-s seconds of it
runs a probe playbook on the serving hosts: the kinds of small tasks a relaunch or a heal is made
of (command, stat, copy, file, slurp; become, over SSH). The weights alternate (A B A B ...), so
that drift in the load does not favour one. Prints, per weight: the probe playbook's wall time and
the load's requests/s, p99 and failures, and the ratio of probe times side by side. Every container
gets its own weight back at the end.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("rolling_restart_bench", REPO / "benchmarks/rolling_restart.py")
rr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rr)  # endpoint_from_inventory, loadgen_cmd, ansible_tool: one owner

SERVING = "label=vllm-fleet.component=vllm"
PROBE = """
- name: Control-plane probe (the kind of tasks a relaunch is made of)
  hosts: fleet_serving
  gather_facts: false
  become: true
  tasks:
    - name: Run a command
      ansible.builtin.command: "true"
      changed_when: false
    - name: Stat a directory
      ansible.builtin.stat:
        path: /etc/vllm-fleet
    - name: Write a file
      ansible.builtin.copy:
        content: "{{ 99999999 | random }}"
        dest: /tmp/fleet-cpu-weight-probe
        mode: "0600"
    - name: Read it back
      ansible.builtin.slurp:
        src: /tmp/fleet-cpu-weight-probe
    - name: Remove it
      ansible.builtin.file:
        path: /tmp/fleet-cpu-weight-probe
        state: absent
    - name: Ask Docker
      ansible.builtin.command: docker ps -q
      changed_when: false
"""


def adhoc(inventory: str, command: str, hosts: str = "fleet_serving", timeout: float = 300) -> dict[str, dict]:
    """{host: result} of one shell command on the hosts (Ansible's json callback)."""
    out = subprocess.run([rr.ansible_tool("ansible"), hosts, "-i", inventory, "-b", "-m", "ansible.builtin.shell",
                          "-a", command], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ, ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_STDOUT_CALLBACK="json"))
    try:
        # the JSON document, without what other callbacks (ansible.cfg's profile_tasks) print after it
        doc = out.stdout[out.stdout.index("\n{") + 1:] if not out.stdout.startswith("{") else out.stdout
        hosts_out = json.JSONDecoder().raw_decode(doc)[0]["plays"][0]["tasks"][0]["hosts"]
    except (ValueError, KeyError, IndexError):
        raise SystemExit(f"ansible {hosts} -a {command!r} gave no result:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    failed = {h: r.get("msg") or r.get("stderr") for h, r in hosts_out.items() if r.get("failed") or r.get("rc")}
    if failed:
        raise SystemExit(f"{command!r} failed: {failed}")
    return hosts_out


# Docker's Go templates, kept away from Ansible's Jinja2 by {% raw %}.
INSPECT = "{% raw %}{{.Name}}={{.HostConfig.CpuShares}}{% endraw %}"


def current_shares(inventory: str) -> dict[str, list[str]]:
    """{host: ['/container=shares', ...]} as they are now, to put back."""
    out = adhoc(inventory, f"for c in $(docker ps -q --filter {SERVING}); do docker inspect -f '{INSPECT}' $c; done")
    return {host: r["stdout"].split() for host, r in out.items()}


def set_shares(inventory: str, shares: int) -> None:
    adhoc(inventory, f"ids=$(docker ps -q --filter {SERVING}); "
                     f"[ -z \"$ids\" ] || docker update --cpu-shares {shares} $ids")


def restore(inventory: str, before: dict[str, list[str]]) -> None:
    for host, pairs in before.items():
        for pair in pairs:
            name, _, value = pair.partition("=")
            # 0 is Docker's "not set", which docker update does not take: 1024 is that default
            adhoc(inventory, f"docker update --cpu-shares {value if value not in ('', '0') else 1024} "
                             f"{name.lstrip('/')}", hosts=host)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-i", "--inventory", required=True)
    p.add_argument("--shares", default="1024,256", help="the weights to compare, alternated (Docker's default: 1024)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per weight")
    p.add_argument("--concurrency", type=int, default=3)
    p.add_argument("--think-time", type=float, default=0.0)
    p.add_argument("--load-s", type=float, default=20.0, help="seconds of load before each probe")
    p.add_argument("--stream-ratio", type=float, default=0.5)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout")
    p.add_argument("--probe-timeout", type=float, default=900.0)
    p.add_argument("--json", dest="json_path", default="")
    p.add_argument("--log-dir", default="", help="keep each probe's and load's raw output here")
    args = p.parse_args(argv)
    door = rr.endpoint_from_inventory(args.inventory)
    args.base_url, args.model = door["url"], door["model"]
    args.api_key_file, args.ca_file = door["key_file"], door["ca_file"]
    args.max_requests = 1_000_000
    weights = [int(s) for s in args.shares.split(",")]
    logs = Path(args.log_dir) if args.log_dir else None
    if logs:
        logs.mkdir(parents=True, exist_ok=True)

    before = current_shares(args.inventory)
    print(f"[weight] serving containers now: {before}", flush=True)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            probe = Path(tmp) / "probe.yml"
            probe.write_text(PROBE)
            for rnd in range(args.rounds):
                for shares in weights:
                    set_shares(args.inventory, shares)
                    load_json = os.path.join(tmp, f"load-{shares}-{rnd}.json")
                    load = subprocess.Popen(rr.loadgen_cmd(args, 3600, load_json), stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
                    time.sleep(args.load_s)
                    t0 = time.monotonic()
                    play = subprocess.run([rr.ansible_tool("ansible-playbook"), "-i", args.inventory, str(probe)],
                                          cwd=REPO, capture_output=True, text=True, timeout=args.probe_timeout)
                    probe_s = time.monotonic() - t0
                    load.send_signal(2)  # loadgen stops on SIGINT and writes its summary
                    load.wait(args.timeout + 60)
                    summary = json.loads(Path(load_json).read_text()) if Path(load_json).exists() else {}
                    loadavg = Path("/proc/loadavg").read_text().split()[0]
                    row = {"shares": shares, "round": rnd, "probe_s": round(probe_s, 1), "probe_rc": play.returncode,
                           "loadavg_1m": float(loadavg), "requests": summary.get("total"),
                           "failed": summary.get("failed"), "requests_per_s": summary.get("requests_per_s"),
                           "latency_p99_s": summary.get("latency_p99_s")}
                    rows.append(row)
                    print(f"[weight] round {rnd} shares {shares}: probe {probe_s:.1f}s (rc {play.returncode}), "
                          f"load {row['requests_per_s'] or 0:.2f} req/s, p99 {row['latency_p99_s'] or 0:.2f}s, "
                          f"failed {row['failed']}, load average {loadavg}", flush=True)
                    if logs:
                        (logs / f"probe-{shares}-{rnd}.log").write_text(play.stdout + play.stderr)
                        if Path(load_json).exists():
                            (logs / f"load-{shares}-{rnd}.json").write_text(Path(load_json).read_text())
    finally:
        restore(args.inventory, before)

    print(f"\n{'shares':>8}{'probe s (median)':>18}{'req/s':>8}{'p99 s':>8}{'failed':>8}")
    medians = {}
    for shares in weights:
        mine = [r for r in rows if r["shares"] == shares]
        medians[shares] = statistics.median(r["probe_s"] for r in mine)
        print(f"{shares:>8}{medians[shares]:>18.1f}"
              f"{statistics.median(r['requests_per_s'] or 0 for r in mine):>8.2f}"
              f"{statistics.median(r['latency_p99_s'] or 0 for r in mine):>8.2f}"
              f"{sum(r['failed'] or 0 for r in mine):>8}")
    base = weights[0]
    for shares in weights[1:]:
        print(f"probe time at {base} / at {shares}: {medians[base] / medians[shares]:.2f}x")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"rows": rows, "probe_median_s": medians}, indent=1))
    return 0 if all(r["probe_rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
