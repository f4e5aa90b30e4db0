# -*- coding: utf-8 -*-
"""Filters shared by the vllm-fleet roles and playbooks."""

from __future__ import annotations

import ipaddress
import re

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


#: Interfaces whose addresses never carry a host's own traffic to other hosts: container bridges
#: and veths (the same 172.17.0.1 on every Docker host), loopback.
LOCAL_ONLY_IFACES = ("lo", "docker", "br-", "virbr", "veth", "cni", "flannel", "cali", "vxlan.calico", "tunl")


def fleet_host_addresses(hostvars, hosts) -> list:
    """Every address the given hosts may send from: the IPv4 and (not link-local) IPv6 addresses of
    their network interfaces in gathered facts, container bridges left out, and ansible_host when it
    is an IP. Usage: ``hostvars | fleet_host_addresses(groups['fleet_monitoring'])``."""
    out: list = []
    for host in hosts or []:
        hv = hostvars[host]
        facts = hv.get("ansible_facts") or {}
        found = []
        # by name: the facts list interfaces in the kernel's directory order, which changes when
        # one is added (docker0 on the first deploy), and a new order would rewrite every file
        # these addresses are written to (a re-run must change nothing)
        for iface in sorted(facts.get("interfaces") or []):
            if iface.startswith(LOCAL_ONLY_IFACES):
                continue
            data = facts.get(iface) or facts.get(re.sub(r"[-.:]", "_", iface)) or {}
            for v4 in [data.get("ipv4") or {}] + list(data.get("ipv4_secondaries") or []):
                if v4.get("address"):
                    found.append(v4["address"])
            for v6 in data.get("ipv6") or []:
                addr = str(v6.get("address", "")).split("%")[0]
                if addr and not ipaddress.ip_address(addr).is_link_local:
                    found.append(addr)
        literal = str(hv.get("ansible_host") or "")
        try:
            ipaddress.ip_address(literal)
            found.append(literal)
        except ValueError:
            pass
        for a in found:
            if a not in out:
                out.append(a)
    return out


class FilterModule:
    def filters(self):
        return {"fleet_api_address": fleet_api_address, "fleet_url_host": fleet_url_host,
                "fleet_host_addresses": fleet_host_addresses}
