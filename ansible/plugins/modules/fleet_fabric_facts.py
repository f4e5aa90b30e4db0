#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Compute this node's fabric settings on the node (vllm-fleet fabric role)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: fleet_fabric_facts
short_description: Compute a node's NCCL/Gloo/Ray fabric settings on the node itself
description:
  - On a head, finds its fabric interface and address (C(fleet_fabric_interface), or the only
    non-default-route interface).
  - On a worker, picks the interface that carries the route to the head's fabric address
    (C(ip route get)), never by name, and checks the route is directly connected.
  - Reads every InfiniBand/RoCE port from C(<sysfs_root>/class/infiniband), decides per port
    whether NCCL may use it (state, SR-IOV, default route, subnet, GID) and derives
    C(NCCL_IB_HCA), C(NCCL_IB_DISABLE) and C(NCCL_IB_GID_INDEX); reconciles them with the head.
  - Read-only; never reports changed. Fails with a message naming the host and variable.
  - The logic lives in C(vllm_fleet.fabric_env) (module_utils C(fleet_fabric_env)), shared with
    the serving image.
options:
  host:
    description: Inventory name of this host (used in messages).
    type: str
    required: true
  role:
    description: C(head) or C(worker).
    type: str
    required: true
    choices: [head, worker]
  head_host:
    description: Inventory name of this worker's head.
    type: str
    default: ''
  head:
    description: The head's result (its C(fabric) return value); required for workers.
    type: dict
  interface:
    description: C(fleet_fabric_interface) override.
    type: str
    default: ''
  nccl_ib:
    description: C(fleet_nccl_ib).
    type: str
    default: auto
    choices: [auto, 'on', 'off']
  ib_hca:
    description: C(fleet_nccl_ib_hca) override.
    type: str
    default: ''
  allow_routed:
    description: Accept a route to the head through a (non-default) gateway.
    type: bool
    default: false
  dedicated:
    description: C(fleet_fabric_dedicated); without it a fabric interface that carries the default route fails.
    type: bool
    default: false
  rdma_subnets:
    description: C(fabric_rdma_subnets), networks besides the fabric subnet whose RDMA ports NCCL may use.
    type: list
    elements: str
    default: []
  sysfs_root:
    description: Root of sysfs (tests point it at a fake tree).
    type: path
    default: /sys
  ip_command:
    description: The iproute2 C(ip) binary.
    type: str
    default: ip
author: vllm-fleet
"""

EXAMPLES = r"""
- name: Compute the worker's fabric settings
  fleet_fabric_facts:
    host: "{{ inventory_hostname }}"
    role: worker
    head_host: node1
    head: "{{ hostvars['node1'].fleet_fabric }}"
"""

RETURN = r"""
fabric:
  description: The decision (fabric.json content) with C(env), C(interface), C(address),
    C(reasons) and C(warnings).
  returned: success
  type: dict
env_file:
  description: Content for /etc/vllm-fleet/fabric.env.
  returned: success
  type: str
nccl_conf:
  description: Content for /etc/nccl.conf.
  returned: success
  type: str
json:
  description: Content for /etc/vllm-fleet/fabric.json.
  returned: success
  type: str
summary:
  description: One line for the run summary.
  returned: success
  type: str
table:
  description: The node's decision at a glance, one row per HCA port (used, or why not).
  returned: success
  type: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.fleet_fabric_env import (
    FabricError, detect, render_env_file, render_json, render_nccl_conf, render_table, summary_line)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            host=dict(type="str", required=True),
            role=dict(type="str", required=True, choices=["head", "worker"]),
            head_host=dict(type="str", default=""),
            head=dict(type="dict"),
            interface=dict(type="str", default=""),
            nccl_ib=dict(type="str", default="auto", choices=["auto", "on", "off"]),
            ib_hca=dict(type="str", default=""),
            allow_routed=dict(type="bool", default=False),
            dedicated=dict(type="bool", default=False),
            rdma_subnets=dict(type="list", elements="str", default=[]),
            sysfs_root=dict(type="path", default="/sys"),
            ip_command=dict(type="str", default="ip"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    head = p["head"]
    if p["role"] == "worker" and not (head and head.get("address")):
        module.fail_json(msg="host %s: no fabric result from its head %s (the head failed or was "
                             "not in this run; run the fabric stage on the head too)"
                             % (p["host"], p["head_host"] or "(none)"))
    ip = module.get_bin_path(p["ip_command"], required=False) or p["ip_command"]

    def runner(argv):
        return module.run_command(argv, environ_update={"LC_ALL": "C"})

    try:
        result = detect(
            host=p["host"], role=p["role"], head_address=(head or {}).get("address") or "",
            head_host=p["head_host"], head=head, interface=p["interface"], nccl_ib=p["nccl_ib"],
            ib_hca=p["ib_hca"], allow_routed=p["allow_routed"], dedicated=p["dedicated"],
            rdma_subnets=p["rdma_subnets"], sysfs_root=p["sysfs_root"],
            ip=ip, runner=runner)
    except FabricError as exc:
        module.fail_json(msg=str(exc))
    for warning in result["warnings"]:
        module.warn("%s: %s" % (p["host"], warning))
    module.exit_json(changed=False, fabric=result, env_file=render_env_file(result),
                     nccl_conf=render_nccl_conf(result), json=render_json(result),
                     summary=summary_line(result), table=render_table(result))


if __name__ == "__main__":
    main()
