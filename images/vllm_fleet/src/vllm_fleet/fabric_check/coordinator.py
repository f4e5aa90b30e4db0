"""Coordinator (RFC): is_master / is_local_master / broadcast(bytes, src) / barrier, over a
torch.distributed TCPStore on the master at a launch-id-derived port.

Every wait is bounded: a timeout raises ``FabricTimeout`` naming the ranks that did not arrive,
with the node, host and interface they registered (or, for ranks that never joined, their
expected node rank).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time

from .. import launch as launch_mod


class FabricTimeout(RuntimeError):
    pass


def fabric_port(launch_id: str) -> int:
    """Same on every node without a free-port walk (peers cannot see the master's ports): the
    'fabric' slot of the launch id's hashed block (launch.shared_port)."""
    return launch_mod.shared_port(launch_id, "fabric")


def _iface_addr(ifname: str | None) -> str | None:
    if not ifname:
        return None
    try:
        import fcntl
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", ifname[:15].encode()))
            return socket.inet_ntoa(packed[20:24])  # SIOCGIFADDR
    except OSError:
        return None


class Coordinator:
    def __init__(self, rank: int, world_size: int, local_rank: int, local_world_size: int,
                 node_rank: int, master_addr: str, master_port: int, launch_id: str,
                 timeout_s: float = 60.0, ifname: str | None = None):
        from torch.distributed import TCPStore

        self.rank, self.world_size = rank, world_size
        self.local_rank, self.local_world_size = local_rank, local_world_size
        self.node_rank, self.launch_id, self.timeout_s = node_rank, launch_id, timeout_s
        self.master_addr, self.master_port, self.ifname = master_addr, master_port, ifname
        self.host = os.environ.get("FLEET_NODE_NAME") or socket.gethostname()
        self._seq = 0
        try:
            self.store = TCPStore(master_addr, master_port, world_size, rank == 0,
                                  timeout=datetime.timedelta(seconds=timeout_s),
                                  wait_for_workers=False)
        except Exception as exc:
            where = "bind" if rank == 0 else "reach"
            raise FabricTimeout(f"rank {rank} on node {node_rank} ({self.host}, interface "
                                f"{ifname or '?'}) cannot {where} the coordinator at "
                                f"{master_addr}:{master_port}: {exc}") from None
        if rank == 0:
            self.store.set("launch_id", launch_id)
        elif self.store.get("launch_id").decode() != launch_id:
            raise FabricTimeout(f"{master_addr}:{master_port} serves another launch")
        self.store.set(f"rank/{rank}", json.dumps(self.describe_self()))

    # RFC interface -----------------------------------------------------------
    def is_master(self) -> bool:
        return self.rank == 0

    def is_local_master(self) -> bool:
        return self.local_rank == 0

    def broadcast(self, data: bytes | None, src: int = 0) -> bytes:
        self._seq += 1
        key = f"bcast/{self._seq}"
        if self.rank == src:
            self.store.set(key, data or b"")
            return data or b""
        self._wait([key], f"broadcast #{self._seq} from rank {src}", [src])
        return self.store.get(key)

    def barrier(self, name: str = "") -> None:
        self._seq += 1
        tag = f"barrier/{self._seq}{'/' + name if name else ''}"
        self.store.set(f"{tag}/{self.rank}", b"1")
        keys = [f"{tag}/{r}" for r in range(self.world_size)]
        self._wait(keys, f"barrier {name or self._seq}", list(range(self.world_size)))

    def leave(self) -> None:
        """Tell the master this rank is done with the store (the last thing it does)."""
        try:
            self.store.set(f"left/{self.rank}", b"1")
        except Exception:
            pass

    def wait_left(self, timeout_s: float) -> bool:
        """Master: wait (bounded) until every other rank has left, so that the store outlives
        their last read. False if some did not say so in time (they end on their own timers)."""
        keys = [f"left/{r}" for r in range(self.world_size) if r != self.rank]
        deadline = time.monotonic() + timeout_s
        while keys and time.monotonic() < deadline:
            try:
                if self.store.check(keys):
                    return True
            except Exception:
                return False
            time.sleep(0.02)
        return not keys

    # helpers -----------------------------------------------------------------
    def describe_self(self) -> dict:
        return {"rank": self.rank, "node_rank": self.node_rank, "local_rank": self.local_rank,
                "host": self.host, "ifname": self.ifname, "addr": _iface_addr(self.ifname),
                "pid": os.getpid()}

    def side_store(self):
        """A second client connection for other threads (a TCPStore client is not thread-safe).
        Its connect and calls may take as long as a step (``--timeout``), like the main one's: a
        fixed 3 s gave up on a busy host, and a rank whose heartbeat thread had given up was
        then named as not responding."""
        from torch.distributed import TCPStore

        return TCPStore(self.master_addr, self.master_port, self.world_size, False,
                        timeout=datetime.timedelta(seconds=self.timeout_s), wait_for_workers=False)

    def describe(self, rank: int, store=None) -> str:
        store = self.store if store is None else store
        try:
            if store.check([f"rank/{rank}"]):
                d = json.loads(store.get(f"rank/{rank}"))
                return (f"rank {rank} on node {d['node_rank']} ({d['host']}, interface "
                        f"{d.get('ifname') or '?'}{', ' + d['addr'] if d.get('addr') else ''})")
        except Exception:
            pass
        node = rank // max(1, self.local_world_size)
        return (f"rank {rank} on node {node} (never joined the coordinator at "
                f"{self.master_addr}:{self.master_port}; expected over interface "
                f"{self.ifname or '?'})")

    def _wait(self, keys: list[str], what: str, ranks: list[int]) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                if self.store.check(keys):
                    return
            except Exception as exc:
                raise FabricTimeout(f"{what}: coordinator at {self.master_addr}:{self.master_port}"
                                    f" (node 0) unreachable: {exc}") from None
            if time.monotonic() > deadline:
                missing = [r for r, k in zip(ranks, keys) if not self.store.check([k])]
                raise FabricTimeout(f"{what} timed out after {self.timeout_s:.0f}s waiting for "
                                    + "; ".join(self.describe(r) for r in missing))
            time.sleep(0.02)

    def set_progress(self, step: int, what: str) -> None:
        self.store.set(f"progress/{self.rank}", json.dumps([step, what]))

    def beat(self, store) -> None:
        """One heartbeat of this rank (a counter, so no clocks are compared across nodes)."""
        store.add(f"beat/{self.rank}", 1)

    def beats(self, store) -> dict[int, int]:
        out = {}
        for r in range(self.world_size):
            try:
                out[r] = int(store.add(f"beat/{r}", 0))
            except Exception:
                out[r] = -1
        return out

    def laggards(self, step: int, store=None, silent: tuple = (), silent_s: float = 0.0
                 ) -> list[str]:
        """Ranks that are behind ``step``, or in ``silent`` (no heartbeat for ``silent_s``: a
        frozen process or a node cut off while inside the same step). Called after a timeout."""
        store = self.store if store is None else store
        out = []
        for r in range(self.world_size):
            tags = []
            if r in silent:
                tags.append(f"not responding: no heartbeat for {silent_s:.0f}s "
                            "(frozen, stopped or cut off)")
            try:
                if not store.check([f"progress/{r}"]):
                    tags.append("no progress")
                else:
                    their, what = json.loads(store.get(f"progress/{r}"))
                    if their < step or r in silent:
                        tags.append(f"still at: {what}")
            except Exception:
                tags.append("unknown")
            if tags:
                out.append(self.describe(r, store) + " [" + "; ".join(tags) + "]")
        return out
