#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Read or set one HAProxy server's administrative state through the runtime API (admin socket)."""
from __future__ import annotations

DOCUMENTATION = r"""
---
module: fleet_haproxy_server
short_description: Set an HAProxy server to ready, drain or maint through the runtime API
description:
  - Talks to HAProxy's runtime API on its admin UNIX socket (C(stats socket ... level admin)); needs
    no socat.
  - Idempotent; reads the state first and changes it only when it differs. Supports check mode.
  - Can wait, with a timeout, until a drained server has no sessions left, or until a server that
    was put back is UP in HAProxy's own health checks.
  - Without I(state) it only reports the server (or every server of the backend when I(server) is
    empty).
options:
  socket:
    description: Path of the admin socket.
    type: path
    default: /run/haproxy/admin.sock
  backend:
    description: Backend name.
    type: str
    required: true
  server:
    description: Server name in the backend; empty reports every server of the backend.
    type: str
    default: ''
  state:
    description:
      - C(ready) takes the server back into rotation; C(drain) lets sessions finish but sends no new
        ones; C(maint) takes it out completely (health checks stop).
      - Omitted, the module only reports.
    type: str
    choices: [ready, drain, maint]
  wait_sessions_zero:
    description: After setting I(state), wait until the server has no current sessions and nothing queued.
    type: bool
    default: false
  wait_up:
    description: After setting I(state=ready), wait until HAProxy's health checks report the server UP.
    type: bool
    default: false
  timeout:
    description: Seconds any wait may take; the module fails naming what did not happen in time.
    type: float
    default: 120
  poll_interval:
    description: Seconds between polls while waiting.
    type: float
    default: 0.5
"""

EXAMPLES = r"""
- name: Take replica r2 out of rotation and wait for its sessions to end
  fleet_haproxy_server:
    backend: vllm
    server: r2
    state: drain
    wait_sessions_zero: true
    timeout: 300
"""

RETURN = r"""
server:
  description: The server after the change (admin/op state, sessions, health check status).
  type: dict
  returned: when server is set
servers:
  description: Every server of the backend, by name.
  type: dict
  returned: always
previous_state:
  description: The administrative state before (ready, drain or maint).
  type: str
  returned: when server is set
"""

import socket
import time

from ansible.module_utils.basic import AnsibleModule

# srv_admin_state bits (HAProxy src/server.h): forced/inherited/config/resolver/health maint, drain.
ADMIN_FMAINT, ADMIN_IMAINT, ADMIN_CMAINT = 0x01, 0x02, 0x04
ADMIN_FDRAIN, ADMIN_IDRAIN, ADMIN_RMAINT, ADMIN_HMAINT = 0x08, 0x10, 0x20, 0x40
MAINT_MASK = ADMIN_FMAINT | ADMIN_IMAINT | ADMIN_CMAINT | ADMIN_RMAINT | ADMIN_HMAINT
DRAIN_MASK = ADMIN_FDRAIN | ADMIN_IDRAIN
OP_STATES = {0: "stopped", 1: "starting", 2: "running", 3: "stopping"}


class RuntimeApiError(Exception):
    pass


def command(path: str, line: str, timeout: float = 10.0) -> str:
    """One runtime API command (non-interactive mode: the socket closes after the answer)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(line.encode() + b"\n")
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    except OSError as exc:
        raise RuntimeApiError(f"HAProxy runtime API at {path}: {exc}") from exc
    finally:
        sock.close()
    return b"".join(chunks).decode(errors="replace")


def parse_servers_state(text: str) -> dict[str, dict]:
    """`show servers state <backend>` → {server: fields}; the header line names the columns."""
    header, rows = None, {}
    for line in text.splitlines():
        if line.startswith("# be_id"):
            header = line[2:].split()
            continue
        if not line.strip() or line.startswith("#") or header is None or line.strip() == "1":
            continue
        values = line.split()
        if len(values) < len(header):
            continue
        row = dict(zip(header, values))
        rows[row["srv_name"]] = row
    return rows


def parse_stat(text: str, backend: str) -> dict[str, dict]:
    """`show stat` CSV → {server: row} for one backend."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# "):
        return {}
    cols = lines[0][2:].split(",")
    rows = {}
    for line in lines[1:]:
        row = dict(zip(cols, line.split(",")))
        if row.get("pxname") == backend and row.get("svname") not in ("FRONTEND", "BACKEND", None):
            rows[row["svname"]] = row
    return rows


