"""Which transport NCCL really uses, from NCCL's own `NCCL INFO` log lines.

Lines that decide (NCCL 2.1x-2.2x wording):
  ... NCCL INFO Using network IB | Socket | IBext_v8       network plugin selected
  ... NCCL INFO Channel 00/0 : 0[0] -> 1[1] via P2P/IPC     a channel connection's transport
  ... NCCL INFO Channel 00/0 : 1[1] -> 2[0] [send] via NET/IB/0/GDRDMA
  ... NCCL INFO Channel 00 : 0[0] -> 1[1] via SHM/direct/direct
  ... NCCL INFO NVLS comm 0x... headRank 0 nHeads 4 ...     NVLink SHARP in use
Log files are read incrementally (offset per file; reset when a file is replaced or truncated).
"""

from __future__ import annotations

import glob
import os
import re
from typing import Dict, List, Optional, Tuple

TRANSPORTS = ("net_ib", "net_socket", "net_other", "p2p_ipc", "p2p_cumem", "p2p_direct",
              "p2p_other", "shm", "nvls", "collnet")

_VIA = re.compile(r"\bvia (\S+)")
_USING_NET = re.compile(r"\bUsing network (\S+)")
_NVLS = re.compile(r"\bNVLS comm\b|\bvia NVLS\b|\bNVLS/")


def classify_via(path: str) -> str:
    p = path.upper()
    if p.startswith("NET/"):
        net = p[4:]
        if net.startswith("IB"):  # IB, IBext_v8 (RDMA plugin)
            return "net_ib"
        if net.startswith("SOCKET"):
            return "net_socket"
        return "net_other"
    if p.startswith("P2P/"):
        kind = p[4:]
        if kind.startswith("CUMEM"):
            return "p2p_cumem"
        if kind.startswith("IPC"):
            return "p2p_ipc"
        if kind.startswith("DIRECT"):
            return "p2p_direct"
        return "p2p_other"
    if p.startswith("SHM"):
        return "shm"
    if p.startswith("NVLS"):
        return "nvls"
    if p.startswith("COLLNET"):
        return "collnet"
    return ""


def classify_network(name: str) -> str:
    n = name.upper()
    if n.startswith("IB"):
        return "net_ib"
    if n.startswith("SOCKET"):
        return "net_socket"
    return "net_other"


def parse_line(line: str) -> Tuple[Optional[str], bool]:
    """-> (transport or None, counts_as_connection). Only `NCCL INFO` lines count."""
    if "NCCL INFO" not in line:
        return None, False
    m = _VIA.search(line)
    if m and "Channel" in line:
        t = classify_via(m.group(1))
        return (t or None), bool(t)
    m = _USING_NET.search(line)
    if m:
        return classify_network(m.group(1)), False
    if _NVLS.search(line):
        return "nvls", False
    return None, False


class _FileState:
    __slots__ = ("ino", "offset", "partial", "connections", "seen")

    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.offset = 0
        self.partial = b""
        self.connections: Dict[str, int] = {}
        self.seen: set = set()


class NcclLogParser:
    def __init__(self, max_read_bytes: int = 8 << 20) -> None:
        self.files: Dict[str, _FileState] = {}
        self.scope: Optional[str] = None
        self.max_read_bytes = max_read_bytes

    def update(self, globs: List[str], launch_dir: Optional[str]) -> Dict[str, object]:
        if launch_dir != self.scope:  # a new launch: forget the previous one's logs
            self.files.clear()
            self.scope = launch_dir
        paths = set()
        for pattern in globs:
            if "{launch_dir}" in pattern:
                if launch_dir is None:
                    continue
                pattern = pattern.replace("{launch_dir}", launch_dir)
            paths.update(p for p in glob.glob(pattern) if os.path.isfile(p))
        for gone in set(self.files) - paths:
            del self.files[gone]
        for path in sorted(paths):
            self._read(path)
        connections = {t: 0 for t in TRANSPORTS}
        in_use = {t: 0 for t in TRANSPORTS}
        for st in self.files.values():
            for t, n in st.connections.items():
                connections[t] += n
            for t in st.seen:
                in_use[t] = 1
        return {"files": len(self.files), "connections": connections, "in_use": in_use}

    def _read(self, path: str) -> None:
        try:
            st_ = os.stat(path)
        except OSError:
            return
        st = self.files.get(path)
        if st is None or st.ino != st_.st_ino or st_.st_size < st.offset:
            st = self.files[path] = _FileState(st_.st_ino)
        if st_.st_size == st.offset:
            return
        with open(path, "rb") as fh:
            fh.seek(st.offset)
            data = fh.read(self.max_read_bytes)
        st.offset += len(data)
        data = st.partial + data
        lines = data.split(b"\n")
        st.partial = lines.pop()  # an incomplete last line waits for the next read
        for raw in lines:
            if b"NCCL INFO" not in raw:
                continue
            t, conn = parse_line(raw.decode("utf-8", "replace"))
            if t is None:
                continue
            st.seen.add(t)
            if conn:
                st.connections[t] = st.connections.get(t, 0) + 1
