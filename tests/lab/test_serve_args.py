"""Unit tests for the image entrypoints' argument building (no lab, no vLLM, no Ray needed)."""
import json
import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "images" / "vllm_fleet" / "src"))

from vllm_fleet import launch  # noqa: E402
from vllm_fleet.entrypoints import merged_env, ray_node, serve  # noqa: E402
from tests.launch_ids import colliding_launch_ids


def ray_cmd(argv, env):
    args = ray_node.parser().parse_args(argv)
    return ray_node.build_command(args, env)


def serve_cmd(argv, env):
    """Build without writing state (as --dry-run)."""
    args = serve.parser().parse_args(argv)
    return serve.build_command(args, env)


def serve_cmd_w(argv, env):
    """Build as fleet-serve does before exec: ports reserved in launch.json (pass --state-dir)."""
    args = serve.parser().parse_args(argv)
    return serve.build_command(args, env, write_state=True)


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


def test_env_file_under_the_container_env(tmp_path):
    """The entrypoints read fabric.env with fabric_env's reader; the container's own env wins."""
    p = tmp_path / "fabric.env"
    p.write_text("# c\nNCCL_SOCKET_IFNAME=fab0\n\nVLLM_HOST_IP=172.28.20.13\nBAD\nX=a=b\n")
    assert merged_env({"X": "mine"}, str(p)) == {"NCCL_SOCKET_IFNAME": "fab0",
                                                  "VLLM_HOST_IP": "172.28.20.13", "X": "mine"}
    assert merged_env({"X": "mine"}, str(tmp_path / "missing")) == {"X": "mine"}


def test_ray_head_binds_node_ip_everywhere():
    argv, env, head, ports = ray_cmd(["--head"], {"FLEET_RAY_NODE_IP": "172.28.20.11"})
    f = flags(argv)
    # `ray start` through our wrapper (ray_start.py lengthens Ray's node-registration wait)
    assert argv[1:5] == ["-m", "vllm_fleet.entrypoints.ray_start", "start", "--block"]
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


