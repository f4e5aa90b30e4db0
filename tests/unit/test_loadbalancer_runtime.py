"""A REAL haproxy, configured by the loadbalancer role, in front of two fake_vllm backends on localhost.

Proves: the fleet_haproxy_server module (directly and through the role's server_state.yml under
ansible-playbook, incl. --check) drains / maints / readies a server idempotently; a replica that is
drained, restarted and put back costs zero failed requests under load (real OpenAI client); a dead
server that HAProxy still believes UP is retried on the other replica; rolling_restart.yml itself
(stub start role, stub docker) restarts both replicas under load with zero failed requests, and a
replica that fails its canary stays out while the other keeps serving; deploy.yml's balancer stage
puts back only the replicas its serve stage smoke-tested; the role's own handlers save the drain
and reload HAProxy, and the drain survives the reload.

Stand-ins, each for what cannot run in the unit tier: fake_vllm (restarts in seconds and counts
what each backend served; the real engines' rolling restart is the lab's day-2 test), stub_docker
and a stub start role (no serving containers on the controller), stub_systemctl (no systemd here).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.unit.fake_vllm import FakeVLLM, free_port
from tests.unit.test_loadbalancer_config import RENDER_PLAYBOOK, render_config

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="haproxy is not installed (tests/requirements-apt.txt lists it)")


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


haproxy_module = load("fleet_haproxy_server", REPO / "roles/loadbalancer/library/fleet_haproxy_server.py")
loadgen = load("loadgen", REPO / "tools/loadgen.py")


class Balancer:
    """A real HAProxy in master-worker mode with the role's configuration (Debian's haproxy.service
    runs it master-worker too, -Ws, and reloads it by SIGUSR2 to the master)."""

    def __init__(self, tmp: Path, backends: dict[str, FakeVLLM], head_vars: dict[str, str] | None = None,
                 **overrides):
        self.tmp = tmp
        self.port, self.stats_port = free_port(), free_port()
        self.socket = str(tmp / "admin.sock")
        self.backends = backends
        self.overrides = dict(dict(loadbalancer_frontend_port=self.port, loadbalancer_stats_port=self.stats_port,
                                   loadbalancer_frontend_address="127.0.0.1", loadbalancer_check_interval="500ms",
                                   loadbalancer_check_rise=1, loadbalancer_tls=False), **overrides)
        self.config = render_config(tmp, {r: ("127.0.0.1", b.port) for r, b in backends.items()},
                                    head_vars=head_vars, **self.overrides)
        self.inventory = tmp / "inventory.ini"
        self.pidfile = tmp / "haproxy.pid"
        self.proc = subprocess.Popen(["haproxy", "-W", "-db", "-p", str(self.pidfile), "-f", str(tmp / "haproxy.cfg")],
                                     stdout=open(tmp / "haproxy.log", "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120  # a busy machine: health checks every 500 ms
        while time.monotonic() < deadline:
            try:
                # UP after a passed check (L7OK), not only HAProxy's initial UP: a server that has
                # never passed one goes DOWN on its first failed check.
                if all(s["status"].startswith("UP") and s["check_status"] == "L7OK" for s in self.servers().values()):
                    return
            except (haproxy_module.RuntimeApiError, KeyError):
                pass
            time.sleep(0.2)
        raise AssertionError("haproxy did not come up with both servers UP:\n" + (tmp / "haproxy.log").read_text())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def servers(self) -> dict:
        return haproxy_module.describe(self.socket, "vllm")

    def worker_pid(self) -> int:
        info = haproxy_module.command(self.socket, "show info")
        return int(next(line.split(":", 1)[1] for line in info.splitlines() if line.startswith("Pid:")))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def fleet(tmp_path):
    backends = {"r1": FakeVLLM("r1").start(), "r2": FakeVLLM("r2").start()}
    balancer = Balancer(tmp_path, backends)
    yield balancer, backends
    balancer.stop()
    for b in backends.values():
        b.stop()


def chat(url: str, stream: bool = False) -> requests.Response:
    return requests.post(f"{url}/v1/chat/completions", timeout=60,
                         json={"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}],
                               "max_tokens": 4, "stream": stream})


SERVER_STATE_PLAYBOOK = """
- name: Set a server's state through the role
  hosts: fleet_head
  gather_facts: false
  tasks:
    - name: Change it
      ansible.builtin.include_role:
        name: loadbalancer
        tasks_from: server_state.yml
      vars:
        loadbalancer_server_name: "{{ server }}"
        loadbalancer_server_state: "{{ state }}"
        loadbalancer_server_wait_sessions_zero: "{{ state == 'drain' }}"
        loadbalancer_server_wait_up: "{{ state == 'ready' }}"
        loadbalancer_server_timeout: 30
      when: inventory_hostname == groups['fleet_head'][0]
