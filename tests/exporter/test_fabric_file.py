"""fabric.json has one layout, the fabric role's: its settings under "env" (fabric_env.render_json).
The exporter reads that and refuses anything else, naming the file."""
import importlib.util
import json
from pathlib import Path

import pytest
from vllm_fleet_exporter.fabric import ib_expected, load_fabric, ray_node_ip

# the writer's own module (the image's package is not importable in the exporter's tests)
_SOURCE = Path(__file__).resolve().parents[2] / "images/vllm_fleet/src/vllm_fleet/fabric_env.py"
_spec = importlib.util.spec_from_file_location("fabric_env_writer", _SOURCE)
fabric_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fabric_env)
render_json = fabric_env.render_json


def test_reads_the_file_the_fabric_role_writes(tmp_path):
    path = tmp_path / "fabric.json"
    path.write_text(render_json({"host": "node3", "role": "worker", "interface": "fab0",
                                 "env": {"NCCL_SOCKET_IFNAME": "fab0", "NCCL_IB_DISABLE": "0",
                                         "NCCL_IB_HCA": "mlx5_0", "VLLM_HOST_IP": "172.28.20.13"}}))
    env = load_fabric(str(path))
    assert env == {"NCCL_SOCKET_IFNAME": "fab0", "NCCL_IB_DISABLE": "0", "NCCL_IB_HCA": "mlx5_0",
                   "VLLM_HOST_IP": "172.28.20.13"}
    assert ib_expected(env) and ray_node_ip(env) == "172.28.20.13"


@pytest.mark.parametrize("layout", [
    {"NCCL_SOCKET_IFNAME": "fab0"},  # settings at the top level
    {"environment": {"NCCL_SOCKET_IFNAME": "fab0"}},
    {"env": ["NCCL_SOCKET_IFNAME=fab0"]},
])
def test_any_other_layout_is_refused_naming_the_file(tmp_path, layout):
    path = tmp_path / "fabric.json"
    path.write_text(json.dumps(layout))
    with pytest.raises(ValueError, match=f'{path}: no "env" object'):
        load_fabric(str(path))


def test_no_file_is_no_fabric(tmp_path):
    assert load_fabric(str(tmp_path / "absent.json")) is None
