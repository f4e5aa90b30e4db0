# Over 350 lines on purpose (issue 19): Ansible ships this one file to the nodes as module_utils
# (symlink ansible/plugins/module_utils/fleet_fabric_env.py), so it stays a single stdlib-only file.
"""Fabric settings of one node: the interface that carries NCCL/Gloo/Ray traffic and the
InfiniBand/RoCE HCAs NCCL may use, computed on the node itself.

Pure, stdlib-only, Python >= 3.9. The same file is used by

* the ``fabric`` Ansible role, through the symlink
  ``ansible/plugins/module_utils/fleet_fabric_env.py`` (module ``fleet_fabric_facts``), and
* the serving image's entrypoints, which read the env file the role wrote (``entrypoints.merged_env``;
  without the file they run with the container's own environment only, nothing is recomputed).

Rules (docs/design.md, roles/fabric/README.md):

* Head: its fabric address is the IPv4 address of ``fleet_fabric_interface``; when that is empty
  the head must have exactly one non-virtual interface with a global IPv4 address that does not
  carry a default route, otherwise the head fails and asks for ``fleet_fabric_interface``.
* Worker: the interface is the one the kernel routes the head's fabric address through
  (``ip route get``), i.e. chosen by route, never by name. The route must be directly connected
  (no gateway) unless ``fabric_allow_routed``; a route through the management default
  gateway always fails. ``fleet_fabric_interface`` overrides the choice (a warning is recorded
  when it disagrees with the route).
* An interface that carries the default route (management) is never the fabric, chosen or given,
  unless ``fleet_fabric_dedicated`` says that network carries nothing but the fabric.
* HCAs: every port under ``/sys/class/infiniband`` gets one row of a decision table (HCA, port,
  state, link layer, netdev, subnet, GID, used or why not). A port is an NCCL HCA when it is
  ACTIVE, is not an SR-IOV virtual function next to its physical function, its netdev does not
  carry the default route (other than a dedicated fabric interface), its netdev is address-less
  (an InfiniBand rail) or on the fabric subnet (or ``fabric_rdma_subnets``), and, for RoCE, it
  has a usable GID (RoCE v2 IPv4-mapped first). InfiniBand ports that are cabled (LinkUp) but
  stuck in INIT/ARMED (no subnet manager) stop the node when no HCA is usable (never a silent
  fall-back to sockets) and are warned about otherwise. ``fleet_nccl_ib=off`` disables IB,
  ``on`` requires it, ``auto`` uses it when present and the head uses it too.
  ``fleet_nccl_ib_hca`` wins over detection.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = [
    "FabricError", "parse_route_get", "parse_addr_show", "parse_default_routes",
    "read_infiniband", "select_gid_index", "compute_head", "compute_worker", "compute_ib",
    "render_env_file", "render_nccl_conf", "render_json", "summary_line", "render_table", "collect",
    "subprocess_runner", "detect", "parse_env_text", "load_env_file", "node_ip", "ENV_KEYS", "ENV_OWNERS",
    "NODE_IP_KEYS",
]

#: Keys written to /etc/vllm-fleet/fabric.env, in this order when present.
ENV_KEYS = (
    "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "VLLM_HOST_IP", "FLEET_RAY_NODE_IP",
    "NCCL_IB_DISABLE", "NCCL_IB_HCA", "NCCL_IB_GID_INDEX", "NCCL_IB_ROCE_VERSION_NUM",
)

#: The keys of fabric.env that hold the node's fabric address, in the order a reader takes them
#: (the first non-empty one). Both are written, with the same address (render_env_file); the Ray
#: node IP comes first as in fleet-ray-node (entrypoints/ray_node.py) and the exporter, so the
#: address the roles use is the one the Ray head's GCS listens on.
NODE_IP_KEYS = ("FLEET_RAY_NODE_IP", "VLLM_HOST_IP")

#: The inventory setting that decides each of ENV_KEYS: a hand-set value of one of these in a
#: container's environment would override this module's decision (the validate stage refuses it).
ENV_OWNERS = {
    "NCCL_SOCKET_IFNAME": "fleet_fabric_interface", "GLOO_SOCKET_IFNAME": "fleet_fabric_interface",
    "VLLM_HOST_IP": "fleet_fabric_interface", "FLEET_RAY_NODE_IP": "fleet_fabric_interface",
    "NCCL_IB_DISABLE": "fleet_nccl_ib", "NCCL_IB_HCA": "fleet_nccl_ib_hca",
    "NCCL_IB_GID_INDEX": "the fabric role (it reads the RoCE GIDs; fleet_nccl_ib_hca picks the HCAs)",
    "NCCL_IB_ROCE_VERSION_NUM": "the fabric role (it reads the RoCE GIDs; fleet_nccl_ib_hca picks the HCAs)",
}

#: Interface name prefixes that are never a fabric (container bridges, tunnels, overlays).
VIRTUAL_PREFIXES = (
    "docker", "br-", "veth", "virbr", "cni", "flannel", "cali", "vxlan", "tun", "tap", "wg",
    "tailscale", "kube", "weave", "podman", "lxc", "vnet", "cilium", "genev", "zt",
)

ZERO_GID = "0000:0000:0000:0000:0000:0000:0000:0000"
IPV4_MAPPED_PREFIX = "0000:0000:0000:0000:0000:ffff:"

Runner = Callable[[List[str]], Tuple[int, str, str]]


class FabricError(Exception):
    """A fabric setting that cannot work. The message names the host and the variable."""


# --- parsing `ip` output ---------------------------------------------------------------------

def parse_route_get(text: str) -> Dict[str, Optional[str]]:
    """Parse `ip route get ADDR` (text form) into type, dst, gateway, dev, src."""
    tokens = text.split()
    route: Dict[str, Optional[str]] = {"type": "unicast", "dst": None, "gateway": None,
                                       "dev": None, "src": None}
    if not tokens:
        return route
    i = 0
    if tokens[0] in ("local", "broadcast", "unreachable", "prohibit", "blackhole", "multicast"):
        route["type"] = tokens[0]
        i = 1
    if i < len(tokens):
        route["dst"] = tokens[i]
    keys = {"via": "gateway", "dev": "dev", "src": "src"}
    while i < len(tokens) - 1:
        key = keys.get(tokens[i])
        if key and route[key] is None:
            route[key] = tokens[i + 1]
            i += 2
            continue
        i += 1
    return route


def parse_addr_show(text: str) -> Dict[str, List[str]]:
    """Parse `ip -o -4 addr show` into {ifname: ["a.b.c.d/nn", ...]}, global scope only."""
    result: Dict[str, List[str]] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[2] != "inet":
            continue
        name = fields[1].split("@", 1)[0]
        scope = fields[fields.index("scope") + 1] if "scope" in fields[:-1] else "global"
        if scope != "global":
            continue
        result.setdefault(name, []).append(fields[3])
    return result


def parse_default_routes(text: str) -> List[Dict[str, Optional[str]]]:
    """Parse `ip -4 route show default` into [{"gateway", "dev"}]."""
    routes = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0] != "default":
            continue
        route: Dict[str, Optional[str]] = {"gateway": None, "dev": None}
        for key, name in (("via", "gateway"), ("dev", "dev")):
            if key in fields[:-1]:
                route[name] = fields[fields.index(key) + 1]
        routes.append(route)
    return routes


# --- /sys/class/infiniband ---------------------------------------------------------------------

def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read().strip()
    except OSError:  # missing file, or EINVAL reading gid_attrs of an empty GID
        return None


def _numeric_names(path: str) -> List[int]:
    try:
        return sorted(int(n) for n in os.listdir(path) if n.isdigit())
    except OSError:
        return []


def read_infiniband(sysfs_root: str = "/sys") -> List[Dict[str, Any]]:
    """Every HCA under <sysfs_root>/class/infiniband with its ports, states, link layers and
    non-zero GIDs (index, gid, type, ndev)."""
    base = os.path.join(sysfs_root, "class", "infiniband")
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    hcas = []
    for name in names:
        ports = []
        ports_dir = os.path.join(base, name, "ports")
        for number in _numeric_names(ports_dir):
            pdir = os.path.join(ports_dir, str(number))
            state_raw = _read(os.path.join(pdir, "state")) or ""
            state = state_raw.split(":", 1)[-1].strip().upper() if state_raw else "UNKNOWN"
            gids = []
            for index in _numeric_names(os.path.join(pdir, "gids")):
                gid = (_read(os.path.join(pdir, "gids", str(index))) or "").lower()
                if not gid or gid == ZERO_GID:
                    continue
                gids.append({
                    "index": index,
                    "gid": gid,
                    "type": _read(os.path.join(pdir, "gid_attrs", "types", str(index))),
                    "ndev": _read(os.path.join(pdir, "gid_attrs", "ndevs", str(index))),
                })
            ports.append({
                "port": number,
                "state": state,
                "phys_state": (_read(os.path.join(pdir, "phys_state")) or "").split(":", 1)[-1].strip(),
                "link_layer": _read(os.path.join(pdir, "link_layer")) or "InfiniBand",
                "gids": gids,
                "netdev": _port_netdev(os.path.join(base, name), number, gids),
            })
        device = os.path.join(base, name, "device")
        physfn = os.path.join(device, "physfn")
        hcas.append({"name": name, "ports": ports,
                     "pci": os.path.basename(os.path.realpath(device)) if os.path.exists(device) else None,
                     "physfn": os.path.basename(os.path.realpath(physfn)) if os.path.exists(physfn) else None})
    return hcas


def _port_netdev(hca_dir: str, port: int, gids: List[Dict[str, Any]]) -> Optional[str]:
    """The network interface of an HCA port: RoCE GIDs name it; otherwise the netdev of the
    HCA's PCI function whose dev_port is port-1 (IPoIB ib0, or the only one)."""
    for gid in gids:
        if gid.get("ndev"):
            return gid["ndev"]
    net = os.path.join(hca_dir, "device", "net")
    try:
        names = sorted(os.listdir(net))
    except OSError:
        return None
    for name in names:
        dev_port = _read(os.path.join(net, name, "dev_port"))
        if dev_port is not None and dev_port.isdigit() and int(dev_port) == port - 1:
            return name
    return names[0] if len(names) == 1 else None


