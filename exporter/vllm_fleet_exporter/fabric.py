"""fabric.json (written by the fabric role): settings as an info metric, and what NCCL should use."""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

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


def load_fabric(path: str) -> Optional[Dict[str, str]]:
    """None when the file does not exist (hosts without a fabric); raises when unparseable."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return _env_of(data, path)


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
