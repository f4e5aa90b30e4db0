#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Keep one nftables table (ours) as a ruleset file says, live and on disk; nothing else."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: fleet_nft_table
short_description: Converge one nftables table and its ruleset file, with a real diff
description:
  - C(content) is a complete nft script for one table that replaces only that table atomically
    (C(table FAMILY NAME {}), C(delete table FAMILY NAME), C(table FAMILY NAME { ... })). Other
    tables (the distribution's, Docker's, the site's own) are never read or changed; nothing is
    flushed.
  - The wanted table is what the kernel makes of C(content) in a throw-away network namespace
    (C(unshare --net)); the live one is C(nft --stateless list table). They are compared in the
    kernel's own normal form, so a re-run with the same rules changes nothing, and C(--check
    --diff) shows exactly which rules would change. The file at C(path) is written too (the
    C(vllm-fleet-firewall) unit loads it at boot).
  - C(state=absent) deletes the live table and the file.
options:
  family:
    description: nftables family of the table.
    type: str
    default: inet
  table:
    description: Name of the table (ours alone).
    type: str
    required: true
  content:
    description: The nft script (required with C(state=present)).
    type: str
  path:
    description: Where the script is kept for boot.
    type: path
    required: true
  state:
    description: C(present) or C(absent).
    type: str
    default: present
    choices: [present, absent]
author: vllm-fleet
"""

EXAMPLES = r"""
- name: Load the firewall table
  fleet_nft_table:
    table: vllm_fleet
    content: "{{ lookup('ansible.builtin.template', 'vllm-fleet.nft.j2') }}"
    path: /etc/vllm-fleet/firewall.nft
"""

RETURN = r"""
live:
  description: The table as the kernel lists it after the run (stateless).
  returned: state=present
  type: str
"""

import os
import re
import tempfile

from ansible.module_utils.basic import AnsibleModule

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")


def listing(module, family, table, netns_script=None):
    """(rc, stateless listing) of the live table, or of the table netns_script makes in a fresh
    network namespace."""
    if netns_script is None:
        rc, out, err = module.run_command(["nft", "--stateless", "list", "table", family, table])
        return rc, out if rc == 0 else err
    with tempfile.NamedTemporaryFile("w", suffix=".nft", delete=False) as fh:
        fh.write(netns_script)
        script = fh.name
    try:
        rc, out, err = module.run_command(
            ["unshare", "--net", "sh", "-ec",
             'nft -f "$1" && nft --stateless list table "$2" "$3"', "sh", script, family, table])
        return rc, out if rc == 0 else err
    finally:
        os.unlink(script)


def read(path):
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def main():
    module = AnsibleModule(
        argument_spec=dict(
            family=dict(type="str", default="inet"),
            table=dict(type="str", required=True),
            content=dict(type="str"),
            path=dict(type="path", required=True),
            state=dict(type="str", default="present", choices=["present", "absent"]),
        ),
        required_if=[("state", "present", ["content"])],
        supports_check_mode=True,
    )
    p = module.params
    family, table = p["family"], p["table"]
    if family not in ("inet", "ip", "ip6") or not NAME_RE.match(table):
        module.fail_json(msg=f"not a table this module manages: {family} {table}")
    if module.get_bin_path("nft") is None:
        if p["state"] == "absent":  # never installed here: no table; the file may still be
            on_disk = read(p["path"])
            if on_disk is not None and not module.check_mode:
                os.unlink(p["path"])
            module.exit_json(changed=on_disk is not None)
        module.fail_json(msg="nft is not installed (package nftables)")
    rc_live, live = listing(module, family, table)
    live = live if rc_live == 0 else ""
    on_disk = read(p["path"])

    if p["state"] == "absent":
        changed = bool(live) or on_disk is not None
        if changed and not module.check_mode:
            if live:
                rc, _, err = module.run_command(["nft", "delete", "table", family, table])
                if rc != 0:
                    module.fail_json(msg=f"nft delete table {family} {table}: {err.strip()}")
            if on_disk is not None:
                os.unlink(p["path"])
        module.exit_json(changed=changed, diff={"before": live, "after": ""})

    content = p["content"] if p["content"].endswith("\n") else p["content"] + "\n"
    rc, wanted = listing(module, family, table, netns_script=content)
    if rc != 0:
        module.fail_json(msg=f"the ruleset for table {family} {table} does not load: {wanted.strip()}")
    live_changed, file_changed = live != wanted, on_disk != content
    if not module.check_mode:
        if file_changed:
            os.makedirs(os.path.dirname(p["path"]), exist_ok=True)
            tmp = p["path"] + ".tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(content)
            os.chmod(tmp, 0o644)
            os.replace(tmp, p["path"])
        if live_changed:
            rc, _, err = module.run_command(["nft", "-f", p["path"]])
            if rc != 0:
                module.fail_json(msg=f"nft -f {p['path']}: {err.strip()}")
            rc, live = listing(module, family, table)
            if rc != 0 or live != wanted:
                module.fail_json(msg=f"table {family} {table} differs from its ruleset after loading it",
                                 live=live, wanted=wanted)
    module.exit_json(changed=live_changed or file_changed, live=wanted if not module.check_mode else live,
                     diff=[{"before_header": f"live table {family} {table}", "before": live,
                            "after_header": "wanted", "after": wanted},
                           {"before_header": p["path"], "before": on_disk or "",
                            "after_header": p["path"], "after": content}])


if __name__ == "__main__":
    main()
