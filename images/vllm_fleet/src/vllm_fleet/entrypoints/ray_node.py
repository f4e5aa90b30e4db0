"""``fleet-ray-node --head|--worker``: one Ray node, every port on the cluster's own address.

Node IP: ``--node-ip``, else ``FLEET_RAY_NODE_IP``, else ``VLLM_HOST_IP`` (the fabric role writes
both into /etc/vllm-fleet/fabric.env). The dashboard listens on the node IP, never 0.0.0.0 (an
open Ray dashboard runs arbitrary code for anyone who reaches it). Every other port is fixed (the
``fleet_ray_*`` settings), so a firewall can be written for them.

A worker first checks that it can open a TCP connection to the head's GCS port; if not, it exits
(code 3) naming the head address and its own node IP, instead of letting ``ray start`` retry.

Token authentication (``RAY_AUTH_MODE=token``, the token in the file ``RAY_AUTH_TOKEN_PATH``; the
ray_cluster role sets both): a missing or empty token file fails here, named, before ``ray start``.
"""
import argparse
import os
import socket
import sys
import time

from .. import fabric_env, ray_auth
from . import die, exec_or_print, first, merged_env

# (flag, env var, default, ray option); env vars are what the ray_cluster role passes.
PORTS = [
    ("port", "FLEET_RAY_PORT", 6379, None),  # head: --port; worker: part of --address
    ("dashboard_port", "FLEET_RAY_DASHBOARD_PORT", 8265, "--dashboard-port"),
    ("client_port", "FLEET_RAY_CLIENT_PORT", 10001, "--ray-client-server-port"),
    ("node_manager_port", "FLEET_RAY_NODE_MANAGER_PORT", 6380, "--node-manager-port"),
    ("object_manager_port", "FLEET_RAY_OBJECT_MANAGER_PORT", 6381, "--object-manager-port"),
    ("dashboard_agent_port", "FLEET_RAY_DASHBOARD_AGENT_PORT", 52365,
     "--dashboard-agent-listen-port"),
    ("dashboard_agent_grpc_port", "FLEET_RAY_DASHBOARD_AGENT_GRPC_PORT", 52366,
     "--dashboard-agent-grpc-port"),
    ("runtime_env_agent_port", "FLEET_RAY_RUNTIME_ENV_AGENT_PORT", 52367,
     "--runtime-env-agent-port"),
    ("metrics_export_port", "FLEET_RAY_METRICS_EXPORT_PORT", 8090, "--metrics-export-port"),
    ("min_worker_port", "FLEET_RAY_MIN_WORKER_PORT", 10002, "--min-worker-port"),
    ("max_worker_port", "FLEET_RAY_MAX_WORKER_PORT", 10999, "--max-worker-port"),
]
HEAD_ONLY = {"dashboard_port", "client_port"}


def parser():
    p = argparse.ArgumentParser(prog="fleet-ray-node", description=__doc__.splitlines()[0])
    role = p.add_mutually_exclusive_group(required=True)
    role.add_argument("--head", action="store_true", help="start the Ray head (GCS + dashboard)")
    role.add_argument("--worker", action="store_true", help="join the head as a worker node")
    p.add_argument("--node-ip", help="this node's cluster address (default: FLEET_RAY_NODE_IP, "
                   "then VLLM_HOST_IP)")
    p.add_argument("--head-address", help="head's cluster IP (workers; default FLEET_RAY_HEAD_IP)")
    p.add_argument("--num-cpus", type=int, help="CPUs to register (default FLEET_RAY_NUM_CPUS)")
    p.add_argument("--num-gpus", type=int, help="GPUs to register (default FLEET_RAY_NUM_GPUS)")
    p.add_argument("--temp-dir", help="Ray temp/session dir (default FLEET_RAY_TEMP_DIR)")
    p.add_argument("--fabric-env", help="fabric env file (default /etc/vllm-fleet/fabric.env)")
    p.add_argument("--connect-timeout", type=float, default=None,
                   help="seconds a worker waits for the head's GCS port (default 60)")
    p.add_argument("--no-dashboard", action="store_true", help="head without the dashboard")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    for name, env_key, default, _ in PORTS:
        p.add_argument("--" + name.replace("_", "-"), type=int, dest=name,
                       help=f"default {env_key} or {default}")
    p.add_argument("extra", nargs=argparse.REMAINDER,
                   help="after --: extra arguments for `ray start`")
    return p