def _gid_ipv4(gid: str) -> Optional[str]:
    if not gid.startswith(IPV4_MAPPED_PREFIX):
        return None
    tail = gid[len(IPV4_MAPPED_PREFIX):].replace(":", "")
    try:
        return str(ipaddress.IPv4Address(int(tail, 16)))
    except ValueError:
        return None


def select_gid_index(port: Dict[str, Any]) -> Tuple[Optional[int], str]:
    """GID index NCCL should use on a RoCE port: RoCE v2 with an IPv4-mapped GID first, then
    RoCE v2 with a global IPv6 GID, then RoCE v1 IPv4-mapped. Returns (index, why)."""
    gids = port.get("gids") or []

    def kind(entry: Dict[str, Any]) -> str:
        return (entry.get("type") or "").lower()

    v2 = [g for g in gids if "v2" in kind(g)]
    for g in v2:
        if _gid_ipv4(g["gid"]):
            return g["index"], "RoCE v2 IPv4 GID %s (%s)" % (g["index"], _gid_ipv4(g["gid"]))
    for g in v2:
        if not g["gid"].startswith("fe80"):
            return g["index"], "RoCE v2 IPv6 GID %s" % g["index"]
    for g in gids:
        if _gid_ipv4(g["gid"]):
            return g["index"], "RoCE v1 IPv4 GID %s (no RoCE v2 GID)" % g["index"]
    return None, "no usable RoCE GID (no IPv4/IPv6 address on the HCA's netdev?)"


