"""The alerting role's Alertmanager configuration, rendered by the real role, checked by the real
amtool and run by the real Alertmanager, with webhook receivers on localhost.

Proves: a hung-replica alert reaches the people's receiver and the healer's webhook (with the
healer's bearer token); while it fires, the replica's component alerts are inhibited but another
replica's are not; a host whose exporter is down pages once; bad receivers are refused by amtool
before anything is replaced.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from tests.unit.fake_vllm import free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("prometheus-alertmanager") is None,
                                reason="prometheus-alertmanager is not installed (tests/requirements-apt.txt)")

RENDER = """
- name: Render the Alertmanager configuration with the real role
  hosts: fleet_monitoring
  gather_facts: false
  tasks:
    - name: Write it
      ansible.builtin.include_role:
        name: alerting
        tasks_from: config.yml
"""


class Sink:
    """A webhook receiver: records every POST (path, Authorization header, alerts)."""

    def __init__(self):
        self.posts: list[dict] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                sink.posts.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                   "alerts": body.get("alerts", [])})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def alerts(self, path: str) -> list[dict]:
        return [a for p in self.posts if p["path"] == path for a in p["alerts"]]


def render(tmp: Path, receivers: list, sink_port: int, token: Path, healing: bool = True):
    inventory = tmp / "inventory.ini"
    inventory.write_text(f"""
[fleet_monitoring]
mon ansible_host=127.0.0.1

[fleet_healer]
mon