"""


def set_state(balancer: Balancer, server: str, state: str, *extra: str) -> subprocess.CompletedProcess:
    playbook = balancer.tmp / "server_state.yml"
    playbook.write_text(SERVER_STATE_PLAYBOOK)
    proc = subprocess.run(["ansible-playbook", "-i", str(balancer.inventory), str(playbook),
                           "-e", f"server={server}", "-e", f"state={state}", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    return proc


def changed(proc: subprocess.CompletedProcess) -> int:
    return sum(int(m) for m in re.findall(r"changed=(\d+)", proc.stdout))


def test_module_reads_and_sets_states_idempotently_through_ansible(fleet):
    balancer, _ = fleet
    servers = balancer.servers()
    assert {n: (s["admin_state"], s["status"].split()[0], s["backup"]) for n, s in servers.items()} == {
        "r1": ("ready", "UP", False), "r2": ("ready", "UP", False),
        "r1-fallback": ("ready", "UP", True), "r2-fallback": ("ready", "UP", True)}
    assert set_state(balancer, "r1", "drain", "--check") and balancer.servers()["r1"]["admin_state"] == "ready", \
        "--check changes nothing"
    # a replica's backup entry (loadbalancer_verdict_fallback) follows its server
    assert changed(set_state(balancer, "r1", "drain")) == 1
    assert [balancer.servers()[n]["admin_state"] for n in ("r1", "r1-fallback", "r2-fallback")] == \
        ["drain", "drain", "ready"]
    assert changed(set_state(balancer, "r1", "drain")) == 0, "idempotent"
    assert changed(set_state(balancer, "r1", "maint")) == 1
    assert balancer.servers()["r1"]["status"] == "MAINT" and balancer.servers()["r1-fallback"]["status"] == "MAINT"
    assert changed(set_state(balancer, "r1", "ready")) == 1
    assert balancer.servers()["r1"]["status"] == "UP"
    assert changed(set_state(balancer, "r1", "ready")) == 0


def test_module_names_an_unknown_server(fleet):
    balancer, _ = fleet
    playbook = balancer.tmp / "server_state.yml"
    playbook.write_text(SERVER_STATE_PLAYBOOK)
    proc = subprocess.run(["ansible-playbook", "-i", str(balancer.inventory), str(playbook),
                           "-e", "server=r9", "-e", "state=drain"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "has no server 'r9' (it has: r1, r1-fallback, r2, r2-fallback)" in proc.stdout


READY_PROVEN_PLAYBOOK = """
- name: What the serve stage leaves on the heads it smoke-tested (here head-r1 passed, head-r2 was not tested)
  hosts: fleet_head
  gather_facts: false
  tasks:
    - name: Record the smoke test's result the way smoke.yml registers it
      ansible.builtin.set_fact:
        _vllm_serve_smoke: {rc: 0}
      when: inventory_hostname == 'head-r1'
- name: The balancer converges
  hosts: fleet_loadbalancer
  gather_facts: false
  tasks:
    - name: Put back replicas this run proved serving
      ansible.builtin.include_role:
        name: loadbalancer
        tasks_from: ready_proven.yml
