# -*- coding: utf-8 -*-
"""Filters shared by the vllm-fleet roles and playbooks."""

from __future__ import annotations

import ipaddress

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


def fleet_host_addresses(hostvars, hosts) -> list:
    """Every address the given hosts may send from: their IPv4 and (not link-local) IPv6 addresses
    from gathered facts, and ansible_host when it is an IP. Usage:
    ``hostvars | fleet_host_addresses(groups['fleet_monitoring'])``."""
    out: list = []
    for host in hosts or []:
        hv = hostvars[host]
        facts = hv.get("ansible_facts") or {}
        found = list(facts.get("all_ipv4_addresses") or [])
        found += [a for a in facts.get("all_ipv6_addresses") or []
                  if not ipaddress.ip_address(a.split("%")[0]).is_link_local]
        literal = str(hv.get("ansible_host") or "")
        try:
            ipaddress.ip_address(literal)
            found.append(literal)
        except ValueError:
            pass
        out += [a for a in found if a not in out]
    return out


class FilterModule:
    def filters(self):
        return {"fleet_api_address": fleet_api_address, "fleet_url_host": fleet_url_host,
                "fleet_host_addresses": fleet_host_addresses}