def admin_name(admin_bits: int) -> str:
    if admin_bits & MAINT_MASK:
        return "maint"
    if admin_bits & DRAIN_MASK:
        return "drain"
    return "ready"


def describe(path: str, backend: str) -> dict[str, dict]:
    state_text = command(path, f"show servers state {backend}")
    if "Can't find backend" in state_text or "No such backend" in state_text:
        raise RuntimeApiError(f"HAProxy has no backend {backend!r}")
    if state_text.startswith("Unknown command") or "Permission denied" in state_text:
        raise RuntimeApiError(f"HAProxy runtime API refused `show servers state`: {state_text.strip()}")
    states = parse_servers_state(state_text)
    stats = parse_stat(command(path, "show stat"), backend)
    out = {}
    for name, row in states.items():
        admin_bits = int(row.get("srv_admin_state", "0"))
        stat = stats.get(name, {})
        out[name] = {
            "name": name,
            "address": row.get("srv_addr"),
            "port": int(row.get("srv_port", "0") or 0),
            "admin_state": admin_name(admin_bits),
            "admin_bits": admin_bits,
            "op_state": OP_STATES.get(int(row.get("srv_op_state", "0")), row.get("srv_op_state")),
            "status": stat.get("status", ""),
            "check_status": stat.get("check_status", ""),
            "last_check": stat.get("last_chk", ""),
            "sessions": int(stat.get("scur") or 0),
            "queued": int(stat.get("qcur") or 0),
            "total_sessions": int(stat.get("stot") or 0),
            "weight": int(stat.get("weight") or 0),
            "backup": stat.get("bck") == "1",
        }
    return out


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            socket=dict(type="path", default="/run/haproxy/admin.sock"),
            backend=dict(type="str", required=True),
            server=dict(type="str", default=""),
            state=dict(type="str", choices=["ready", "drain", "maint"]),
            wait_sessions_zero=dict(type="bool", default=False),
            wait_up=dict(type="bool", default=False),
            timeout=dict(type="float", default=120.0),
            poll_interval=dict(type="float", default=0.5),
        ),
        supports_check_mode=True,
    )
    p = module.params
    path, backend, server, want = p["socket"], p["backend"], p["server"], p["state"]
    if want and not server:
        module.fail_json(msg="state needs a server name")

    def current():
        try:
            return describe(path, backend)
        except RuntimeApiError as exc:
            module.fail_json(msg=str(exc))

    servers = current()
    if not server:
        module.exit_json(changed=False, servers=servers)
    if server not in servers:
        module.fail_json(msg=f"HAProxy backend {backend!r} has no server {server!r} "
                             f"(it has: {', '.join(sorted(servers)) or 'none'})", servers=servers)
    before = servers[server]
    previous = before["admin_state"]
    changed = bool(want) and previous != want
    if changed and not module.check_mode:
        answer = command(path, f"set server {backend}/{server} state {want}").strip()
        if answer:  # the runtime API answers set commands with an empty line on success
            module.fail_json(msg=f"set server {backend}/{server} state {want}: {answer}")
        servers = current()
        if servers[server]["admin_state"] != want:
            module.fail_json(msg=f"{backend}/{server} is {servers[server]['admin_state']} after asking for {want}",
                             servers=servers)

    deadline = time.monotonic() + p["timeout"]
    if not module.check_mode and p["wait_sessions_zero"]:
        while True:
            srv = current()[server]
            if srv["sessions"] == 0 and srv["queued"] == 0:
                break
            if time.monotonic() >= deadline:
                module.fail_json(msg=f"{backend}/{server} still has {srv['sessions']} session(s) and "
                                     f"{srv['queued']} queued after {p['timeout']:.0f}s", server=srv,
                                 previous_state=previous, changed=changed)
            time.sleep(p["poll_interval"])
    if not module.check_mode and p["wait_up"]:
        while True:
            srv = current()[server]
            if srv["status"] == "UP" and srv["admin_state"] == "ready":
                break
            if time.monotonic() >= deadline:
                module.fail_json(msg=f"{backend}/{server} is not UP in HAProxy's health checks after "
                                     f"{p['timeout']:.0f}s: status {srv['status']}, check {srv['check_status']} "
                                     f"({srv['last_check']})", server=srv, previous_state=previous, changed=changed)
            time.sleep(p["poll_interval"])
    servers = current()
    module.exit_json(changed=changed, previous_state=previous, server=servers[server], servers=servers)


if __name__ == "__main__":
    main()
