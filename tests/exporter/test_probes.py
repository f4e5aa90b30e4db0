"""Health probe, canary and Ray query against real local HTTP servers (stand-ins for the engine
and the Ray dashboard on the controller; the lab tests use the real ones)."""

import json
import sys
import urllib.error

import pytest
from exporter_testlib import free_port

from vllm_fleet_exporter.probes import parse_ray_nodes, probe_health, query_ray, run_canary


def test_health_up_down_refused(stub):
    assert probe_health(stub.url, 2).up
    stub.state.health_status = 503
    r = probe_health(stub.url, 2)
    assert not r.up and r.status == 503
    r = probe_health(f"http://127.0.0.1:{free_port()}", 2)
    assert not r.up and r.status == 0 and r.error


def test_health_timeout_bounds_the_probe(stub):
    stub.state.health_delay_s = 2.0
    r = probe_health(stub.url, 0.3)
    assert not r.up and r.duration_s < 1.5


def test_canary_measures_ttft_and_sends_key(stub):
    stub.state.first_token_delay_s = 0.3
    r = run_canary(stub.url, "", "hi", 4, "s3cret", 10)
    assert r.success, r.error
    assert r.model == "tiny-llama"  # discovered from /v1/models
    assert 0.3 <= r.ttft_s < 2.0 and r.duration_s >= r.ttft_s
    assert r.tokens == 2
    assert stub.state.auth_seen[-1] == "Bearer s3cret"
    req = stub.state.chat_requests[-1]
    assert req["stream"] is True and req["max_tokens"] == 4 and req["model"] == "tiny-llama"


@pytest.mark.parametrize("change,error", [
    ({"chat_status": 500}, "HTTP 500"),
    ({"tokens": []}, "no content token"),
    ({"send_done": False}, "without [DONE]"),
])
def test_canary_failures(stub, change, error):
    for k, v in change.items():
        setattr(stub.state, k, v)
    r = run_canary(stub.url, "m", "hi", 4, "", 10)
    assert not r.success and error in r.error


def test_canary_timeout(stub):
    stub.state.first_token_delay_s = 3
    r = run_canary(stub.url, "m", "hi", 4, "", 0.5)
    assert not r.success and r.duration_s < 2.5


NODES = [
    {"node_id": "a", "node_ip": "172.28.20.11", "is_head_node": True, "state": "ALIVE",
     "resources_total": {"CPU": 8.0, "GPU": 2.0, "memory": 1e9}},
    {"node_id": "b", "node_ip": "172.28.20.12", "is_head_node": False, "state": "ALIVE",
     "resources_total": {"CPU": 8.0, "GPU": 2.0}},
    {"node_id": "c", "node_ip": "172.28.20.13", "is_head_node": False, "state": "DEAD",
     "resources_total": {"CPU": 8.0, "GPU": 2.0}},
]


def test_ray_dashboard_api(stub):
    stub.state.ray_nodes = NODES
    r = query_ray(stub.url, [], 5)
    assert (r.nodes_alive, r.nodes_dead, r.gpus, r.cpus) == (2, 1, 4.0, 16.0)


def test_ray_dashboard_with_token_authentication(stub, tmp_path):
    stub.state.ray_nodes, stub.state.ray_token = NODES, "cluster-token-0123456789"
    with pytest.raises(urllib.error.HTTPError) as refused:
        query_ray(stub.url, [], 5)
    assert refused.value.code == 401
    token = tmp_path / "ray-token"
    token.write_text("cluster-token-0123456789\n")
    r = query_ray(stub.url, [], 5, token_file=str(token))
    assert r.nodes_alive == 2
    # a command (ray list nodes) gets the file's path and the mode, never the token itself
    env_dump = [sys.executable, "-c", "import json, os; print(json.dumps([{'state': 'ALIVE', 'resources_total': "
                "{'CPU': float(os.environ['RAY_AUTH_MODE'] == 'token' and os.environ['RAY_AUTH_TOKEN_PATH'] == "
                f"{str(token)!r})}}}}]))"]
    assert query_ray("", env_dump, 5, token_file=str(token)).cpus == 1.0


def test_ray_command_output(tmp_path):
    out = tmp_path / "nodes.json"
    out.write_text(json.dumps(NODES[:1]))  # `ray list nodes --format json` prints a list
    r = query_ray("", [sys.executable, "-c", f"print(open({str(out)!r}).read())"], 5)
    assert (r.nodes_alive, r.gpus) == (1, 2.0)


def test_ray_errors():
    with pytest.raises(RuntimeError):
        parse_ray_nodes({"result": False, "msg": "GCS unreachable"})
    with pytest.raises(ValueError):
        parse_ray_nodes({"data": {"foo": 1}})
