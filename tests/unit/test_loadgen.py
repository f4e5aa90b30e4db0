"""tools/loadgen.py against fake_vllm (a stand-in OpenAI server), through the real OpenAI client."""
from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.fake_vllm import FakeVLLM, free_port

REPO = Path(__file__).resolve().parents[2]
LOADGEN = REPO / "tools" / "loadgen.py"
spec = importlib.util.spec_from_file_location("loadgen_under_test", LOADGEN)
loadgen = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = loadgen  # dataclasses look their module up
spec.loader.exec_module(loadgen)


@pytest.fixture
def fake():
    server = FakeVLLM("a", token_delay=0.005).start()
    yield server
    server.stop()


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LOADGEN), *args], capture_output=True, text=True, timeout=timeout)


def test_percentile_interpolates_like_numpy_linear():
    assert loadgen.percentile([], 50) is None
    assert loadgen.percentile([3.0], 99) == 3.0
    assert loadgen.percentile([1, 2, 3, 4], 50) == 2.5
    values = list(range(1, 101))
    assert loadgen.percentile(values, 99) == pytest.approx(99.01)
    assert loadgen.percentile(values, 0) == 1 and loadgen.percentile(values, 100) == 100


def test_count_bound_mix_and_json(fake, tmp_path):
    out = tmp_path / "run.json"
    proc = run_cli("--base-url", fake.url + "/v1", "--requests", "30", "--duration", "60", "--concurrency", "3",
                   "--stream-ratio", "0.5", "--json", str(out), "--per-request", "--fail-on-error")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["total"] == 30 and data["ok"] == 30 and data["failed"] == 0
    assert data["model"] == "tiny-llama", "the model comes from /v1/models when not given"
    assert data["stream"] > 0 and data["non_stream"] > 0 and data["stream"] + data["non_stream"] == 30
    assert 0 < data["latency_p50_s"] <= data["latency_p99_s"] <= data["latency_max_s"]
    assert data["ttft_p50_s"] is not None and data["ttft_p50_s"] <= data["latency_p99_s"]
    assert len(data["requests"]) == 30 and all(r["ok"] for r in data["requests"])
    streamed = [r for r in data["requests"] if r["stream"]]
    assert all(r["ttft_s"] is not None and r["ttft_s"] <= r["latency_s"] for r in streamed)
    for word in ("30 requests", "ok 30", "failed 0", "latency p50", "p99", "ttft"):
        assert word in proc.stdout
    assert fake.served == 30


def test_wall_time_bound_stops_before_the_count(fake, tmp_path):
    fake.token_delay = 0.05
    out = tmp_path / "bound.json"
    proc = run_cli("--base-url", fake.url + "/v1", "--requests", "100000", "--duration", "2", "--concurrency", "2",
                   "--timeout", "10", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    # the run's own clock (not the interpreter's start-up): duration, then in-flight requests end
    # by their timeout, then 5 s of grace; +5 s of slack for a busy machine
    assert data["duration_s"] < 2 + 10 + 5 + 5, "duration + request timeout bounds the run"
    assert 0 < data["total"] < 200 and data["failed"] == 0


def test_think_time_spaces_each_workers_requests(fake, tmp_path):
    out = tmp_path / "think.json"
    proc = run_cli("--base-url", fake.url + "/v1", "--model", "tiny-llama", "--requests", "4", "--concurrency", "1",
                   "--max-tokens", "1", "--think-time", "0.5", "--json", str(out), "--per-request")
    assert proc.returncode == 0, proc.stderr
    starts = sorted(r["start"] for r in json.loads(out.read_text())["requests"])
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert len(gaps) == 3 and min(gaps) >= 0.5, gaps
    assert run_cli("--base-url", fake.url + "/v1", "--think-time", "-1").returncode == 2


def test_failures_are_counted_and_fail_the_exit_code_when_asked(fake, tmp_path):
    fake.fail_status = 503
    out = tmp_path / "fail.json"
    args = ["--base-url", fake.url + "/v1", "--model", "tiny-llama", "--requests", "6", "--concurrency", "2",
            "--json", str(out)]
    proc = run_cli(*args)
    assert proc.returncode == 0, "without --fail-on-error failures are only reported"
    data = json.loads(out.read_text())
    assert data["failed"] == 6 and data["ok"] == 0
    assert data["errors"] == {"HTTP 503": 6}, "the client does not retry (max_retries=0): every failure counts"
    assert "error x6: HTTP 503" in proc.stdout
    assert len(data["requests"]) == 6, "failed requests are kept in the JSON even without --per-request"
    assert run_cli(*args, "--fail-on-error").returncode == 1


def test_connection_errors_and_unreachable_endpoint(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    proc = run_cli("--base-url", dead, "--requests", "3")
    assert proc.returncode == 2 and "cannot start" in proc.stderr, "no model list: nothing to run"
    proc = run_cli("--base-url", dead, "--model", "m", "--requests", "3", "--json", str(tmp_path / "x.json"),
                   "--fail-on-error")
    assert proc.returncode == 1
    assert json.loads((tmp_path / "x.json").read_text())["errors"] == {"connection error": 3}


def test_cut_off_stream_is_a_failure(fake):
    gen = loadgen.LoadGenerator(loadgen.Config(base_url=fake.url + "/v1", model="tiny-llama", requests=1))
    real_stream = None

    class Cut:
        """Wraps the client's stream and drops the finishing chunk, like an engine killed mid-stream."""
        def __init__(self, events):
            self.events = events

        def __enter__(self):
            return (e for e in self.events if not any(c.finish_reason for c in e.choices))

        def __exit__(self, *exc):
            self.events.close()

    client = gen.client()
    real_stream = client.chat.completions.create
    client.chat.completions.create = lambda **kw: Cut(real_stream(**kw)) if kw.get("stream") else real_stream(**kw)
    result = gen.one(client, "tiny-llama", 0, stream=True)
    assert not result.ok and "without a finish_reason" in result.error


def test_sigterm_stops_new_requests_and_still_reports(fake, tmp_path):
    fake.token_delay = 0.02
    out = tmp_path / "term.json"
    proc = subprocess.Popen([sys.executable, str(LOADGEN), "--base-url", fake.url + "/v1", "--requests", "100000",
                             "--duration", "120", "--concurrency", "2", "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60  # the client's import alone takes seconds on a busy machine
    while fake.served < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    data = json.loads(out.read_text())
    assert data["ok"] > 0 and data["failed"] == 0 and data["duration_s"] < 30


def test_bad_arguments_are_rejected():
    proc = run_cli("--base-url", "http://x/v1", "--requests", "0")
    assert proc.returncode == 2 and "--requests" in proc.stderr