"""


def test_deploy_puts_back_only_the_replicas_its_smoke_test_proved(fleet):
    balancer, _ = fleet
    for server in ("r1", "r2", "r1-fallback", "r2-fallback"):  # left out by an interrupted rolling restart
        haproxy_module.command(balancer.socket, f"set server vllm/{server} state maint")
    playbook = balancer.tmp / "ready_proven.yml"
    playbook.write_text(READY_PROVEN_PLAYBOOK)

    def converge():
        proc = subprocess.run(["ansible-playbook", "-i", str(balancer.inventory), str(playbook)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
        return proc

    first = converge()
    servers = balancer.servers()
    assert (servers["r1"]["admin_state"], servers["r1"]["status"]) == ("ready", "UP"), "waited until UP"
    assert servers["r2"]["status"] == "MAINT", "a replica this run did not test keeps its state"
    assert servers["r1-fallback"]["admin_state"] == "ready" and servers["r2-fallback"]["status"] == "MAINT"
    assert changed(first) == 1 and changed(converge()) == 0


# stub_systemctl: no systemd runs on the controller. It answers `systemctl show haproxy` as systemd
# would for a running unit and reloads like Debian's haproxy.service (ExecReload: SIGUSR2 to the
# master), so that the role's real handlers run unchanged.
STUB_SYSTEMCTL = """#!/bin/sh
case "$1" in
  show) printf 'Id=haproxy.service\\nLoadState=loaded\\nActiveState=active\\nSubState=running\\nMainPID=%s\\n' "$(cat {pidfile})" ;;
  reload) kill -USR2 "$(cat {pidfile})" ;;
  *) echo "stub_systemctl: $* is not stubbed" >&2; exit 1 ;;
