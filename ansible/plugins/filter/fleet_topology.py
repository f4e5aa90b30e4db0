"""Who belongs to which replica, and where to reach a host: the one owner of these facts.

    {{ groups | fleet_replica_hosts(hostvars, 'a') }}          -> ['node1', 'node2', 'node3']
    {{ groups | fleet_replica_head(hostvars, 'a') }}           -> 'node1'
    {{ groups | fleet_engine_hosts(hostvars, 'a', 'cpu', 2) }}  -> ['node1', 'node2']
    {{ 'node2' | fleet_exporter_url(hostvars, 9445) }}         -> 'http://172.28.10.12:9445'
    {{ hostvars['node3'] | fleet_host_address }}              -> '172.28.10.13'
    {{ groups | fleet_healer_host }}                          -> 'node3'
    {{ groups | fleet_replica_heads(hostvars) }}              -> [{'name': 'a', 'head': 'node1'}, {'name': 'b', ...}]
    {{ ansible_play_hosts | fleet_run_replica(groups, hostvars, fleet_replica, '_role_replica') }}
        -> {'members': ['node1', 'node2', 'node3'], 'heads': ['node1'], 'hosts': ['node1', 'node2', 'node3']}
    {{ groups | fleet_rolling_restart_plan(hostvars, ansible_play_hosts_all, replicas='a,b', batch=1) }}
        -> {'replicas': [{'name': 'a', 'head': 'node1', 'hosts': [...]}, ...], 'problems': [], ...}

A replica is the serving hosts (group fleet_serving, inventory order) whose fleet_replica is its
name (default 'main'); its head is the one of them in fleet_head, listed first. A role that acts
on a replica as this run sees it (the fabric, ray_cluster and vllm_serve roles: --limit, hosts that
failed) uses fleet_run_replica instead.
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


def fleet_replica_heads(groups, hostvars):
    """Every head (group fleet_head, in its order) with its replica's name: [{'name', 'head'}]."""
    return [{"name": _replica_of(hostvars, head), "head": head} for head in groups.get("fleet_head", [])]


def fleet_run_replica(hosts, groups, hostvars, replica, key):
    """A replica as this run sees it.

    hosts: the hosts to look at, in the order wanted (ansible_play_hosts). key: the fact each host
    set to its own fleet_replica at the start of the role (set_fact): a host without it did not
    run the role in this play (--limit, failed before) and is left out, as is a name that is no
    host. Returns members: the hosts whose key equals replica, in the order of hosts; heads: the
    members in fleet_head, same order (the caller checks there is exactly one); hosts: heads
    first, then the other members.
    """
    head_group = set(groups.get("fleet_head", []) or [])
    members = []
    for host in hosts:
        if host not in hostvars:
            continue
        try:
            hv = hostvars[host]
            if key not in hv:
                continue
            value = hv[key]
        except Exception:  # an undefined or unrenderable fact: not in this run
            continue
        if value == replica:
            members.append(host)
    heads = [h for h in members if h in head_group]
    return {"members": members, "heads": heads, "hosts": heads + [h for h in members if h not in heads]}


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


def _replica_of(hostvars, host):
    return str(_var(hostvars, host, "fleet_replica", "main"))


def _wanted_replicas(replicas):
    """rolling_restart_replicas: a list, or names separated by commas; blanks dropped."""
    if replicas is None:
        return []
    items = replicas.split(",") if isinstance(replicas, str) else list(replicas)
    return [str(r).strip() for r in items if str(r).strip()]


def fleet_rolling_restart_plan(groups, hostvars, play_hosts, replicas=(), batch=1, allow_full_outage=False):
    """What rolling_restart.yml restarts, in which order, in which batches (the plan play).

    replicas: the replicas the play's hosts (--limit) cover, sorted by name, narrowed to
    `replicas` (rolling_restart_replicas) when given; each {name, head, hosts} with its serving
    hosts head first (fleet_replica_hosts). all_replicas: every replica's name, sorted. batches:
    the selected replicas' names, `batch` at a time. serial: hosts per batch (the restart play's
    serial). problems: why the selection cannot run (empty: it can), in the words the plan's
    check shows; the first kind found is the one reported (named replicas and --limit, then an
    empty selection, then a batch that would take out every replica behind a balancer).
    """
    try:
        size = int(batch)
    except (TypeError, ValueError):
        size = 0
    try:
        from ansible.module_utils.parsing.convert_bool import boolean
        outage_ok = boolean(allow_full_outage, strict=False)
    except ImportError:  # pragma: no cover - pure-Python callers pass a bool
        outage_ok = bool(allow_full_outage)
    serving = list(groups.get("fleet_serving", []))
    members = {}
    for host in serving:
        members.setdefault(_replica_of(hostvars, host), []).append(host)
    wanted = _wanted_replicas(replicas)
    problems = [f"rolling_restart_replicas names {r}, which is no replica (replicas: {', '.join(sorted(members))})"
                for r in wanted if r not in members]
    play = list(play_hosts)
    touched = sorted({_replica_of(hostvars, h) for h in play} & set(wanted or members))
    selected = []
    for name in touched:
        hosts = fleet_replica_hosts(groups, hostvars, name)
        head = fleet_replica_head(groups, hostvars, name)
        missing = [h for h in members[name] if h not in play]
        if missing:
            problems.append(f"--limit covers part of replica {name} but not {', '.join(missing)}: a replica "
                            f"restarts as a whole; add its hosts or use -e rolling_restart_replicas={name}")
        selected.append({"name": name, "head": head, "hosts": hosts})
    if not problems and not selected:
        problems.append("no replica selected")
    elif not problems and (size < 1 or (not outage_ok and groups.get("fleet_loadbalancer")
                                        and size >= len(members))):
        problems.append(f"rolling_restart_batch={batch} would take out all {len(members)} replica(s) at once; "
                        "lower it or set rolling_restart_allow_full_outage to true "
                        "(-e '{\"rolling_restart_allow_full_outage\": true}')")
    step = max(size, 1)
    chunks = [selected[i:i + step] for i in range(0, len(selected), step)]
    return {"replicas": selected, "all_replicas": sorted(members),
            "batches": [[r["name"] for r in chunk] for chunk in chunks],
            "serial": [sum(len(r["hosts"]) for r in chunk) for chunk in chunks],
            "problems": problems}


class FilterModule:
    def filters(self):
        return {"fleet_replica_hosts": fleet_replica_hosts,
                "fleet_replica_head": fleet_replica_head,
                "fleet_replica_heads": fleet_replica_heads,
                "fleet_run_replica": fleet_run_replica,
                "fleet_engine_hosts": fleet_engine_hosts,
                "fleet_exporter_url": fleet_exporter_url,
                "fleet_host_address": fleet_host_address,
                "fleet_healer_host": fleet_healer_host,
                "fleet_rolling_restart_plan": fleet_rolling_restart_plan}
