"""Reader for the plugin's per-launch state files (docs/design.md, "per-launch state").

Files are re-parsed only when their (mtime, size, inode) changes, so reading them at scrape
time is cheap. Unparseable files are counted, never fatal (writers rename atomically, readers
ignore what they cannot parse).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

HIST_LABELS = ("backend", "size_bytes", "group", "scope", "source")


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def recorded_deployment(launch_dir: str, launch_doc: Any = None) -> Optional[str]:
    """The deployment a launch directory belongs to, as the plugin records it: launch.json's
    "deployment", else a member record's (the plugin's ownership.launch_deployment, read-only)."""
    doc = launch_doc if launch_doc is not None else _read_json(os.path.join(launch_dir, "launch.json"))
    if isinstance(doc, dict) and doc.get("deployment"):
        return str(doc["deployment"])
    try:
        names = sorted(n for n in os.listdir(os.path.join(launch_dir, "members")) if n.isdigit())
    except OSError:
        return None
    for name in names:
        member = _read_json(os.path.join(launch_dir, "members", name))
        if isinstance(member, dict) and member.get("deployment"):
            return str(member["deployment"])
    return None


def newest_launch_dir(launches_dir: str, deployment: str = "") -> Optional[str]:
    """The launch directory with the latest launch.json `created` (dir mtime if unreadable);
    with `deployment`, only that deployment's (another deployment on the same host is not ours
    to judge: x's launches, never x-y's)."""
    best: Optional[Tuple[float, str]] = None
    try:
        entries = list(os.scandir(launches_dir))
    except OSError:
        return None
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        doc = _read_json(os.path.join(entry.path, "launch.json"))
        if deployment and recorded_deployment(entry.path, doc) != deployment:
            continue
        created = None
        try:
            created = float(doc["created"])
        except (KeyError, TypeError, ValueError):
            pass
        if created is None:
            try:
                created = entry.stat().st_mtime
            except OSError:
                continue
        key = (created, entry.name)
        if best is None or key > best:
            best = (key[0], entry.path)
    return best[1] if best else None


class JsonCache:
    """path -> parsed JSON, refreshed when the file's stat signature changes."""

    def __init__(self) -> None:
        self._cache: Dict[str, Tuple[Tuple[int, int, int], Any]] = {}

    def load(self, path: str) -> Any:
        st = os.stat(path)
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        hit = self._cache.get(path)
        if hit and hit[0] == sig:
            return hit[1]
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        self._cache[path] = (sig, data)
        return data

    def prune(self, keep: Iterable[str]) -> None:
        keep = set(keep)
        for path in list(self._cache):
            if path not in keep:
                del self._cache[path]


@dataclasses.dataclass
class Histogram:
    labels: Tuple[str, ...]  # values in HIST_LABELS order
    bounds: Tuple[float, ...]  # last is +Inf
    counts: List[float]  # cumulative
    sum_s: float
    count: float


@dataclasses.dataclass
class Collective:
    rank: str
    pid: int
    updated: float
    inflight_s: float  # age of the current collective, 0 when none is in flight
    stuck: bool
    threshold_s: float
    completed_total: float
    op: str
    group: str


@dataclasses.dataclass
class LaunchState:
    launch_dir: Optional[str]
    launch: Dict[str, Any]
    histograms: List[Histogram]
    collectives: List[Collective]
    stale_collective_files: int
    p2p_gate: Optional[Dict[str, Any]]
    bad_files: int


def _bound(v: Any) -> float:
    if isinstance(v, str):
        if v.strip().lower() in ("+inf", "inf"):
            return math.inf
        return float(v)
    return float(v)


