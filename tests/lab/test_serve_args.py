"""Unit tests for the image entrypoints' argument building (no lab, no vLLM, no Ray needed)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "images" / "vllm_fleet" / "src"))

from vllm_fleet.entrypoints import ray_node, read_env_file, serve  # noqa: E402


def ray_cmd(argv, env):
    args = ray_node.parser().parse_args(argv)
    return ray_node.build_command(args, env)


def serve_cmd(argv, env):
    args = serve.parser().parse_args(argv)
    return serve.build_command(args, env)


def flags(argv):
    """--key=value and --key value pairs into a dict (first wins)."""
    out, i = {}, 0
    while i < len(argv):
        item = argv[i]
        if item.startswith("--") and "=" in item:
            key, value = item.split("=", 1)
            out.setdefault(key, value)
        elif item.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.setdefault(item, argv[i + 1])
            i += 1
        elif item.startswith("--"):
            out.setdefault(item, True)
        i += 1
    return out


def test_env_file(tmp_path):
    p = tmp_path / "fabric.env"
    p.write_text("# c\nNCCL_SOCKET_IFNAME=fab0\n\nVLLM_HOST_IP=172.28.20.13\nBAD\nX=a=b\n")
    assert read_env_file(p) == {"NCCL_SOCKET_IFNAME": "fab0", "VLLM_HOST_IP": "172.28.20.13",
                                "X": "a=b"}
    assert read_env_file(tmp_path / "missing") == {}


def test_ray_head_binds_node_ip_everywhere():
    argv, env, head, ports = ray_cmd(["--head"], {"FLEET_RAY_NODE_IP": "172.28.20.11"})
    f = flags(argv)
    assert argv[:3] == ["ray", "start", "--block"]
    assert f["--node-ip-address"] == "172.28.20.11"
    assert f["--dashboard-host"] == "172.28.20.11"
    assert "0.0.0.0" not in " ".join(argv)
    assert f["--port"] == "6379" and f["--dashboard-port"] == "8265"
    for flag in ("--node-manager-port", "--object-manager-port", "--ray-client-server-port",
                 "--min-worker-port", "--max-worker-port", "--metrics-export-port",
                 "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--runtime-env-agent-port"):
        assert flag in f, flag
    assert env["RAY_NODE_IP_ADDRESS"] == "172.28.20.11" and head == "172.28.20.11"


def test_ray_node_ip_falls_back_to_vllm_host_ip_and_file(tmp_path):
    p = tmp_path / "fabric.env"
    p.write_text("VLLM_HOST_IP=172.28.20.12\n")
    args = ray_node.parser().parse_args(["--worker", "--head-address", "172.28.20.11",
                                         "--fabric-env", str(p), "--num-cpus", "2"])
    env = ray_node.merged_env({}, args.fabric_env)
    argv, _, _, _ = ray_node.build_command(args, env)
    f = flags(argv)
    assert f["--node-ip-address"] == "172.28.20.12"
    assert f["--address"] == "172.28.20.11:6379"
    assert f["--num-cpus"] == "2"
    assert "--head" not in argv and "--dashboard-host" not in f and "--dashboard-port" not in f


def test_ray_ports_from_env_and_flags():
    env = {"VLLM_HOST_IP": "10.0.0.1", "FLEET_RAY_PORT": "7000", "FLEET_RAY_NODE_MANAGER_PORT": "7001"}
    argv, _, _, _ = ray_cmd(["--head", "--object-manager-port", "7002", "--num-gpus", "8"], env)
    f = flags(argv)
    assert f["--port"] == "7000" and f["--node-manager-port"] == "7001"
    assert f["--object-manager-port"] == "7002" and f["--num-gpus"] == "8"


@pytest.mark.parametrize("argv,env,msg", [
    (["--head"], {}, "no node IP"),
    (["--head"], {"VLLM_HOST_IP": "0.0.0.0"}, "wildcard"),
    (["--worker"], {"VLLM_HOST_IP": "10.0.0.2"}, "head-address"),
    (["--head", "--", "--dashboard-host=0.0.0.0"], {"VLLM_HOST_IP": "10.0.0.1"}, "refusing"),
])
def test_ray_bad_settings(argv, env, msg):
    with pytest.raises(ValueError, match=msg):
        ray_cmd(argv, env)


def test_ray_worker_unreachable_head_exits_3(capsys):
    with pytest.raises(SystemExit) as exc:
        ray_node.main(["--worker", "--head-address", "127.0.0.1", "--port", "1",
                       "--connect-timeout", "0"], {"VLLM_HOST_IP": "127.0.0.1",
                                                   "FLEET_FABRIC_ENV": "/nonexistent"})
    assert exc.value.code == 3
    assert "cannot reach the Ray head 127.0.0.1:1" in capsys.readouterr().err


BASE = {"FLEET_MODEL_PATH": "/var/lib/vllm-fleet/models/tiny", "VLLM_FLEET_DEPLOYMENT": "lab"}


def test_serve_single_node_cuda():
    argv, env, info = serve_cmd(["--served-model-name", "tiny", "--tp", "4",
                                 "--gpu-memory-utilization", "0.85", "--max-model-len", "2048",
                                 "--quantization", "gptq_marlin"], BASE)
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    f = flags(argv)
    assert f["--model"] == BASE["FLEET_MODEL_PATH"] and f["--served-model-name"] == "tiny"
    assert f["--tensor-parallel-size"] == "4" and f["--pipeline-parallel-size"] == "1"
    assert f["--gpu-memory-utilization"] == "0.85" and f["--max-model-len"] == "2048"
    assert f["--quantization"] == "gptq_marlin" and f["--distributed-executor-backend"] == "mp"
    assert f["--host"] == "0.0.0.0" and f["--port"] == "8000"
    assert env["VLLM_FLEET_DEPLOYMENT"] == "lab"
    assert env["VLLM_FLEET_LAUNCH_ID"].startswith("lab-") and info["executor"] == "mp"
    assert env["VLLM_FLEET_STATE_DIR"] == "/run/vllm-fleet"


def test_serve_gpu_ray_executor_tp_within_pp_across():
    env = dict(BASE, FLEET_TENSOR_PARALLEL_SIZE="4", FLEET_PIPELINE_PARALLEL_SIZE="2",
               FLEET_RAY_ADDRESS="172.28.20.11:6379", VLLM_FLEET_LAUNCH_ID="lab-1-abc")
    argv, out, info = serve_cmd([], env)
    f = flags(argv)
    assert f["--distributed-executor-backend"] == "ray" and "--nnodes" not in f
    assert f["--tensor-parallel-size"] == "4" and f["--pipeline-parallel-size"] == "2"
    assert out["RAY_ADDRESS"] == "172.28.20.11:6379" and out["VLLM_FLEET_LAUNCH_ID"] == "lab-1-abc"


def test_serve_cpu_multinode_rank0_and_headless_rank1():
    env = dict(BASE, FLEET_ENGINE="cpu", FLEET_PIPELINE_PARALLEL_SIZE="2", FLEET_NNODES="2",
               FLEET_MASTER_ADDR="172.28.20.11", FLEET_MASTER_PORT="29501",
               FLEET_CPU_KVCACHE_GIB="1", FLEET_CPU_OMP_THREADS_BIND="0|1",
               FLEET_GPU_MEMORY_UTILIZATION="0.9")
    argv0, env0, info0 = serve_cmd(["--node-rank", "0"], env)
    f0 = flags(argv0)
    assert argv0[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert f0["--nnodes"] == "2" and f0["--node-rank"] == "0"
    assert f0["--master-addr"] == "172.28.20.11" and f0["--master-port"] == "29501"
    assert f0["--distributed-executor-backend"] == "mp" and "--headless" not in f0
    assert "--gpu-memory-utilization" not in f0  # cpu engine: KV cache comes from the env below
    assert env0["VLLM_CPU_KVCACHE_SPACE"] == "1" and env0["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    argv1, _, info1 = serve_cmd(["--node-rank", "1"], env)
    f1 = flags(argv1)
    assert argv1[1:3] == ["-m", "vllm_fleet.entrypoints.vllm_headless"]
    assert f1["--headless"] is True and "--port" not in f1 and f1["--node-rank"] == "1"
    assert info1["headless"] and not info0["headless"]


def test_serve_api_key_from_file_not_argv(tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    argv, env, _ = serve_cmd(["--api-key-file", str(key)], BASE)
    assert "s3cret" not in " ".join(argv) and env["VLLM_API_KEY"] == "s3cret"


def test_serve_extra_args_env_and_cli():
    env = dict(BASE, FLEET_EXTRA_ARGS=json.dumps(["--enforce-eager", "--seed", "1"]))
    argv, _, _ = serve_cmd(["--", "--max-num-seqs", "4"], env)
    assert argv[-5:] == ["--enforce-eager", "--seed", "1", "--max-num-seqs", "4"]


@pytest.mark.parametrize("argv,env,msg", [
    ([], {}, "no model"),
    (["--engine", "cpu", "--executor", "ray"], BASE, "cannot use the Ray executor"),
    (["--nnodes", "2", "--engine", "cpu"], BASE, "master-addr"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h", "--engine", "cpu", "--pp", "2"],
     BASE, "outside"),
    (["--nnodes", "2", "--master-addr", "h", "--engine", "cpu", "--pp", "3"], BASE, "divide"),
    (["--gpu-memory-utilization", "1.5"], BASE, r"\(0, 1\]"),
    (["--", "--api-key", "x"], BASE, "api-key-file"),
    (["--api-key-file", "/nonexistent/key"], BASE, "cannot read API key"),
])
def test_serve_bad_settings(argv, env, msg):
    with pytest.raises(ValueError, match=msg):
        serve_cmd(argv, env)


def test_serve_dry_run_redacts_key(tmp_path, capsys):
    key = tmp_path / "key"
    key.write_text("s3cret")
    serve.main(["--dry-run", "--api-key-file", str(key)], dict(BASE, FLEET_FABRIC_ENV="/none"))
    out = json.loads(capsys.readouterr().out)
    assert out["env"]["VLLM_API_KEY"] == "<redacted>" and "s3cret" not in json.dumps(out)


def test_launch_json(tmp_path):
    _, env, info = serve_cmd(["--state-dir", str(tmp_path), "--launch-id", "lab-1-x"], BASE)
    path = serve.write_launch_json(info, env)
    doc = json.loads(Path(path).read_text())
    assert doc["launch_id"] == "lab-1-x" and doc["deployment"] == "lab"
    assert doc["ports"] == {"api": 8000} and set(doc) >= {"host", "created"}
