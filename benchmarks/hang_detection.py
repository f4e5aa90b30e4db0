#!/usr/bin/env python3
"""Hung replicas on a deployed fleet: time to out-of-rotation, to alert, to healthy again, and the
requests it cost, under steady load through the balancer.

  benchmarks/hang_detection.py -i .lab/inventory.ini --mode stop-worker [--concurrency 3]
      [--think-time 0] [--before 30] [--heal-timeout 600] [--json out.json] [--log-dir DIR]

Modes (the replica and host are picked from the inventory, or given with --replica / --host):
  freeze-stage   `docker pause` of the serving container of a replica's second engine host (a
                 frozen pipeline stage: processes alive, sockets open, nothing answers)
  stop-worker    SIGSTOP of the TP rank 1 worker (VLLM::Worker_TP1) of a TP>1 replica
  kill-engine    kill -9 of a replica's engine core (VLLM::EngineCore)
  cut-fabric     the fabric NIC of a replica's second engine host down; put back once the alert is
                 at the sink (or --max-alert-s + 30 s passed), so that the heal can pass its fabric
                 check
  kill-ray-node  `docker kill` of the Ray node container of a replica's Ray-only host
  soak           no fault: --soak seconds of load; nothing may leave rotation, alert or heal

Measured (controller clock; HAProxy is watched from its host every 0.5 s through one SSH
session, the Alertmanager webhook lands on a sink here at http://<mgmt gateway>:<sink port>):
out = first DOWN/MAINT of the replica's server; alert = first firing VllmFleetReplicaUnhealthy
for it at the sink; back = UP again with a healthy verdict; in flight = the server's sessions at
its last sample before out; sent after out = growth of its session total while it was out;
failed = failed client requests. Prints a table; exits 1 when a bound is missed (--max-out-s,
--max-alert-s, --max-back-s) or more requests failed than were in flight on it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The one fabric.env reader (stdlib only), as the roles use it through their filter.
_fe_spec = importlib.util.spec_from_file_location(
    "fleet_fabric_env", REPO / "images/vllm_fleet/src/vllm_fleet/fabric_env.py")
fabric_env = importlib.util.module_from_spec(_fe_spec)
_fe_spec.loader.exec_module(fabric_env)
_spec = importlib.util.spec_from_file_location("rolling_restart_bench", REPO / "benchmarks/rolling_restart.py")
rr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rr)  # endpoint_from_inventory, loadgen_cmd, ansible_tool: one owner

MODES = ("freeze-stage", "stop-worker", "kill-engine", "cut-fabric", "kill-ray-node", "soak")


class Fleet:
    """Hosts, replicas and SSH from `ansible-inventory --list`."""

    def __init__(self, inventory: str):
        out = subprocess.run([rr.ansible_tool("ansible-inventory"), "-i", inventory, "--list"], cwd=REPO,
                             capture_output=True, text=True, check=True, timeout=120).stdout
        data = json.loads(out)
        self.hv = data["_meta"]["hostvars"]
        group = lambda g: data.get(g, {}).get("hosts", [])  # noqa: E731
        serving = group("fleet_head") + group("fleet_workers")
        order = [h for h in self.hv if h in serving]
        heads = set(group("fleet_head"))
        self.replicas: dict[str, list[str]] = {}
        for h in sorted(order, key=lambda h: (h not in heads, order.index(h))):
            self.replicas.setdefault(str(self.hv[h].get("fleet_replica", "main")), []).append(h)
        self.balancer = group("fleet_loadbalancer")[0]
        self.monitoring = group("fleet_monitoring")[0]
        self.healer = (group("fleet_healer") or group("fleet_monitoring"))[0]
        self.deployment = next(v["fleet_deployment"] for v in self.hv.values() if "fleet_deployment" in v)

    def var(self, host: str, name: str, default=None):
        return self.hv[host].get(name, default)

    def engine_hosts(self, replica: str) -> list[str]:
        hosts = self.replicas[replica]
        if self.var(hosts[0], "fleet_engine") == "cpu":
            return hosts[:int(self.var(hosts[0], "fleet_pipeline_parallel_size", 1))]
        return hosts

    def ssh_argv(self, host: str, command: str) -> list[str]:
        hv = self.hv[host]
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
        if hv.get("ansible_ssh_private_key_file"):
            argv += ["-i", hv["ansible_ssh_private_key_file"]]
        user = hv.get("ansible_user")
        return argv + [f"{user}@{hv['ansible_host']}" if user else hv["ansible_host"], command]

    def ssh(self, host: str, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.ssh_argv(host, command), capture_output=True, text=True, timeout=timeout)

    def verdict(self, host: str) -> dict:
        port = self.var(host, "fleet_exporter_port", 9445)
        with urllib.request.urlopen(f"http://{self.var(host, 'ansible_host')}:{port}/verdict", timeout=5) as r:
            return json.loads(r.read())


class Watcher:
    """HAProxy's view of every server, sampled on the balancer every 0.5 s: (t, name, status,
    scur, stot). One SSH session; the controller and the lab hosts share one kernel clock."""

    def __init__(self, fleet: Fleet, backend: str, log: Path):
        script = ("while :; do t=$(date +%s.%N); echo 'show stat' | socat stdio /run/haproxy/admin.sock "
                  f"| awk -F, -v t=$t '$1==\"{backend}\" && $2!=\"BACKEND\" "
                  "{print t\",\"$2\",\"$18\",\"$5\",\"$8}'; sleep 0.5; done")
        self.proc = subprocess.Popen(fleet.ssh_argv(fleet.balancer, f"sudo sh -c {shlex.quote(script)}"),
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.samples: list[tuple[float, str, str, int, int]] = []
        self.log = open(log, "w")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.log.write(line)
            try:
                t, name, status, scur, stot = line.strip().split(",")
                self.samples.append((float(t), name, status, int(scur or 0), int(stot or 0)))
            except ValueError:
                continue

    def of(self, server: str) -> list[tuple[float, str, int, int]]:
        return [(t, st, cur, tot) for t, n, st, cur, tot in list(self.samples) if n == server]

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.log.close()


class Sink:
    """Alertmanager's webhook receiver for people: every firing alert with its arrival time."""

    def __init__(self, address: str, port: int):
        self.alerts: list[tuple[float, dict]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                now = time.time()
                sink.alerts.extend((now, a) for a in body.get("alerts", []))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer((address, port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def first(self, alertname: str, replica: str, after: float) -> float | None:
        times = [t for t, a in list(self.alerts) if t >= after and a.get("status") == "firing"
                 and a["labels"].get("alertname") == alertname and a["labels"].get("replica") == replica]
        return min(times) if times else None

    def stop(self):
        self.httpd.shutdown()


def wait(pred, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(interval)
    return None


def pick(fleet: Fleet, mode: str, replica: str, host: str) -> tuple[str, str, str, str]:
    """(replica, host, inject command, restore command) for a mode."""
    dep = fleet.deployment
    if mode == "stop-worker":
        replica = replica or next(r for r, hs in fleet.replicas.items()
                                  if int(fleet.var(hs[0], "fleet_tensor_parallel_size", 1)) > 1)
        host = host or fleet.replicas[replica][0]
        return replica, host, "sudo pkill -STOP -f '^VLLM::Worker_TP1'", ""
    if mode == "kill-engine":
        replica = replica or sorted(fleet.replicas)[-1]
        host = host or fleet.replicas[replica][0]
        return replica, host, "sudo pkill -KILL -f '^VLLM::EngineCore'", ""
    if mode in ("freeze-stage", "cut-fabric"):
        replica = replica or next(r for r in sorted(fleet.replicas) if len(fleet.engine_hosts(r)) > 1)
        host = host or fleet.engine_hosts(replica)[1]
        if mode == "freeze-stage":
            return replica, host, f"sudo docker pause {dep}-vllm", ""
        # GLOO_SOCKET_IFNAME is one plain interface name; NCCL_SOCKET_IFNAME may carry NCCL's
        # exact-match '=' prefix ("==eth1" in the file) or a list.
        env = fabric_env.parse_env_text(fleet.ssh(host, "cat /etc/vllm-fleet/fabric.env").stdout)
        nic = env.get("GLOO_SOCKET_IFNAME", "").strip() or \
            env.get("NCCL_SOCKET_IFNAME", "").lstrip("=^").split(",")[0].strip()
        if not nic:
            raise SystemExit(f"{host}: no GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME in /etc/vllm-fleet/fabric.env")
        return replica, host, f"sudo ip link set {nic} down", f"sudo ip link set {nic} up"
    if mode == "kill-ray-node":
        replica = replica or next(r for r in sorted(fleet.replicas)
                                  if len(fleet.replicas[r]) > len(fleet.engine_hosts(r)))
        host = host or fleet.replicas[replica][-1]
        return replica, host, f"sudo docker kill {dep}-ray", ""
    return replica or sorted(fleet.replicas)[0], host, "", ""


def quiet_pager(fleet: Fleet) -> bool:
    """No VllmFleetReplicaUnhealthy of this deployment is active in Alertmanager (silenced ones
    included). A fault injected while one still fires gets no notification of its own: its group
    was notified already, and the sink would see nothing until the group's next interval."""
    hv = fleet.hv[fleet.monitoring]
    url = (f"http://{hv['ansible_host']}:{hv.get('fleet_alertmanager_port', 9093)}/api/v2/alerts"
           "?filter=alertname%3D%22VllmFleetReplicaUnhealthy%22")
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            alerts = json.loads(r.read())
    except (OSError, ValueError):
        return False
    return not [a for a in alerts if a.get("labels", {}).get("fleet_deployment") == fleet.deployment]


def healthy_fleet(fleet: Fleet, watcher: Watcher) -> bool:
    for hosts in fleet.replicas.values():
        try:
            if fleet.verdict(hosts[0])["state"] != "healthy":
                return False
        except OSError:
            return False
    latest = {}
    for t, n, st, _, _ in list(watcher.samples):
        latest[n] = st
    return (bool(latest) and all(st == "UP" for n, st in latest.items() if n in fleet.replicas)
            and quiet_pager(fleet))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-i", "--inventory", required=True)
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--replica", default="")
    p.add_argument("--host", default="")
    p.add_argument("--base-url", default="", help="default: the first balancer's front door of the inventory")
    p.add_argument("--model", default="")
    p.add_argument("--api-key-file", default="",
                   help="tenant key file (default: the inventory's generated key of its first tenant)")
    p.add_argument("--ca-file", default="", help="CA bundle (default: the inventory's lab CA when generated)")
    p.add_argument("--concurrency", type=int, default=3)
    p.add_argument("--think-time", type=float, default=0.0)
    p.add_argument("--stream-ratio", type=float, default=0.5)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout")
    p.add_argument("--max-requests", type=int, default=1_000_000)
    p.add_argument("--before", type=float, default=30.0, help="seconds of load before the fault")
    p.add_argument("--soak", type=float, default=600.0, help="soak mode: seconds of load")
    p.add_argument("--ready-timeout", type=float, default=900.0,
                   help="seconds to wait for every replica healthy and UP before starting")
    p.add_argument("--heal-timeout", type=float, default=900.0, help="seconds to wait for the replica back")
    p.add_argument("--heal-record-timeout", type=float, default=300.0,
                   help="seconds to wait for the healer to record how a heal it started ended")
    p.add_argument("--max-out-s", type=float, default=10.0)
    p.add_argument("--max-alert-s", type=float, default=60.0)
    p.add_argument("--max-back-s", type=float, default=300.0)
    p.add_argument("--sink-address", default="", help="default: the management network's gateway (.1)")
    p.add_argument("--sink-port", type=int, default=9099)
    p.add_argument("--backend", default="vllm")
    p.add_argument("--json", dest="json_path", default="")
    p.add_argument("--log-dir", default="", help="keep the raw logs here")
    args = p.parse_args(argv)
    fleet = Fleet(args.inventory)
    if not args.base_url or not args.model:
        door = rr.endpoint_from_inventory(args.inventory)  # TLS front door, lab CA, tenant key file
        args.base_url = args.base_url or door["url"]
        args.model = args.model or door["model"]
        args.api_key_file = args.api_key_file or door["key_file"]
        args.ca_file = args.ca_file or door["ca_file"]
    replica, host, inject, restore = pick(fleet, args.mode, args.replica, args.host)
    head = fleet.replicas[replica][0]
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="hang-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    sink_addr = args.sink_address or fleet.var(fleet.monitoring, "ansible_host").rsplit(".", 1)[0] + ".1"
    sink = Sink(sink_addr, args.sink_port)
    watcher = Watcher(fleet, args.backend, log_dir / "haproxy-servers.csv")
    print(f"[hang] mode {args.mode}: replica {replica}, host {host or '-'}; waiting for a healthy fleet "
          "(every verdict healthy, every replica UP, no replica page active)",
          flush=True)
    if not wait(lambda: healthy_fleet(fleet, watcher), args.ready_timeout, 2):
        watcher.stop()
        sink.stop()
        print(f"[hang] the fleet was not healthy and UP, or a replica page stayed active, within "
              f"{args.ready_timeout:.0f}s")
        return 2

    load_json = str(log_dir / "loadgen.json")
    cmd = rr.loadgen_cmd(args, 24 * 3600, load_json) + ["--per-request"]
    load = subprocess.Popen(cmd, stdout=open(log_dir / "loadgen.log", "w"), stderr=subprocess.STDOUT)
    result: dict = {"mode": args.mode, "replica": replica, "host": host, "concurrency": args.concurrency,
                    "think_time": args.think_time}
    problems: list[str] = []
    try:
        time.sleep(args.before if args.mode != "soak" else 0)
        t0 = time.time()
        result["fault_at"] = t0
        if args.mode == "soak":
            time.sleep(args.soak)
            left = [(t, n, st) for t, n, st, _, _ in watcher.samples if t >= t0 and n in fleet.replicas
                    and st != "UP"]
            alerts = [a for t, a in sink.alerts if t >= t0 and a.get("status") == "firing"
                      and a["labels"].get("alertname") == "VllmFleetReplicaUnhealthy"]
            result.update(out_of_rotation=len(left), alerts=len(alerts))
            if left:
                problems.append(f"a healthy replica left rotation under load: {left[:3]}")
            if alerts:
                problems.append(f"false alarm under load: {[a['labels'] for a in alerts]}")
        else:
            # the engine's launch before and after: a heal of the Ray nodes alone keeps it
            result["launch_before"] = fleet.verdict(head).get("launch_id")
            r = fleet.ssh(host, inject)
            print(f"[hang] {host}: `{inject}` -> rc {r.returncode} {r.stderr.strip()}", flush=True)
            if r.returncode != 0:
                problems.append(f"the fault could not be injected: {r.stderr.strip()}")
            out = wait(lambda: next((s for s in watcher.of(replica) if s[0] >= t0 and not s[1].startswith("UP")),
                                    None), 180, 0.2)
            if out:
                result["out_s"] = round(out[0] - t0, 1)
                before = [s for s in watcher.of(replica) if s[0] < out[0]]
                result["in_flight_at_out"] = before[-1][2] if before else 0
                result["status_at_out"] = out[1]
                print(f"[hang] out of rotation after {result['out_s']}s ({out[1]})", flush=True)
            else:
                problems.append("the replica never left rotation")

            def back():
                s = watcher.of(replica)
                if not (out and s and s[-1][1] == "UP" and s[-1][0] > out[0]):
                    return None
                try:
                    v = fleet.verdict(head)
                except OSError:
                    return None
                if v["state"] != "healthy":
                    return None
                result["launch_after"] = v.get("launch_id")
                return s[-1][0]

            # The alert and the way back are watched together, each timed when first seen (a
            # replica can be back before its alert, or the alert can come late). A cut link stays
            # cut until the page is out (or --max-alert-s + 30 s passed), as a real cut would,
            # then is put back so that the heal can pass its fabric check.
            t_alert = t_back = None
            restored = not restore
            alert_deadline = time.monotonic() + 180
            back_deadline = time.monotonic() + args.heal_timeout
            while time.monotonic() < back_deadline and (t_back is None or (
                    t_alert is None and time.monotonic() < alert_deadline)):
                if t_alert is None:
                    t_alert = sink.first("VllmFleetReplicaUnhealthy", replica, t0)
                    if t_alert:
                        print(f"[hang] alert at the sink after {t_alert - t0:.1f}s", flush=True)
                if not restored and (t_alert or time.time() - t0 > args.max_alert_s + 30):
                    fleet.ssh(host, restore)
                    restored = True
                    result["restored_s"] = round(time.time() - t0, 1)
                    print(f"[hang] {host}: `{restore}` after {result['restored_s']}s", flush=True)
                if restored and t_back is None:
                    t_back = back()
                time.sleep(0.5)
            if not restored:
                fleet.ssh(host, restore)
            result["alert_s"] = round(t_alert - t0, 1) if t_alert else None
            result["back_s"] = round(t_back - t0, 1) if t_back else None
            print(f"[hang] alert at the sink after {result['alert_s']}s; back in rotation, healthy, after "
                  f"{result['back_s']}s", flush=True)
            if out:
                during = [s for s in watcher.of(replica) if out[0] <= s[0] <= (t_back or time.time())
                          and not s[1].startswith("UP")]
                result["sent_after_out"] = (max(s[3] for s in during) - out[3]) if during else 0
    finally:
        load.send_signal(signal.SIGTERM)
        try:
            load.wait(timeout=args.timeout + 60)
        except subprocess.TimeoutExpired:
            load.kill()
        watcher.stop()
        sink.stop()
    summary = json.loads(Path(load_json).read_text()) if Path(load_json).exists() else {}
    failed = [r for r in summary.get("requests", []) if not r.get("ok")]
    t0 = result.get("fault_at", 0)
    result.update(requests=summary.get("total"), failed=len(failed),
                  failed_errors=sorted({r.get("error", "")[:120] for r in failed}),
                  # when each failed request started, seconds after the fault (for the timeline)
                  failed_started_s=[round(r.get("start", t0) - t0, 1) for r in failed],
                  latency_p99_s=summary.get("latency_p99_s"))
    healer_dir = fleet.var(fleet.healer, 'fleet_healer_state_dir', '/var/lib/vllm-fleet/healer')
    actions = f"{healer_dir}/actions.jsonl"

    def heal_records():
        heals = fleet.ssh(fleet.healer, f"sudo cat {shlex.quote(actions)}")
        return [r for r in (json.loads(line) for line in heals.stdout.splitlines() if line.strip())
                if r.get("ts", 0) >= result.get("fault_at", 0)]

    def heal_settled():
        # The heal playbook records its outcome after the relaunch's last task (the balancer
        # put-back, its own checks), seconds after the replica is back in rotation: a heal that
        # started is read once it has ended, or after --heal-record-timeout.
        recs = heal_records()
        mine = [r.get("result") for r in recs if r.get("replica") == replica]
        return (recs,) if "started" not in mine or {"healed", "failed"} & set(mine) else None
    settled = wait(heal_settled, args.heal_record_timeout, 2) if args.mode != "soak" else None
    result["healer"] = settled[0] if settled else heal_records()
    (log_dir / "alerts.json").write_text(json.dumps([{"t": t, **a} for t, a in sink.alerts], indent=1))
    (log_dir / "healer-actions.json").write_text(json.dumps(result["healer"], indent=1))
    # the relaunch's own log (its task timings: profile_tasks) of each heal since the fault
    if args.mode != "soak" and "fault_at" in result:
        logs = fleet.ssh(fleet.healer, f"sudo find {shlex.quote(healer_dir)} -maxdepth 1 -name 'heal-*.log' "
                         f"-newermt @{int(result['fault_at'])} -printf '%f\\n'")
        for name in logs.stdout.split():
            text = fleet.ssh(fleet.healer, f"sudo cat {shlex.quote(healer_dir + '/' + name)}").stdout
            (log_dir / name).write_text(text)

    if args.mode != "soak":
        for key, bound in (("out_s", args.max_out_s), ("alert_s", args.max_alert_s), ("back_s", args.max_back_s)):
            if result.get(key) is None or result[key] > bound:
                problems.append(f"{key} = {result.get(key)} (bound {bound})")
        if result.get("sent_after_out"):
            problems.append(f"{result['sent_after_out']} requests were sent to it after it left rotation")
        if len(failed) > result.get("in_flight_at_out", 0):
            problems.append(f"{len(failed)} requests failed, {result.get('in_flight_at_out', 0)} were in flight on it")
    result["problems"] = problems
    print(json.dumps({k: v for k, v in result.items() if k != "healer"}, indent=1))
    for r in result["healer"]:
        print(f"[hang] healer: {r.get('result')} {r.get('replica')}"
              f"{' (' + r['scope'] + ')' if r.get('scope') else ''}: {r.get('why', '')[:200]}")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(result, indent=1))
    print(f"[hang] raw logs: {log_dir}")
    for prob in problems:
        print(f"[hang] FAIL: {prob}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
