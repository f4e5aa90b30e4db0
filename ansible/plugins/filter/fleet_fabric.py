"""/etc/vllm-fleet/fabric.env as the roles read it: the one reader of the file the fabric role writes.

    {{ _slurped.content | b64decode | fleet_fabric_env }}   -> {'NCCL_SOCKET_IFNAME': 'fab0', ...}
    {{ fabric_settings_dict | fleet_fabric_node_ip }}       -> '172.28.20.13' ('' when there is none)

Both are fabric_env's own functions (parse_env_text, node_ip), the module that writes the file
(render_env_file) and that the serving image reads it with: ansible/plugins/module_utils/
fleet_fabric_env.py, a symlink to images/vllm_fleet/src/vllm_fleet/fabric_env.py. The node's
address is the first non-empty of fabric_env.NODE_IP_KEYS (FLEET_RAY_NODE_IP, then VLLM_HOST_IP),
the order fleet-ray-node reads them in.
"""

from __future__ import annotations

import importlib.util
import os

_MODULE = None


def _fabric_env():
    """fabric_env, loaded from module_utils by path (as the validate action does): a filter
    plugin cannot import the project's module_utils by name."""
    global _MODULE
    if _MODULE is None:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "module_utils",
                            "fleet_fabric_env.py")
        spec = importlib.util.spec_from_file_location("_fleet_fabric_env_for_filters", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULE = module
    return _MODULE


def fleet_fabric_env(text):
    """fabric.env's text (a slurp's content, b64decoded) as a dict of its settings."""
    return _fabric_env().parse_env_text(str(text or ""))


def fleet_fabric_node_ip(env):
    """The node's fabric address from fabric.env's settings (fleet_fabric_env); '' when none."""
    return _fabric_env().node_ip(dict(env or {}))


class FilterModule:
    def filters(self):
        return {"fleet_fabric_env": fleet_fabric_env,
                "fleet_fabric_node_ip": fleet_fabric_node_ip}