# --- the decisions -----------------------------------------------------------------------------

def _is_virtual(name: str) -> bool:
    return name == "lo" or name.startswith(VIRTUAL_PREFIXES)


def _first_ipv4(addresses: Dict[str, List[str]], ifname: str,
                near: Optional[str] = None) -> Optional[str]:
    cidrs = addresses.get(ifname) or []
    if near:
        for cidr in cidrs:
            try:
                if ipaddress.IPv4Address(near) in ipaddress.IPv4Interface(cidr).network:
                    return cidr.split("/", 1)[0]
            except ValueError:
                continue
    return cidrs[0].split("/", 1)[0] if cidrs else None


def _default_route_text(default_routes: List[Dict[str, Optional[str]]], dev: str) -> str:
    routes = [r for r in default_routes if r.get("dev") == dev]
    return "; ".join("default via %s dev %s" % (r.get("gateway") or "-", dev) if r.get("gateway")
                     else "default dev %s" % dev for r in routes)


def _refuse_default_route(host: str, interface: str, how: str,
                          default_routes: List[Dict[str, Optional[str]]], dedicated: bool) -> Optional[str]:
    """FabricError when the fabric interface carries the default route and the inventory does not
    say that network is the fabric's alone; the warning text when it does."""
    route = _default_route_text(default_routes, interface)
    if not route:
        return None
    if not dedicated:
        raise FabricError(
            "host %s: fabric interface %s (%s) carries the default route (%s): Ray, NCCL and Gloo "
            "would listen on the management network; name the fabric NIC in fleet_fabric_interface, "
            "or set fleet_fabric_dedicated=true if that network carries nothing but the fabric"
            % (host, interface, how, route))
    return ("fabric interface %s carries the default route (%s); accepted because "
            "fleet_fabric_dedicated=true" % (interface, route))


def _network(addresses: Dict[str, List[str]], interface: str, address: Optional[str]) -> Optional[str]:
    for cidr in addresses.get(interface) or []:
        try:
            iface = ipaddress.IPv4Interface(cidr)
        except ValueError:
            continue
        if address is None or str(iface.ip) == address:
            return str(iface.network)
    return None


