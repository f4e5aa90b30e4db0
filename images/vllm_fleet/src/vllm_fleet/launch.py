"""Launch id -> ports.

Every port a launch needs is derived from its launch id (the RFC's Jupyter-style scheme): hash the
id to a base port, then walk upward to the first block whose ports are all free. Why:

* two launches on one node never collide: each picks a different place in the range, free-port
  checks catch what is bound, and ports recorded in the other live launches' ``launch.json`` count
  as taken even before those launches bind them (the allocation runs under a file lock);
* a relaunch gets a new launch id, so it never waits on a port that the dead launch left in
  TIME_WAIT or that an orphan still holds;
* deterministic: the same id over the same free ports gives the same ports, so every process of a
  launch (and an operator reading logs) can recompute them.

A port that peers on OTHER nodes must know (the multi-node distributed-init ``master`` port, the
fabric check's coordinator) cannot take part in the free-port walk, since the other nodes cannot
see which ports are free on the master's node: ``shared_port()`` gives the hashed block's slot
without a walk (the same on every node from the launch id alone), and the node that binds it
checks that it is free (``ensure_launch(..., fixed=..., bind_fixed=...)``), failing with the port,
host and launch named rather than silently taking another one.

CLI (used by entrypoints and tests)::

    python -m vllm_fleet.launch --launch-id ID [--deployment D] [--format env|json]

prints ``VLLM_PORT=..``, ``MASTER_PORT=..`` ... and writes ``launch.json``. ``fleet-serve`` calls
``ensure_launch()`` itself.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from typing import Callable, Iterable

from . import state

PORT_LO = 20000
PORT_HI = 32768  # Linux's ephemeral range starts here: stay below it so outgoing connections never hold our ports

#: Ports one launch needs and their offsets in the launch's block. ``dp_master`` and ``vllm`` start
#: runs: vLLM keeps VLLM_DP_MASTER_PORT .. +9 out of its own picks (network_utils'
#: _get_reserved_port_range) and hands out "VLLM_PORT, VLLM_PORT+1, ..." when it needs several
#: internal ports. The runs must not overlap, or vLLM skips from VLLM_PORT past the dp range.
PORT_NAMES = ("master", "fabric", "dp_master", "vllm")
DP_MASTER_SPAN = 10
VLLM_PORT_SPAN = 16
SPANS = {"dp_master": DP_MASTER_SPAN, "vllm": VLLM_PORT_SPAN}
OFFSETS = {"master": 0, "fabric": 1, "dp_master": 2, "vllm": 2 + DP_MASTER_SPAN}
BLOCK = 32  # >= OFFSETS["vllm"] + VLLM_PORT_SPAN (28): blocks never overlap each other

#: A launch.json younger than this counts as live even if no process of it runs yet (it is being
#: started); older ones count only while a process carrying its launch id is alive.
FRESH_S = 600.0


def base_port(launch_id: str, lo: int = PORT_LO, hi: int = PORT_HI, block: int = BLOCK) -> int:
    """Block-aligned port in [lo, hi) from a stable hash (not Python's salted hash())."""
    nblocks = (hi - lo) // block
    digest = hashlib.sha256(launch_id.encode("utf-8")).digest()
    return lo + (int.from_bytes(digest[:8], "big") % nblocks) * block


def block_ports(start: int) -> dict[str, int]:
    return {name: start + OFFSETS[name] for name in PORT_NAMES}


def shared_port(launch_id: str, name: str = "master") -> int:
    """The ``name`` slot of the launch id's hashed block, without a free-port walk: every node
    computes the same port from the launch id alone (for ports that peers connect to)."""
    return block_ports(base_port(launch_id))[name]


def expand(ports: dict) -> set[int]:
    """Every port a ports dict occupies, spans included (unknown names count as single ports)."""
    out: set[int] = set()
    for name, port in ports.items():
        if isinstance(port, int) and not isinstance(port, bool):
            out.update(range(port, port + SPANS.get(name, 1)))
    return out


def port_is_free(port: int) -> bool:
    """True if nothing is bound to ``port`` on any address (TCP). SO_REUSEADDR so a TIME_WAIT
    leftover of our own earlier run does not count as busy (the kernel lets us bind then)."""
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this host
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((addr, port))
        except OSError:
            return False
        finally:
            sock.close()
    return True


def allocate(launch_id: str, taken: Iterable[int] = (), is_free: Callable[[int], bool] = port_is_free,
             lo: int = PORT_LO, hi: int = PORT_HI, skip: Iterable[str] = ()) -> dict[str, int]:
    """First block at/after the hashed base (wrapping once) whose ports are all free and not in
    ``taken``. The dp_master and vLLM runs are checked whole (vLLM increments from them).
    ``skip``: names fixed elsewhere, whose slot in the block is not needed."""
    taken = set(taken)
    skip = set(skip)
    nblocks = (hi - lo) // BLOCK
    start0 = base_port(launch_id, lo, hi)
    for i in range(nblocks):
        start = lo + ((start0 - lo) // BLOCK + i) % nblocks * BLOCK
        ports = block_ports(start)
        needed = sorted(expand({n: p for n, p in ports.items() if n not in skip}))
        if any(p in taken for p in needed):
            continue
        if all(is_free(p) for p in needed):
            return ports
    raise RuntimeError(f"no free port block in [{lo}, {hi}) for launch {launch_id}")


def _live_launch_ids() -> set[str]:
    """Launch ids carried by live processes (from /proc/<pid>/environ; unreadable ones skipped)."""
    from .cleanup import iter_processes  # local: cleanup imports are heavier than we need here

    return {p.launch_id for p in iter_processes() if p.launch_id}


def reserved_ports(root: str, own_launch: str, now: float | None = None) -> set[int]:
    """Ports recorded by other launches that are live (a process carries the id) or fresh."""
    now = time.time() if now is None else now
    live = None
    taken: set[int] = set()
    base = os.path.join(root, "launches")
    try:
        names = os.listdir(base)
    except OSError:
        return taken
    for name in names:
        if name == own_launch:
            continue
        doc = state.read_json(os.path.join(base, name, "launch.json"))
        if not isinstance(doc, dict) or not isinstance(doc.get("ports"), dict):
            continue
        created = doc.get("created") or 0
        if not isinstance(created, (int, float)) or now - created > FRESH_S:
            live = _live_launch_ids() if live is None else live
            if name not in live:
                continue
        taken |= expand(doc["ports"])
    return taken


@contextlib.contextmanager
def _root_lock(root: str):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".ports.lock"), "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class PortBusy(RuntimeError):
    """A fixed port this node must bind is in use or reserved by another launch."""


def _check_fixed(name: str, port: int, launch_id: str, taken: set[int], host: str,
                 is_free: Callable[[int], bool]) -> None:
    why = None
    if port in taken:
        why = "reserved by another live launch's launch.json"
    elif not is_free(port):
        why = "already bound by another process"
    if why:
        raise PortBusy(f"{name} port {port} of launch {launch_id} on host {host} is {why}; "
                       f"it is derived from the launch id so that every node agrees on it: start "
                       f"a new launch (new launch id) or pin it with FLEET_MASTER_PORT / "
                       f"--master-port")


def ensure_launch(launch_id: str, deployment: str | None = None, env: dict | None = None,
                  extra_ports: dict | None = None, fixed: dict | None = None,
                  bind_fixed: Iterable[str] = (), write: bool = True,
                  is_free: Callable[[int], bool] = port_is_free) -> dict:
    """Allocate (or re-read) this launch's ports and write/merge ``launch.json``.

    Idempotent: a launch.json that already has our port names is reused, so every process of the
    launch sees the same ports. Keys written by others (e.g. the entrypoint's ``api`` port) stay.

    ``fixed``: ports that are not walked (an explicit setting, or ``shared_port()`` for a port
    peers on other nodes connect to); they override the block's slot of the same name, are kept
    out of this launch's block and are recorded so other launches keep off them too.
    ``bind_fixed``: names of fixed ports THIS node binds: they must be free here and not reserved
    by another live launch, else ``PortBusy`` (never a silent walk: peers could not follow).
    ``write=False``: compute only (dry runs); no lock, nothing created.
    """
    env = os.environ if env is None else env
    fixed = {k: int(v) for k, v in (fixed or {}).items()}
    root = state.state_root(env)
    lock = _root_lock(root) if write else contextlib.nullcontext()
    with lock:
        path = os.path.join(root, "launches", launch_id, "launch.json")
        doc = state.read_json(path)
        doc = doc if isinstance(doc, dict) else {}
        ports = doc.get("ports") if isinstance(doc.get("ports"), dict) else {}
        taken = reserved_ports(root, launch_id)
        for name in bind_fixed:
            _check_fixed(name, fixed[name], launch_id, taken, state.host_name(env), is_free)
        if not all(isinstance(ports.get(n), int) for n in PORT_NAMES):
            mine = expand({k: v for k, v in ports.items() if k not in PORT_NAMES})
            ports.update(allocate(launch_id, taken | mine | expand(fixed), is_free, skip=fixed))
        ports.update(fixed)
        if extra_ports:
            ports.update(extra_ports)
        doc.setdefault("launch_id", launch_id)
        doc.setdefault("deployment", deployment or state.deployment(env) or "")
        doc.setdefault("host", state.host_name(env))
        doc.setdefault("created", time.time())
        doc["ports"] = ports
        if write:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            state.write_json_atomic(path, doc)
    return doc


def port_env(doc: dict) -> dict[str, str]:
    """Environment the entrypoint exports from a launch.json document."""
    ports = doc["ports"]
    out = {
        "VLLM_FLEET_LAUNCH_ID": doc["launch_id"],
        "VLLM_PORT": str(ports["vllm"]),
        "MASTER_PORT": str(ports["master"]),
        "VLLM_DP_MASTER_PORT": str(ports["dp_master"]),
        "VLLM_FLEET_FABRIC_PORT": str(ports["fabric"]),
    }
    if doc.get("deployment"):
        out["VLLM_FLEET_DEPLOYMENT"] = doc["deployment"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_fleet.launch", description=__doc__.split("\n")[0])
    ap.add_argument("--launch-id", default=os.environ.get("VLLM_FLEET_LAUNCH_ID"))
    ap.add_argument("--deployment", default=os.environ.get("VLLM_FLEET_DEPLOYMENT"))
    ap.add_argument("--format", choices=("env", "json"), default="env")
    args = ap.parse_args(argv)
    if not args.launch_id:
        ap.error("--launch-id (or VLLM_FLEET_LAUNCH_ID) is required")
    doc = ensure_launch(args.launch_id, args.deployment)
    if args.format == "json":
        print(json.dumps(doc))
    else:
        for key, value in port_env(doc).items():
            print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
