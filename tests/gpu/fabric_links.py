#!/usr/bin/env python3
"""GPU machine, read-only: the exporter's fabric link reader (exporter/vllm_fleet_exporter/fabric.py
links_down, what fabric_link_down is built on) against this host's real sysfs. Prints every netdev
operstate and IB/RoCE port state file as the kernel wrote it, then what links_down says of each.
Nothing is changed (no link is taken down: that is the lab's cut-fabric test).

  python3 tests/gpu/fabric_links.py > $OUT/fabric-links.txt
"""
import glob
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "exporter"))
from vllm_fleet_exporter.fabric import links_down  # noqa: E402


def raw(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError as exc:
        return f"<{exc.strerror}>"


netdevs = sorted(os.path.basename(p) for p in glob.glob("/sys/class/net/*"))
ports = sorted(f"{p.split('/')[4]}:{p.split('/')[6]}" for p in glob.glob("/sys/class/infiniband/*/ports/*"))
print(f"netdevs: {len(netdevs)}   IB/RoCE ports: {len(ports)}")
for dev in netdevs:
    print(f"net {dev:16} operstate={raw(f'/sys/class/net/{dev}/operstate'):10} "
          f"carrier={raw(f'/sys/class/net/{dev}/carrier'):8} links_down={links_down(dev, [])}")
for port in ports:
    hca, num = port.split(":")
    base = f"/sys/class/infiniband/{hca}/ports/{num}"
    print(f"ib  {port:16} state={raw(base + '/state')!r:14} phys_state={raw(base + '/phys_state')!r:16} "
          f"link_layer={raw(base + '/link_layer'):11} links_down={links_down('', [port])}")
print("a name that is not there:", links_down("fleetnone0", ["nohca0:1"]))
