"""Per-launch state files (docs/design.md, "Launch id and per-launch state").

This module is the only writer of the formats the node exporter reads, so the contract lives in
one place. Everything here is stdlib-only and never raises into serving code paths: callers wrap
writes, but the helpers themselves are also conservative.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from typing import Any, Iterable

DEFAULT_STATE_DIR = "/run/vllm-fleet"

#: Histogram bucket upper bounds in seconds; the last one is +Inf (design.md).
BUCKET_BOUNDS_S: tuple[float, ...] = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2,
    2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, math.inf,
)

BACKENDS = ("custom_ar", "nccl", "gloo", "shm", "pynccl")
GROUPS = ("tp", "pp")
SCOPES = ("intra", "inter")
SOURCES = ("probe", "eager", "isend", "irecv")


def state_root(env: dict | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("VLLM_FLEET_STATE_DIR") or DEFAULT_STATE_DIR


def launch_id(env: dict | None = None) -> str | None:
    env = os.environ if env is None else env
    return env.get("VLLM_FLEET_LAUNCH_ID") or None


def deployment(env: dict | None = None) -> str | None:
    env = os.environ if env is None else env
    return env.get("VLLM_FLEET_DEPLOYMENT") or None


def host_name(env: dict | None = None) -> str:
    # FLEET_NODE_NAME matches the inventory name the exporter labels with; fall back to uname.
    env = os.environ if env is None else env
    return env.get("FLEET_NODE_NAME") or socket.gethostname()


def launch_dir(launch: str | None = None, env: dict | None = None, create: bool = True) -> str:
    """``<state root>/launches/<launch_id>``; processes without a launch id use ``_unlaunched``
    so a bare ``vllm serve`` with the plugin still leaves readable state."""
    path = os.path.join(state_root(env), "launches", launch or launch_id(env) or "_unlaunched")
    if create:
        os.makedirs(path, exist_ok=True)
    return path


def write_json_atomic(path: str, doc: Any) -> None:
    # Readers may poll at any time: write *.tmp then rename so they never see half a file.
    # The pid in the tmp name keeps two writers of the same file from sharing a tmp file.
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, default=_json_default)
    os.replace(tmp, path)


def read_json(path: str) -> Any | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and math.isinf(obj):
        return "+Inf"
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def bounds_for_json() -> list:
    return [("+Inf" if math.isinf(b) else b) for b in BUCKET_BOUNDS_S]


class Histogram:
    """Cumulative (Prometheus-style) latency histogram for one label set."""

    __slots__ = ("labels", "counts", "sum_s", "count")

    def __init__(self, labels: dict):
        self.labels = labels
        self.counts = [0] * len(BUCKET_BOUNDS_S)
        self.sum_s = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        # Cumulative buckets: every bucket whose bound is >= the value counts it.
        for i, bound in enumerate(BUCKET_BOUNDS_S):
            if seconds <= bound:
                self.counts[i] += 1
        self.sum_s += seconds
        self.count += 1

    def to_json(self) -> dict:
        doc = dict(self.labels)
        doc.update(bucket_counts=list(self.counts), sum_s=self.sum_s, count=self.count)
        return doc


class HistogramSet:
    """All histograms of one process, keyed by (backend, size_bytes, group, scope, source)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._hists: dict[tuple, Histogram] = {}

    def observe(self, backend: str, size_bytes: int, group: str, scope: str, source: str,
                seconds: float) -> None:
        key = (backend, int(size_bytes), group, scope, source)
        with self._lock:
            hist = self._hists.get(key)
            if hist is None:
                hist = self._hists[key] = Histogram(dict(
                    backend=backend, size_bytes=int(size_bytes), group=group, scope=scope,
                    source=source))
            hist.observe(seconds)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [h.to_json() for h in self._hists.values()]

    def __len__(self) -> int:
        return len(self._hists)


def allreduce_doc(hists: Iterable[dict], rank: int | None, env: dict | None = None) -> dict:
    return {"launch_id": launch_id(env), "host": host_name(env), "pid": os.getpid(),
            "rank": rank, "updated": time.time(), "bucket_bounds_s": bounds_for_json(),
            "histograms": list(hists)}


def allreduce_path(env: dict | None = None) -> str:
    return os.path.join(launch_dir(env=env), f"allreduce-{host_name(env)}-{os.getpid()}.json")


def collective_path(env: dict | None = None) -> str:
    return os.path.join(launch_dir(env=env), f"collective-{host_name(env)}-{os.getpid()}.json")


def p2p_gate_path(env: dict | None = None) -> str:
    return os.path.join(launch_dir(env=env), f"p2p-gate-{host_name(env)}.json")


def launch_json_path(launch: str | None = None, env: dict | None = None) -> str:
    return os.path.join(launch_dir(launch, env=env), "launch.json")


def proc_start_ticks(pid: int) -> int | None:
    """Start time of a process (clock ticks after boot): with the pid, a unique process identity."""
    from .ownership import start_ticks

    return start_ticks(pid)


MEMBER_ROLES = ("main", "engine", "worker")


def register_member(env: dict | None = None, role: str | None = None) -> str | None:
    """Record this process as a member of its launch: ``launches/<id>/members/<pid>``.

    Why: vLLM renames its processes (setproctitle), which overwrites the memory that
    /proc/<pid>/environ shows, so the env markers of EngineCore and workers are unreadable
    after start. Every vLLM process loads the plugin, so each one registers itself here; the
    start time guards against pid reuse.

    ``role`` (main, engine, worker) marks a process that lives as long as the launch serves: the
    exporter's verdict judges only those (vLLM also starts short-lived helpers, e.g. a model
    inspection subprocess, that load the plugin and exit). A role once written is kept.
    """
    lid = launch_id(env)
    if not lid:
        return None
    d = os.path.join(launch_dir(lid, env), "members")
    os.makedirs(d, exist_ok=True)
    from .ownership import ns_id

    pid = os.getpid()
    path = os.path.join(d, str(pid))
    ticks = proc_start_ticks(pid)
    # pid_ns: a pid means something only in its own pid namespace (cleanup judges no other)
    doc = {"pid": pid, "start_ticks": ticks, "pid_ns": ns_id("pid"), "launch_id": lid,
           "deployment": deployment(env)}
    old = read_json(path)
    if isinstance(old, dict) and old.get("start_ticks") == ticks and old.get("role") in MEMBER_ROLES:
        doc["role"] = old["role"]
    if role is not None:
        if role not in MEMBER_ROLES:
            raise ValueError(f"member role {role!r} is not one of {MEMBER_ROLES}")
        doc["role"] = role
    write_json_atomic(path, doc)
    return path


def read_members(env: dict | None = None) -> dict[int, tuple[str, str | None]]:
    """{pid: (launch_id, deployment)} for registered processes that are still the same process
    (same pid namespace, same start time)."""
    from .ownership import ns_id

    own_ns = ns_id("pid")
    out: dict[int, tuple[str, str | None]] = {}
    base = os.path.join(state_root(env), "launches")
    try:
        launches = os.listdir(base)
    except OSError:
        return out
    for lid in launches:
        d = os.path.join(base, lid, "members")
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for name in names:
            if not name.isdigit():
                continue
            doc = read_json(os.path.join(d, name))
            if not isinstance(doc, dict):
                continue
            pid = int(name)
            if doc.get("pid_ns") and doc["pid_ns"] != own_ns:
                continue  # registered in another pid namespace: this pid is not that process
            if doc.get("start_ticks") is not None and proc_start_ticks(pid) == doc["start_ticks"]:
                out[pid] = (doc.get("launch_id") or lid, doc.get("deployment"))
    return out