def compute_head(*, host: str, addresses: Dict[str, List[str]],
                 default_routes: List[Dict[str, Optional[str]]],
                 interface: str = "", dedicated: bool = False) -> Dict[str, Any]:
    """The head's fabric interface and address (see module docstring)."""
    reasons = []
    warnings: List[str] = []
    default_devs = {r["dev"] for r in default_routes if r.get("dev")}
    if interface:
        if interface not in addresses:
            raise FabricError(
                "host %s: fleet_fabric_interface=%r has no global IPv4 address on this host "
                "(interfaces with one: %s)" % (host, interface, ", ".join(sorted(addresses)) or "none"))
        reasons.append("interface %s from fleet_fabric_interface" % interface)
        how = "fleet_fabric_interface"
    else:
        candidates = sorted(n for n in addresses if not _is_virtual(n) and n not in default_devs)
        if not candidates and dedicated:
            candidates = sorted(n for n in addresses if not _is_virtual(n))
        if len(candidates) != 1:
            raise FabricError(
                "host %s (head): cannot tell the fabric interface: %s non-default-route interfaces "
                "with an IPv4 address (%s; default route via %s); set fleet_fabric_interface for "
                "this host" % (host, len(candidates), ", ".join(candidates) or "none",
                               ", ".join(sorted(default_devs)) or "none"))
        interface = candidates[0]
        reasons.append("interface %s: the head's only non-default-route interface" % interface
                       if interface not in default_devs else
                       "interface %s: the head's only interface (fleet_fabric_dedicated)" % interface)
        how = "detected"
    warning = _refuse_default_route(host, interface, how, default_routes, dedicated)
    if warning:
        warnings.append(warning)
    address = _first_ipv4(addresses, interface)
    return {"role": "head", "host": host, "interface": interface, "address": address,
            "network": _network(addresses, interface, address),
            "head_address": address, "route": None, "reasons": reasons, "warnings": warnings}


def compute_worker(*, host: str, head_host: str, head_address: str,
                   route: Optional[Dict[str, Optional[str]]], route_error: str = "",
                   addresses: Dict[str, List[str]],
                   default_routes: List[Dict[str, Optional[str]]],
                   interface: str = "", allow_routed: bool = False,
                   dedicated: bool = False) -> Dict[str, Any]:
    """A worker's fabric interface: the one routing to the head's fabric address."""
    reasons: List[str] = []
    warnings: List[str] = []
    if not head_address:
        raise FabricError("host %s: the fabric address of its head %s is unknown (did the head "
                          "fail the fabric stage?)" % (host, head_host))
    if route is None or not route.get("dev") or route.get("type") in (
            "unreachable", "prohibit", "blackhole"):
        raise FabricError("host %s: no route to head %s's fabric address %s (%s)"
                          % (host, head_host, head_address, (route_error or "unreachable").strip()))
    if route.get("type") == "local":
        raise FabricError("host %s: head %s's fabric address %s is an address of this host itself"
                          % (host, head_host, head_address))
    gateway = route.get("gateway")
    if gateway:
        via_default = any(r.get("gateway") == gateway and r.get("dev") == route["dev"]
                          for r in default_routes)
        problem = None
        if via_default:
            problem = ("the route to head %s's fabric address %s goes via the default gateway %s on "
                       "%s instead of a directly connected fabric interface"
                       % (head_host, head_address, gateway, route["dev"]))
        elif not allow_routed:
            problem = ("the route to head %s's fabric address %s goes via gateway %s on %s, not a "
                       "directly connected interface (set fabric_allow_routed=true for a "
                       "routed fabric)" % (head_host, head_address, gateway, route["dev"]))
        if problem and not interface:
            raise FabricError("host %s: %s; fix the fabric network or set fleet_fabric_interface"
                              % (host, problem))
        if problem:
            warnings.append(problem)
    routed_dev = route["dev"]
    if interface:
        if interface not in addresses:
            raise FabricError(
                "host %s: fleet_fabric_interface=%r has no global IPv4 address on this host "
                "(interfaces with one: %s)" % (host, interface, ", ".join(sorted(addresses)) or "none"))
        if interface != routed_dev:
            warnings.append("fleet_fabric_interface=%s overrides %s, the interface routing to head "
                            "%s (%s)" % (interface, routed_dev, head_host, head_address))
        reasons.append("interface %s from fleet_fabric_interface" % interface)
        address = _first_ipv4(addresses, interface, near=head_address)
        how = "fleet_fabric_interface"
    else:
        interface = routed_dev
        address = route.get("src") or _first_ipv4(addresses, interface, near=head_address)
        reasons.append("interface %s carries the route to head %s (%s)%s"
                       % (interface, head_host, head_address,
                          " via %s" % gateway if gateway else ", directly connected"))
        how = "routes to head %s" % head_host
    if not address:
        raise FabricError("host %s: fabric interface %s has no IPv4 address" % (host, interface))
    warning = _refuse_default_route(host, interface, how, default_routes, dedicated)
    if warning:
        warnings.append(warning)
    return {"role": "worker", "host": host, "interface": interface, "address": address,
            "network": _network(addresses, interface, address),
            "head_address": head_address, "head_host": head_host,
            "route": {k: route.get(k) for k in ("dev", "src", "gateway")},
            "reasons": reasons, "warnings": warnings}


