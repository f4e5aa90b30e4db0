"""``fleet-fabric-check``: all-reduce correctness, latency and bus bandwidth across nodes.

Direct launcher: run the same command on every node (only --node-rank differs)::

    fleet-fabric-check --nnodes 3 --node-rank R --master-addr A --nproc-per-node 1 \\
        --launch-id X --ifname eth1 [--max-size 1G] [--timeout 60] [--json-out F]

Ray launcher: run once, anywhere that can reach the Ray cluster; one task per node placed with a
STRICT_SPREAD placement group (ray_launcher.py)::

    fleet-fabric-check --launcher ray --ray-address HEAD:6379 --launch-id X [--nnodes 3]

Exit codes: 0 ok, 1 wrong result or a slow/broken pair, 124 timeout (the message names the node
and interface).
"""

from __future__ import annotations

import argparse
import os
import sys

from .coordinator import fabric_port
from .launcher import default_sizes, launch_local

UNITS = {"": 1, "B": 1, "K": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MIB": 1 << 20,
         "G": 1 << 30, "GIB": 1 << 30}


def parse_size(text: str) -> int:
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    return int(float(num) * UNITS[t[len(num):]])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fleet-fabric-check", description=__doc__.split("\n")[0])
    ap.add_argument("--launcher", choices=("direct", "ray"), default="direct",
                    help="direct: this node's ranks (run on every node); ray: every node's, "
                         "placed on a Ray cluster from here")
    ap.add_argument("--nnodes", type=int, default=None,
                    help="direct: default 1; ray: default every alive node that fits a bundle")
    ap.add_argument("--node-rank", type=int, default=0, help="direct launcher only")
    ap.add_argument("--master-addr", default=None,
                    help="direct: default 127.0.0.1; ray: default node 0's Ray address")
    ap.add_argument("--master-port", type=int, default=None,
                    help="default: derived from the launch id (same on every node)")
    ap.add_argument("--nproc-per-node", type=int, default=None,
                    help="default: number of GPUs, or 1 on CPU")
    ap.add_argument("--launch-id", default=os.environ.get("VLLM_FLEET_LAUNCH_ID"))
    ap.add_argument("--ifname", default=None,
                    help="default: GLOO_SOCKET_IFNAME (ray: of each node's own environment)")
    ap.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    ap.add_argument("--min-size", default="8")
    ap.add_argument("--max-size", default=None, help="default 1G on GPU, 16M on CPU")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per step")
    ap.add_argument("--no-pairs", action="store_true", help="skip the pairwise isolation phase")
    ap.add_argument("--pair-size", default="1M")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS") or "auto",
                    help="ray launcher: the cluster's GCS address (default RAY_ADDRESS or auto)")
    ap.add_argument("--ray-task-cpus", type=float, default=1.0,
                    help="ray launcher: CPUs of each node's bundle and task")
    ap.add_argument("--ray-timeout", type=float, default=60.0,
                    help="ray launcher: seconds to connect, and to place the placement group")
    ap.add_argument("--ray-auth-token-file", default=None,
                    help="ray launcher: the cluster's token file (token authentication); default: "
                         "RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH from the environment")
    return ap


def make_base(args, backend: str, master_addr: str | None) -> dict:
    """What every rank is told, except its own rank numbers (launcher.run_rank)."""
    max_size = parse_size(args.max_size) if args.max_size else (1 << 30 if backend == "nccl"
                                                               else 16 << 20)
    return {"launch_id": args.launch_id, "master_addr": master_addr,
            "master_port": args.master_port or fabric_port(args.launch_id), "backend": backend,
            "sizes": default_sizes(max_size, parse_size(args.min_size)),
            "timeout_s": args.timeout, "ifname": args.ifname, "pairs": not args.no_pairs,
            "pair_size": parse_size(args.pair_size), "json_out": args.json_out,
            "min_size": args.min_size, "max_size": max_size}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if not args.launch_id:
        parser().error("--launch-id (or VLLM_FLEET_LAUNCH_ID) is required")
    if args.launcher == "ray":
        from .ray_launcher import launch_ray

        return launch_ray(args, make_base)
    args.ifname = args.ifname or os.environ.get("GLOO_SOCKET_IFNAME")
    try:
        import torch

        gpus = torch.cuda.device_count() if args.backend != "gloo" else 0
    except Exception:
        gpus = 0
    backend = args.backend if args.backend != "auto" else ("nccl" if gpus else "gloo")
    nproc = args.nproc_per_node or (gpus if backend == "nccl" else 1)
    base = make_base(args, backend, args.master_addr or "127.0.0.1")
    return launch_local(base, nproc, args.node_rank, args.nnodes or 1)


if __name__ == "__main__":
    sys.exit(main())
