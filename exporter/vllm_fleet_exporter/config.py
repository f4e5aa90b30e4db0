"""Exporter settings: built-in defaults < config file (JSON or YAML) < command-line flags.

The config file is flat: its keys are the field names of `Config` below. Unknown keys are an
error (a misspelt key must not silently fall back to a default). Secrets never go on the
command line: the canary's API key is read from `api_key_file`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import socket
from typing import Any, Dict, List, Optional

DEFAULT_PORT = 9445


@dataclasses.dataclass
class ProcessClass:
    """Processes whose command line matches `pattern` (a regex, searched) count as `name`."""

    name: str
    pattern: str
    expected: int = 1


@dataclasses.dataclass
class Config:
    # "ADDR:PORT"; ADDR "auto" is the address of the interface holding the default route (the
    # management address), "[v6]:PORT" for IPv6.
    listen: str = f"auto:{DEFAULT_PORT}"
    # Host name reported in logs; files of the launch dir are all local to this host.
    host: str = ""
    state_dir: str = "/run/vllm-fleet"
    fabric_file: str = "/etc/vllm-fleet/fabric.json"

    # vLLM OpenAI server of this host ("http://ADDR:PORT"); empty: no health probe, no canary.
    engine_url: str = ""
    health_interval_s: float = 5.0
    health_timeout_s: float = 3.0

    canary_enabled: bool = True
    canary_interval_s: float = 30.0
    canary_timeout_s: float = 30.0
    # Model for the canary; empty: the first id /v1/models lists.
    canary_model: str = ""
    canary_prompt: str = "Reply with the single word OK."
    canary_max_tokens: int = 8
    # File holding the API key (first line); empty: no Authorization header.
    api_key_file: str = ""

    # Ray dashboard (state API) URL, e.g. "http://{ray_node_ip}:8265"; {ray_node_ip} comes from
    # fabric.json (FLEET_RAY_NODE_IP, else VLLM_HOST_IP). Empty and no ray_command: Ray not queried.
    ray_url: str = ""
    # Alternative to ray_url: argv printing `ray list nodes --format json` output.
    ray_command: List[str] = dataclasses.field(default_factory=list)
    ray_interval_s: float = 15.0
    ray_timeout_s: float = 10.0
    ray_expected_nodes: Optional[int] = None
    ray_expected_gpus: Optional[float] = None
    ray_expected_cpus: Optional[float] = None
    # Ray token authentication: file holding the cluster's token (first line), sent as a bearer
    # token to the dashboard (or to ray_command through RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH).
    ray_token_file: str = ""

    # Balancer hosts: per-tenant request counters of the front door (tenants.py), e.g.
    # "http://127.0.0.1:8404/tenant-metrics". Empty: not read.
    tenants_url: str = ""
    tenants_interval_s: float = 15.0
    tenants_timeout_s: float = 5.0

    # Engine process state from a /proc scan (see docs/monitoring.md for why not docker).
    processes: List[ProcessClass] = dataclasses.field(default_factory=list)
    process_interval_s: float = 5.0
    proc_root: str = "/proc"
    # Liveness of the pids named in collective-*.json: auto (dead only when the pid exists neither
    # as a host pid nor as a pid inside any pid namespace), host (pids are host pids), off.
    pid_check: str = "auto"
    # Collective files not updated for this long are stale (0: never by age).
    collective_stale_after_s: float = 0.0
    # Override of each file's threshold_s for "stuck" (0: use the file's, else 60 s).
    stuck_threshold_s: float = 0.0

    # NCCL INFO logs; {launch_dir} is the newest launch directory.
    nccl_log_globs: List[str] = dataclasses.field(
        default_factory=lambda: ["{launch_dir}/nccl-*.log", "{launch_dir}/nccl/*.log"])
    nccl_interval_s: float = 15.0

    # GPU presence through NVML: auto (when pynvml imports and NVML initialises) or off.
    nvml: str = "auto"
    nvml_interval_s: float = 60.0
    gpus_expected: Optional[int] = None

    # ---- the verdict (verdict.py): is this host / this replica hung? ----
    verdict_enabled: bool = False
    # The deployment: only its launches are read and judged (another deployment on the host is
    # not this exporter's), and its maintenance marker <state_dir>/maintenance-<deployment>.json.
    # Empty: the newest launch of any deployment.
    deployment: str = ""
    # This host runs engine processes of the launch (a missing launch is then a problem).
    expect_engine: bool = False
    # This host's replica spans several hosts: a fabric link fabric.json names that is down
    # (netdev operstate, IB port state) is a host problem (fabric_link_down).
    fabric_link_check: bool = False
    # Root of the kernel's sysfs (class/net, class/infiniband).
    sys_root: str = "/sys"
    # Heads: base URLs ("http://ADDR:PORT") of the exporters of the replica's other hosts.
    replica_member_urls: List[str] = dataclasses.field(default_factory=list)
    verdict_interval_s: float = 1.0
    # A rank whose watchdog file is older than this is hung (the plugin flushes every <= 1 s).
    heartbeat_max_age_s: float = 10.0
    # Heads: unhealthy once /health has not answered 200 for this long (after first serving).
    api_max_silence_s: float = 6.0
    # Heads: another host's exporter silent for this long is a problem; each request's timeout.
    member_max_silence_s: float = 6.0
    member_timeout_s: float = 2.0
    # Heads: this many failed canaries in a row make the replica unhealthy (0: never).
    canary_max_failures: int = 2
    # Heads: a launch not serving this long after it was created is unhealthy (0: never).
    start_timeout_s: float = 1800.0
    # HAProxy agent-check listener ("ADDR:PORT", ADDR "auto" as for listen); empty: none.
    agent_listen: str = ""
    cgroup_root: str = "/sys/fs/cgroup"
    # The healer's records (healer host: roles/healer actions.jsonl); empty: not exported.
    heal_log: str = ""
    # Replicas exported at 0 before their first heal.
    heal_replicas: List[str] = dataclasses.field(default_factory=list)

    log_level: str = "INFO"

    @property
    def launches_dir(self) -> str:
        return os.path.join(self.state_dir, "launches")


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


class ConfigError(ValueError):
    pass


def _load_file(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if path.endswith((".yml", ".yaml")):
        try:
            import yaml  # optional dependency
        except ImportError as exc:  # pragma: no cover - depends on the host
            raise ConfigError(f"{path}: YAML config needs PyYAML; use JSON instead") from exc
        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text) if text.strip() else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def _coerce(name: str, value: Any) -> Any:
    if name == "processes":
        out = []
        for item in value or []:
            if isinstance(item, ProcessClass):
                out.append(item)
                continue
            if not isinstance(item, dict) or not {"name", "pattern"} <= set(item):
                raise ConfigError(f"processes: each entry needs name and pattern, got {item!r}")
            pc = ProcessClass(str(item["name"]), str(item["pattern"]), int(item.get("expected", 1)))
            if not re.fullmatch(r"[a-z][a-z0-9_]*", pc.name):
                raise ConfigError(f"processes: name {pc.name!r} must match [a-z][a-z0-9_]*")
            re.compile(pc.pattern)
            out.append(pc)
        return out
    field = FIELDS[name]
    ftype = str(field.type)
    if value is None or ("Optional" in ftype and str(value).strip() in ("", "None", "null")):
        if "Optional" in ftype:
            return None
        raise ConfigError(f"{name}: null is not allowed")
    try:
        if ftype.startswith("List"):
            if isinstance(value, str):
                value = [value]
            return [str(v) for v in value]
        if "bool" in ftype:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if "int" in ftype:
            return int(value)
        if "float" in ftype:
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vllm-fleet-exporter", allow_abbrev=False,
        description="Prometheus exporter for vllm-fleet hosts (read-only).")
    p.add_argument("--config", help="JSON or YAML file with any of the settings below (flat keys)")
    p.add_argument("--listen", help=f"ADDR:PORT to serve /metrics on (default auto:{DEFAULT_PORT}; "
                   "auto = management address, the default route's interface)")
    p.add_argument("--host", help="host name for logs (default: hostname)")
    p.add_argument("--state-dir", help="vllm-fleet state root (default /run/vllm-fleet)")
    p.add_argument("--fabric-file", help="fabric.json path")
    p.add_argument("--engine-url", help="vLLM server base URL; empty disables health + canary")
    p.add_argument("--health-interval-s", type=float)
    p.add_argument("--health-timeout-s", type=float)
    p.add_argument("--canary", dest="canary_enabled", action=argparse.BooleanOptionalAction,
                   default=None, help="run the canary completion (default on with --engine-url)")
    p.add_argument("--canary-interval-s", type=float)
    p.add_argument("--canary-timeout-s", type=float)
    p.add_argument("--canary-model")
    p.add_argument("--canary-max-tokens", type=int)
    p.add_argument("--api-key-file", help="file holding the API key (never pass the key itself)")
    p.add_argument("--ray-url", help="Ray dashboard URL; {ray_node_ip} is filled from fabric.json")
    p.add_argument("--ray-interval-s", type=float)
    p.add_argument("--ray-expected-nodes", type=int)
    p.add_argument("--ray-expected-gpus", type=float)
    p.add_argument("--ray-expected-cpus", type=float)
    p.add_argument("--ray-token-file", help="file holding the Ray token (never pass the token)")
    p.add_argument("--tenants-url", help="the balancer's /tenant-metrics URL (per-tenant counters)")
    p.add_argument("--process", dest="process_specs", action="append", metavar="NAME=REGEX",
                   help="count processes whose command line matches REGEX as NAME (repeatable)")
    p.add_argument("--process-interval-s", type=float)
    p.add_argument("--pid-check", choices=["auto", "host", "off"])
    p.add_argument("--stuck-threshold-s", type=float)
    p.add_argument("--collective-stale-after-s", type=float)
    p.add_argument("--nccl-log-glob", dest="nccl_log_globs", action="append",
                   help="NCCL log glob, {launch_dir} allowed (repeatable; replaces the default)")
    p.add_argument("--nccl-interval-s", type=float)
    p.add_argument("--nvml", choices=["auto", "off"])
    p.add_argument("--gpus-expected", type=int)
    p.add_argument("--verdict", dest="verdict_enabled", action=argparse.BooleanOptionalAction,
                   default=None, help="judge this host / replica (verdict.py)")
    p.add_argument("--deployment")
    p.add_argument("--expect-engine", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--fabric-link-check", action=argparse.BooleanOptionalAction, default=None,
                   help="judge the fabric links fabric.json names (hosts of multi-host replicas)")
    p.add_argument("--sys-root", help="sysfs root (default /sys)")
    p.add_argument("--replica-member-url", dest="replica_member_urls", action="append",
                   help="exporter URL of another host of this replica (heads; repeatable)")
    p.add_argument("--heartbeat-max-age-s", type=float)
    p.add_argument("--agent-listen", help="ADDR:PORT for the HAProxy agent-check (empty: off)")
    p.add_argument("--log-level")
    p.add_argument("--once", action="store_true",
                   help="run every collector once, print the exposition and exit")
    return p


def load_config(argv: Optional[List[str]] = None) -> Config:
    args = build_parser().parse_args(argv)
    merged: Dict[str, Any] = {}
    if args.config:
        data = _load_file(args.config)
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise ConfigError(f"{args.config}: unknown keys {unknown}")
        merged.update(data)
    for key, value in vars(args).items():
        if key in ("config", "process_specs", "once") or value is None:
            continue
        merged[key] = value
    if args.process_specs:
        specs = []
        for spec in args.process_specs:
            name, sep, pattern = spec.partition("=")
            if not sep:
                raise ConfigError(f"--process {spec!r}: expected NAME=REGEX")
            specs.append({"name": name, "pattern": pattern})
        merged["processes"] = specs
    cfg = Config()
    for key, value in merged.items():
        setattr(cfg, key, _coerce(key, value))
    if cfg.pid_check not in ("auto", "host", "off"):
        raise ConfigError(f"pid_check: {cfg.pid_check!r} is not auto, host or off")
    if cfg.nvml not in ("auto", "off"):
        raise ConfigError(f"nvml: {cfg.nvml!r} is not auto or off")
    if not cfg.host:
        cfg.host = socket.gethostname()
    parse_listen(cfg.listen)  # validate early
    if cfg.agent_listen:
        parse_listen(cfg.agent_listen)
    for name in ("verdict_interval_s", "member_timeout_s"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name}: {getattr(cfg, name)} must be > 0")
    return cfg


def management_address() -> str:
    """Address of the interface that holds the default route (no packet is sent)."""
    for family, probe in ((socket.AF_INET, ("192.0.2.1", 9)), (socket.AF_INET6, ("2001:db8::1", 9))):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(probe)
                return s.getsockname()[0]
        except OSError:
            continue
    return "127.0.0.1"


def parse_listen(listen: str) -> "tuple[str, int]":
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]*):(\d+)|([^:\[\]]+)", listen.strip())
    if not m:
        raise ConfigError(f"listen: {listen!r} is not ADDR:PORT")
    if m.group(1) is not None:
        addr, port = m.group(1), int(m.group(2))
    elif m.group(3) is not None:
        addr, port = m.group(3), int(m.group(4))
    else:
        addr, port = m.group(5), DEFAULT_PORT
    if not 0 < port < 65536:
        raise ConfigError(f"listen: port {port} out of range")
    return addr, port


def resolve_listen(listen: str) -> "tuple[str, int]":
    addr, port = parse_listen(listen)
    if addr in ("", "auto"):
        addr = management_address()
    return addr, port


def read_secret(path: str) -> str:
    if not path:
        return ""
    with open(path, encoding="utf-8") as fh:
        return fh.readline().strip()
