"""What vllm-fleet may delete: ownership proven from records, never guessed from names or ages.

Used by the plugin's start-up cleanup (``cleanup.py``, inside a serving container) and, through
the module_utils symlink ``fleet_ownership.py``, by the Ansible module ``fleet_launch_state`` on
the host (teardown, rolling restart). Stdlib only.

Records (under the state root, docs/design.md):

* ``launches/<id>/launch.json`` ``"deployment"`` (fleet-serve, the fabric check) and
  ``launches/<id>/members/<pid>`` ``"deployment"`` (every vLLM process): the deployment a launch
  directory belongs to;
* ``launches/<id>/shm/<name>``: a ``/dev/shm`` segment created by a process of the launch
  (the plugin records every ``SharedMemory(create=True)``):
  ``{"name", "pid", "start_ticks", "pid_ns", "ipc_ns", "launch_id", "deployment"}``.

Rules:

* a launch directory is deployment D's only when its recorded deployment is exactly D. Names are
  never matched by prefix (``launches/x-*`` also matches deployment ``x-y``'s launches); a
  directory with no record is nobody's and stays;
* a recorded process is judged only where it can be seen: in our own pid namespace by pid and
  start time; from the host's (initial) pid namespace, which sees every process, a namespace with
  no live process left has no live member. Anything else is "unknown", and unknown counts as alive;
* a segment is removed only if it is recorded by a launch of our deployment (not our own launch),
  lives in our IPC namespace (the /dev/shm we see), every member of its launch is judged dead, and
  no process we can see maps it or holds it open. An unrecorded segment is never ours, whatever
  its name (another deployment's, another user's ``nccl-*``, a Python program's ``psm_*``).
"""

from __future__ import annotations

import json
import os
import re

SHM_DIR = "/dev/shm"
#: Names the plugin records: what multiprocessing.shared_memory creates (psm_<hex>).
SHM_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def ns_id(kind: str, pid: int | str = "self") -> str:
    """``pid:[4026531836]``-style namespace identity of a process ("" when unreadable)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return ""


def start_ticks(pid: int, running: bool = False) -> int | None:
    """Start time of a process (clock ticks after boot): with the pid, a unique identity.
    running: None for a zombie too (it has exited; only its parent's wait is missing)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            data = fh.read()
        fields = data[data.rindex(")") + 2:].split()
        if running and fields[0] == "Z":
            return None
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def sees_every_process() -> bool:
    """True in the host's initial pid namespace: kthreadd is pid 2 there (parent 0), and never
    visible from a container's pid namespace."""
    try:
        with open("/proc/2/stat", encoding="utf-8", errors="replace") as fh:
            data = fh.read()
        comm = data[data.index("(") + 1:data.rindex(")")]
        return comm == "kthreadd" and data[data.rindex(")") + 2:].split()[1] == "0"
    except (OSError, ValueError, IndexError):
        return False


def live_pid_namespaces() -> set[str]:
    """Pid namespaces that still hold a live process (complete only where every process is seen)."""
    out = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            ns = ns_id("pid", name)
            if ns:
                out.add(ns)
    return out


def launch_deployment(launch_dir: str) -> str | None:
    """The deployment recorded for a launch directory: launch.json, else its member records."""
    doc = read_json(os.path.join(launch_dir, "launch.json"))
    if isinstance(doc, dict) and doc.get("deployment"):
        return str(doc["deployment"])
    for doc in member_docs(launch_dir):
        if doc.get("deployment"):
            return str(doc["deployment"])
    return None


def _records(launch_dir: str, sub: str, valid) -> list[dict]:
    """The JSON records in launch_dir/sub that valid(name, doc) accepts, by name."""
    d = os.path.join(launch_dir, sub)
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return []
    docs = [(name, read_json(os.path.join(d, name))) for name in names]
    return [doc for name, doc in docs if isinstance(doc, dict) and valid(name, doc)]


def member_docs(launch_dir: str) -> list[dict]:
    return _records(launch_dir, "members", lambda name, doc: name.isdigit())


def deployment_launches(root: str, deployment: str) -> list[str]:
    """Launch directories whose recorded deployment is exactly ``deployment``, oldest first
    (launch.json "created", else the directory's mtime)."""
    base = os.path.join(root, "launches")
    try:
        names = os.listdir(base)
    except OSError:
        return []
    found = []
    for name in names:
        path = os.path.join(base, name)
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        if launch_deployment(path) != deployment:
            continue
        doc = read_json(os.path.join(path, "launch.json"))
        created = doc.get("created") if isinstance(doc, dict) else None
        if not isinstance(created, (int, float)):
            try:
                created = os.stat(path).st_mtime
            except OSError:
                continue
        found.append((float(created), name, path))
    return [p for _, _, p in sorted(found)]


class Judge:
    """Is a recorded process alive? Answers "alive", "dead" or "unknown" (see module docstring)."""

    def __init__(self):
        self.pid_ns = ns_id("pid")
        self.everything = sees_every_process()
        self._live_ns = live_pid_namespaces() if self.everything else None

    def process(self, doc: dict) -> str:
        pid, ticks, ns = doc.get("pid"), doc.get("start_ticks"), doc.get("pid_ns") or ""
        if not isinstance(pid, int) or ticks is None:
            return "unknown"
        if ns and ns != self.pid_ns:
            if self._live_ns is not None and ns not in self._live_ns:
                return "dead"  # its whole pid namespace is gone
            return "unknown"
        if not ns and not self.everything:
            return "unknown"  # recorded without a namespace: we cannot tell whose pid it is
        # A zombie is dead: the cleanup's own SIGKILLed orphans are zombies until init reaps
        # them, which on a busy host can be after the cleanup judges their launch.
        return "alive" if start_ticks(pid, running=True) == ticks else "dead"

    def launch_dead(self, launch_dir: str) -> bool:
        """Every recorded member (and shm creator) is dead; a launch with no record is not."""
        docs = member_docs(launch_dir) + shm_records(launch_dir)
        return bool(docs) and all(self.process(d) == "dead" for d in docs)


def shm_records(launch_dir: str) -> list[dict]:
    return _records(launch_dir, "shm",
                    lambda name, doc: doc.get("name") == name and bool(SHM_NAME_RE.match(name)))


def record_segment(launch_dir: str, name: str, deployment: str | None, launch_id: str | None) -> str:
    """Record that this process created /dev/shm/<name> (atomic write)."""
    if not SHM_NAME_RE.match(name):
        raise ValueError(f"not a shm segment name: {name!r}")
    d = os.path.join(launch_dir, "shm")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, name)
    doc = {"name": name, "pid": os.getpid(), "start_ticks": start_ticks(os.getpid()),
           "pid_ns": ns_id("pid"), "ipc_ns": ns_id("ipc"), "launch_id": launch_id,
           "deployment": deployment}
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh)
    os.replace(tmp, path)
    return path


