#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Remove a deployment's launch state and the shm segments it recorded, nothing else."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: fleet_launch_state
short_description: Remove one deployment's launch directories and recorded shm segments
description:
  - Finds the launch directories under C(root)/launches whose recorded deployment (launch.json,
    else the member records) is exactly C(deployment). A directory of another deployment, even one
    whose name starts with C(deployment)-, or one with no record, is never touched.
  - C(state=absent) removes all of them (teardown); C(state=pruned) keeps the newest C(keep)
    (rolling restart).
  - Before a launch directory goes, the C(/dev/shm) segments its processes recorded
    (C(launches/<id>/shm/<name>)) are removed when they live in this host's IPC namespace (a
    container started with the host's IPC), every process of the launch is proven gone and no
    process maps or holds them open. A segment that cannot be removed on that proof is kept, and
    so is its launch directory (the record is the only proof it is ours). Segments in a container's
    private C(/dev/shm) go with the container. Nothing else in C(/dev/shm) is touched.
  - The rules live in C(vllm_fleet.ownership) (module_utils C(fleet_ownership)), shared with the
    plugin's start-up cleanup. Supports check mode.
options:
  deployment:
    description: The deployment (C(fleet_deployment)).
    type: str
    required: true
  state:
    description: C(absent) removes every launch of the deployment; C(pruned) keeps the newest C(keep).
    type: str
    default: absent
    choices: [absent, pruned]
  keep:
    description: Launch directories kept with C(state=pruned) (newest first).
    type: int
    default: 5
  root:
    description: The state root.
    type: path
    default: /run/vllm-fleet
  shm_dir:
    description: The shared-memory directory.
    type: path
    default: /dev/shm
author: vllm-fleet
"""

EXAMPLES = r"""
- name: Remove the deployment's launch state
  fleet_launch_state:
    deployment: "{{ fleet_deployment }}"
    state: absent
"""

RETURN = r"""
removed_launches:
  description: Launch directories removed (or that would be, in check mode).
  returned: always
  type: list
removed_shm:
  description: Recorded shm segments removed.
  returned: always
  type: list
kept_shm:
  description: >-
    Recorded segments in this IPC namespace left in place: mapped, or a process of their launch
    that cannot be proven gone (alive, or in a pid namespace this host cannot see).
  returned: always
  type: list
kept_launches:
  description: Launch directories kept because they hold the record of a kept segment.
  returned: always
  type: list
"""

import os
import shutil

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.fleet_ownership import (Judge, deployment_launches, files_in_use, ns_id,
                                                  removable_segments, shm_records)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            deployment=dict(type="str", required=True),
            state=dict(type="str", default="absent", choices=["absent", "pruned"]),
            keep=dict(type="int", default=5),
            root=dict(type="path", default="/run/vllm-fleet"),
            shm_dir=dict(type="path", default="/dev/shm"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    if not p["deployment"]:
        module.fail_json(msg="deployment is empty: it would name no launch")
    if p["state"] == "pruned" and p["keep"] < 1:
        module.fail_json(msg=f"keep={p['keep']}: pruning keeps at least the newest launch")
    launches = deployment_launches(p["root"], p["deployment"])
    doomed = launches if p["state"] == "absent" else launches[:-p["keep"]]
    judge = Judge()
    ipc = ns_id("ipc")
    in_use = files_in_use(p["shm_dir"]) if doomed else None
    segments = removable_segments(p["root"], p["deployment"], shm_dir=p["shm_dir"], launches=doomed,
                                  judge=judge, in_use=in_use)
    removable = {seg for seg, _ in segments}
    kept, holding = [], set()
    for d in doomed:
        for rec in shm_records(d):
            seg = os.path.join(p["shm_dir"], rec["name"])
            if os.path.lexists(seg) and seg not in removable and rec.get("ipc_ns") == ipc:
                kept.append(seg)
                holding.add(d)  # its record is the only proof the segment is ours: the dir stays
    doomed = [d for d in doomed if d not in holding]
    removed_shm = []
    if not module.check_mode:
        for seg in sorted(removable):
            try:
                os.unlink(seg)
                removed_shm.append(seg)
            except FileNotFoundError:
                pass
            except OSError as exc:
                module.fail_json(msg=f"cannot remove recorded segment {seg}: {exc}")
        for d in doomed:
            shutil.rmtree(d)
    else:
        removed_shm = sorted(removable)
    module.exit_json(changed=bool(doomed or removed_shm), removed_launches=doomed,
                     removed_shm=removed_shm, kept_shm=sorted(kept), kept_launches=sorted(holding))


if __name__ == "__main__":
    main()