def _port_rows(*, hcas: List[Dict[str, Any]], addresses: Dict[str, List[str]], default_devs: set,
               fabric_interface: str, fabric_network: Optional[str],
               rdma_subnets: List[str]) -> List[Dict[str, Any]]:
    """One row per HCA port: what it is and whether NCCL may use it (why not, when not)."""
    pf_of = {h["pci"]: h["name"] for h in hcas if h.get("pci")}
    networks = [ipaddress.ip_network(n, strict=False) for n in ([fabric_network] if fabric_network else [])
                + list(rdma_subnets)]
    rows = []
    for h in hcas:
        for p in h["ports"]:
            netdev = p.get("netdev")
            cidrs = [c for c in (addresses.get(netdev) or [])] if netdev else []
            subnets = []
            for cidr in cidrs:
                try:
                    subnets.append(ipaddress.IPv4Interface(cidr).network)
                except ValueError:
                    continue
            row = {"hca": h["name"], "port": p["port"], "state": p["state"], "link_layer": p["link_layer"],
                   "netdev": netdev, "subnet": ",".join(str(n) for n in subnets) or None, "gid": None,
                   "used": False, "why": "", "stuck": False, "no_gid": False}
            pf = pf_of.get(h.get("physfn"))
            roce = p["link_layer"].lower() == "ethernet"
            index, gid_why = select_gid_index(p) if roce else (None, "")
            row["gid"] = index  # shown for every RoCE port; used only where the port is
            if pf:
                row["why"] = "SR-IOV virtual function of %s (the physical function is used)" % pf
            elif p["state"] != "ACTIVE":
                if (not roce and p.get("phys_state", "").lower() == "linkup"
                        and p["state"] in ("INIT", "ARMED")):
                    row["stuck"] = True
                    row["why"] = "%s with the link up: no subnet manager has activated it" % p["state"]
                else:
                    row["why"] = "%s (%s)" % (p["state"], p.get("phys_state") or "no link")
            elif netdev and netdev in default_devs and netdev != fabric_interface:
                row["why"] = "netdev %s carries the default route (management)" % netdev
            elif subnets and networks and not any(n.overlaps(f) for n in subnets for f in networks):
                row["why"] = ("netdev %s is not on the fabric subnet %s%s" % (
                    netdev, fabric_network or "?", " or fabric_rdma_subnets" if rdma_subnets else
                    " (a compute rail on its own subnet? list it in fabric_rdma_subnets)"))
            elif roce:
                row.update(no_gid=index is None, used=index is not None, why=gid_why)
            else:
                row.update(used=True, why="ACTIVE InfiniBand")
            rows.append(row)
    return rows


def _port_name(row: Dict[str, Any]) -> str:
    return "%s:%s" % (row["hca"], row["port"])


