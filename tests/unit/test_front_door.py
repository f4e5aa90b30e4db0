"""The front door with a REAL haproxy configured by the loadbalancer role: TLS from the generated lab
CA, HTTP -> HTTPS, the path allow-list, tenant keys (401 without / with a wrong one), the engine's
key swapped in for vLLM, per-tenant rate limits (429 for one tenant while another is served) and
per-tenant counters as the exporter reads them. Backends are fake_vllm with vLLM's key check."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.unit.fake_vllm import FakeVLLM, free_port
from tests.unit.test_loadbalancer_runtime import Balancer

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "exporter"))
from vllm_fleet_exporter.tenants import read_tenants  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="haproxy is not installed (tests/requirements-apt.txt lists it)")

ENGINE_KEY = "engine-key-only-the-balancer-knows-0001"


@pytest.fixture(scope="module")
def door(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("door")
    backends = {"r1": FakeVLLM("r1", api_key=ENGINE_KEY).start(),
                "r2": FakeVLLM("r2", api_key=ENGINE_KEY).start()}
    tls_port = free_port()
    balancer = Balancer(tmp, backends, loadbalancer_tls=True, loadbalancer_tls_port=tls_port,
                        fleet_api_auth="on", fleet_api_key=ENGINE_KEY,
                        loadbalancer_api_keys=[{"name": "team-a", "rate_limit": 3}, {"name": "team-b"}],
                        loadbalancer_rate_limit_period="30s", loadbalancer_tls_names=["127.0.0.1", "localhost"])
    secrets = tmp / "fleet-secrets" / "lbtest"
    keys = {name: (secrets / "api-keys" / name).read_text().strip() for name in ("team-a", "team-b")}
    yield dict(balancer=balancer, backends=backends, keys=keys, tmp=tmp, secrets=secrets,
               https=f"https://127.0.0.1:{tls_port}", ca=str(secrets / "lab-ca" / "ca.crt"))
    balancer.stop()
    for b in backends.values():
        b.stop()


def get(door, path, key=None, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.get(door["https"] + path, headers=headers, verify=door["ca"], timeout=10, **kw)


def chat(door, key, stream=False):
    return requests.post(door["https"] + "/v1/chat/completions", verify=door["ca"], timeout=20,
                         headers={"Authorization": f"Bearer {key}"}, stream=stream,
                         json={"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}],
                               "max_tokens": 4, "stream": stream})


def test_tls_with_the_lab_ca_and_http_redirected(door):
    plain = requests.get(door["balancer"].url + "/v1/models", allow_redirects=False, timeout=10)
    assert plain.status_code == 308 and plain.headers["location"].startswith("https://")
    with pytest.raises(requests.exceptions.SSLError):  # not trusted without the lab CA
        requests.get(door["https"] + "/health", timeout=10)
    assert get(door, "/health").status_code == 200  # /health needs no key


def test_keys_401_without_or_wrong_200_with_and_vllm_gets_the_engine_key(door):
    assert get(door, "/v1/models").status_code == 401
    wrong = get(door, "/v1/models", key="not-a-tenant-key-0000000000")
    assert wrong.status_code == 401 and wrong.headers.get("www-authenticate") == "Bearer"
    before = {n: len(b.auth_seen) for n, b in door["backends"].items()}
    r = chat(door, door["keys"]["team-b"])
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    s = chat(door, door["keys"]["team-b"], stream=True)
    assert s.status_code == 200
    lines = [ln for ln in s.iter_lines() if ln]
    assert lines[-1] == b"data: [DONE]" and len(lines) > 2
    seen = [h for n, b in door["backends"].items() for h in b.auth_seen[before[n]:]]
    assert seen and set(seen) == {f"Bearer {ENGINE_KEY}"}, "vLLM must only ever see the engine's key"


def test_only_the_api_and_health_pass(door):
    key = door["keys"]["team-b"]
    for method, path in (("POST", "/pause"), ("POST", "/abort_requests"), ("POST", "/invocations"),
                         ("GET", "/version"), ("GET", "/")):
        r = requests.request(method, door["https"] + path, verify=door["ca"], timeout=10,
                             headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 403, (method, path, r.status_code)
    # around the prefix: dot segments, encoded dots, double slashes (raw, as curl --path-as-is sends)
    ctx = ssl.create_default_context(cafile=door["ca"])
    port = int(door["https"].rsplit(":", 1)[1])
    for path in ("/v1/../pause", "/v1/%2e%2e/pause", "/v1//../pause", "/v1/%2E%2E/abort_requests"):
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        conn.request("POST", path, body=b"{}", headers={"Authorization": f"Bearer {key}"})
        status = conn.getresponse().status
        conn.close()
        assert status == 400, (path, status)
    assert sum(b.paused for b in door["backends"].values()) == 0, "/pause reached a replica"


def test_metrics_only_for_the_monitoring_sources(door):
    # 127.0.0.1 is in the allowed list (the balancer itself); 127.0.0.2 is any other client
    ctx = ssl.create_default_context(cafile=door["ca"])
    port = int(door["https"].rsplit(":", 1)[1])
    for source, want in (("127.0.0.1", 200), ("127.0.0.2", 403)):
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10,
                                           source_address=(source, 0))
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode()
        conn.close()
        assert resp.status == want, (source, resp.status)
        if want == 200:
            assert "haproxy_backend_http_requests_total" in body  # HAProxy's own metrics


def test_rate_limit_429_for_one_tenant_while_another_is_served_and_counted(door):
    codes_a = [get(door, "/v1/models", key=door["keys"]["team-a"]).status_code for _ in range(6)]
    codes_b = [get(door, "/v1/models", key=door["keys"]["team-b"]).status_code for _ in range(6)]
    assert codes_a[:3] == [200, 200, 200] and set(codes_a[3:]) == {429}, codes_a
    assert codes_b == [200] * 6, codes_b
    stats = f"http://127.0.0.1:{door['balancer'].stats_port}/tenant-metrics"
    counters = read_tenants(stats, 10)
    assert counters["team-a"].requests == 6 and counters["team-a"].rate_limited == 3
    assert counters["team-b"].rate_limited == 0 and counters["team-b"].requests >= 6
    assert door["keys"]["team-a"] not in requests.get(stats, timeout=10).text


def test_balancer_files_hold_no_plaintext_tenant_key_and_are_root_only(door):
    lb = door["tmp"] / "lb-secrets"
    for name in ("api-keys.map", "rate-limits.map", "engine-key.map", "tls.pem"):
        assert stat.S_IMODE((lb / name).stat().st_mode) == 0o600, name
    text = (lb / "api-keys.map").read_text()
    assert not any(k in text for k in door["keys"].values())
    for name in ("team-a", "team-b"):
        key_file = door["secrets"] / "api-keys" / name
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert json.dumps(door["keys"]) not in door["balancer"].config


def test_loadgen_through_the_door_with_key_and_ca_files(door, tmp_path):
    """tools/loadgen.py as the lab and the benchmarks use it: key and CA from files, never argv."""
    loadgen = REPO / "tools" / "loadgen.py"
    key_file = door["secrets"] / "api-keys" / "team-b"
    common = ["--base-url", door["https"] + "/v1", "--model", "tiny-llama", "--requests", "4", "--duration", "30",
              "--concurrency", "2", "--max-tokens", "4", "--timeout", "20", "--ca-file", door["ca"]]
    ok = subprocess.run([sys.executable, str(loadgen), *common, "--api-key-file", str(key_file), "--fail-on-error",
                         "--json", str(tmp_path / "ok.json")], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads((tmp_path / "ok.json").read_text())["ok"] == 4
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    refused = subprocess.run([sys.executable, str(loadgen), *common, "--json", str(tmp_path / "no.json")],
                             capture_output=True, text=True, timeout=120, env=env)
    assert json.loads((tmp_path / "no.json").read_text())["errors"] == {"HTTP 401": 4}, refused.stdout
