"""Who belongs to which replica, and where to reach a host: the one owner of these facts.

    {{ groups | fleet_replica_hosts(hostvars, 'a') }}          -> ['node1', 'node2', 'node3']
    {{ groups | fleet_replica_head(hostvars, 'a') }}           -> 'node1'
    {{ groups | fleet_engine_hosts(hostvars, 'a', 'cpu', 2) }}  -> ['node1', 'node2']
    {{ 'node2' | fleet_exporter_url(hostvars, 9445) }}         -> 'http://172.28.10.12:9445'
    {{ hostvars['node3'] | fleet_host_address }}              -> '172.28.10.13'
    {{ groups | fleet_healer_host }}                          -> 'node3'

A replica is the serving hosts (group fleet_serving, inventory order) whose fleet_replica is its
name (default 'main'); its head is the one of them in fleet_head, listed first.
"""

from __future__ import annotations

from ansible.errors import AnsibleFilterError


def _var(hostvars, host, name, default=None):
    try:
        value = hostvars[host].get(name, default)
    except Exception:  # an undefined or unrenderable var: treated as unset
        return default
    return default if value is None or value == "" else value


def fleet_replica_hosts(groups, hostvars, replica):
    """The replica's serving hosts, head first, the rest in inventory order."""
    serving = list(groups.get("fleet_serving", []))
    heads = set(groups.get("fleet_head", []))
    members = [h for h in serving if str(_var(hostvars, h, "fleet_replica", "main")) == str(replica)]
    return [h for h in members if h in heads] + [h for h in members if h not in heads]


def fleet_replica_head(groups, hostvars, replica):
    hosts = fleet_replica_hosts(groups, hostvars, replica)
    heads = [h for h in hosts if h in set(groups.get("fleet_head", []))]
    if len(heads) != 1:
        raise AnsibleFilterError(f"replica {replica!r} has {len(heads)} heads in fleet_head "
                                 f"({', '.join(heads) or 'none'}); it needs exactly one")
    return heads[0]


def fleet_engine_hosts(groups, hostvars, replica, engine, pipeline_parallel_size):
    """Hosts that run engine processes of the replica's launch: with the cpu engine the first
    PP hosts (vLLM's own multi-node launcher, one stage per host); with cuda every host (Ray
    places the workers)."""
    hosts = fleet_replica_hosts(groups, hostvars, replica)
    if str(engine) == "cpu":
        return hosts[:int(pipeline_parallel_size)]
    return hosts


def fleet_host_address(hv):
    """A host's management address: its default IPv4 route's address (gathered facts), else
    ansible_host, else its inventory name."""
    try:
        facts = hv.get("ansible_facts") or {}
        return ((facts.get("default_ipv4") or {}).get("address") or hv.get("ansible_host")
                or hv.get("inventory_hostname"))
    except Exception as exc:
        raise AnsibleFilterError(f"fleet_host_address: {exc}") from exc


def fleet_healer_host(groups):
    """The host that heals hung replicas: the first of fleet_healer, else the first monitoring
    host; '' when there is neither."""
    for group in ("fleet_healer", "fleet_monitoring"):
        hosts = list(groups.get(group, []))
        if hosts:
            return hosts[0]
    return ""


def fleet_exporter_url(host, hostvars, default_port):
    """Base URL of a host's exporter: its exporter_listen_address, else its management address."""
    addr = _var(hostvars, host, "exporter_listen_address") or fleet_host_address(hostvars[host])
    port = int(_var(hostvars, host, "fleet_exporter_port", default_port))
    addr = f"[{addr}]" if ":" in str(addr) else addr
    return f"http://{addr}:{port}"


class FilterModule:
    def filters(self):
        return {"fleet_replica_hosts": fleet_replica_hosts,
                "fleet_replica_head": fleet_replica_head,
                "fleet_engine_hosts": fleet_engine_hosts,
                "fleet_exporter_url": fleet_exporter_url,
                "fleet_host_address": fleet_host_address,
                "fleet_healer_host": fleet_healer_host}
