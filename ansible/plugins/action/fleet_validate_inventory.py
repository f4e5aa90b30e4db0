# -*- coding: utf-8 -*-
"""Validate a vllm-fleet inventory on the controller, before any host is touched.

Every problem names the host, the variable and the bad value; all problems are reported at once.
The known fleet_* variables and their types come from the roles' meta/argument_specs.yml, so a
role that adds a setting documents and validates it in one place.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import yaml

try:  # the pure checks below are importable without Ansible (unit tests)
    from ansible.plugins.action import ActionBase
except ImportError:  # pragma: no cover
    ActionBase = object

HEAD_GROUP, WORKER_GROUP, MONITORING_GROUP = "fleet_head", "fleet_workers", "fleet_monitoring"
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
# Linux IFNAMSIZ is 16 including the NUL; '/', ':' and white space are never valid.
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
# NCCL_IB_HCA: optional ^ (exclude) or = (exact), then device[:port] entries separated by commas.
IB_HCA_RE = re.compile(r"^[\^=]?[A-Za-z0-9_]+(:\d+)?(,[A-Za-z0-9_]+(:\d+)?)*$")
IMAGE_RE = re.compile(r"^[a-z0-9]+([._/-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*"
                      r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$")
TRUTHY_STRINGS = {"true", "false", "yes", "no", "on", "off", "1", "0", "y", "n"}
# vLLM flags the fleet sets itself: passing them in fleet_extra_args would fight the inventory.
MANAGED_FLAGS = {
    "--model": "fleet_model_path", "--served-model-name": "fleet_served_model_name",
    "--tensor-parallel-size": "fleet_tensor_parallel_size", "-tp": "fleet_tensor_parallel_size",
    "--pipeline-parallel-size": "fleet_pipeline_parallel_size", "-pp": "fleet_pipeline_parallel_size",
    "--max-model-len": "fleet_max_model_len", "--port": "fleet_api_port",
    "--quantization": "fleet_quantization", "--gpu-memory-utilization": "fleet_gpu_memory_utilization",
    "--api-key": "fleet_api_key (a secret never belongs on the command line)",
    "--distributed-executor-backend": "fleet_engine",
}
RAY_PORT_VARS = ("fleet_ray_port", "fleet_ray_dashboard_port", "fleet_ray_client_port",
                 "fleet_ray_node_manager_port", "fleet_ray_object_manager_port",
                 "fleet_ray_dashboard_agent_port", "fleet_ray_metrics_export_port")


@dataclass(frozen=True)
class Problem:
    host: str
    variable: str
    value: Any
    message: str

    def __str__(self) -> str:
        return f"host {self.host}: {self.variable}={self.value!r}: {self.message}"


def load_specs(roles_path: str) -> tuple[dict[str, dict], dict[str, Any]]:
    """Options and defaults of every role: {var: spec}, {var: default}."""
    specs: dict[str, dict] = {}
    defaults: dict[str, Any] = {}
    for role in sorted(os.listdir(roles_path)):
        spec_file = os.path.join(roles_path, role, "meta", "argument_specs.yml")
        if os.path.isfile(spec_file):
            with open(spec_file, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
            for entry in (data.get("argument_specs") or {}).values():
                for name, spec in (entry.get("options") or {}).items():
                    specs.setdefault(name, dict(spec, role=role))
        defaults_file = os.path.join(roles_path, role, "defaults", "main.yml")
        if os.path.isfile(defaults_file):
            with open(defaults_file, encoding="utf-8") as fh:
                for name, value in (yaml.safe_load(fh) or {}).items():
                    defaults.setdefault(name, value)
    return specs, defaults


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
    if typ in ("str", "path", "raw"):
        if isinstance(value, (dict, list)):
            return False, value, "must be a single value, not a %s" % type(value).__name__
        return True, value if typ == "raw" else ("" if value is None else str(value)), ""
    if typ == "dict":
        return (True, value, "") if isinstance(value, dict) else (False, value, "must be a mapping")
    return True, value, ""


def setting_prefixes(specs: Mapping[str, dict]) -> list[str]:
    """fleet_ (shared settings) and <role>_ (one role's own), longest first."""
    roles = {spec["role"] for spec in specs.values() if spec.get("role")}
    return sorted({"fleet_"} | {f"{role}_" for role in roles}, key=len, reverse=True)


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


class Checker:
    def __init__(self, hosts: Mapping[str, Mapping[str, Any]], groups: Mapping[str, list[str]],
                 specs: Mapping[str, dict], defaults: Mapping[str, Any]):
        self.raw = hosts
        self.groups = groups
        self.specs = specs
        self.defaults = defaults
        self.problems: list[Problem] = []
        self.values: dict[str, dict[str, Any]] = {}
        # Settings are named fleet_* (shared) or <role>_* (one role's own): both are checked.
        self.prefixes = setting_prefixes(specs)

    def add(self, host: str, variable: str, value: Any, message: str) -> None:
        self.problems.append(Problem(host, variable, value, message))

    # --- per variable: known name, type, choices ---------------------------------------------
    def typed_values(self, host: str) -> dict[str, Any]:
        merged = dict(self.defaults)
        for name, value in self.raw[host].items():
            prefix = next((p for p in self.prefixes if name.startswith(p)), None)
            if prefix is None:
                continue
            if name not in self.specs:
                self.add(host, name, value, f"unknown {prefix}* variable" + _suggest(name, self.specs))
                continue
            spec = self.specs[name]
            ok, coerced, reason = _coerce(value, spec.get("type", "str"))
            if not ok:
                self.add(host, name, value, reason)
                continue
            if spec.get("choices") and coerced not in spec["choices"]:
                self.add(host, name, value, "must be one of %s" % ", ".join(map(str, spec["choices"])))
                continue
            merged[name] = coerced
        return merged

    # --- the checks ----------------------------------------------------------------------------
    def run(self) -> list[Problem]:
        all_hosts = list(self.raw)
        self.values = {h: self.typed_values(h) for h in all_hosts}
        heads = list(self.groups.get(HEAD_GROUP, []))
        workers = list(self.groups.get(WORKER_GROUP, []))
        serving = heads + [w for w in workers if w not in heads]
        if not heads:
            self.add("(inventory)", HEAD_GROUP, [], "no host in group fleet_head: every replica needs one head")
        for host in set(heads) & set(workers):
            self.add(host, "groups", "fleet_head+fleet_workers", "a host is either a head or a worker, not both")
        self.check_addresses(all_hosts)
        for host in all_hosts:
            self.check_host(host, host in serving)
        self.check_replicas(heads, serving)
        return self.problems

    def check_addresses(self, hosts: list[str]) -> None:
        seen: dict[tuple[str, int], str] = {}
        for host in hosts:
            if self.raw[host].get("ansible_connection") == "local":
                continue
            address = str(self.raw[host].get("ansible_host", host))
            key = (address, int(self.raw[host].get("ansible_port", 22) or 22))
            if key in seen:
                self.add(host, "ansible_host", address, f"same address and port as host {seen[key]}")
            else:
                seen[key] = host

    def check_host(self, host: str, serving: bool) -> None:
        v = self.values[host]
        for name in ("fleet_deployment", "fleet_replica"):
            if not NAME_RE.match(str(v.get(name, ""))):
                self.add(host, name, v.get(name), "use 1-40 lower-case letters, digits and dashes")
        self.check_ports(host, v)
        iface = v.get("fleet_fabric_interface", "")
        if iface and (not IFNAME_RE.match(iface) or iface in (".", "..")):
            self.add(host, "fleet_fabric_interface", iface,
                     "not a possible Linux interface name (1-15 characters, no '/', ':' or spaces)")
        hca = v.get("fleet_nccl_ib_hca", "")
        if hca and not IB_HCA_RE.match(hca):
            self.add(host, "fleet_nccl_ib_hca", hca, "not an NCCL_IB_HCA list such as mlx5_0:1,mlx5_1 or ^mlx5_2")
        if hca and v.get("fleet_nccl_ib") == "off":
            self.add(host, "fleet_nccl_ib_hca", hca, "is set while fleet_nccl_ib=off on the same host")
        image = str(v.get("fleet_image", ""))
        if not IMAGE_RE.match(image):
            self.add(host, "fleet_image", image, "not an image reference such as registry:5000/vllm-fleet:1.0")
        if serving:
            self.check_serving_host(host, v)

    def check_ports(self, host: str, v: Mapping[str, Any]) -> None:
        # Ray's ports first, so a clash names the setting that moved onto Ray's port.
        port_vars = sorted((n for n, s in self.specs.items() if n.endswith("_port") and s.get("type") == "int"),
                           key=lambda n: (n not in RAY_PORT_VARS, n))
        bad = set()
        for name in port_vars:
            port = v.get(name)
            if not isinstance(port, int) or not 1 <= port <= 65535:
                self.add(host, name, port, "port must be between 1 and 65535")
                bad.add(name)
        lo, hi = v.get("fleet_ray_min_worker_port"), v.get("fleet_ray_max_worker_port")
        if not {"fleet_ray_min_worker_port", "fleet_ray_max_worker_port"} & bad and lo > hi:
            self.add(host, "fleet_ray_min_worker_port", lo, f"is above fleet_ray_max_worker_port={hi}")
        owners: dict[int, str] = {}
        for name in port_vars:
            port = v.get(name)
            if name in bad or name in ("fleet_ray_min_worker_port", "fleet_ray_max_worker_port"):
                continue
            if port in owners:
                self.add(host, name, port, f"clashes with {owners[port]}={port}")
            else:
                owners[port] = name
            if name not in RAY_PORT_VARS and not bad & {"fleet_ray_min_worker_port", "fleet_ray_max_worker_port"} \
                    and lo <= port <= hi:
                self.add(host, name, port, f"falls inside Ray's worker port range {lo}-{hi}")

    def check_serving_host(self, host: str, v: Mapping[str, Any]) -> None:
        path = v.get("fleet_model_path", "")
        if not path:
            self.add(host, "fleet_model_path", path, "is empty: set the absolute model path on the nodes")
        elif not os.path.isabs(path) or ".." in path.split("/"):
            self.add(host, "fleet_model_path", path, "must be an absolute path without '..'")
        self.check_model_source(host, v)
        name = v.get("fleet_served_model_name", "")
        if not name.strip():
            self.add(host, "fleet_served_model_name", name, "is empty: clients need a model name")
        elif re.search(r"\s", name):
            self.add(host, "fleet_served_model_name", name, "must not contain white space")
        for var in ("fleet_tensor_parallel_size", "fleet_pipeline_parallel_size", "fleet_max_model_len"):
            if v.get(var, 0) < 1:
                self.add(host, var, v.get(var), "must be at least 1")
        util = v.get("fleet_gpu_memory_utilization", 0.9)
        if not 0 < util <= 1:
            self.add(host, "fleet_gpu_memory_utilization", util, "must be in (0, 1]")
        if v.get("fleet_engine") == "cuda":
            if v.get("fleet_gpu_less"):
                self.add(host, "fleet_engine", "cuda", "is cuda on a host marked fleet_gpu_less=True")
            elif v.get("fleet_gpus_per_node", 0) < 1:
                self.add(host, "fleet_gpus_per_node", v.get("fleet_gpus_per_node"),
                         "must be at least 1 on a serving host of the cuda engine")
        elif v.get("fleet_cpu_workers_per_node", 0) < 1:
            self.add(host, "fleet_cpu_workers_per_node", v.get("fleet_cpu_workers_per_node"), "must be at least 1")
        for arg in v.get("fleet_extra_args", []):
            if not isinstance(arg, str):
                self.add(host, "fleet_extra_args", arg, "every extra argument must be a string")
                continue
            flag = arg.split("=", 1)[0]
            if flag in MANAGED_FLAGS:
                self.add(host, "fleet_extra_args", arg, f"is set by the fleet: use {MANAGED_FLAGS[flag]}")
        key = v.get("fleet_api_key", "")
        if key and (len(key) < 8 or re.search(r"\s", key)):
            self.add(host, "fleet_api_key", "(hidden)", "must be at least 8 characters without white space")

    def check_model_source(self, host: str, v: Mapping[str, Any]) -> None:
        """The model role's own parser (ansible/plugins/filter/fleet_model.py) says what is wrong."""
        model = _model_filters()
        source = v.get("fleet_model_source", "")
        try:
            model.parse_source(source)
        except model.SourceError as exc:
            self.add(host, "fleet_model_source", source, str(exc))
        why = model.check_manifest(v.get("model_manifest"))
        if why:
            self.add(host, "model_manifest", "(pinned manifest)", why)

    def capacity(self, host: str) -> tuple[int, str]:
        v = self.values[host]
        if v.get("fleet_engine") == "cpu":
            return v.get("fleet_cpu_workers_per_node", 0), "fleet_cpu_workers_per_node"
        return v.get("fleet_gpus_per_node", 0), "fleet_gpus_per_node"

    def check_replicas(self, heads: list[str], serving: list[str]) -> None:
        replicas: dict[str, list[str]] = {}
        for host in serving:
            replicas.setdefault(self.values[host].get("fleet_replica", "main"), []).append(host)
        for replica, hosts in sorted(replicas.items()):
            replica_heads = [h for h in hosts if h in heads]
            if not replica_heads:
                self.add(hosts[0], "fleet_replica", replica, f"replica {replica!r} has no host in fleet_head")
                continue
            if len(replica_heads) > 1:
                self.add(replica_heads[1], "fleet_replica", replica,
                         f"replica {replica!r} has two heads: {', '.join(replica_heads)}")
                continue
            head = replica_heads[0]
            hv = self.values[head]
            for var in ("fleet_tensor_parallel_size", "fleet_pipeline_parallel_size", "fleet_engine",
                        "fleet_model_path", "fleet_served_model_name", "fleet_api_port", "fleet_image"):
                for host in hosts:
                    if self.values[host].get(var) != hv.get(var):
                        self.add(host, var, self.values[host].get(var),
                                 f"differs from the head {head} ({hv.get(var)!r}); it must be the same in a replica")
            tp, pp = hv.get("fleet_tensor_parallel_size", 1), hv.get("fleet_pipeline_parallel_size", 1)
            if tp < 1 or pp < 1:
                continue
            for host in hosts:
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


def _model_filters():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "filter", "fleet_model.py")
    spec = importlib.util.spec_from_file_location("fleet_model_filters", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def validate(hosts, groups, specs, defaults) -> list[Problem]:
    return Checker(hosts, groups, specs, defaults).run()


def format_problems(problems: list[Problem]) -> str:
    lines = [f"{len(problems)} problem(s) in the inventory; nothing was changed on any host:"]
    lines += [f"  {i}. {p}" for i, p in enumerate(problems, 1)]
    return "\n".join(lines)


class ActionModule(ActionBase):
    """Runs on the controller; reads hostvars, groups and the roles' argument specs."""

    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(("roles_path",))

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        task_vars = task_vars or {}
        roles_path = self._task.args.get("roles_path")
        if not roles_path or not os.path.isdir(roles_path):
            return dict(result, failed=True, msg=f"roles_path {roles_path!r} is not a directory")
        specs, defaults = load_specs(roles_path)
        groups = {k: list(v) for k, v in task_vars.get("groups", {}).items()}
        hostvars = task_vars.get("hostvars", {})
        prefixes = tuple(setting_prefixes(specs))
        hosts = {}
        for host in groups.get("all", []):
            hv = hostvars[host]
            names = [n for n in hv.keys() if n.startswith(prefixes) or n in
                     ("ansible_host", "ansible_port", "ansible_connection")]
            hosts[host] = {n: self._templar.template(hv[n]) for n in names}
        problems = validate(hosts, groups, specs, defaults)
        if problems:
            return dict(result, failed=True, msg=format_problems(problems))
        serving = [h for h in groups.get(HEAD_GROUP, []) + groups.get(WORKER_GROUP, [])]
        return dict(result, changed=False,
                    msg=f"inventory valid: {len(hosts)} host(s), {len(set(serving))} serving, "
                        f"{len(specs)} known settings")
