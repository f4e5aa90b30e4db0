"""fleet-serve with the Ray executor must not pin VLLM_PORT: vLLM 0.24's RayExecutorV2 asks
get_open_port() twice in the driver before binding either port (rank 0's TCPStore, then its
broadcast queue), so a pinned VLLM_PORT hands both the same port and rank 0 dies with EADDRINUSE
(seen on 2x H200, docs/benchmarks/2026-11-21-h200x2-ray-pp.md). The mp executor keeps it."""
from vllm_fleet.entrypoints import serve

BASE = {"FLEET_MODEL_PATH": "/models/m", "FLEET_ENGINE": "cuda", "PATH": "/usr/bin"}


def build(extra_env, tmp_path):
    env = dict(BASE, VLLM_FLEET_STATE_DIR=str(tmp_path), **extra_env)
    args = serve.parser().parse_args([])
    return serve.build_command(args, env)


def test_ray_executor_leaves_vllm_port_to_vllm(tmp_path):
    argv, env, info = build({"FLEET_RAY_ADDRESS": "10.0.0.1:6379", "FLEET_PIPELINE_PARALLEL_SIZE": "2",
                             "VLLM_FLEET_LAUNCH_ID": "ray-1"}, tmp_path)
    assert info["executor"] == "ray" and "VLLM_PORT" not in env
    assert env["RAY_ADDRESS"] == "10.0.0.1:6379"


def test_mp_executor_keeps_the_launch_vllm_port(tmp_path):
    argv, env, info = build({"FLEET_TENSOR_PARALLEL_SIZE": "2", "VLLM_FLEET_LAUNCH_ID": "mp-1"},
                            tmp_path)
    assert info["executor"] == "mp" and env["VLLM_PORT"].isdigit()
