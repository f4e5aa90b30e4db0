#!/usr/bin/env python3
"""Print the Ray cluster's nodes as `ray list nodes --format json` does, straight from the GCS.

    ray_nodes_json.py HEAD_IP:PORT

For the exporter's ``ray_command`` setting where the Ray dashboard (the state API behind `ray
list`) is not running: the GPU test machine has Ray without its dashboard dependencies, so the
head runs with ``fleet-ray-node --no-dashboard``. Only the fields the exporter reads are printed
(state, resources_total), plus node ip/name for people. No driver is started (no ray.init).
"""
import json
import sys


def main() -> int:
    from ray._raylet import GcsClient
    from ray.core.generated import gcs_pb2

    info = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=5)
    nodes = []
    for node in info.values():
        nodes.append({
            "node_id": node.node_id.hex(),
            "node_ip": node.node_manager_address,
            "node_name": node.node_name,
            "is_head_node": node.is_head_node,
            "state": gcs_pb2.GcsNodeInfo.GcsNodeState.Name(node.state),
            "resources_total": dict(node.resources_total),
        })
    print(json.dumps(nodes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