def compute_ib(*, host: str, hcas: List[Dict[str, Any]], nccl_ib: str = "auto",
               ib_hca: str = "", head: Optional[Dict[str, Any]] = None,
               head_host: str = "", addresses: Optional[Dict[str, List[str]]] = None,
               default_routes: Optional[List[Dict[str, Optional[str]]]] = None,
               fabric_interface: str = "", fabric_network: Optional[str] = None,
               rdma_subnets: Optional[List[str]] = None) -> Dict[str, Any]:
    """NCCL_IB_* for this node and the per-port decision table. ``head`` is the head's result
    (None on the head itself)."""
    if nccl_ib not in ("auto", "on", "off"):
        raise FabricError("host %s: fleet_nccl_ib=%r: use auto, on or off" % (host, nccl_ib))
    env: Dict[str, str] = {}
    reasons: List[str] = []
    warnings: List[str] = []
    rows = _port_rows(hcas=hcas, addresses=addresses or {},
                      default_devs={r["dev"] for r in default_routes or [] if r.get("dev")},
                      fabric_interface=fabric_interface, fabric_network=fabric_network,
                      rdma_subnets=list(rdma_subnets or []))
    inactive = ["%s port %s %s" % (r["hca"], r["port"], r["state"]) for r in rows if r["state"] != "ACTIVE"]
    usable = [r for r in rows if r["used"]]
    stuck = [r for r in rows if r["stuck"]]
    no_gid = [r for r in rows if r["no_gid"]]
    head_ib = None
    if head is not None:
        head_ib = (head.get("env") or {}).get("NCCL_IB_DISABLE") == "0"

    def not_used_by(reason: str) -> None:
        for r in rows:
            if r["used"]:
                r.update(used=False, why=reason)

    use_ib = False
    if nccl_ib == "off":
        reasons.append("IB disabled by fleet_nccl_ib=off")
        not_used_by("fleet_nccl_ib=off")
    elif ib_hca:
        use_ib = True
        reasons.append("HCAs from fleet_nccl_ib_hca=%s" % ib_hca)
    elif usable:
        use_ib = True
        for r in stuck + no_gid:
            warnings.append("%s left out: %s" % (_port_name(r), r["why"]))
    elif stuck:
        raise FabricError(
            "host %s: InfiniBand port(s) %s are cabled (link up) but not ACTIVE: no subnet manager has "
            "activated them (is opensm, or the switch's, running?); NCCL would fall back to sockets "
            "silently. Fix the fabric, or set fleet_nccl_ib=off to use sockets on purpose"
            % (host, ", ".join("%s %s" % (_port_name(r), r["state"]) for r in stuck)))
    elif no_gid:
        raise FabricError("host %s: RoCE port %s has %s" % (host, _port_name(no_gid[0]), no_gid[0]["why"]))
    elif nccl_ib == "on":
        raise FabricError("host %s: fleet_nccl_ib=on but no ACTIVE InfiniBand/RoCE port in "
                          "/sys/class/infiniband (%s)" % (host, ", ".join(inactive) or "no HCA"))
    else:
        reasons.append("no usable HCA port (%s): NCCL uses sockets" % (
            ", ".join("%s %s" % (_port_name(r), r["why"]) for r in rows) or "no /sys/class/infiniband devices"))

    if head is not None:
        if head_ib and not use_ib:
            if nccl_ib == "off":
                raise FabricError("host %s: fleet_nccl_ib=off but its head %s uses InfiniBand/RoCE; "
                                  "set fleet_nccl_ib=off for the whole replica or enable IB here"
                                  % (host, head_host))
            raise FabricError("host %s: its head %s uses InfiniBand/RoCE but this host has no usable "
                              "HCA port (%s); fix the HCA or set fleet_nccl_ib=off for the whole "
                              "replica" % (host, head_host, "; ".join(
                                  "%s %s" % (_port_name(r), r["why"]) for r in rows) or "no HCA"))
        if use_ib and head_ib is False:
            if nccl_ib == "on" or ib_hca:
                raise FabricError("host %s: fleet_nccl_ib=%s%s requires InfiniBand/RoCE but its "
                                  "head %s does not use it"
                                  % (host, nccl_ib, " with fleet_nccl_ib_hca" if ib_hca else "",
                                     head_host))
            use_ib = False
            warnings[:] = []
            reasons.append("ACTIVE HCAs ignored: head %s does not use InfiniBand/RoCE" % head_host)
            not_used_by("head %s does not use InfiniBand/RoCE" % head_host)

    if not use_ib:
        env["NCCL_IB_DISABLE"] = "1"
        return {"env": env, "reasons": reasons, "warnings": warnings, "hcas": hcas, "ib_ports": [],
                "table": rows}

    env["NCCL_IB_DISABLE"] = "0"
    if ib_hca:
        env["NCCL_IB_HCA"] = ib_hca
        wanted = {part.split(":", 1)[0].lstrip("=^") for part in ib_hca.split(",") if part}
        known = {h["name"] for h in hcas}
        if not ib_hca.startswith("^") and wanted - known:
            warnings.append("fleet_nccl_ib_hca names HCAs not found on this host: %s"
                            % ", ".join(sorted(wanted - known)))
        excluded = ib_hca.startswith("^")
        for r in rows:
            named = (r["hca"] in wanted) != excluded
            chosen = named and r["state"] == "ACTIVE"
            why = r["why"]
            if chosen and r["link_layer"].lower() == "ethernet" and r["gid"] is None:
                index, why = select_gid_index(next(p for h in hcas if h["name"] == r["hca"]
                                                   for p in h["ports"] if p["port"] == r["port"]))
                if index is None:
                    raise FabricError("host %s: RoCE port %s has %s" % (host, _port_name(r), why))
                r["gid"] = index
            r.update(used=chosen, why=("named in fleet_nccl_ib_hca" + (" (" + why + ")" if why and chosen else ""))
                     if chosen else ("not named in fleet_nccl_ib_hca" if not named else r["why"]))
        ports = [r for r in rows if r["used"]]
    else:
        ports = usable
        env["NCCL_IB_HCA"] = "=" + ",".join(_port_name(r) for r in ports)
        reasons.append("HCA ports used: %s" % ", ".join(
            "%s (%s)" % (_port_name(r), r["link_layer"]) for r in ports))

    layers = sorted({r["link_layer"] for r in ports})
    if len(layers) > 1:
        warnings.append("HCA ports mix link layers %s" % ", ".join(layers))
    indices = {_port_name(r): r["gid"] for r in ports if r["link_layer"].lower() == "ethernet"}
    for r in ports:
        if r["gid"] is not None:
            reasons.append("%s %s" % (_port_name(r), r["why"]))
    if indices:
        values = sorted(set(indices.values()))
        if len(values) == 1:
            env["NCCL_IB_GID_INDEX"] = str(values[0])
        else:
            env["NCCL_IB_ROCE_VERSION_NUM"] = "2"
            warnings.append("RoCE GID indices differ between ports (%s): NCCL_IB_GID_INDEX left unset, "
                            "NCCL picks the RoCE v2 GID per port" % ", ".join(
                                "%s=%s" % kv for kv in sorted(indices.items())))
    if head is not None and head_ib:
        head_layers = sorted(set((head.get("ib") or {}).get("link_layers") or []))
        if head_layers and layers and head_layers != layers:
            warnings.append("link layers differ from head %s (%s here, %s there)"
                            % (head_host, ", ".join(layers), ", ".join(head_layers)))
    return {"env": env, "reasons": reasons, "warnings": warnings, "hcas": hcas,
            "ib_ports": [_port_name(r) for r in ports], "link_layers": layers, "table": rows}