def build_command(args, env):
    """Return (argv, env) for `ray start --block ...`. Raises ValueError on bad settings."""
    node_ip = args.node_ip or first(env, *fabric_env.NODE_IP_KEYS)
    if not node_ip:
        raise ValueError("no node IP: pass --node-ip or set FLEET_RAY_NODE_IP/VLLM_HOST_IP "
                         "(the fabric role writes them to /etc/vllm-fleet/fabric.env)")
    if node_ip in ("0.0.0.0", "::"):
        raise ValueError(f"node IP {node_ip} is a wildcard; Ray must bind the cluster address")
    problem = ray_auth.token_problem(env)
    if problem:
        raise ValueError(problem)
    ports = {}
    for name, env_key, default, _ in PORTS:
        value = getattr(args, name)
        ports[name] = int(value if value is not None else first(env, env_key, default=default))
    if ports["min_worker_port"] > ports["max_worker_port"]:
        raise ValueError("min worker port is above max worker port")

    # `ray start`, through ray_start.py: Ray's fixed 30 s node-registration wait becomes
    # FLEET_RAY_REGISTER_TIMEOUT (a busy host misses 30 s and the head restarts in a loop).
    argv = [sys.executable, "-m", "vllm_fleet.entrypoints.ray_start", "start", "--block",
            f"--node-ip-address={node_ip}", "--disable-usage-stats"]
    if args.head:
        argv += ["--head", f"--port={ports['port']}"]
        if args.no_dashboard:
            argv += ["--include-dashboard=false"]
        else:
            argv += ["--include-dashboard=true", f"--dashboard-host={node_ip}"]
        head_ip = node_ip
    else:
        head_ip = args.head_address or first(env, "FLEET_RAY_HEAD_IP", "FLEET_RAY_HEAD_ADDRESS")
        if not head_ip:
            raise ValueError("a worker needs --head-address or FLEET_RAY_HEAD_IP")
        argv += [f"--address={head_ip}:{ports['port']}"]
    for name, _, _, flag in PORTS:
        if flag is None or (name in HEAD_ONLY and not args.head):
            continue
        if name == "dashboard_port" and args.no_dashboard:
            continue
        argv.append(f"{flag}={ports[name]}")
    num_cpus = args.num_cpus if args.num_cpus is not None else first(env, "FLEET_RAY_NUM_CPUS")
    num_gpus = args.num_gpus if args.num_gpus is not None else first(env, "FLEET_RAY_NUM_GPUS")
    if num_cpus not in (None, ""):
        argv.append(f"--num-cpus={int(num_cpus)}")
    if num_gpus not in (None, ""):
        argv.append(f"--num-gpus={int(num_gpus)}")
    temp_dir = args.temp_dir or first(env, "FLEET_RAY_TEMP_DIR")
    if temp_dir:
        argv.append(f"--temp-dir={temp_dir}")
    extra = list(args.extra or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    for item in extra:
        if item.startswith("--dashboard-host") and "0.0.0.0" in item:
            raise ValueError("refusing --dashboard-host=0.0.0.0 (public Ray dashboards run code)")
    argv += extra

    out_env = dict(env)
    # Ray, Gloo and NCCL in the node's actors must use the fabric address too.
    out_env["VLLM_HOST_IP"] = env.get("VLLM_HOST_IP") or node_ip
    out_env["RAY_NODE_IP_ADDRESS"] = node_ip
    return argv, out_env, head_ip, ports


def wait_for_tcp(host, port, timeout):
    """True when a TCP connection to host:port opens within timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=3):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(1)


def main(argv=None, environ=None):
    args = parser().parse_args(argv)
    env = merged_env(environ, args.fabric_env)
    try:
        cmd, out_env, head_ip, ports = build_command(args, env)
    except ValueError as exc:
        die(str(exc))
    if args.worker and not args.dry_run:
        timeout = args.connect_timeout
        if timeout is None:
            timeout = float(first(env, "FLEET_RAY_CONNECT_TIMEOUT", default=60))
        if not wait_for_tcp(head_ip, ports["port"], timeout):
            node_ip = out_env["RAY_NODE_IP_ADDRESS"]
            die(f"worker {node_ip} cannot reach the Ray head {head_ip}:{ports['port']} on the "
                f"fabric network within {timeout:.0f}s", code=3)
    return exec_or_print(cmd, out_env, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
