# -*- coding: utf-8 -*-
"""Validate a vllm-fleet inventory on the controller, before any host is touched.

Every problem is one line naming the host, the variable and the bad value; all problems are
reported at once. What a setting may hold is read from the roles' meta/argument_specs.yml: its
type, its choices, and the description item that starts with ``Valid:`` (grammar below and in
docs/design.md), so a role that adds a setting documents and validates it in one place. The rules
that tie several settings or hosts together (replicas, balancers, ports, groups) are code here.

``Valid:`` grammar (one description item)::

    Valid: ALTERNATIVE [or ALTERNATIVE]... [; same in a replica] [(why, added to the message)]
    ALTERNATIVE: empty | 'literal' | [KIND] [COMPARISON]...
    COMPARISON:  >N  >=N  <N  <=N  N..M  N          (in the kind's base unit: seconds, bytes)

KIND is one of KINDS below (``seconds``, ``port``, ``Prometheus duration``, ``HAProxy time``,
``Docker size``, ``interface name``, ``inventory host``, ``controller directory``, ...); for a
list setting the rule applies to each element unless the kind reads the whole list.
"""
from __future__ import annotations

import difflib
import importlib.util
import ipaddress
import json
import os
import re
import socket
import subprocess
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

import yaml

try:  # the pure checks below are importable without Ansible (unit tests)
    from ansible.plugins.action import ActionBase
except ImportError:  # pragma: no cover
    ActionBase = object