def _merge_histograms(files: List[Dict[str, Any]]) -> Tuple[List[Histogram], int]:
    """Sums histograms with equal labels across worker processes of this host."""
    merged: Dict[Tuple[str, ...], Histogram] = {}
    bad = 0
    for data in files:
        try:
            bounds = tuple(_bound(b) for b in data["bucket_bounds_s"])
            if not bounds or any(b2 <= b1 for b1, b2 in zip(bounds, bounds[1:])):
                raise ValueError("bucket bounds not increasing")
            parsed = []
            for h in data.get("histograms") or []:
                labels = tuple(str(h[k]) for k in HIST_LABELS)
                counts = [float(c) for c in h["bucket_counts"]]
                if len(counts) != len(bounds):
                    raise ValueError("bucket_counts length differs from bucket_bounds_s")
                parsed.append((labels, counts, float(h["sum_s"]), float(h["count"])))
        except (KeyError, TypeError, ValueError):
            bad += 1
            continue
        if not math.isinf(bounds[-1]):
            bounds = bounds + (math.inf,)
            parsed = [(lb, c + [n], s, n) for lb, c, s, n in parsed]
        for labels, counts, s, n in parsed:
            h = merged.get(labels)
            if h is None:
                merged[labels] = Histogram(labels, bounds, counts, s, n)
            elif h.bounds != bounds:
                bad += 1  # a process with other buckets cannot be summed in
            else:
                h.counts = [a + b for a, b in zip(h.counts, counts)]
                h.sum_s += s
                h.count += n
    for h in merged.values():
        h.counts[-1] = max(h.counts[-1], h.count)  # +Inf must equal count
        h.count = h.counts[-1]
    return sorted(merged.values(), key=lambda h: h.labels), bad


class LaunchReader:
    def __init__(self, launches_dir: str, deployment: str = "") -> None:
        self.launches_dir = launches_dir
        self.deployment = deployment  # empty: every deployment's launches
        self.cache = JsonCache()

    def read(self, now: float, pid_alive, stuck_threshold_s: float = 0.0,
             stale_after_s: float = 0.0) -> LaunchState:
        """pid_alive(pid) -> True/False/None (None: unknown, treated as alive)."""
        ldir = newest_launch_dir(self.launches_dir, self.deployment)
        if ldir is None:
            return LaunchState(None, {}, [], [], 0, None, 0)
        bad = 0
        launch: Dict[str, Any] = {}
        allreduce: List[Dict[str, Any]] = []
        colls: List[Dict[str, Any]] = []
        gate = None
        seen = []
        try:
            names = sorted(os.listdir(ldir))
        except OSError:
            names = []
        for name in names:
            if not name.endswith(".json"):
                continue
            path = os.path.join(ldir, name)
            seen.append(path)
            try:
                data = self.cache.load(path)
                if not isinstance(data, dict):
                    raise ValueError("not an object")
            except (OSError, ValueError):
                bad += 1
                continue
            if name == "launch.json":
                launch = data
            elif name.startswith("allreduce-"):
                allreduce.append(data)
            elif name.startswith("collective-"):
                colls.append(data)
            elif name.startswith("p2p-gate-"):
                gate = data
        self.cache.prune(seen)
        hists, hbad = _merge_histograms(allreduce)
        collectives, stale, cbad = _collectives(colls, now, pid_alive, stuck_threshold_s,
                                                stale_after_s)
        return LaunchState(ldir, launch, hists, collectives, stale, gate, bad + hbad + cbad)


def _collectives(files, now, pid_alive, threshold_override, stale_after_s):
    by_rank: Dict[str, Collective] = {}
    stale = bad = 0
    for d in files:
        try:
            pid = int(d["pid"])
            rank = str(int(d["rank"]))
            updated = float(d.get("updated") or 0)
            threshold = float(threshold_override or d.get("threshold_s") or 60.0)
            cur = d.get("current")
            start = float(cur["start"]) if isinstance(cur, dict) else None
            completed = float(d.get("completed_total") or 0)
        except (KeyError, TypeError, ValueError):
            bad += 1
            continue
        if pid_alive(pid) is False or (stale_after_s > 0 and now - updated > stale_after_s):
            stale += 1  # a dead process's leftover file: never "stuck"
            continue
        inflight = max(0.0, now - start) if start is not None else 0.0
        c = Collective(rank, pid, updated, inflight, start is not None and inflight > threshold,
                       threshold, completed, str(cur.get("op", "")) if cur else "",
                       str(cur.get("group", "")) if cur else "")
        prev = by_rank.get(rank)
        if prev is None or c.updated > prev.updated:
            if prev is not None:
                stale += 1
            by_rank[rank] = c
        else:
            stale += 1
    return sorted(by_rank.values(), key=lambda c: int(c.rank)), stale, bad
