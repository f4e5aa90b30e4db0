"""Engine process state from a /proc scan.

Why /proc and not the docker socket: read access to /var/run/docker.sock is root-equivalent, and
the exporter must stay an unprivileged, read-only observer. A scan sees processes whatever
started them (container, systemd, by hand), sees kill -9 at once, and the same pass yields the
pid set used to tell live from dead watchdog files (NSpid covers pids inside containers).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, FrozenSet, List, Optional

from .config import ProcessClass


@dataclasses.dataclass(frozen=True)
class ProcessState:
    counts: Dict[str, int]
    oldest_start: Dict[str, float]  # Unix seconds of the oldest matching process per class
    host_pids: FrozenSet[int]
    ns_pids: FrozenSet[int]  # pids as seen inside nested pid namespaces (containers)
    scanned: int


def _boot_time(proc_root: str) -> float:
    with open(os.path.join(proc_root, "stat"), encoding="ascii") as fh:
        for line in fh:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def scan(proc_root: str, classes: List[ProcessClass], want_ns_pids: bool) -> ProcessState:
    compiled = [(c.name, re.compile(c.pattern)) for c in classes]
    counts = {c.name: 0 for c in classes}
    oldest: Dict[str, float] = {}
    host_pids = set()
    ns_pids = set()
    btime: Optional[float] = None
    me = os.getpid()
    scanned = 0
    for entry in os.listdir(proc_root):
        if not entry.isdigit():
            continue
        pid = int(entry)
        host_pids.add(pid)
        scanned += 1
        base = os.path.join(proc_root, entry)
        if want_ns_pids:
            try:
                with open(base + "/status", "rb") as fh:
                    for line in fh:
                        if line.startswith(b"NSpid:"):
                            parts = line.split()[1:]
                            if len(parts) > 1:
                                ns_pids.update(int(p) for p in parts[1:])
                            break
            except OSError:
                pass
        if not compiled or pid == me:
            continue
        try:
            with open(base + "/cmdline", "rb") as fh:
                raw = fh.read(8192)
        except OSError:
            continue  # exited meanwhile, or a kernel thread
        if not raw:
            continue
        cmdline = raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()
        for name, rx in compiled:
            if not rx.search(cmdline):
                continue
            counts[name] += 1
            try:
                with open(base + "/stat", "rb") as fh:
                    stat = fh.read()
                # field 22 (starttime) counted after the ")" that ends comm
                fields = stat[stat.rindex(b")") + 2:].split()
                if btime is None:
                    btime = _boot_time(proc_root)
                start = btime + int(fields[19]) / _CLK_TCK
                if name not in oldest or start < oldest[name]:
                    oldest[name] = start
            except (OSError, ValueError, IndexError):
                pass
    return ProcessState(counts, oldest, frozenset(host_pids), frozenset(ns_pids), scanned)
