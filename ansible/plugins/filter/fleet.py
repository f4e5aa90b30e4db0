# -*- coding: utf-8 -*-
"""Filters shared by the vllm-fleet roles and playbooks."""

from __future__ import annotations

WILDCARDS = ("0.0.0.0", "::", "[::]")


def fleet_api_address(hostvars: dict, name: str = "") -> str:
    """The address a replica head's OpenAI API listens on, and the one its balancer, canary,
    Prometheus and rolling restarts use (one definition, so they never disagree):
    vllm_serve_api_host, else loadbalancer_server_address, else ansible_host, else the
    inventory name. A wildcard vllm_serve_api_host (0.0.0.0, ::) is where vLLM listens, not an
    address to connect to: the next one is used for that. Usage:
    ``hostvars[head] | fleet_api_address(head)``."""
    for key in ("vllm_serve_api_host", "loadbalancer_server_address", "ansible_host"):
        value = str(hostvars.get(key) or "").strip()
        if value and value not in WILDCARDS:
            return value
    return name or str(hostvars.get("inventory_hostname", ""))


def fleet_url_host(address: str) -> str:
    """An address as it goes into a URL or host:port ([v6])."""
    address = str(address)
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


class FilterModule:
    def filters(self):
        return {"fleet_api_address": fleet_api_address, "fleet_url_host": fleet_url_host}