esac
"""


def test_drained_server_gets_no_new_requests_and_state_survives_the_roles_reload(fleet):
    """The role's own handlers (save the servers' state, then reload) on a configuration change:
    the drained replica stays drained in the reloaded HAProxy."""
    balancer, backends = fleet
    haproxy_module.command(balancer.socket, "set server vllm/r1 state drain")
    for _ in range(10):
        response = chat(balancer.url)
        assert response.status_code == 200 and response.headers["x-fake-backend"] == "r2"
    old_worker = balancer.worker_pid()
    (balancer.tmp / "bin").mkdir(exist_ok=True)
    systemctl = balancer.tmp / "bin" / "systemctl"
    systemctl.write_text(STUB_SYSTEMCTL.format(pidfile=balancer.pidfile))
    systemctl.chmod(0o755)
    playbook = balancer.tmp / "reconfigure.yml"  # the role's config.yml: its template notifies the handlers
    playbook.write_text(RENDER_PLAYBOOK)
    env = dict(os.environ, PATH=f"{balancer.tmp / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert not (balancer.tmp / "server-state").exists()
    proc = subprocess.run(["ansible-playbook", "-i", str(balancer.inventory), str(playbook), "-e",
                           '{"loadbalancer_service_managed": true, "loadbalancer_timeout_queue": "61s"}'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert "RUNNING HANDLER [loadbalancer : Save the servers' drain/maint state" in proc.stdout
    assert "RUNNING HANDLER [loadbalancer : Reload HAProxy" in proc.stdout
    saved = (balancer.tmp / "server-state").read_text()
    assert re.search(r"^\d+ vllm \d+ r1 ", saved, re.M), saved  # the handler saved the backend's servers
    assert "timeout queue 61s" in (balancer.tmp / "haproxy.cfg").read_text()
    deadline, worker = time.monotonic() + 120, old_worker
    while worker == old_worker and time.monotonic() < deadline:  # the reload's new worker
        try:
            worker = balancer.worker_pid()
        except (haproxy_module.RuntimeApiError, OSError, StopIteration):
            pass
        time.sleep(0.2)
    assert worker != old_worker, "HAProxy did not reload"
    assert balancer.servers()["r1"]["admin_state"] == "drain", "the drain did not survive the reload"
    assert balancer.servers()["r2"]["admin_state"] == "ready"


def run_load(url: str, seconds: float, concurrency: int = 4) -> tuple[threading.Thread, dict]:
    out: dict = {}
    gen = loadgen.LoadGenerator(loadgen.Config(base_url=url + "/v1", model="tiny-llama", requests=100000,
                                               duration=seconds, concurrency=concurrency, stream_ratio=0.5,
                                               max_tokens=8, timeout=20))
    thread = threading.Thread(target=lambda: out.update(gen.run()), daemon=True)
    thread.start()
    out["_gen"] = gen
    return thread, out


def wait_served(backend: FakeVLLM, more_than: int, what: str, timeout: float = 120) -> None:
    """Until the backend has served more than `more_than` requests (load reaches it)."""
    deadline = time.monotonic() + timeout
    while backend.served <= more_than:
        assert time.monotonic() < deadline, f"{what}: {backend.name} served {backend.served} after {timeout:.0f}s"
        time.sleep(0.1)


def test_drain_restart_ready_under_load_has_zero_failed_requests(fleet):
    balancer, backends = fleet
    thread, result = run_load(balancer.url, seconds=900)  # stopped below
    for backend in backends.values():
        wait_served(backend, 0, "load on both replicas")
    set_state(balancer, "r1", "drain")  # waits for r1's sessions to reach 0
    assert backends["r1"].running == 0
    set_state(balancer, "r1", "maint")
    served_before = backends["r1"].served
    backends["r1"].restart(down_s=1.5)   # the engine goes away and comes back
    deadline = time.monotonic() + 60
    while requests.get(backends["r1"].url + "/health", timeout=30).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    set_state(balancer, "r1", "ready")   # waits until HAProxy sees it UP
    wait_served(backends["r1"], served_before, "r1 back in rotation")
    result["_gen"].stop_event.set()
    thread.join(60)
    assert not thread.is_alive()
    assert result["failed"] == 0, result["errors"]
    assert result["ok"] > 20 and result["stream"] > 0 and result["non_stream"] > 0
    assert backends["r1"].served > served_before, "r1 took traffic again after it was put back"


def assert_all_served_by(balancer, name: str, requests: int = 12) -> None:
    """Chats through the balancer, streamed and not in turn: every one 200, from replica `name`."""
    for i in range(requests):
        response = chat(balancer.url, stream=bool(i % 2))
        assert response.status_code == 200, response.text
        assert response.headers["x-fake-backend"] == name


def test_dead_server_still_believed_up_is_retried_on_the_other_replica(tmp_path):
    backends = {"r1": FakeVLLM("r1").start(), "r2": FakeVLLM("r2").start()}
    # Slow health checks: HAProxy keeps r1 UP for a while after it dies. Balancer returns just after
    # both passed their first check (health rise+1 of rise+fall-1, checks 30 s apart): r1 stays UP
    # (at most "UP 1/3", still in rotation) for at least 60 s after it dies, whatever the load.
    balancer = Balancer(tmp_path, backends, loadbalancer_check_interval="30s")
    try:
        backends["r1"].stop()
        assert balancer.servers()["r1"]["status"].startswith("UP")
        assert_all_served_by(balancer, "r2")
        assert balancer.servers()["r1"]["status"].startswith("UP"), \
            "HAProxy noticed the death meanwhile: nothing was retried"
    finally:
        balancer.stop()
        backends["r2"].stop()


def test_engine_dead_500_is_retried_on_the_other_replica(tmp_path):
    """vLLM's API server answers HTTP 500 at once ("EngineCore encountered an issue") while its
    engine core is dead, for the seconds before the verdict takes the replica out; /health may still
    say 200. HAProxy retries such a request on another replica (retry-on 500), before any byte of it
    reached the client. (Seen on the lab: kill -9 of the engine core failed 3 requests in 4.6 s.)"""
    backends = {"r1": FakeVLLM("r1").start(), "r2": FakeVLLM("r2").start()}
    balancer = Balancer(tmp_path, backends, loadbalancer_check_interval="30s")
    try:
        backends["r1"].fail_status = 500
        assert_all_served_by(balancer, "r2")
        assert balancer.servers()["r1"]["status"].startswith("UP"), \
            "r1 left rotation meanwhile: the requests were not retried, only routed elsewhere"
    finally:
        balancer.stop()
        for backend in backends.values():
            backend.stop()


STUB_DOCKER = """#!/bin/sh
# stub_docker: no fleet container exists here; images all have the same ID.
case "$1" in
  ps) exit 0 ;;
  image|inspect) echo sha256:stub; exit 0 ;;
  *) exit 0 ;;