class InUse:
    """Files mapped (/proc/*/maps) or open (/proc/*/fd) by any live process we can see, by path
    and by inode: glibc's sem_open maps a temp file and link()s it to sem.<name>, so a semaphore's
    mapping shows another path than its name; the inode is the same."""

    def __init__(self):
        self.paths: set[str] = set()
        self.inodes: set[int] = set()

    def add_fd(self, link: str, target: str) -> None:
        self.paths.add(target)
        try:
            self.inodes.add(os.stat(link).st_ino)
        except OSError:
            pass

    def __contains__(self, path: str) -> bool:
        if path in self.paths:
            return True
        try:
            return os.lstat(path).st_ino in self.inodes
        except OSError:
            return False


def files_in_use(shm_dir: str = SHM_DIR) -> InUse:
    used = InUse()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/maps", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if "/" not in line:
                        continue
                    path = line[line.index("/"):].rstrip("\n").removesuffix(" (deleted)")
                    used.paths.add(path)
                    if path.startswith(shm_dir + "/"):
                        fields = line.split()
                        if len(fields) >= 5 and fields[4].isdigit():
                            used.inodes.add(int(fields[4]))
        except OSError:
            pass
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            link = f"/proc/{name}/fd/{fd}"
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target.startswith("/"):
                used.add_fd(link, target)
    return used


def removable_segments(root: str, deployment: str, own_launch: str | None = None,
                       shm_dir: str = SHM_DIR, launches: list[str] | None = None,
                       judge: Judge | None = None, in_use: InUse | None = None) -> list[tuple[str, str]]:
    """[(segment path, record path)] this process may delete (rules: module docstring).
    ``launches``: only these launch directories (default: every launch of the deployment)."""
    judge = judge or Judge()
    ipc = ns_id("ipc")
    out = []
    for launch_dir in (deployment_launches(root, deployment) if launches is None else launches):
        if own_launch and os.path.basename(launch_dir) == own_launch:
            continue
        records = [r for r in shm_records(launch_dir)
                   if r.get("deployment") == deployment and r.get("ipc_ns") == ipc]
        if not records or not judge.launch_dead(launch_dir):
            continue
        in_use = files_in_use(shm_dir) if in_use is None else in_use
        for rec in records:
            path = os.path.join(shm_dir, rec["name"])
            if os.path.lexists(path) and path not in in_use:
                out.append((path, os.path.join(launch_dir, "shm", rec["name"])))
    return out
