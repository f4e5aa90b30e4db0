"""The launch's own processes, found on the host: alive, stopped, frozen or gone.

Every vLLM process of a launch registers itself in ``launches/<id>/members/<pid>`` (plugin,
docs/design.md) with its pid *as seen inside its container* and its start time in clock ticks
after boot; the long-lived ones (fleet-serve's exec'd ``main`` process, the ``engine`` core, each
``worker``) also with their role. Only those are judged: vLLM starts short-lived helpers too (a
model-inspection subprocess, say) that load the plugin and exit. The start time is the same in every pid namespace, so (container pid, start ticks)
names one process for its whole life; the host pid is found by matching the last ``NSpid`` entry
of /proc/<pid>/status. Why not the docker socket: read access to it is root-equivalent (see
procscan.py); everything here is world-readable in /proc and /sys/fs/cgroup.

States: ``running`` (any scheduler state but the two below), ``stopped`` (``T``/``t`` in
/proc/<pid>/stat: SIGSTOP, a debugger), ``frozen`` (its cgroup is frozen: ``docker pause``,
cgroup v2 ``cgroup.events`` or v1 ``freezer.state``), ``exited`` (no such process any more).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Iterable, List, Optional, Tuple

Key = Tuple[int, int]  # (pid inside its namespace, start ticks)


ROLES = ("main", "engine", "worker")


@dataclasses.dataclass(frozen=True)
class Member:
    pid: int  # as registered (the process's own pid namespace)
    start_ticks: int
    state: str  # running | stopped | frozen | exited
    host_pid: Optional[int]
    role: str = ""


def read_registry(launch_dir: str) -> List[Key]:
    """(pid, start_ticks) of every registered long-lived member (a role of ROLES); files without
    a start time are skipped (a pid alone could name a reused pid)."""
    return [k for k, _ in read_roles(launch_dir)]


def read_roles(launch_dir: str) -> List[Tuple[Key, str]]:
    """((pid, start_ticks), role) of every registered long-lived member."""
    d = os.path.join(launch_dir, "members")
    try:
        names = os.listdir(d)
    except OSError:
        return []
    out = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(d, name), encoding="utf-8") as fh:
                doc = json.load(fh)
            if doc.get("role") in ROLES:
                out.append(((int(doc["pid"]), int(doc["start_ticks"])), str(doc["role"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(out)


def _stat(proc_root: str, pid: int) -> Optional[Tuple[str, int]]:
    """(state letter, start ticks) of a host pid, None when it is gone."""
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as fh:
            data = fh.read()
        rest = data[data.rindex(b")") + 2:].split()
        return rest[0].decode(), int(rest[19])
    except (OSError, ValueError, IndexError):
        return None


def _ns_pid(proc_root: str, pid: int) -> Optional[int]:
    """The pid as the innermost pid namespace sees it (last NSpid entry)."""
    try:
        with open(f"{proc_root}/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_frozen(proc_root: str, cgroup_root: str, pid: int) -> bool:
    """True when the process's cgroup is frozen (cgroup v2 or the v1 freezer)."""
    try:
        with open(f"{proc_root}/{pid}/cgroup", encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return False
    for line in lines:
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        path = path.lstrip("/")
        if hier == "0" and controllers == "":
            # v2: the unified hierarchy is cgroup_root itself, or cgroup_root/unified (hybrid)
            for base in (cgroup_root, os.path.join(cgroup_root, "unified")):
                try:
                    with open(os.path.join(base, path, "cgroup.events"), encoding="ascii") as fh:
                        if any(ln.strip() == "frozen 1" for ln in fh):
                            return True
                except OSError:
                    continue
        elif "freezer" in controllers.split(","):
            try:
                with open(os.path.join(cgroup_root, "freezer", path, "freezer.state"),
                          encoding="ascii") as fh:
                    if fh.read().strip() in ("FROZEN", "FREEZING"):
                        return True
            except OSError:
                pass
    return False


class MemberTracker:
    """Maps registered members to host pids (remembered once found) and reads their state."""

    def __init__(self, proc_root: str = "/proc", cgroup_root: str = "/sys/fs/cgroup"):
        self.proc_root = proc_root
        self.cgroup_root = cgroup_root
        self._host_pid: Dict[Key, int] = {}

    def _find(self, wanted: Iterable[Key]) -> None:
        """One /proc pass for the members not mapped yet: match start ticks first (one read per
        process), then the namespace pid (one more read for the few candidates)."""
        by_ticks: Dict[int, List[int]] = {}
        for pid, ticks in wanted:
            by_ticks.setdefault(ticks, []).append(pid)
        if not by_ticks:
            return
        try:
            entries = os.listdir(self.proc_root)
        except OSError:
            return
        for entry in entries:
            if not entry.isdigit():
                continue
            host_pid = int(entry)
            st = _stat(self.proc_root, host_pid)
            if st is None or st[1] not in by_ticks:
                continue
            ns = _ns_pid(self.proc_root, host_pid)
            if ns is not None and ns in by_ticks[st[1]]:
                self._host_pid[(ns, st[1])] = host_pid

    def states(self, registered: List[Key], roles: Optional[Dict[Key, str]] = None) -> List[Member]:
        roles = roles or {}
        keys = set(registered)
        for k in list(self._host_pid):
            if k not in keys:
                del self._host_pid[k]
        self._find(k for k in registered if k not in self._host_pid)
        out = []
        for key in registered:
            pid, ticks = key
            host_pid = self._host_pid.get(key)
            st = _stat(self.proc_root, host_pid) if host_pid is not None else None
            if st is None or st[1] != ticks:  # gone (or the host pid was reused)
                self._host_pid.pop(key, None)
                out.append(Member(pid, ticks, "exited", None, roles.get(key, "")))
                continue
            if st[0] in ("T", "t"):
                state = "stopped"
            elif cgroup_frozen(self.proc_root, self.cgroup_root, host_pid):
                state = "frozen"
            else:
                state = "running"
            out.append(Member(pid, ticks, state, host_pid, roles.get(key, "")))
        return out