def build_result(node: Dict[str, Any], ib: Dict[str, Any]) -> Dict[str, Any]:
    """Merge the interface and IB decisions into the fabric result (fabric.json's content)."""
    iface = node["interface"]
    env = {
        "NCCL_SOCKET_IFNAME": "=" + iface,  # '=' makes NCCL match the name exactly (eth1 != eth10)
        "GLOO_SOCKET_IFNAME": iface,
        "VLLM_HOST_IP": node["address"],
        "FLEET_RAY_NODE_IP": node["address"],
    }
    env.update(ib["env"])
    ordered = {k: env[k] for k in ENV_KEYS if k in env}
    return {
        "host": node["host"],
        "role": node["role"],
        "interface": iface,
        "address": node["address"],
        "network": node.get("network"),
        "head_address": node["head_address"],
        "head_host": node.get("head_host", node["host"]),
        "route": node.get("route"),
        "env": ordered,
        "ib": {"ports": ib["ib_ports"], "link_layers": ib.get("link_layers", []),
               "hcas": ib["hcas"], "table": [{k: v for k, v in r.items() if k not in ("stuck", "no_gid")}
                                             for r in ib["table"]]},
        "reasons": node["reasons"] + ib["reasons"],
        "warnings": node["warnings"] + ib["warnings"],
    }


# --- rendering ---------------------------------------------------------------------------------

def render_env_file(result: Dict[str, Any]) -> str:
    """docker --env-file format (KEY=VALUE, no quotes)."""
    lines = ["# Written by vllm-fleet's fabric role for %s; do not edit (rerun the fabric stage)."
             % result["host"]]
    lines += ["%s=%s" % (k, v) for k, v in result["env"].items()]
    return "\n".join(lines) + "\n"


def render_nccl_conf(result: Dict[str, Any]) -> str:
    lines = ["# Written by vllm-fleet's fabric role for %s; do not edit." % result["host"]]
    lines += ["%s=%s" % (k, v) for k, v in result["env"].items() if k.startswith("NCCL_")]
    return "\n".join(lines) + "\n"


def render_json(result: Dict[str, Any]) -> str:
    return json.dumps(result, indent=2, sort_keys=True) + "\n"


def summary_line(result: Dict[str, Any]) -> str:
    env = result["env"]
    ib = "off" if env.get("NCCL_IB_DISABLE") == "1" else "%s%s" % (
        env.get("NCCL_IB_HCA", ""),
        " gid=%s" % env["NCCL_IB_GID_INDEX"] if "NCCL_IB_GID_INDEX" in env else "")
    text = "%s (%s): %s %s -> head %s; IB %s" % (
        result["host"], result["role"], result["interface"], result["address"],
        result["head_address"], ib)
    if result["warnings"]:
        text += "; WARNING: " + "; ".join(result["warnings"])
    return text


def render_table(result: Dict[str, Any]) -> str:
    """The node's fabric decision at a glance: its socket interface, then one row per HCA port
    (HCA, port, state, link layer, netdev, subnet, GID, used or why not)."""
    env = result["env"]
    head = "%s (%s): sockets on %s %s (%s)" % (result["host"], result["role"], result["interface"],
                                               result["address"], result.get("network") or "?")
    if env.get("NCCL_IB_DISABLE") == "1":
        head += "; NCCL over sockets (NCCL_IB_DISABLE=1)"
    else:
        head += "; NCCL_IB_HCA=%s%s" % (env.get("NCCL_IB_HCA", ""),
                                       " NCCL_IB_GID_INDEX=%s" % env["NCCL_IB_GID_INDEX"]
                                       if "NCCL_IB_GID_INDEX" in env else "")
    rows = (result.get("ib") or {}).get("table") or []
    if not rows:
        return head + "\n  no RDMA device under /sys/class/infiniband\n"
    header = ("HCA", "PORT", "STATE", "LINK", "NETDEV", "SUBNET", "GID", "USED")
    cells = [header] + [(r["hca"], str(r["port"]), r["state"], r["link_layer"], r["netdev"] or "-",
                         r["subnet"] or "-", "-" if r["gid"] is None else str(r["gid"]),
                         ("yes: " if r["used"] else "no: ") + r["why"]) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header) - 1)]
    lines = [head] + ["  " + "  ".join(c[i].ljust(widths[i]) for i in range(len(widths))) + "  " + c[-1]
                      for c in cells]
    return "\n".join(line.rstrip() for line in lines) + "\n"