HEAD_GROUP = "fleet_head"
WORKER_GROUP = "fleet_workers"
SERVING_GROUP = "fleet_serving"
MONITORING_GROUP = "fleet_monitoring"
BALANCER_GROUP = "fleet_loadbalancer"
HEALER_GROUP = "fleet_healer"  # optional: the healer host (role healer), else the first monitoring host
REGISTRY_GROUP = "fleet_registry"  # optional: the in-fleet image registry's host (role registry)
SPARE_GROUP = "fleet_spare"  # optional: hosts provisioned for a replica (fleet_replica) that serve nothing yet
KNOWN_GROUPS = (HEAD_GROUP, WORKER_GROUP, SERVING_GROUP, MONITORING_GROUP, BALANCER_GROUP, HEALER_GROUP,
                REGISTRY_GROUP, SPARE_GROUP)
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TENANT_FIELDS = {"name", "key", "rate_limit"}
# Port settings where 0 means "no such listener".
OFF_PORT_VARS = {"loadbalancer_frontend_port", "firewall_ssh_port"}
# vllm_fleet.launch's port blocks: the firewall opens the whole range to fabric peers only.
LAUNCH_PORT_RANGE = (20000, 32767)
# Ports of the cluster itself besides Ray's (fabric peers only): they may sit in the launch range.
CLUSTER_PORT_VARS = ("ray_cluster_dashboard_agent_grpc_port", "ray_cluster_runtime_env_agent_port",
                     "vllm_serve_master_port")
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
# Linux IFNAMSIZ is 16 including the NUL; '/', ':' and white space are never valid.
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
# NCCL_IB_HCA: optional ^ (exclude) or = (exact), then device[:port] entries separated by commas.
IB_HCA_RE = re.compile(r"^[\^=]?[A-Za-z0-9_]+(:\d+)?(,[A-Za-z0-9_]+(:\d+)?)*$")
# Names the kernel gives network interfaces, not RDMA devices (those are mlx5_0, ibp12s0, rocep1s0f0...).
NETDEV_NAME_RE = re.compile(r"^(ib\d+|eth\d+|bond\d+|en[ospx]\w*|em\d+|p\d+p\d+)$")
IMAGE_RE = re.compile(r"^[a-z0-9]+([._/-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*"
                      r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$")
DNS_NAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                         r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")
TRUTHY_STRINGS = {"true", "false", "yes", "no", "on", "off", "1", "0", "y", "n"}
ANSIBLE_BOOL_STRINGS = TRUTHY_STRINGS | {"t", "f"}

# vLLM flags the fleet sets itself: passing them in fleet_extra_args would fight the inventory.
MANAGED_FLAGS = {
    "--model": "fleet_model_path", "--served-model-name": "fleet_served_model_name",
    "--tensor-parallel-size": "fleet_tensor_parallel_size", "-tp": "fleet_tensor_parallel_size",
    "--pipeline-parallel-size": "fleet_pipeline_parallel_size", "-pp": "fleet_pipeline_parallel_size",
    "--max-model-len": "fleet_max_model_len", "--port": "fleet_api_port", "--host": "vllm_serve_api_host",
    "--quantization": "fleet_quantization", "-q": "fleet_quantization", "--dtype": "fleet_dtype",
    "--gpu-memory-utilization": "fleet_gpu_memory_utilization",
    "--api-key": "fleet_api_key (a secret never belongs on the command line)",
    "--distributed-executor-backend": "fleet_engine",
    "--nnodes": "the inventory (the replica's serving hosts)", "-n": "the inventory (the replica's serving hosts)",
    "--node-rank": "the inventory (the host's place in fleet_serving)", "-r": "the inventory (the host's place in fleet_serving)",
    "--master-addr": "the fabric role (the head's fabric address)", "--master-port": "vllm_serve_master_port",
    "--headless": "the vllm_serve role (every non-head stage runs headless)",
}
# Environment the fleet computes for its containers, beyond the fabric role's keys (those come
# from fabric_env.ENV_OWNERS, their one owner), and who owns each.
MANAGED_ENV = {
    "VLLM_API_KEY": "fleet_api_key (kept in a root-only file, never in the environment)",
    "RAY_ADDRESS": "the vllm_serve role (the head's fabric address and fleet_ray_port)",
    "VLLM_PORT": "the launch's port block (docs/design.md)",
    "VLLM_FLEET_DEPLOYMENT": "fleet_deployment", "VLLM_FLEET_LAUNCH_ID": "the vllm_serve role (one id per launch)",
    "NCCL_NET": "fleet_nccl_ib (off: sockets; on/auto: InfiniBand/RoCE)",
    "TP_SOCKET_IFNAME": "fleet_fabric_interface",
}
# daemon.json keys the container_runtime role writes from its own settings.
MANAGED_DAEMON_KEYS = {
    "log-driver": "the container_runtime role (json-file)",
    "log-opts": "container_runtime_log_max_size / container_runtime_log_max_file",
    "live-restore": "container_runtime_live_restore",
    "runtimes": "the container_runtime role (the nvidia runtime on GPU hosts)",
    "default-runtime": "container_runtime_nvidia_default",
}
# Connection variables and their types when Ansible's own definitions cannot be read (tests).
FALLBACK_CONNECTION_VARS = {"ansible_host": "string", "ansible_port": "int", "ansible_user": "string",
                            "ansible_connection": "string", "ansible_become": "boolean",
                            "ansible_python_interpreter": "string", "ansible_ssh_private_key_file": "path",
                            "ansible_ssh_common_args": "string"}
FALLBACK_PLUGINS = {"connection": {"ssh", "paramiko_ssh", "local", "smart"}, "become": {"sudo", "su"},
                    "shell": {"sh", "cmd", "powershell"}}


class _NotSet:
    def __repr__(self) -> str:
        return "(not set)"


NOT_SET = _NotSet()


@dataclass(frozen=True)
class Problem:
    host: str
    variable: str
    value: Any
    message: str

    def __str__(self) -> str:
        return f"host {self.host}: {self.variable}={self.value!r}: {self.message}"


@dataclass(frozen=True)
class TemplateFailure:
    """A variable whose template could not be rendered (raw text kept for the message)."""
    raw: Any
    reason: str


class SpecError(Exception):
    """A Valid: rule in an argument spec that this validator cannot read."""


# --- kinds: what a value of a setting may look like ----------------------------------------------

@dataclass
class Context:
    hosts: tuple[str, ...] = ()
    specs: Mapping[str, dict] = None  # type: ignore[assignment]
    fabric_env_owners: Mapping[str, str] = None  # type: ignore[assignment]
    # False where the validator runs on a host that is not the controller (the healer): the
    # controller's files were checked by the deploy; here only their form is.
    controller_paths: bool = True


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", value):
        return float(value)
    return None


def _numeric(value, ctx):
    n = _number(value)
    return (None, n) if n is not None else ("must be a number", None)


def _port(value, ctx):
    n = _number(value)
    if n is None or n != int(n) or not 1 <= n <= 65535:
        return "port must be between 1 and 65535", None
    return None, n


def _kib(value, ctx):
    n = _number(value)
    if n is None or n != int(n):
        return "must be a whole number of KiB", None
    return None, n


def _regex(pattern: str, reason: str) -> Callable:
    rx = re.compile(pattern)

    def check(value, ctx):
        return (None, None) if isinstance(value, str) and rx.match(value) else (reason, None)
    return check


_PROM_UNITS = {"y": 31536000, "w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
_PROM_RE = re.compile(r"^((\d+)y)?((\d+)w)?((\d+)d)?((\d+)h)?((\d+)m)?((\d+)s)?((\d+)ms)?$")


def _prometheus_duration(value, ctx):
    text = str(value).strip()
    match = _PROM_RE.match(text)
    if not text or not match or not any(match.groups()):
        return "is not a Prometheus duration (a number with a unit: ms, s, m, h, d, w, y; e.g. 15s or 1h30m)", None
    units = ["y", "w", "d", "h", "m", "s", "ms"]
    return None, sum(int(match.group(2 * i + 2)) * _PROM_UNITS[u] for i, u in enumerate(units)
                     if match.group(2 * i + 2))


_HAPROXY_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _haproxy_time(value, ctx):
    text = str(value).strip()
    match = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", text)
    if not match:
        return "is not an HAProxy time (a whole number with a unit: ms, s, m, h or d; e.g. 30s)", None
    if not match.group(2):
        return (f"has no unit: HAProxy reads a bare number as milliseconds ({text} ms); "
                f"write the unit, e.g. {text}s or {text}ms"), None
    return None, int(match.group(1)) * _HAPROXY_UNITS[match.group(2)]


_SIZE_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _size(pattern: str, example: str) -> Callable:
    rx = re.compile(pattern, re.I)

    def check(value, ctx):
        text = str(value).strip()
        match = rx.fullmatch(text)
        if not match:
            if re.fullmatch(r"\d+", text):
                return f"has no unit: a bare number is bytes ({text} B); write the unit, e.g. {example}", None
            return f"is not a size with a unit (a whole number then k, m or g; e.g. {example})", None
        return None, int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    return check


def _absolute_path(value, ctx):
    text = str(value)
    if not os.path.isabs(text) or ".." in text.split("/"):
        return "must be an absolute path without '..'", None
    return None, None


def _controller_directory(value, ctx):
    text = str(value)
    if not os.path.isabs(text) or ".." in text.split("/"):
        return "must be an absolute path on the controller (without '..')", None
    if not ctx.controller_paths:
        return None, None
    if not os.path.exists(text):
        return "does not exist on the controller", None
    if not os.path.isdir(text):
        return "is not a directory on the controller", None
    if not os.access(text, os.R_OK | os.X_OK):
        return "cannot be read on the controller (permissions)", None
    return None, None


def _inventory_host(value, ctx):
    if value in ctx.hosts:
        return None, None
    close = difflib.get_close_matches(str(value), list(ctx.hosts), n=1, cutoff=0.75)
    return ("is not a host of this inventory" + (f"; did you mean {close[0]}?" if close else
                                                  f" (hosts: {', '.join(ctx.hosts) or 'none'})")), None


def _ip_address(value, ctx):
    try:
        ipaddress.ip_address(str(value))
    except ValueError:
        hint = " (an interface name? give the address it holds)" if IFNAME_RE.match(str(value)) else ""
        return f"is not an IP address{hint}", None
    return None, None


def _host_address(value, ctx):
    text = str(value)
    try:
        ipaddress.ip_address(text)
        return None, None
    except ValueError:
        pass
    if DNS_NAME_RE.match(text):
        return None, None
    return "must be an IP address or a DNS name (no scheme, port or path)", None


def _interface_name(value, ctx):
    text = str(value)
    try:
        ipaddress.ip_address(text)
        return (f"is an address, not an interface name: name the interface that holds it "
                f"(`ip -o addr | grep {text}` on the host)"), None
    except ValueError:
        pass
    if "," in text or text[:1] in "^=" or " " in text.strip():
        return ("names one interface; NCCL's list syntax (=, ^, commas) is written by the fabric role "
                "from this one name"), None
    if text == "lo":
        return "is the loopback interface, which other nodes cannot reach: name the fabric NIC", None
    if not IFNAME_RE.match(text) or text in (".", ".."):
        return "not a possible Linux interface name (1-15 characters, no '/', ':' or spaces)", None
    return None, None


def _nccl_ib_hca(value, ctx):
    text = str(value)
    if not IB_HCA_RE.match(text):
        return "not an NCCL_IB_HCA list such as mlx5_0:1,mlx5_1 or ^mlx5_2", None
    netdevs = [p.split(":")[0] for p in text.lstrip("^=").split(",") if NETDEV_NAME_RE.match(p.split(":")[0])]
    if netdevs:
        return (f"names network interfaces ({', '.join(netdevs)}), not RDMA devices: NCCL_IB_HCA takes the "
                f"names under /sys/class/infiniband (mlx5_0, ibp12s0, ...)"), None
    return None, None


def _image_reference(value, ctx):
    ok = isinstance(value, str) and IMAGE_RE.match(value)
    return (None, None) if ok else ("not an image reference such as registry:5000/vllm-fleet:1.0", None)


def _secret(value, ctx):
    text = str(value)
    if len(text) < 8 or re.search(r"\s", text):
        return "must be at least 8 characters without white space", None
    return None, None


def _cidr(value, ctx):
    try:
        ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        return "is not a network in CIDR form (e.g. 10.10.0.0/16)", None
    return None, None


def _regex_pattern(value, ctx):
    try:
        re.compile(str(value))
    except re.error as exc:
        return f"is not a regular expression ({exc})", None
    return None, None


def _one_word(value, ctx):
    return ("must not contain white space", None) if re.search(r"\s", str(value)) or not str(value) else (None, None)


def _text(value, ctx):
    return ("must be one line of text", None) if "\n" in str(value) or not str(value).strip() else (None, None)


def _ok(value, ctx):
    return None, None


def _vllm_arguments(value, ctx):
    """fleet_extra_args: one argument per item; nothing the fleet sets itself."""
    for arg in value:
        if not isinstance(arg, str):
            return f"every extra argument must be a string ({arg!r} is not)", None
        flag = arg.split("=", 1)[0]
        if flag.startswith("--"):
            flag = "--" + flag[2:].replace("_", "-")  # vLLM reads --max_model_len as --max-model-len
        head = flag.split()[0] if flag.split() else flag
        if head in MANAGED_FLAGS:
            return f"{arg!r} is set by the fleet: use {MANAGED_FLAGS[head]}", None
        if " " in arg.strip() and arg.strip().startswith("-"):
            return (f"{arg!r} is one argument with a space in it: give the flag and its value as two items "
                    f"(['{arg.split()[0]}', '{' '.join(arg.split()[1:])}']) or as --flag=value"), None
    return None, None


def _environment(value, ctx):
    """vllm_serve_env: docker env (names, string values), nothing the fleet computes."""
    owners = dict(ctx.fabric_env_owners or {})
    for key, val in value.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            return f"{key!r} is not an environment variable name", None
        owner = owners.get(key) or MANAGED_ENV.get(key)
        if owner is None and key.startswith("FLEET_"):
            setting = "fleet_" + key[len("FLEET_"):].lower()
            owner = setting if setting in (ctx.specs or {}) else "the vllm_serve role"
        if owner:
            return f"{key} is computed by the fleet: set {owner} instead", None
        if not isinstance(val, str):
            return f"the value of {key} must be a string (quote it: '{val}')", None
    return None, None


def _daemon_keys(value, ctx):
    for key in value:
        if key in MANAGED_DAEMON_KEYS:
            return f"{key!r} is written by the container_runtime role: use {MANAGED_DAEMON_KEYS[key]}", None
    return None, None


_UNIT_KINDS = {"seconds", "count", "tokens", "GiB", "KiB", "fraction", "number"}
#: name -> (check(value, ctx) -> (reason or None, measure or None), reads the whole list/dict)
KINDS: dict[str, tuple[Callable, bool]] = {
    "seconds": (_numeric, False), "count": (_numeric, False), "tokens": (_numeric, False),
    "GiB": (_numeric, False), "fraction": (_numeric, False), "number": (_numeric, False),
    "KiB": (_kib, False), "port": (_port, False),
    "name": (_regex(NAME_RE.pattern, "use 1-40 lower-case letters, digits and dashes"), False),
    "word": (_regex(r"^[A-Za-z0-9_.-]+$", "must be one word (letters, digits, '_', '.', '-')"), False),
    "one word": (_one_word, False), "text": (_text, False), "any": (_ok, False), "a choice": (_ok, False),
    "digits": (_regex(r"^\d+$", "must be digits only"), False),
    "version": (_regex(r"^\d+(\.\d+)+$", "must be a version such as 570.133.20"), False),
    "absolute path": (_absolute_path, False), "controller directory": (_controller_directory, False),
    "file name": (_regex(r"^(?!\.\.?$)[^/\s]+$", "must be a file name (no '/' or spaces)"), False),
    "file mode": (_regex(r"^0?[0-7]{3,4}$", "must be an octal file mode such as '0644' (quoted)"), False),
    "user name": (_regex(r"^[a-z_][a-z0-9_-]{0,31}$", "must be a user or group name (a-z, 0-9, _, -)"), False),
    "container name": (_regex(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$", "must be a container name (letters, digits, _ . -)"),
                       False),
    "URL": (_regex(r"^https?://[^\s/]+\S*$", "must be an http:// or https:// URL"), False),
    "URL path": (_regex(r"^/\S*$", "must be a path starting with /"), False),
    "IP address": (_ip_address, False), "host address": (_host_address, False),
    "interface name": (_interface_name, False), "NCCL_IB_HCA list": (_nccl_ib_hca, False),
    "inventory host": (_inventory_host, False), "image reference": (_image_reference, False),
    "secret": (_secret, False), "CIDR": (_cidr, False), "regex": (_regex_pattern, False),
    "metric name": (_regex(r"^[a-z][a-z0-9_]*$", "must be a metric label value: [a-z][a-z0-9_]*"), False),
    "Prometheus duration": (_prometheus_duration, False), "HAProxy time": (_haproxy_time, False),
    "Docker size": (_size(r"(\d+)([kmg])b?", "16g"), False),
    "size": (_size(r"(\d+)([kmg])(?:ib)?", "1M"), False),
    "vLLM arguments": (_vllm_arguments, True), "environment": (_environment, True),
    "daemon.json keys": (_daemon_keys, True),
}

_CMP_RE = re.compile(r"^(>=|<=|>|<)?(-?\d+(?:\.\d+)?)(?:\.\.(-?\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class Alternative:
    kind: str = ""            # "" = plain number
    literal: Optional[str] = None
    empty: bool = False
    comparisons: tuple = ()   # ((op, number), ...)


@dataclass(frozen=True)
class Rule:
    text: str
    alternatives: tuple
    replica_wide: bool = False
    why: str = ""


def _parse_alternative(text: str) -> Alternative:
    text = text.strip()
    if text == "empty":
        return Alternative(empty=True)
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return Alternative(literal=text[1:-1])
    words = text.split()
    comparisons = []
    while words and _CMP_RE.match(words[-1]):
        op, a, b = _CMP_RE.match(words.pop()).groups()
        if b is not None:
            comparisons[:0] = [(">=", float(a)), ("<=", float(b))]
        else:
            comparisons[:0] = [(op or "==", float(a))]
    kind = " ".join(words)
    if kind and kind not in KINDS:
        raise SpecError(f"unknown kind {kind!r} (known: {', '.join(sorted(KINDS))})")
    if not kind and not comparisons:
        raise SpecError(f"empty alternative in {text!r}")
    return Alternative(kind=kind, comparisons=tuple(comparisons))


def parse_rule(item: str) -> Rule:
    """A description item 'Valid: ...' -> Rule (raises SpecError on a rule it cannot read)."""
    body = item.strip()[len("Valid:"):].strip().rstrip(".").strip()
    why = ""
    match = re.search(r"\s*\(([^()]*)\)$", body)
    if match:
        why, body = match.group(1).strip(), body[:match.start()].strip()
    parts = [p.strip() for p in body.split(";")]
    flags = parts[1:]
    unknown = [f for f in flags if f != "same in a replica"]
    if unknown:
        raise SpecError(f"unknown flag(s) {unknown}: only 'same in a replica'")
    alternatives = tuple(_parse_alternative(a) for a in re.split(r"\s+or\s+", parts[0]))
    return Rule(text=body, alternatives=alternatives, replica_wide=bool(flags), why=why)


def rule_of(spec: Mapping[str, Any]) -> Optional[Rule]:
    description = spec.get("description") or []
    items = [description] if isinstance(description, str) else list(description)
    found = [i for i in items if isinstance(i, str) and i.strip().startswith("Valid:")]
    if len(found) > 1:
        raise SpecError("more than one 'Valid:' item")
    return parse_rule(found[0]) if found else None


def _fmt(n: float) -> str:
    return str(int(n)) if n == int(n) else str(n)


def _describe_comparisons(comparisons: tuple) -> str:
    ops = dict(comparisons)
    if set(ops) == {">=", "<="}:
        return f"between {_fmt(ops['>='])} and {_fmt(ops['<='])}"
    if set(ops) == {">", "<="}:
        return f"in ({_fmt(ops['>'])}, {_fmt(ops['<='])}]"
    words = {">=": "at least", ">": "more than", "<=": "at most", "<": "less than", "==": ""}
    return " and ".join(f"{words[op]} {_fmt(n)}".strip() for op, n in comparisons)


def describe(rule: Rule) -> str:
    out = []
    for alt in rule.alternatives:
        if alt.empty:
            out.append("empty")
        elif alt.literal is not None:
            out.append(repr(alt.literal))
        else:
            cmp = _describe_comparisons(alt.comparisons)
            if alt.kind in _UNIT_KINDS or not alt.kind:
                unit = alt.kind if alt.kind in ("seconds", "GiB", "KiB") else ""
                out.append(" ".join(x for x in (cmp, unit) if x) or "a number")
            else:
                out.append(" ".join(x for x in ("a " + alt.kind, cmp) if x))
    return " or ".join(out)


def _compare(measure: float, comparisons: tuple) -> bool:
    tests = {">=": lambda n: measure >= n, "<=": lambda n: measure <= n, ">": lambda n: measure > n,
             "<": lambda n: measure < n, "==": lambda n: measure == n}
    return all(tests[op](n) for op, n in comparisons)


def check_rule(rule: Rule, value: Any, ctx: Context) -> Optional[str]:
    """None when value satisfies the rule, else the reason (one line)."""
    kind_reasons: list[str] = []
    out_of_range = False
    for alt in rule.alternatives:
        if alt.empty:
            if value in ("", None) or value == [] or value == {}:
                return None
            continue
        if alt.literal is not None:
            if str(value) == alt.literal:
                return None
            continue
        reason, measure = (KINDS[alt.kind][0] if alt.kind else _numeric)(value, ctx)
        if reason:
            kind_reasons.append(reason)
            continue
        if not alt.comparisons:
            return None
        measure = _number(value) if measure is None else measure
        if measure is not None and _compare(measure, alt.comparisons):
            return None
        out_of_range = True
    if out_of_range or not kind_reasons:
        message = "must be " + describe(rule)
    else:  # the value has the wrong form for every kind the rule allows: say what form is wanted
        literals = [a for a in rule.alternatives if a.literal is not None]
        message = kind_reasons[0] + (f" (or {describe(Rule('', tuple(literals)))})" if literals else "")
    return message + (f" ({rule.why})" if rule.why else "")


# --- specs ---------------------------------------------------------------------------------------

def load_specs(roles_path: str) -> tuple[dict[str, dict], dict[str, Any]]:
    """Options and defaults of every role: {var: spec (+role, +rule)}, {var: default}.
    Raises SpecError naming the role and option whose Valid: rule cannot be read."""
    specs: dict[str, dict] = {}
    defaults: dict[str, Any] = {}
    for role in sorted(os.listdir(roles_path)):
        spec_file = os.path.join(roles_path, role, "meta", "argument_specs.yml")
        if os.path.isfile(spec_file):
            with open(spec_file, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
            for entry in (data.get("argument_specs") or {}).values():
                for name, spec in (entry.get("options") or {}).items():
                    if name in specs:
                        continue
                    try:
                        specs[name] = dict(spec, role=role, rule=rule_of(spec),
                                           suboptions=_suboptions(spec.get("options") or {}))
                    except SpecError as exc:
                        raise SpecError(f"roles/{role}/meta/argument_specs.yml option {name}: {exc}") from None
        defaults_file = os.path.join(roles_path, role, "defaults", "main.yml")
        if os.path.isfile(defaults_file):
            with open(defaults_file, encoding="utf-8") as fh:
                for name, value in (yaml.safe_load(fh) or {}).items():
                    defaults.setdefault(name, value)
    return specs, defaults


def _suboptions(options: Mapping[str, dict]) -> dict[str, dict]:
    return {name: dict(spec, rule=rule_of(spec)) for name, spec in options.items()}


def _coerce(value: Any, typ: str) -> tuple[bool, Any, str]:
    """(ok, coerced value, reason). Strings of digits are numbers: INI values may be strings."""
    if typ == "bool":
        if isinstance(value, bool):
            return True, value, ""
        if isinstance(value, str) and value.strip().lower() in TRUTHY_STRINGS:
            return False, value, ("is the string %r, not a boolean (a quoted 'false' counts as true in "
                                  "conditions); write True or False unquoted" % value)
        return False, value, "must be a boolean (True or False)"
    if typ == "int":
        if isinstance(value, bool):
            return False, value, "must be a whole number, not a boolean"
        if isinstance(value, int):
            return True, value, ""
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return True, int(value), ""
        return False, value, "must be a whole number"
    if typ == "float":
        if isinstance(value, bool):
            return False, value, "must be a number, not a boolean"
        if isinstance(value, (int, float)):
            return True, float(value), ""
        try:
            return True, float(str(value).strip()), ""
        except ValueError:
            return False, value, "must be a number"
    if typ == "list":
        if isinstance(value, (list, tuple)):
            return True, list(value), ""
        return False, value, "must be a list, e.g. ['--enforce-eager']"
    if typ == "raw":  # any value, as in Ansible's argument specs (e.g. a list or a comma-separated string)
        return True, value, ""
    if typ in ("str", "path"):
        if isinstance(value, (dict, list)):
            return False, value, "must be a single value, not a %s" % type(value).__name__
        return True, "" if value is None else str(value), ""
    if typ == "dict":
        return (True, value, "") if isinstance(value, dict) else (False, value, "must be a mapping")
    return True, value, ""


def setting_prefixes(specs: Mapping[str, dict]) -> list[str]:
    """fleet_ (shared settings) and <role>_ (one role's own), longest first."""
    roles = {spec["role"] for spec in specs.values() if spec.get("role")}
    return sorted({"fleet_"} | {f"{role}_" for role in roles}, key=len, reverse=True)


def _suggest(name: str, known: Iterable[str], cutoff: float = 0.75) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=cutoff)
    return f"; did you mean {close[0]}?" if close else ""


def fabric_env_owners() -> dict[str, str]:
    """Which setting owns each variable the fabric role writes (from fabric_env, its one owner)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "module_utils", "fleet_fabric_env.py")
    spec = importlib.util.spec_from_file_location("_fleet_fabric_env_for_validation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.ENV_OWNERS)


# --- the checker ---------------------------------------------------------------------------------

Resolver = Callable[[Mapping[str, str]], Mapping[str, Optional[list]]]


class Checker:
    def __init__(self, hosts: Mapping[str, Mapping[str, Any]], groups: Mapping[str, list[str]],
                 specs: Mapping[str, dict], defaults: Mapping[str, Any], *,
                 connection_vars: Optional[Mapping[str, str]] = None,
                 plugins: Optional[Mapping[str, Iterable[str]]] = None,
                 resolver: Optional[Resolver] = None, env_owners: Optional[Mapping[str, str]] = None,
                 controller_paths: bool = True, command_line: Iterable[str] = ()):
        self.raw = hosts
        self.groups = groups
        self.specs = specs
        self.defaults = defaults
        self.connection_vars = dict(connection_vars or FALLBACK_CONNECTION_VARS)
        self.plugins = {k: set(v) for k, v in (plugins or FALLBACK_PLUGINS).items()}
        self.resolver = resolver
        # Variables given with -e: a key=value there is always a string, so the fix differs.
        self.command_line = set(command_line)
        self.problems: list[Problem] = []
        self.reported: set[tuple[str, str]] = set()
        self.values: dict[str, dict[str, Any]] = {}
        self.user_set: dict[str, set[str]] = {}
        # Settings are named fleet_* (shared) or <role>_* (one role's own): both are checked.
        self.prefixes = setting_prefixes(specs)
        self.ctx = Context(hosts=tuple(hosts), specs=specs, fabric_env_owners=env_owners or {},
                           controller_paths=controller_paths)

    def add(self, host: str, variable: str, value: Any, message: str) -> None:
        """One problem per host and variable: the first found (its own value's) is the one that
        explains; what other checks derive from a rejected value would only repeat it."""
        if (host, variable) in self.reported:
            return
        self.reported.add((host, variable))
        self.problems.append(Problem(host, variable, value, message))

    def shown(self, name: str, value: Any) -> Any:
        return "(hidden)" if (self.specs.get(name) or {}).get("no_log") and value not in ("", None) else value

    # --- per variable: known name, type, choices, Valid: rule --------------------------------
    def typed_values(self, host: str) -> dict[str, Any]:
        merged = dict(self.defaults)
        self.user_set[host] = set()
        for name, value in self.raw[host].items():
            prefix = next((p for p in self.prefixes if name.startswith(p)), None)
            if prefix is None:
                continue
            if isinstance(value, TemplateFailure):
                self.add(host, name, self.shown(name, value.raw), value.reason)
                continue
            if name not in self.specs:
                self.add(host, name, value, f"unknown {prefix}* variable" + _suggest(name, self.specs))
                continue
            spec = self.specs[name]
            reason = self.check_value(spec, value, name)
            if reason is not None:
                if name in self.command_line and spec.get("type") == "bool" and isinstance(value, str):
                    wanted = json.dumps({name: value.strip().lower() in ("true", "yes", "on", "1", "y")})
                    reason = (f"is the string {value!r}, not a boolean: -e {name}={value} always gives a "
                              f"string; give it as JSON: -e '{wanted}'")
                self.add(host, name, self.shown(name, value), reason)
                continue
            merged[name] = _coerce(value, spec.get("type", "str"))[1]
            self.user_set[host].add(name)
        return merged

    def check_value(self, spec: Mapping[str, Any], value: Any, name: str) -> Optional[str]:
        """None when value fits the spec (type, choices, rule, sub-options), else the reason."""
        ok, coerced, reason = _coerce(value, spec.get("type", "str"))
        if not ok:
            return reason
        if spec.get("choices") and coerced not in spec["choices"]:
            return "must be one of %s" % ", ".join(map(str, spec["choices"]))
        rule = spec.get("rule")
        per_item = spec.get("type") == "list" and not (rule and _whole(rule))
        for element in (coerced if per_item else [coerced]):
            if per_item and spec.get("elements"):
                ok, element, reason = _coerce(element, spec["elements"])
                if not ok:
                    return f"item {element!r}: {reason}"
            if rule:
                reason = check_rule(rule, element, self.ctx)
                if reason:
                    return f"item {element!r}: {reason}" if per_item else reason
            if spec.get("suboptions") and isinstance(element, dict):
                reason = self.check_suboptions(spec["suboptions"], element)
                if reason:
                    return reason
        return None

    def check_suboptions(self, options: Mapping[str, dict], item: Mapping[str, Any]) -> Optional[str]:
        for key in item:
            if key not in options:
                return f"item {dict(item)!r}: unknown key {key!r} (known: {', '.join(options)})"
        for key, spec in options.items():
            if key not in item:
                if spec.get("required"):
                    return f"item {dict(item)!r}: {key} is required"
                continue
            reason = self.check_value(spec, item[key], key)
            if reason:
                return f"item {dict(item)!r}: {key}: {reason}"
        return None

    # --- the checks ----------------------------------------------------------------------------
    def run(self) -> list[Problem]:
        all_hosts = list(self.raw)
        self.check_groups(all_hosts)
        for host in all_hosts:
            self.check_connection(host)
        self.values = {h: self.typed_values(h) for h in all_hosts}
        heads = list(self.groups.get(HEAD_GROUP, []))
        workers = list(self.groups.get(WORKER_GROUP, []))
        serving = heads + [w for w in workers if w not in heads]
        for host in set(heads) & set(workers):
            self.add(host, "groups", "fleet_head+fleet_workers", "a host is either a head or a worker, not both")
        self.check_addresses(all_hosts)
        balancers = set(self.groups.get(BALANCER_GROUP, []))
        spares = [h for h in self.groups.get(SPARE_GROUP, []) if h not in serving]
        for host in all_hosts:
            # A spare is checked as a serving host: it must be able to join its replica as it is.
            self.check_host(host, host in serving or host in spares)
            if host in balancers:
                self.check_balancer_host(host, self.values[host])
        self.check_replicas(heads, serving, spares)
        self.check_balancer(heads)
        return self.problems

    def check_groups(self, all_hosts: list[str]) -> None:
        heads = self.groups.get(HEAD_GROUP, [])
        workers = self.groups.get(WORKER_GROUP, [])
        if not all_hosts:
            self.add("(inventory)", "hosts", [], "the inventory has no host at all (was the right file given with -i?)")
            return
        if not heads:
            self.add("(inventory)", HEAD_GROUP, [], "no host in group fleet_head: every replica needs one head")
        serving_group = set(self.groups.get(SERVING_GROUP, []))
        if serving_group != set(heads) | set(workers):
            missing = sorted((set(heads) | set(workers)) - serving_group)
            extra = sorted(serving_group - set(heads) - set(workers))
            if missing:
                self.add("(inventory)", SERVING_GROUP, sorted(serving_group),
                         f"does not hold {', '.join(missing)}: the serving stages run on fleet_serving only; "
                         "write [fleet_serving:children] with fleet_head and fleet_workers")
            for host in extra:
                self.add(host, "groups", SERVING_GROUP, "is in fleet_serving but neither in fleet_head nor in "
                                                        "fleet_workers: put it in one of them")
        for host in self.groups.get(SPARE_GROUP, []):
            if host in serving_group or host in heads or host in workers:
                self.add(host, "groups", SPARE_GROUP, "is a spare and a serving host: a spare serves nothing until "
                                                      "it is moved to fleet_head or fleet_workers")
        registry = self.groups.get(REGISTRY_GROUP, [])
        if len(registry) > 1:
            self.add("(inventory)", REGISTRY_GROUP, registry, "holds more than one host: the in-fleet registry "
                                                              "runs on one (role registry)")
        if registry:
            for host in sorted(self.raw):
                if self.raw[host].get("image_registry"):
                    self.add(host, "image_registry", self.raw[host]["image_registry"],
                             f"is set while [{REGISTRY_GROUP}] names {registry[0]}: use your registry "
                             f"(image_registry) or the in-fleet one ([{REGISTRY_GROUP}]), not both")
        build_hosts = {str(v.get("image_build_host")) for v in self.raw.values() if v.get("image_build_host")}
        for group in sorted(self.groups):
            if group in KNOWN_GROUPS or group in ("all", "ungrouped"):
                continue
            close = difflib.get_close_matches(group, KNOWN_GROUPS, n=1, cutoff=0.8)
            if group.startswith("fleet") or close:
                self.add("(inventory)", "group", group, "unknown vllm-fleet group" + (
                    f"; did you mean {close[0]}?" if close else f" (groups: {', '.join(KNOWN_GROUPS)})"))
        for host in self.groups.get("ungrouped", []):
            # The controller listed for itself (localhost, or the image build host) needs no group.
            if host not in build_hosts and host != "localhost" and self.raw[host].get("ansible_connection") != "local":
                self.add(host, "groups", [], "is in no group: put it under [fleet_head], [fleet_workers], "
                                             "[fleet_spare], [fleet_monitoring] or [fleet_loadbalancer]")

    def check_connection(self, host: str) -> None:
        """Connection variables first: Ansible would fail on them with its own, raw, messages."""
        raw = self.raw[host]
        for name, value in raw.items():
            if not name.startswith("ansible_"):
                continue
            if isinstance(value, TemplateFailure):
                self.add(host, name, value.raw, value.reason)
                continue
            typ = self.connection_vars.get(name)
            if typ is None:
                close = _suggest(name, self.connection_vars, cutoff=0.85)
                if close:
                    self.add(host, name, value, "unknown connection variable" + close)
                continue
            reason = self._connection_reason(name, typ, value)
            if reason:
                self.add(host, name, value, reason)

    def _connection_reason(self, name: str, typ: str, value: Any) -> Optional[str]:
        if typ in ("int", "integer"):
            if isinstance(value, bool) or not re.fullmatch(r"\s*\d+\s*", str(value)):
                return "must be a whole number" + (" (the SSH port, e.g. 22)" if name.endswith("_port") else "")
            if name.endswith("_port") and not 1 <= int(value) <= 65535:
                return "port must be between 1 and 65535"
        elif typ in ("bool", "boolean"):
            if not isinstance(value, bool) and str(value).strip().lower() not in ANSIBLE_BOOL_STRINGS:
                return "must be a boolean (True or False)"
        elif typ in ("float",):
            if _number(value) is None:
                return "must be a number"
        text = str(value)
        if name in ("ansible_host", "ansible_ssh_host"):
            if not text.strip():
                return "is empty: set the host's address or leave the variable out"
            if "://" in text or "@" in text or re.search(r"\s", text):
                return "must be a bare address or DNS name (no scheme, user@ or spaces)"
            if re.fullmatch(r"[^:\[\]]+:\d+", text):
                return f"has a port in it: write ansible_host={text.rsplit(':', 1)[0]} ansible_port={text.rsplit(':', 1)[1]}"
            if _host_address(text, self.ctx)[0]:
                return "must be an IP address or a DNS name"
        if name in ("ansible_user", "ansible_ssh_user", "ansible_become_user") and (
                not text.strip() or re.search(r"[\s@:/]", text)):
            return "must be a user name (no spaces, '@', ':' or '/')"
        for var, kind in (("ansible_connection", "connection"), ("ansible_become_method", "become"),
                          ("ansible_shell_type", "shell")):
            known = self.plugins.get(kind, set())
            if name == var and text not in known and "." not in text:
                return (f"is not a {kind} plugin" + _suggest(text, known, 0.6)
                        + f" (known: {', '.join(sorted(known))})")
        if name == "ansible_python_interpreter" and not (os.path.isabs(text) or text.startswith("auto")
                                                         or "{{" in text):
            return "must be an absolute path (e.g. /usr/bin/python3) or auto"
        if name in ("ansible_ssh_private_key_file", "ansible_private_key_file") and self.ctx.controller_paths:
            path = os.path.expanduser(text)
            if not os.path.isfile(path):
                return "does not exist on the controller"
            if not os.access(path, os.R_OK):
                return "cannot be read on the controller (permissions)"
        return None

    def check_addresses(self, hosts: list[str]) -> None:
        """Two inventory names for one machine (same address and port), and names that do not resolve."""
        seen: dict[tuple[str, int], str] = {}
        to_resolve: dict[str, str] = {}
        for host in hosts:
            raw = self.raw[host]
            if raw.get("ansible_connection") == "local" or isinstance(raw.get("ansible_host"), TemplateFailure):
                continue
            address = str(raw.get("ansible_host", host))
            port_text = str(raw.get("ansible_port", 22) or 22)
            if not re.fullmatch(r"\s*\d+\s*", port_text):
                continue  # reported by check_connection
            key = (address, int(port_text))
            if key in seen:
                self.add(host, "ansible_host", address, f"same address and port as host {seen[key]}")
            else:
                seen[key] = host
            try:
                ipaddress.ip_address(address)
            except ValueError:
                if not _host_address(address, self.ctx)[0]:
                    to_resolve[host] = address
        if not to_resolve or self.resolver is None:
            return
        resolved = self.resolver(to_resolve)
        by_ip: dict[tuple[str, int], str] = {(addr, port): host for (addr, port), host in seen.items()}
        for host, name in to_resolve.items():
            ips = resolved.get(host)
            variable = "ansible_host"
            value = self.raw[host].get("ansible_host", NOT_SET)
            if ips is None:
                continue  # SSH resolves it itself (ssh_config alias, ProxyJump): not ours to judge
            if not ips:
                self.add(host, variable, value, f"the name {name} does not resolve on the controller (DNS or "
                                                f"/etc/hosts): set ansible_host to the host's address")
                continue
            port = int(str(self.raw[host].get("ansible_port", 22) or 22))
            for ip in ips:
                other = by_ip.get((ip, port))
                if other and other != host:
                    self.add(host, variable, value, f"{name} resolves to {ip}, the address of host {other}: one "
                                                    "machine is listed twice (under two names)")
                    break

    def check_host(self, host: str, serving: bool) -> None:
        v = self.values[host]
        self.check_ports(host, v)
        hca = v.get("fleet_nccl_ib_hca", "")
        if hca and v.get("fleet_nccl_ib") == "off":
            self.add(host, "fleet_nccl_ib_hca", hca, "is set while fleet_nccl_ib=off on the same host")
        interval, timeout = v.get("monitoring_scrape_interval"), v.get("monitoring_scrape_timeout")
        if timeout and {"monitoring_scrape_interval", "monitoring_scrape_timeout"} & self.user_set[host]:
            i_seconds, t_seconds = _prometheus_duration(interval, None)[1], _prometheus_duration(timeout, None)[1]
            if i_seconds is not None and t_seconds is not None and t_seconds > i_seconds:
                self.add(host, "monitoring_scrape_timeout", timeout,
                         f"is longer than monitoring_scrape_interval={interval}: Prometheus refuses that")
        if serving:
            self.check_serving_host(host, v)

    def check_ports(self, host: str, v: Mapping[str, Any]) -> None:
        # Ray's ports first, so a clash names the setting that moved onto Ray's port.
        ray_ports = [n for n in self.specs if n.startswith("fleet_ray_") and n.endswith("_port")]
        port_vars = sorted((n for n, s in self.specs.items() if n.endswith("_port") and s.get("type") == "int"),
                           key=lambda n: (n not in ray_ports, n))
        bad = set()
        for name in port_vars:
            port = v.get(name)
            if name in OFF_PORT_VARS and port == 0:
                bad.add(name)  # switched off: nothing listens, nothing to compare
                continue
            if not isinstance(port, int) or not 1 <= port <= 65535:
                if name not in self.user_set[host]:  # user-set values were checked by their rule
                    self.add(host, name, port, "port must be between 1 and 65535")
                bad.add(name)
        worker_range = {"fleet_ray_min_worker_port", "fleet_ray_max_worker_port"}
        lo, hi = v.get("fleet_ray_min_worker_port"), v.get("fleet_ray_max_worker_port")
        if not worker_range & bad and lo > hi:
            self.add(host, "fleet_ray_min_worker_port", lo, f"is above fleet_ray_max_worker_port={hi}")
        owners: dict[int, str] = {}
        for name in port_vars:
            port = v.get(name)
            if name in bad or name in worker_range:
                continue
            if port in owners:
                self.add(host, name, port, f"clashes with {owners[port]}={port}")
            else:
                owners[port] = name
            if name not in ray_ports and not bad & worker_range and lo <= port <= hi:
                self.add(host, name, port, f"falls inside Ray's worker port range {lo}-{hi}")
            if name not in ray_ports and name not in CLUSTER_PORT_VARS and LAUNCH_PORT_RANGE[0] <= port <= LAUNCH_PORT_RANGE[1]:
                self.add(host, name, port, "falls inside the launch port range %d-%d (vLLM's internal ports, open "
                         "to the replica's fabric peers only)" % LAUNCH_PORT_RANGE)

    def check_serving_host(self, host: str, v: Mapping[str, Any]) -> None:
        path = v.get("fleet_model_path", "")
        if not path:
            self.add(host, "fleet_model_path", path, "is empty: set the absolute model path on the nodes")
        elif not os.path.isabs(path) or ".." in path.split("/"):
            self.add(host, "fleet_model_path", path, "must be an absolute path without '..'")
        self.check_model_source(host, v)
        name = v.get("fleet_served_model_name", "")
        if not str(name).strip():
            self.add(host, "fleet_served_model_name", name, "is empty: clients need a model name")
        if v.get("fleet_engine") == "cuda":
            if v.get("fleet_gpu_less"):
                self.add(host, "fleet_engine", "cuda", "is cuda on a host marked fleet_gpu_less=True")
            elif v.get("fleet_gpus_per_node", 0) < 1:
                self.add(host, "fleet_gpus_per_node", v.get("fleet_gpus_per_node"),
                         "must be at least 1 on a serving host of the cuda engine")
        elif v.get("fleet_cpu_workers_per_node", 0) < 1:
            self.add(host, "fleet_cpu_workers_per_node", v.get("fleet_cpu_workers_per_node"), "must be at least 1")

    def check_model_source(self, host: str, v: Mapping[str, Any]) -> None:
        """The model role's own parser (ansible/plugins/filter/fleet_model.py) says what is wrong."""
        model = _model_filters()
        source = v.get("fleet_model_source", "")
        try:
            parsed = model.parse_source(source)
        except model.SourceError as exc:
            self.add(host, "fleet_model_source", source, str(exc))
        else:
            if parsed["scheme"] == "controller" and self.ctx.controller_paths and not os.path.isdir(parsed["path"]):
                self.add(host, "fleet_model_source", source, "does not exist on the controller (a directory)")
        why = model.check_manifest(v.get("model_manifest"))
        if why:
            self.add(host, "model_manifest", "(pinned manifest)", why)

    def check_balancer_host(self, host: str, v: Mapping[str, Any]) -> None:
        """Tenants (loadbalancer_api_keys) and the TLS certificate files of a balancer."""
        names, keys = set(), set()
        for i, tenant in enumerate(v.get("loadbalancer_api_keys") or []):
            where = f"loadbalancer_api_keys[{i}]"
            if not isinstance(tenant, dict):
                self.add(host, where, tenant, "must be a mapping {name, key, rate_limit}")
                continue
            for field in sorted(set(tenant) - TENANT_FIELDS):
                self.add(host, f"{where}.{field}", tenant[field],
                         "unknown field (a tenant has name, key, rate_limit)" + _suggest(field, TENANT_FIELDS))
            name = str(tenant.get("name", ""))
            if not TENANT_RE.match(name):
                self.add(host, f"{where}.name", name, "use 1-64 letters, digits, '.', '_' or '-' (it labels metrics)")
            elif name in names:
                self.add(host, f"{where}.name", name, "two tenants have this name")
            names.add(name)
            key = tenant.get("key") or ""
            if key:
                if not isinstance(key, str) or len(key) < 16 or re.search(r"\s", key):
                    self.add(host, f"{where}.key", "(hidden)", "must be at least 16 characters without white space")
                elif key in keys:
                    self.add(host, f"{where}.key", "(hidden)", "the same key as another tenant")
                keys.add(key)
            ok, limit, _ = _coerce(tenant.get("rate_limit", 0), "int")
            if not ok or limit < 0:
                self.add(host, f"{where}.rate_limit", tenant.get("rate_limit"), "must be a whole number >= 0")
        cert, key_file = v.get("loadbalancer_tls_cert_file", ""), v.get("loadbalancer_tls_key_file", "")
        if v.get("loadbalancer_tls", True):
            if bool(cert) != bool(key_file):
                self.add(host, "loadbalancer_tls_cert_file" if not cert else "loadbalancer_tls_key_file", "",
                         "set both loadbalancer_tls_cert_file and loadbalancer_tls_key_file (or neither: lab CA)")
            for var, path in (("loadbalancer_tls_cert_file", cert), ("loadbalancer_tls_key_file", key_file)):
                if path and self.ctx.controller_paths and not os.path.isfile(path):
                    self.add(host, var, path, "no such file on the controller")

    def capacity(self, host: str) -> tuple[int, str]:
        v = self.values[host]
        if v.get("fleet_engine") == "cpu":
            return v.get("fleet_cpu_workers_per_node", 0), "fleet_cpu_workers_per_node"
        return v.get("fleet_gpus_per_node", 0), "fleet_gpus_per_node"

    def replica_wide(self) -> list[str]:
        """Settings whose Valid: rule says 'same in a replica', in the order of the specs."""
        return [n for n, s in self.specs.items() if s.get("rule") is not None and s["rule"].replica_wide]

    def check_replicas(self, heads: list[str], serving: list[str], spares: list[str]) -> None:
        replicas: dict[str, list[str]] = {}
        for host in serving:
            replicas.setdefault(self.values[host].get("fleet_replica", "main"), []).append(host)
        spares_of: dict[str, list[str]] = {}
        for host in spares:
            replica = self.values[host].get("fleet_replica", "main")
            if replica in replicas:
                spares_of.setdefault(replica, []).append(host)
            else:
                self.add(host, "fleet_replica", replica,
                         f"names no replica of the serving hosts ({', '.join(sorted(replicas)) or 'none'}): a spare "
                         "stands by for one (its fabric settings are found by route to that replica's head)")
        for replica, hosts in sorted(replicas.items()):
            replica_heads = [h for h in hosts if h in heads]
            # Its spares must be able to join it as they are: the same replica-wide settings, room for TP.
            members = hosts + spares_of.get(replica, [])
            if not replica_heads:
                self.add(hosts[0], "fleet_replica", replica, f"replica {replica!r} has no host in fleet_head")
                continue
            if len(replica_heads) > 1:
                self.add(replica_heads[1], "fleet_replica", replica,
                         f"replica {replica!r} has two heads: {', '.join(replica_heads)}")
                continue
            head = replica_heads[0]
            hv = self.values[head]
            for var in self.replica_wide():
                for host in members:
                    if self.values[host].get(var) != hv.get(var):
                        self.add(host, var, self.shown(var, self.values[host].get(var)),
                                 f"differs from the head {head} ({self.shown(var, hv.get(var))!r}); it must be the "
                                 f"same on every host of replica {replica!r}")
            tp, pp = hv.get("fleet_tensor_parallel_size", 1), hv.get("fleet_pipeline_parallel_size", 1)
            if not isinstance(tp, int) or not isinstance(pp, int) or tp < 1 or pp < 1:
                continue
            for host in members:
                cap, cap_var = self.capacity(host)
                if cap >= 1 and tp > cap:
                    self.add(host, "fleet_tensor_parallel_size", tp,
                             f"is larger than this node's {cap} ({cap_var}); tensor parallelism stays inside one node")
            if pp > len(hosts):
                self.add(head, "fleet_pipeline_parallel_size", pp,
                         f"is larger than the {len(hosts)} serving node(s) of replica {replica!r}")
            total = sum(max(self.capacity(h)[0], 0) for h in hosts)
            if tp * pp > total:
                self.add(head, "fleet_tensor_parallel_size", tp,
                         f"TP×PP = {tp}×{pp} = {tp * pp} is more than the {total} devices replica {replica!r} declares")

    def check_balancer(self, heads: list[str]) -> None:
        """Replicas behind the balancer(s) must answer the same requests the same way."""
        balancers = self.groups.get(BALANCER_GROUP, [])
        if not balancers or len(heads) < 2:
            return
        first = heads[0]
        for var in ("fleet_served_model_name", "fleet_api_key"):
            want = self.values[first].get(var)
            for head in heads[1:]:
                have = self.values[head].get(var)
                if have != want:
                    self.add(head, var, self.shown(var, have),
                             f"replica {self.values[head].get('fleet_replica')!r} differs from replica "
                             f"{self.values[first].get('fleet_replica')!r} (head {first}: {self.shown(var, want)!r}) "
                             f"behind the same balancer ({', '.join(balancers)}): a client would be answered "
                             "differently depending on the replica")

def _model_filters():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "filter", "fleet_model.py")
    spec = importlib.util.spec_from_file_location("fleet_model_filters", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _whole(rule: Rule) -> bool:
    return any(a.kind and KINDS[a.kind][1] for a in rule.alternatives)


def validate(hosts, groups, specs, defaults, **kwargs) -> list[Problem]:
    return Checker(hosts, groups, specs, defaults, **kwargs).run()


def format_problems(problems: list[Problem]) -> str:
    lines = [f"{len(problems)} problem(s) in the inventory; nothing was changed on any host:"]
    lines += [f"  {i}. {p}" for i, p in enumerate(problems, 1)]
    return "\n".join(lines)


# --- controller-side I/O: name resolution, Ansible's own definitions ------------------------------

def _ssh_resolves_itself(name: str, common_args: str) -> bool:
    """True when SSH maps the name through its own configuration (Host alias, ProxyJump)."""
    if re.search(r"(^|\s)(-F|-J|-o\s*Proxy)|ProxyJump|ProxyCommand", common_args or ""):
        return True
    try:
        out = subprocess.run(["ssh", "-G", name], capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    conf = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    return conf.get("hostname", name).lower() != name.lower() or conf.get("proxyjump", "none") != "none" \
        or conf.get("proxycommand", "none") != "none"


def resolve_names(names: Mapping[str, str], common_args: Mapping[str, str] = None,
                  timeout: float = 10.0) -> dict[str, Optional[list]]:
    """{host: [ip, ...]} ([] = does not resolve; None = SSH resolves it itself), within `timeout`
    seconds of wall-clock time in all (lookups run in parallel; a slow resolver counts as failed)."""
    results: dict[str, Optional[list]] = {}

    def lookup(host: str, name: str) -> None:
        try:
            infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
            results[host] = sorted({info[4][0] for info in infos})
        except (OSError, UnicodeError):
            results[host] = None if _ssh_resolves_itself(name, (common_args or {}).get(host, "")) else []

    threads = [threading.Thread(target=lookup, args=item, daemon=True) for item in names.items()]
    for thread in threads:
        thread.start()
    deadline = threading.Event()
    timer = threading.Timer(timeout, deadline.set)
    timer.daemon = True
    timer.start()
    for thread in threads:
        while thread.is_alive() and not deadline.is_set():
            thread.join(0.05)
    timer.cancel()
    return {host: results.get(host, []) for host in names}


def ansible_connection_definitions() -> tuple[dict[str, str], dict[str, set[str]]]:
    """Connection-related variable names with their types, and the names of the connection, become
    and shell plugins, from Ansible's own plugin documentation (the installed Ansible's truth)."""
    from ansible import constants as C
    from ansible.plugins.loader import become_loader, connection_loader, shell_loader

    names: dict[str, str] = {}
    option_types: dict[str, str] = {}
    for option in C.config.get_configuration_definitions().values():
        for var in option.get("vars") or []:
            names.setdefault(var["name"], option.get("type") or "string")
    plugins: dict[str, set[str]] = {"connection": {"smart"}, "become": set(), "shell": set()}
    for loader, ptype in ((connection_loader, "connection"), (become_loader, "become"), (shell_loader, "shell")):
        for plugin in loader.all(class_only=True):
            name = getattr(plugin, "_load_name", "") or ""
            if not name.startswith("_"):
                plugins[ptype].add(name)
            for key, option in (C.config.get_configuration_definitions(ptype, name) or {}).items():
                option_types.setdefault(key, option.get("type") or "string")
                for var in option.get("vars") or []:
                    if re.fullmatch(r"ansible_\w+", var.get("name", "")):
                        names.setdefault(var["name"], option.get("type") or "string")
    for key, aliases in C.MAGIC_VARIABLE_MAPPING.items():
        for alias in aliases:
            names.setdefault(alias, option_types.get(key, "string"))
    names["ansible_become"] = "boolean"
    return names, plugins


def _template_reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    undefined = re.search(r"'([^']+)' is undefined", text)
    if undefined:
        return f"cannot be templated: it uses {undefined.group(1)}, which is not defined for this host"
    if "syntax" in text.lower() or "unexpected" in text.lower():
        return "is not a valid template: check its {{ }} and {% %} pairs"
    return "cannot be templated: " + text


class ActionModule(ActionBase):
    """Runs on the controller; reads hostvars, groups and the roles' argument specs."""

    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(("roles_path", "controller_paths"))

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        try:
            return self._validate(result, task_vars or {})
        except SpecError as exc:
            return dict(result, failed=True, msg=f"the validator cannot read an argument spec: {exc}")
        except Exception as exc:  # never a traceback in place of the inventory's problems
            return dict(result, failed=True,
                        msg=f"the inventory validator itself failed ({type(exc).__name__}: {exc}); "
                            "this is a vllm-fleet bug, please report it with the inventory")

    def _validate(self, result, task_vars):
        roles_path = self._task.args.get("roles_path")
        if not roles_path or not os.path.isdir(roles_path):
            return dict(result, failed=True, msg=f"roles_path {roles_path!r} is not a directory")
        specs, defaults = load_specs(roles_path)
        groups = {k: list(v) for k, v in task_vars.get("groups", {}).items()}
        hostvars = task_vars.get("hostvars", {})
        prefixes = tuple(setting_prefixes(specs))
        hosts: dict[str, dict[str, Any]] = {}
        # Ansible's own per-run variables (ansible_run_tags, ansible_version, ...) are no inventory's.
        from ansible import constants as C
        from ansible.module_utils.parsing.convert_bool import boolean
        magic = set(C.INTERNAL_STATIC_VARS) | {"ansible_check_mode", "ansible_play_name", "ansible_search_path"}
        for host in groups.get("all", []):
            hv = hostvars[host]
            raw = hostvars.raw_get(host) if hasattr(hostvars, "raw_get") else hv
            values = {}
            for name in [n for n in hv.keys() if n.startswith(prefixes) or n.startswith("ansible_")]:
                if name in magic:
                    continue
                try:
                    values[name] = hv[name]
                except Exception as exc:  # undefined variable, template syntax: named, not raised
                    values[name] = TemplateFailure(raw.get(name, "?") if hasattr(raw, "get") else "?",
                                                   _template_reason(exc))
            hosts[host] = values
        connection_vars, plugins = ansible_connection_definitions()
        try:  # the names given with -e (Ansible caches its parse of them)
            from ansible.utils.vars import load_extra_vars
            command_line = set(load_extra_vars(self._loader))
        except Exception:  # pragma: no cover - only the message's advice depends on it
            command_line = set()
        common_args = {h: str(v.get("ansible_ssh_common_args", "")) for h, v in hosts.items()}
        problems = validate(hosts, groups, specs, defaults, connection_vars=connection_vars, plugins=plugins,
                            resolver=lambda names: resolve_names(names, common_args),
                            env_owners=fabric_env_owners(),
                            controller_paths=boolean(self._task.args.get("controller_paths", True), strict=False),
                            command_line=command_line)
        if problems:
            return dict(result, failed=True, msg=format_problems(problems))
        serving = [h for h in groups.get(HEAD_GROUP, []) + groups.get(WORKER_GROUP, [])]
        return dict(result, changed=False,
                    msg=f"inventory valid: {len(hosts)} host(s), {len(set(serving))} serving, "
                        + (f"{len(groups[SPARE_GROUP])} spare, " if groups.get(SPARE_GROUP) else "")
                        + f"{len(specs)} known settings")