[all:vars]
ansible_connection=local
ansible_python_interpreter={shutil.which('python3')}
fleet_deployment=altest
fleet_healer_port={sink_port}
fleet_healing={healing}
""")
    (tmp / "vars.json").write_text(json.dumps({
        "alerting_config_path": str(tmp / "alertmanager.yml"), "alerting_receivers": receivers,
        "alerting_group_wait": "1s", "alerting_group_interval": "5s", "alerting_service_managed": False,
        "alerting_healer_token_file": str(token), "fleet_healer_token_file": str(tmp / "healer-token")}))
    (tmp / "healer-token").write_text("t0ken-of-the-healer\n")
    (tmp / "render.yml").write_text(RENDER)
    return subprocess.run(["ansible-playbook", "-i", str(inventory), str(tmp / "render.yml"),
                           "-e", f"@{tmp / 'vars.json'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def alertmanager(tmp_path):
    sink = Sink()
    token = tmp_path / "am-healer-token"
    people = {"name": "ops", "webhook_configs": [{"url": f"http://127.0.0.1:{sink.port}/ops",
                                                   "send_resolved": False}]}
    proc = render(tmp_path, [people], sink.port, token)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert token.read_text().strip() == "t0ken-of-the-healer"
    assert oct(token.stat().st_mode & 0o777) == "0o640"
    port = free_port()
    am = subprocess.Popen(["prometheus-alertmanager", f"--config.file={tmp_path / 'alertmanager.yml'}",
                           f"--storage.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                           "--cluster.listen-address="],
                          stdout=open(tmp_path / "am.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/-/ready", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.2)
    else:
        am.kill()
        raise AssertionError("alertmanager not ready:\n" + (tmp_path / "am.log").read_text())
    yield url, sink, tmp_path
    am.kill()
    am.wait()
    sink.httpd.shutdown()


def fire(url: str, *alerts: dict) -> None:
    now = datetime.now(timezone.utc)
    body = [{"labels": dict(a, fleet_deployment="altest"), "annotations": {"summary": "x"},
             "startsAt": now.isoformat(), "endsAt": (now + timedelta(minutes=5)).isoformat()}
            for a in alerts]
    r = requests.post(f"{url}/api/v2/alerts", json=body, timeout=10)
    assert r.status_code == 200, r.text


def names(alerts: list[dict]) -> set:
    return {(a["labels"]["alertname"], a["labels"].get("replica"), a["labels"].get("host"))
            for a in alerts}


def wait_for(pred, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    return pred()


def test_hung_replica_pages_people_and_the_healer_once_with_inhibition(alertmanager):
    url, sink, _ = alertmanager
    hung = {"alertname": "VllmFleetReplicaUnhealthy", "replica": "a", "host": "n1", "severity": "critical"}
    fire(url, hung)
    time.sleep(1)  # the replica alert is active before its echoes arrive, as Prometheus' for: makes it
    fire(url,
         {"alertname": "VllmFleetEngineDown", "replica": "a", "host": "n1", "severity": "critical"},
         {"alertname": "VllmFleetHostUnhealthy", "replica": "a", "host": "n2", "severity": "warning"},
         {"alertname": "VllmFleetEngineDown", "replica": "b", "host": "n4", "severity": "critical"})
    healer = wait_for(lambda: sink.alerts("/endpoint"))
    assert names(healer) == {("VllmFleetReplicaUnhealthy", "a", "n1")}, "the healer gets the hang only"
    assert {p["auth"] for p in sink.posts if p["path"] == "/endpoint"} == {"Bearer t0ken-of-the-healer"}
    ops = wait_for(lambda: {("VllmFleetReplicaUnhealthy", "a", "n1"), ("VllmFleetEngineDown", "b", "n4")}
                   <= names(sink.alerts("/ops")) and sink.alerts("/ops"))
    assert ("VllmFleetReplicaUnhealthy", "a", "n1") in names(ops)
    assert ("VllmFleetEngineDown", "b", "n4") in names(ops), "another replica's alert is not inhibited"
    time.sleep(3)  # past group_wait/interval: the echoes would have arrived by now
    got = names(sink.alerts("/ops"))
    assert ("VllmFleetEngineDown", "a", "n1") not in got and ("VllmFleetHostUnhealthy", "a", "n2") not in got
    per_group = [len(p["alerts"]) for p in sink.posts if p["path"] == "/ops"]
    assert len(per_group) == 2, f"one notification per fault and replica, got {per_group}"


def test_a_dead_host_pages_once(alertmanager):
    url, sink, _ = alertmanager
    fire(url, {"alertname": "VllmFleetExporterDown", "replica": "a", "host": "n2", "severity": "warning"})
    time.sleep(1)
    fire(url, {"alertname": "VllmFleetHostUnhealthy", "replica": "a", "host": "n2", "severity": "warning"},
         {"alertname": "VllmFleetGPUsMissing", "replica": "a", "host": "n2", "severity": "critical"})
    wait_for(lambda: sink.alerts("/ops"))
    time.sleep(3)
    assert names(sink.alerts("/ops")) == {("VllmFleetExporterDown", "a", "n2")}
    assert sink.alerts("/endpoint") == []


def test_amtool_refuses_a_bad_receiver_before_anything_is_replaced(tmp_path):
    sink_port = free_port()
    token = tmp_path / "am-healer-token"
    good = render(tmp_path, [{"name": "ops", "webhook_configs": [{"url": "http://127.0.0.1:1/x"}]}],
                  sink_port, token)
    assert good.returncode == 0, good.stdout[-3000:]
    before = (tmp_path / "alertmanager.yml").read_text()
    bad = render(tmp_path, [{"name": "ops", "webhook_configs": [{"url": "not a url"}]}], sink_port, token)
    assert bad.returncode != 0
    assert "failed to validate" in bad.stdout or "amtool" in bad.stdout
    assert (tmp_path / "alertmanager.yml").read_text() == before


def test_without_healing_the_healer_gets_nothing_and_no_receiver_is_said(tmp_path):
    proc = render(tmp_path, [], free_port(), tmp_path / "t", healing=False)
    assert proc.returncode == 0, proc.stdout[-3000:]
    config = (tmp_path / "alertmanager.yml").read_text()
    assert "vllm-fleet-healer" not in config and "/endpoint" not in config
    assert "receiver: \"vllm-fleet-nobody\"" in config