# --- collecting on the host --------------------------------------------------------------------

def subprocess_runner(argv: List[str]) -> Tuple[int, str, str]:
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, "", str(exc)
    return proc.returncode, proc.stdout, proc.stderr


def collect(runner: Runner, *, ip: str = "ip", head_address: str = "",
            sysfs_root: str = "/sys") -> Dict[str, Any]:
    """Everything the decisions need, read on this host."""
    rc, out, err = runner([ip, "-o", "-4", "addr", "show"])
    if rc != 0:
        raise FabricError("`%s -o -4 addr show` failed: %s" % (ip, (err or out).strip()))
    addresses = parse_addr_show(out)
    rc, out, err = runner([ip, "-4", "route", "show", "default"])
    default_routes = parse_default_routes(out) if rc == 0 else []
    facts: Dict[str, Any] = {"addresses": addresses, "default_routes": default_routes,
                             "hcas": read_infiniband(sysfs_root), "route": None, "route_error": ""}
    if head_address:
        ipaddress.IPv4Address(head_address)  # ValueError for garbage, never passed to `ip`
        rc, out, err = runner([ip, "route", "get", head_address])
        if rc == 0:
            facts["route"] = parse_route_get(out.splitlines()[0] if out else "")
        else:
            facts["route_error"] = (err or out).strip()
    return facts


def detect(*, host: str, role: str, head_address: str = "", head_host: str = "",
           head: Optional[Dict[str, Any]] = None, interface: str = "", nccl_ib: str = "auto",
           ib_hca: str = "", allow_routed: bool = False, dedicated: bool = False,
           rdma_subnets: Optional[List[str]] = None, sysfs_root: str = "/sys",
           ip: str = "ip", runner: Runner = subprocess_runner) -> Dict[str, Any]:
    """Collect and decide: the fabric result of this host (raises FabricError)."""
    if role not in ("head", "worker"):
        raise FabricError("host %s: role must be head or worker, not %r" % (host, role))
    try:
        facts = collect(runner, ip=ip, head_address=head_address if role == "worker" else "",
                        sysfs_root=sysfs_root)
    except ValueError:
        raise FabricError("host %s: head %s's fabric address %r is not an IPv4 address"
                          % (host, head_host, head_address))
    if role == "head":
        node = compute_head(host=host, addresses=facts["addresses"],
                            default_routes=facts["default_routes"], interface=interface,
                            dedicated=dedicated)
    else:
        node = compute_worker(host=host, head_host=head_host, head_address=head_address,
                              route=facts["route"], route_error=facts["route_error"],
                              addresses=facts["addresses"], default_routes=facts["default_routes"],
                              interface=interface, allow_routed=allow_routed, dedicated=dedicated)
    ib = compute_ib(host=host, hcas=facts["hcas"], nccl_ib=nccl_ib, ib_hca=ib_hca,
                    head=head if role == "worker" else None, head_host=head_host,
                    addresses=facts["addresses"], default_routes=facts["default_routes"],
                    fabric_interface=node["interface"], fabric_network=node.get("network"),
                    rdma_subnets=rdma_subnets)
    return build_result(node, ib)


def parse_env_text(text: str) -> Dict[str, str]:
    """fabric.env's text (KEY=VALUE lines; '#' comments) as a dict: the one parser of the file,
    for the image and, through the filter fleet_fabric_env, for the roles."""
    env: Dict[str, str] = {}
    for line in re.split(r"\r\n|\r|\n", text or ""):  # the line ends open() reads as one
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            env[key] = value
    return env


def load_env_file(path: str = "/etc/vllm-fleet/fabric.env") -> Dict[str, str]:
    """Read fabric.env (parse_env_text). Missing file: {}."""
    try:
        with open(path, encoding="utf-8") as handle:
            return parse_env_text(handle.read())
    except OSError:
        return {}


def node_ip(env: Dict[str, str]) -> str:
    """The node's fabric address from fabric.env's settings: the first non-empty of NODE_IP_KEYS;
    '' when there is none (the fabric stage did not run)."""
    for key in NODE_IP_KEYS:
        value = (env or {}).get(key)
        if value:
            return str(value)
    return ""
