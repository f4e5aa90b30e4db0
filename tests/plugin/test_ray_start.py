"""entrypoints/ray_start.py: Ray's start-up waits made to survive a busy host, against Ray's own
code (the engine venv's Ray, the version the images pin)."""

import shutil
import socket
import subprocess
import tempfile
import time

import pytest
from conftest import ENGINE_PY, ENGINE_VENV, child_env, engine_has
from tests.engine_parts import free_port, kill_session

from vllm_fleet.entrypoints import ray_node
from vllm_fleet.entrypoints.ray_start import (RayProcessExited, pass_listen_port, patient_get_node,
                                              raylet_command)


def test_waits_past_rays_30s_until_the_node_registers():
    clock = [0.0]
    calls = []

    def get_node(gcs_address, node_id):
        calls.append(clock[0])
        if clock[0] < 45:  # registers after 45 s: Ray's own loop gave up at 30 s
            raise RuntimeError("node info not available")
        return {"node_id": node_id}

    def sleep(s):
        clock[0] += s
    f = patient_get_node(get_node, 300, sleep=sleep, clock=lambda: clock[0])
    assert f("gcs:6379", "n1") == {"node_id": "n1"} and clock[0] >= 45


def test_gives_up_at_its_own_deadline():
    clock = [0.0]

    def get_node(*_):
        raise RuntimeError("never")

    def sleep(s):
        clock[0] += s
    f = patient_get_node(get_node, 10, sleep=sleep, clock=lambda: clock[0])
    with pytest.raises(RuntimeError):
        f("gcs", "n")
    assert 10 <= clock[0] < 11


def test_a_process_of_the_node_that_exited_ends_the_wait_at_once():
    clock = [0.0]
    gone = [[], [], ["raylet"]]  # the raylet aborts between the 2nd and 3rd attempt

    def get_node(*_):
        raise RuntimeError("node info not available")

    def sleep(s):
        clock[0] += s
    f = patient_get_node(get_node, 300, sleep=sleep, clock=lambda: clock[0], exited=lambda: gone.pop(0))
    with pytest.raises(RayProcessExited, match="raylet exited while this node started"):
        f("gcs", "n")
    assert clock[0] == 1.0  # two pauses, not the 300 s deadline


AGENT = "--dashboard_agent_command=/venv/bin/python -u /r/dashboard/agent.py --listen-port=52365 --grpc-port=1"


def test_the_raylet_is_given_the_agents_listen_port():
    assert raylet_command(["raylet", AGENT]) == ["raylet", AGENT, "--dashboard_agent_listen_port=52365"]
    # Ray passing it itself one day, or an agent without a fixed port: left as Ray made it
    given = ["raylet", AGENT, "--dashboard_agent_listen_port=7"]
    assert raylet_command(given) == given
    dynamic = ["raylet", AGENT.replace("52365", "0")]
    assert raylet_command(dynamic) == dynamic
    started = []
    start = pass_listen_port(lambda command, kind, **kw: started.append((kind, command)))
    start(["raylet", AGENT], "raylet", fate_share=True)
    start(["gcs_server", AGENT], "gcs_server")
    assert started == [("raylet", ["raylet", AGENT, "--dashboard_agent_listen_port=52365"]),
                       ("gcs_server", ["gcs_server", AGENT])]


def test_rays_start_up_code_still_has_what_the_wrapper_changes():
    """The raylet flag goes in through services.start_ray_process, which start_raylet calls by
    module attribute with the process type second and a command that names the agent's command;
    the exited processes come from the Node that start_ray_processes starts. A Ray upgrade that
    changes any of it fails here instead of silently bringing back the aborting raylet."""
    if not engine_has("ray"):
        pytest.fail(f"needs ray in the engine venv {ENGINE_VENV} (tools/bootstrap.sh engine)")
    code = ("import inspect, ray._private.node as n, ray._private.services as s\n"
            "raylet = inspect.getsource(s.start_raylet)\n"
            "init = inspect.getsource(n.Node.__init__)\n"
            "print(all(['start_ray_process(\\n        command,\\n        ray_constants.PROCESS_TYPE_RAYLET' in raylet,\n"
            "           '--dashboard_agent_command=' in raylet, '--dashboard_agent_listen_port' not in raylet,\n"
            "           'self.start_ray_processes()' in init, callable(n.Node.dead_processes),\n"
            "           'dashboard_agent_listen_port' in open(s.RAYLET_EXECUTABLE, 'rb').read().decode('latin-1')]))")
    out = subprocess.run([str(ENGINE_PY), "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stdout + out.stderr


def test_ray_start_ends_when_its_raylet_dies_during_start_up(tmp_path):
    """The real `ray start` through the wrapper, its raylet made to die at start-up (its node
    manager port is taken): `ray start` fails naming the raylet, long before the registration
    deadline (FLEET_RAY_REGISTER_TIMEOUT, 600 s here), where it used to wait for a dead raylet."""
    if not engine_has("ray"):
        pytest.fail(f"needs ray in the engine venv {ENGINE_VENV} (tools/bootstrap.sh engine)")
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # Ray's socket paths must stay short
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    argv = [str(ENGINE_PY), "-m", "vllm_fleet.entrypoints.ray_start", "start", "--block", "--head",
            "--node-ip-address", "127.0.0.1", "--port", str(free_port()), "--include-dashboard", "false",
            "--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats", "--include-log-monitor", "false",
            "--object-store-memory", "80000000", "--temp-dir", ray_tmp,
            "--node-manager-port", str(taken.getsockname()[1]),
            "--object-manager-port", str(free_port()), "--ray-client-server-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())]
    env = child_env(RAY_USAGE_STATS_ENABLED=0, FLEET_RAY_REGISTER_TIMEOUT=600, HOME=str(tmp_path))
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=700)
    finally:
        kill_session(proc.pid)
        taken.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    took = time.monotonic() - started
    assert proc.returncode != 0, out[-3000:]
    assert "RayProcessExited: Ray's raylet exited while this node started" in out, out[-3000:]
    assert "timed out during startup" not in out and took < 600, (took, out[-3000:])


def test_rays_node_startup_still_calls_get_node_by_module_attribute():
    """The wrapper only works while Ray's Node looks get_node up on the services module at call
    time, inside its startup loop: check Ray's own source (the engine venv's Ray, the version the
    images pin), so a Ray upgrade that changes it fails here instead of silently bringing back
    the 30 s limit."""
    if not engine_has("ray"):
        pytest.fail(f"needs ray in the engine venv {ENGINE_VENV} (tools/bootstrap.sh engine)")
    code = ("import inspect, ray._private.node as n; s = inspect.getsource(n.Node.__init__); "
            "print('ray._private.services.get_node(' in s and 'raylet_start_wait_time_s' in s)")
    out = subprocess.run([str(ENGINE_PY), "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stdout + out.stderr


def test_fleet_ray_node_runs_ray_start_through_the_wrapper():
    args = ray_node.parser().parse_args(["--head", "--node-ip", "10.0.0.5"])
    argv, _, _, _ = ray_node.build_command(args, {})
    assert argv[1:4] == ["-m", "vllm_fleet.entrypoints.ray_start", "start"]