def test_ray_node_with_token_auth_needs_a_readable_token_file(tmp_path):
    env = {"FLEET_RAY_NODE_IP": "172.28.20.11", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing"), "HOME": str(tmp_path)}
    with pytest.raises(ValueError, match=f"token file {tmp_path / 'missing'} cannot be read"):
        ray_cmd(["--head"], env)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        ray_cmd(["--head"], dict(env, RAY_AUTH_TOKEN_PATH=str(tmp_path / "empty")))
    (tmp_path / "token").write_text("t0ken" * 8)
    argv, out_env, _, _ = ray_cmd(["--head"], dict(env, RAY_AUTH_TOKEN_PATH=str(tmp_path / "token")))
    # the token stays in its file: Ray reads it there, it is never put in the environment
    assert out_env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in out_env
    assert "t0ken" not in " ".join(argv)


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
    ([], dict(BASE, FLEET_GPU_MEMORY_UTILIZATION="most"), "FLEET_GPU_MEMORY_UTILIZATION.*'most'"),
    (["--nnodes", "2", "--master-addr", "h", "--engine", "cpu", "--pp", "2"],
     dict(BASE, FLEET_MASTER_PORT="x"), "FLEET_MASTER_PORT"),
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


def test_launch_json_through_ensure_launch(tmp_path):
    argv, env, info = serve_cmd_w(["--state-dir", str(tmp_path), "--launch-id", "lab-1-x"], BASE)
    path = tmp_path / "launches" / "lab-1-x" / "launch.json"
    assert info["launch_json"] == str(path)
    doc = json.loads(path.read_text())
    assert doc["launch_id"] == "lab-1-x" and doc["deployment"] == "lab"
    assert set(doc) >= {"host", "created"} and doc["ports"] == info["ports"]
    ports = doc["ports"]
    assert ports["api"] == 8000
    # the launch's block: the hashed one unless something here holds one of its ports
    base = launch.base_port("lab-1-x")
    assert ports["master"] == base or not all(
        launch.port_is_free(p) for p in launch.expand(launch.block_ports(base)))
    assert {n: ports[n] - ports["master"] for n in launch.PORT_NAMES} == launch.OFFSETS
    # vLLM gets the derived ports through its own variables
    assert env["VLLM_PORT"] == str(ports["vllm"]) and env["VLLM_DP_MASTER_PORT"] == str(
        ports["dp_master"])
    assert env["MASTER_PORT"] == str(ports["master"])
    assert env["VLLM_FLEET_FABRIC_PORT"] == str(ports["fabric"])
    # the dp_master run (vLLM keeps VLLM_DP_MASTER_PORT..+9 out of its picks) and the VLLM_PORT
    # run must not overlap, or vLLM would skip its whole VLLM_PORT run
    assert not set(range(ports["dp_master"], ports["dp_master"] + 10)) & set(
        range(ports["vllm"], ports["vllm"] + launch.VLLM_PORT_SPAN))
    assert "--master-port" not in flags(argv)  # single node: vLLM uses no master port
    # the same launch started again (container restart) keeps its ports
    _, _, again = serve_cmd_w(["--state-dir", str(tmp_path), "--launch-id", "lab-1-x"], BASE)
    assert again["ports"] == ports


def test_dry_run_derives_ports_but_writes_nothing(tmp_path, capsys):
    serve.main(["--dry-run", "--state-dir", str(tmp_path), "--launch-id", "lab-2-y"],
               dict(BASE, FLEET_FABRIC_ENV="/none"))
    out = json.loads(capsys.readouterr().out)
    assert out["info"]["launch_json"] is None and not (tmp_path / "launches").exists()
    assert out["env"]["VLLM_PORT"] == str(out["info"]["ports"]["vllm"])


def test_two_launches_on_one_node_get_disjoint_ports(tmp_path):
    a, b = colliding_launch_ids("lab-170000")  # same hashed block: the walk must separate them
    _, env_a, info_a = serve_cmd_w(["--state-dir", str(tmp_path), "--launch-id", a,
                                    "--port", "8001"], BASE)
    _, env_b, info_b = serve_cmd_w(["--state-dir", str(tmp_path), "--launch-id", b,
                                    "--port", "8002"], BASE)
    assert not launch.expand(info_a["ports"]) & launch.expand(info_b["ports"])
    assert env_a["VLLM_PORT"] != env_b["VLLM_PORT"]
    assert (tmp_path / "launches" / a / "launch.json").exists()
    assert (tmp_path / "launches" / b / "launch.json").exists()


def test_relaunch_does_not_wait_on_a_port_the_dead_launch_still_holds(tmp_path):
    dead, new = colliding_launch_ids("lab-170001")
    _, _, info_dead = serve_cmd_w(["--state-dir", str(tmp_path), "--launch-id", dead], BASE)
    # the dead launch is old and has no process left, but an orphan still holds its VLLM_PORT
    path = tmp_path / "launches" / dead / "launch.json"
    doc = json.loads(path.read_text())
    doc["created"] -= 3600
    path.write_text(json.dumps(doc))
    with socket.socket() as held:
        held.bind(("0.0.0.0", info_dead["ports"]["vllm"]))
        held.listen()
        _, env, info = serve_cmd_w(["--state-dir", str(tmp_path), "--launch-id", new], BASE)
    assert info_dead["ports"]["vllm"] not in launch.expand(info["ports"])
    assert int(env["VLLM_PORT"]) != info_dead["ports"]["vllm"]


MULTI = dict(BASE, FLEET_ENGINE="cpu", FLEET_PIPELINE_PARALLEL_SIZE="2", FLEET_NNODES="2",
             FLEET_MASTER_ADDR="172.28.20.11", VLLM_FLEET_LAUNCH_ID="lab-1700000000-mn1")


def test_multinode_master_port_is_derived_the_same_on_every_node(tmp_path):
    lid = MULTI["VLLM_FLEET_LAUNCH_ID"]
    shared = launch.shared_port(lid, "master")
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    # node 1's own block is busy (another live launch reserved it, and a port of it is bound):
    # its local ports walk elsewhere, but the master port it connects to does not
    hashed = launch.block_ports(launch.base_port(lid))
    other = node1 / "launches" / "lab-other" / "launch.json"
    other.parent.mkdir(parents=True)
    other.write_text(json.dumps({"launch_id": "lab-other", "deployment": "lab", "host": "node1",
                                 "created": time.time(), "ports": {"vllm": hashed["vllm"]}}))
    with socket.socket() as held:
        held.bind(("0.0.0.0", hashed["dp_master"]))
        argv1, env1, info1 = serve_cmd_w(["--node-rank", "1", "--state-dir", str(node1)],
                                         dict(MULTI, FLEET_NODE_NAME="node1"))
    argv0, env0, info0 = serve_cmd_w(["--node-rank", "0", "--state-dir", str(node0)],
                                     dict(MULTI, FLEET_NODE_NAME="node0"))
    assert flags(argv0)["--master-port"] == flags(argv1)["--master-port"] == str(shared)
    assert info0["ports"]["master"] == info1["ports"]["master"] == shared
    assert env0["MASTER_PORT"] == env1["MASTER_PORT"] == str(shared)
    assert int(env1["VLLM_PORT"]) != hashed["vllm"]  # node 1 walked for its local ports
    assert not set(range(hashed["vllm"], hashed["vllm"] + 16)) & launch.expand(
        {k: v for k, v in info1["ports"].items() if k != "master"})
    assert "api" not in info1["ports"] and info0["ports"]["api"] == 8000  # headless: no API
    saved = json.loads((node1 / "launches" / lid / "launch.json").read_text())
    assert saved["ports"]["master"] == shared


def test_multinode_rank0_fails_naming_the_port_when_the_derived_master_is_busy(tmp_path):
    lid = MULTI["VLLM_FLEET_LAUNCH_ID"]
    shared = launch.shared_port(lid, "master")
    with socket.socket() as held:
        held.bind(("0.0.0.0", shared))
        held.listen()
        with pytest.raises(ValueError) as exc:
            serve_cmd_w(["--node-rank", "0", "--state-dir", str(tmp_path)],
                        dict(MULTI, FLEET_NODE_NAME="node0"))
        # rank 1 does not bind it and is not checked
        serve_cmd_w(["--node-rank", "1", "--state-dir", str(tmp_path / "n1")], MULTI)
    msg = str(exc.value)
    assert f"master port {shared}" in msg and "host node0" in msg and lid in msg
    assert "FLEET_MASTER_PORT" in msg
    assert not (tmp_path / "launches" / lid).exists()  # nothing written for a refused launch


def test_multinode_explicit_master_port_wins_on_every_node(tmp_path):
    with socket.socket() as held:  # explicit: not checked (the cleanup may still free it)
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        env = dict(MULTI, FLEET_MASTER_PORT=str(port))
        argv0, env0, info0 = serve_cmd_w(["--node-rank", "0", "--state-dir", str(tmp_path)], env)
    argv1, _, _ = serve_cmd_w(["--node-rank", "1", "--state-dir", str(tmp_path / "n1")], env)
    assert flags(argv0)["--master-port"] == flags(argv1)["--master-port"] == str(port)
    assert info0["ports"]["master"] == port and env0["MASTER_PORT"] == str(port)
    saved = json.loads((tmp_path / "launches" / MULTI["VLLM_FLEET_LAUNCH_ID"] /
                        "launch.json").read_text())
    assert saved["ports"]["master"] == port
    # 0 / empty: derived
    argv, _, _ = serve_cmd(["--node-rank", "1"], dict(MULTI, FLEET_MASTER_PORT="0"))
    assert flags(argv)["--master-port"] == str(launch.shared_port(MULTI["VLLM_FLEET_LAUNCH_ID"]))


def test_explicit_vllm_port_in_the_environment_is_kept(tmp_path):
    _, env, info = serve_cmd_w(["--state-dir", str(tmp_path)], dict(BASE, VLLM_PORT="31000"))
    assert env["VLLM_PORT"] == "31000" and info["ports"]["vllm"] == 31000