esac
"""

STUB_START_ROLE = """---
- name: Restart the fake engine of this replica (stands in for the serving roles)
  ansible.builtin.uri:
    url: "http://127.0.0.1:{{ fleet_api_port }}/fake/restart"
    method: POST
    body_format: json
    body: {down_s: 1.5}
  when: inventory_hostname in groups['fleet_head']
"""


def rolling_restart(balancer: Balancer, *extra: str) -> subprocess.CompletedProcess:
    tmp = balancer.tmp
    (tmp / "bin").mkdir(exist_ok=True)
    (tmp / "bin/docker").write_text(STUB_DOCKER)
    (tmp / "bin/docker").chmod(0o755)
    role = tmp / "roles/stub_start/tasks"
    role.mkdir(parents=True, exist_ok=True)
    (role / "main.yml").write_text(STUB_START_ROLE)
    env = dict(os.environ, PATH=f"{tmp / 'bin'}{os.pathsep}{os.environ['PATH']}",
               ANSIBLE_ROLES_PATH=f"{tmp / 'roles'}{os.pathsep}{REPO / 'roles'}")
    return subprocess.run(["ansible-playbook", "-i", str(balancer.inventory), str(REPO / "rolling_restart.yml"),
                           "-e", '{"rolling_restart_start_roles": ["stub_start"]}',
                           "-e", "rolling_restart_health_timeout=30", "-e", "rolling_restart_drain_timeout=30",
                           *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_rolling_restart_playbook_under_load_zero_failed_and_a_failed_gate_keeps_the_replica_out(fleet):
    balancer, backends = fleet
    check = rolling_restart(balancer, "--check")
    assert check.returncode == 0, check.stdout[-6000:]
    assert "replica r1 (head-r1) checked (check mode)" in check.stdout
    assert backends["r1"].served == 0 and all(s["admin_state"] == "ready" for s in balancer.servers().values()), \
        "--check drains nothing, restarts nothing, sends no canary"
    thread, result = run_load(balancer.url, seconds=1800)  # stopped below
    try:
        for backend in backends.values():
            wait_served(backend, 0, "load on both replicas")
        proc = rolling_restart(balancer)
        assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
        assert "replica r1 (head-r1) restarted and back in rotation" in proc.stdout
        assert "replica r2 (head-r2) restarted and back in rotation" in proc.stdout
        assert proc.stdout.index("replica r1 (head-r1) restarted") < proc.stdout.index("replica r2 (head-r2) restarted")
        servers = balancer.servers()
        assert all(s["status"] == "UP" and s["admin_state"] == "ready" for s in servers.values()), servers

        # The canary asks for a model nobody serves: r1 fails its gate, stays out, the play stops before r2.
        failed = rolling_restart(balancer, "-e", "rolling_restart_canary_model=no-such-model",
                                 "-e", "rolling_restart_canary_retries=1")
        assert failed.returncode != 0
        assert "replica r1 failed and is kept out of the balancer (maint)" in failed.stdout, failed.stdout[-6000:]
        assert "Gate - canary chat completion" in failed.stdout
        assert "replica r2 (head-r2) restarted" not in failed.stdout
        servers = balancer.servers()
        assert servers["r1"]["status"] == "MAINT" and servers["r2"]["status"] == "UP"
        assert servers["r1-fallback"]["status"] == "MAINT", "its backup entry stays out with it"
    finally:
        result["_gen"].stop_event.set()
        thread.join(60)
    assert result["failed"] == 0, result["errors"]
    assert result["ok"] > 20

    # r1 is out: taking r2 out too would leave nothing UP, so that is refused before any change.
    refused = rolling_restart(balancer, "--limit", "head-r2")
    assert refused.returncode != 0
    assert "would leave no replica UP" in refused.stdout, refused.stdout[-5000:]
    assert balancer.servers()["r2"]["status"] == "UP"
    # The fix: restart just r1 (--limit), which puts it back.
    fixed = rolling_restart(balancer, "--limit", "head-r1")
    assert fixed.returncode == 0, fixed.stdout[-5000:]
    assert "replica r2" not in fixed.stdout.split("PLAY [Rolling restart - one batch")[1]
    assert all(s["status"] == "UP" for s in balancer.servers().values())
