"""fabric.json (written by the fabric role): settings as an info metric, and what NCCL should use."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

# Keys exposed as labels of vllm_fleet_fabric_info (a fixed set: stable label names).
INFO_KEYS = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "VLLM_HOST_IP", "FLEET_RAY_NODE_IP",
             "NCCL_IB_DISABLE", "NCCL_IB_HCA", "NCCL_NET", "NCCL_P2P_DISABLE", "NCCL_IB_GID_INDEX")


def _env_of(data: Dict[str, Any], path: str) -> Dict[str, str]:
    """The KEY=VALUE settings: under "env", as the fabric role writes the file
    (fabric_env.render_json); anything else is not our file and is refused, naming it."""
    env = data.get("env")
    if not isinstance(env, dict):
        raise ValueError(f"{path}: no \"env\" object (the fabric role writes its settings there)")
    return {str(k): _s(v) for k, v in env.items() if not isinstance(v, (dict, list))}


def _s(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    return "" if v is None else str(v)


def _read(path: str) -> Optional[Dict[str, Any]]:
    """fabric.json's object; None when the file does not exist (hosts without a fabric); raises
    ValueError when it is not a JSON object."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def load_fabric(path: str) -> Optional[Dict[str, str]]:
    """The settings; None when the file does not exist; raises when unparseable."""
    data = _read(path)
    return None if data is None else _env_of(data, path)


def ib_expected(env: Dict[str, str]) -> bool:
    """NCCL should carry inter-node traffic over IB/RoCE."""
    if env.get("NCCL_NET", "").strip().lower() == "socket":
        return False
    disable = env.get("NCCL_IB_DISABLE", "").strip().lower()
    if disable in ("1", "true", "yes"):
        return False
    if disable in ("0", "false", "no"):
        return True
    return bool(env.get("NCCL_IB_HCA", "").strip())


def ray_node_ip(env: Optional[Dict[str, str]]) -> str:
    env = env or {}
    return env.get("FLEET_RAY_NODE_IP") or env.get("VLLM_HOST_IP") or "127.0.0.1"


# A socket interface in these states carries no traffic; "unknown" is what many virtual and some
# physical drivers report while they pass traffic, so it is not a fault.
_NETDEV_DOWN = ("down", "lowerlayerdown", "notpresent", "dormant", "testing")


def fabric_links(path: str, load: Optional[Callable[[str], Any]] = None) -> Optional[Tuple[str, List[str]]]:
    """(socket interface, IB/RoCE ports as "hca:port") that fabric.json says this host's
    inter-node traffic uses; None when there is no readable file (nothing to watch). `load`:
    path -> parsed JSON (a launchstate.JsonCache's, for a caller that asks every second)."""
    try:
        data = (load or _read)(path)
    except (OSError, ValueError):  # the fabric collector reports an unreadable file
        return None
    if not isinstance(data, dict):
        return None
    ib = data.get("ib") if isinstance(data.get("ib"), dict) else {}
    return str(data.get("interface") or ""), [str(p) for p in ib.get("ports") or []]


def _first_line(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().strip()
    except OSError:
        return None


def links_down(interface: str, ib_ports: List[str], sys_root: str = "/sys") -> List[str]:
    """What is down among the fabric links, as text naming each (empty: all up). Read from the
    kernel's own state: netdev operstate, IB port state (the fabric role chose ACTIVE ports)."""
    out = []
    if interface:
        state = _first_line(os.path.join(sys_root, "class/net", interface, "operstate"))
        if state is None:
            out.append(f"fabric interface {interface} is gone")
        elif state.lower() in _NETDEV_DOWN:
            out.append(f"fabric interface {interface} is {state.lower()}")
    for port in ib_ports:
        hca, _, num = port.partition(":")
        state = _first_line(os.path.join(sys_root, "class/infiniband", hca, "ports", num or "1", "state"))
        if state is None:
            out.append(f"IB port {port} is gone")
        elif not state.upper().endswith("ACTIVE"):  # "4: ACTIVE"; "1: DOWN", "2: INIT", ...
            out.append(f"IB port {port} is {state.split(':', 1)[-1].strip() or state}")
    return out
