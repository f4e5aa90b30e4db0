#!/usr/bin/env python3
"""Fabric settings for two simulated hosts on one machine, computed by the fabric role's own code.

    fabric_env_sim.py OUTDIR [--head-ip 127.0.0.2] [--worker-ip 127.0.0.3] [--sysfs /sys]

The GPU machine is one host with no `ip` command, and both "hosts" share its loopback device, so
the facts that `ip` would print on each of them are simulated; everything after that is
`vllm_fleet.fabric_env.detect()` itself (the function behind the fabric role's module, through
the module_utils symlink): parsing, the head's interface (``fleet_fabric_interface=lo``, as an
inventory must set when the fabric NIC cannot be told automatically), the worker's interface BY
ROUTE to the head's address (no interface given), and the NCCL IB decision from the real
``/sys/class/infiniband`` with ``fleet_nccl_ib=off`` (sockets between the two "hosts").

Writes OUTDIR/node-a/{fabric.env,fabric.json,nccl.conf} (head) and OUTDIR/node-b/... (worker),
rendered by fabric_env's renderers, then appends what only the simulation needs: a distinct
NCCL_HOSTID per "host" (NCCL otherwise sees one boot id and uses P2P/SHM between the GPUs) and
FLEET_NODE_NAME. Prints each node's summary line.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "images", "vllm_fleet", "src"))

from vllm_fleet import fabric_env  # noqa: E402


def ip_runner(own_ip: str, head_ip: str):
    """What `ip` prints on a host whose only global IPv4 address is own_ip on lo, with no default
    route and head_ip reachable directly on lo (another host on the same segment)."""
    def run(argv):
        args = argv[1:]
        if args[:4] == ["-o", "-4", "addr", "show"]:
            return 0, (f"1: lo    inet {own_ip}/8 scope global lo\\       valid_lft forever "
                       f"preferred_lft forever\n"), ""
        if args[:4] == ["-4", "route", "show", "default"]:
            return 0, "", ""
        if args[:2] == ["route", "get"]:
            if args[2] == own_ip:
                return 0, f"local {own_ip} dev lo table local src {own_ip} uid 0 \n    cache \n", ""
            return 0, f"{args[2]} dev lo src {own_ip} uid 0 \n    cache \n", ""
        return 1, "", f"simulated ip: unsupported {argv}"
    return run


def write(outdir: str, name: str, result: dict, hostid: str) -> str:
    d = os.path.join(outdir, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "fabric.env"), "w", encoding="utf-8") as fh:
        fh.write(fabric_env.render_env_file(result))
        fh.write("# simulation of two hosts on one machine (tests/gpu/ray_pp.sh), not the role's:\n")
        fh.write(f"NCCL_HOSTID={hostid}\nFLEET_NODE_NAME={name}\n")
    with open(os.path.join(d, "fabric.json"), "w", encoding="utf-8") as fh:
        fh.write(fabric_env.render_json(result))
    with open(os.path.join(d, "nccl.conf"), "w", encoding="utf-8") as fh:
        fh.write(fabric_env.render_nccl_conf(result))
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--head-ip", default="127.0.0.2")
    ap.add_argument("--worker-ip", default="127.0.0.3")
    ap.add_argument("--sysfs", default="/sys")
    args = ap.parse_args()
    head = fabric_env.detect(host="node-a", role="head", interface="lo", nccl_ib="off",
                             sysfs_root=args.sysfs, runner=ip_runner(args.head_ip, args.head_ip))
    worker = fabric_env.detect(host="node-b", role="worker", head_address=head["address"],
                               head_host="node-a", head=head, nccl_ib="off",
                               sysfs_root=args.sysfs,
                               runner=ip_runner(args.worker_ip, args.head_ip))
    for name, result in (("node-a", head), ("node-b", worker)):
        path = write(args.outdir, name, result, hostid=f"{name}-simulated")
        print(fabric_env.summary_line(result), "->", os.path.join(path, "fabric.env"))
        for reason in result["reasons"]:
            print("   ", reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
