"""Health probe, canary and Ray query against stub_engine's faults on demand (HTTP 503/500, a
/health or first token that never comes, a stream cut short, GPU and DEAD Ray nodes). The same
probes against the real engine and Ray: test_exporter_engine.py (engine tier)."""

import json
import sys
import threading
import urllib.error

import pytest
from exporter_testlib import free_port

from vllm_fleet_exporter.checks import check_health, parse_ray_nodes, query_ray, run_canary


def test_health_up_503_refused(stub_engine):
    assert check_health(stub_engine.url, 30).up
    stub_engine.state.health_status = 503
    r = check_health(stub_engine.url, 30)
    assert not r.up and r.status == 503
    r = check_health(f"http://127.0.0.1:{free_port()}", 30)
    assert not r.up and r.status == 0 and r.error


def test_health_timeout_bounds_the_probe(stub_engine):
    stub_engine.state.hold_health = threading.Event()  # /health never answers during the probe
    r = check_health(stub_engine.url, 0.3)
    # only the probe's own timeout can have ended it (the bound is slack for a busy machine)
    assert not r.up and r.status == 0 and "timed out" in r.error and r.duration_s < 30


def test_canary_measures_ttft_and_sends_key(stub_engine):
    stub_engine.state.first_token_delay_s = 0.3
    r = run_canary(stub_engine.url, "", "hi", 4, "s3cret", 60)
    assert r.success, r.error
    assert r.model == "tiny-llama"  # discovered from /v1/models
    assert 0.3 <= r.ttft_s <= r.duration_s
    assert r.tokens == 2
    assert stub_engine.state.auth_seen[-1] == "Bearer s3cret"
    req = stub_engine.state.chat_requests[-1]
    assert req["stream"] is True and req["max_tokens"] == 4 and req["model"] == "tiny-llama"


@pytest.mark.parametrize("change,error", [
    ({"chat_status": 500}, "HTTP 500"),
    ({"tokens": []}, "no content token"),
    ({"send_done": False}, "without [DONE]"),
])
def test_canary_failures(stub_engine, change, error):
    for k, v in change.items():
        setattr(stub_engine.state, k, v)
    r = run_canary(stub_engine.url, "m", "hi", 4, "", 60)
    assert not r.success and error in r.error


def test_canary_timeout(stub_engine):
    stub_engine.state.hold_first_token = threading.Event()  # the first token never comes
    r = run_canary(stub_engine.url, "m", "hi", 4, "", 0.5)
    assert not r.success and r.ttft_s is None and "timed out" in r.error.lower(), r
    assert r.duration_s < 30  # its own 0.5 s timeout ended it (slack for a busy machine)


NODES = [
    {"node_id": "a", "node_ip": "172.28.20.11", "is_head_node": True, "state": "ALIVE",
     "resources_total": {"CPU": 8.0, "GPU": 2.0, "memory": 1e9}},
    {"node_id": "b", "node_ip": "172.28.20.12", "is_head_node": False, "state": "ALIVE",
     "resources_total": {"CPU": 8.0, "GPU": 2.0}},
    {"node_id": "c", "node_ip": "172.28.20.13", "is_head_node": False, "state": "DEAD",
     "resources_total": {"CPU": 8.0, "GPU": 2.0}},
]


def test_ray_dashboard_api_with_gpu_and_dead_nodes(stub_engine):
    stub_engine.state.ray_nodes = NODES
    r = query_ray(stub_engine.url, [], 30)
    assert (r.nodes_alive, r.nodes_dead, r.gpus, r.cpus) == (2, 1, 4.0, 16.0)


def test_ray_dashboard_with_token_authentication(stub_engine, tmp_path):
    stub_engine.state.ray_nodes, stub_engine.state.ray_token = NODES, "cluster-token-0123456789"
    with pytest.raises(urllib.error.HTTPError) as refused:
        query_ray(stub_engine.url, [], 30)
    assert refused.value.code == 401
    token = tmp_path / "ray-token"
    token.write_text("cluster-token-0123456789\n")
    r = query_ray(stub_engine.url, [], 30, token_file=str(token))
    assert r.nodes_alive == 2
    # a command (ray list nodes) gets the file's path and the mode, never the token itself
    env_dump = [sys.executable, "-c", "import json, os; print(json.dumps([{'state': 'ALIVE', 'resources_total': "
                "{'CPU': float(os.environ['RAY_AUTH_MODE'] == 'token' and os.environ['RAY_AUTH_TOKEN_PATH'] == "
                f"{str(token)!r})}}}}]))"]
    assert query_ray("", env_dump, 60, token_file=str(token)).cpus == 1.0


def test_ray_command_output(tmp_path):
    out = tmp_path / "nodes.json"
    out.write_text(json.dumps(NODES[:1]))  # `ray list nodes --format json` prints a list
    r = query_ray("", [sys.executable, "-c", f"print(open({str(out)!r}).read())"], 30)
    assert (r.nodes_alive, r.gpus) == (1, 2.0)


def test_ray_errors():
    with pytest.raises(RuntimeError):
        parse_ray_nodes({"result": False, "msg": "GCS unreachable"})
    with pytest.raises(ValueError):
        parse_ray_nodes({"data": {"foo": 1}})
