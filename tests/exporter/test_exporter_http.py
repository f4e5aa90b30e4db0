"""The exporter as it runs on a host: a subprocess serving HTTP, scraped for real."""

import subprocess
import time
import urllib.error
import urllib.request

import pytest
from exporter_testlib import (full_setup, parse_exposition, run_exporter, sample, scrape_url,
                              wait_for)


@pytest.fixture
def running(tmp_path, stub, state_dir):
    setup = full_setup(tmp_path, stub, state_dir)
    proc = run_exporter(["--config", str(setup["config"])], env=dict(setup["env"]))
    try:
        wait_for(lambda: scrape_url(setup["url"]), 15)
        yield setup, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _all_ready(url):
    s = parse_exposition(scrape_url(url))
    need = ["vllm_fleet_engine_up", "vllm_fleet_canary_success", "vllm_fleet_ray_nodes_alive",
            "vllm_fleet_gpus", "vllm_fleet_nccl_log_files"]
    ready = all(sample(s, n) is not None for n in need) and \
        sample(s, "vllm_fleet_processes", process="exporter_test") is not None
    return s if ready else None


def test_every_collector_reports(running):
    setup, _ = running
    s = wait_for(lambda: _all_ready(setup["url"]), 60)  # generous: CI runs this beside a deploy
    assert sample(s, "vllm_fleet_engine_up") == 1
    assert sample(s, "vllm_fleet_canary_success") == 1
    assert sample(s, "vllm_fleet_canary_ttft_seconds") > 0
    assert (sample(s, "vllm_fleet_ray_nodes_alive"), sample(s, "vllm_fleet_ray_nodes_expected")) \
        == (2, 3)
    assert sample(s, "vllm_fleet_ray_gpus") == 2 and sample(s, "vllm_fleet_ray_cpus") == 8
    assert sample(s, "vllm_fleet_gpus") == 2 and sample(s, "vllm_fleet_nvml_available") == 1
    assert sample(s, "vllm_fleet_nccl_ib_expected") == 1
    assert sample(s, "vllm_fleet_nccl_transport_in_use", transport="net_socket") == 1
    assert sample(s, "vllm_fleet_processes", process="exporter_test") >= 1
    assert sample(s, "vllm_fleet_fabric_info", nccl_socket_ifname="fab0",
                  gloo_socket_ifname="fab0", vllm_host_ip="172.28.20.13",
                  fleet_ray_node_ip="127.0.0.1", nccl_ib_disable="0", nccl_ib_hca="mlx5_0",
                  nccl_net="", nccl_p2p_disable="", nccl_ib_gid_index="") == 1
    for c in ("health", "canary", "ray", "processes", "nccl", "nvml", "launch_state", "fabric"):
        assert sample(s, "vllm_fleet_collector_success", collector=c) == 1, c


def test_promtool_check_metrics_on_real_output(running, promtool):
    setup, _ = running
    wait_for(lambda: _all_ready(setup["url"]), 60)
    text = scrape_url(setup["url"])
    assert "vllm_fleet_allreduce_latency_seconds_bucket" in text
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # and promtool does catch a convention break in this same pipeline
    bad = text + "# TYPE vllm_fleet_bad_count gauge\nvllm_fleet_bad_count 1\n"
    assert subprocess.run([promtool, "check", "metrics"], input=bad.encode(),
                          capture_output=True).returncode != 0


def test_engine_down_is_seen_within_seconds(running, stub):
    setup, _ = running
    wait_for(lambda: sample(parse_exposition(scrape_url(setup["url"])), "vllm_fleet_engine_up")
             == 1, 10)
    t0 = time.time()
    stub.stop()  # the engine goes away (connection refused)
    wait_for(lambda: sample(parse_exposition(scrape_url(setup["url"])), "vllm_fleet_engine_up")
             == 0, 15)
    # health interval 0.3 s here: seen within a few intervals even on a loaded box (lab: < 15 s)
    assert time.time() - t0 < 10
    s = wait_for(lambda: (lambda s: s if sample(s, "vllm_fleet_canary_success") == 0 else None)(
        parse_exposition(scrape_url(setup["url"]))), 10)
    assert sample(s, "vllm_fleet_canary_runs_total", result="failure") >= 1


def test_only_get_is_served(running):
    setup, _ = running
    req = urllib.request.Request(setup["url"], data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=5)
    assert exc.value.code in (405, 501)


def test_slow_canary_does_not_slow_scrapes(tmp_path, stub, state_dir):
    stub.state.first_token_delay_s = 3.0
    setup = full_setup(tmp_path, stub, state_dir, canary_interval_s=0.1, canary_timeout_s=20)
    proc = run_exporter(["--config", str(setup["config"])], env=dict(setup["env"]))
    try:
        wait_for(lambda: scrape_url(setup["url"]), 15)
        wait_for(lambda: stub.state.chat_requests, 5)  # a canary is now in flight (3 s)
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            s = parse_exposition(scrape_url(setup["url"]))
            times.append(time.perf_counter() - t0)
            time.sleep(0.1)
        assert max(times) < 2.0, times  # well under the 3 s canary: scrapes never wait for it
        assert sample(s, "vllm_fleet_canary_success") is None  # nothing finished yet
        s = wait_for(lambda: (lambda s: s if sample(s, "vllm_fleet_canary_success") else None)(
            parse_exposition(scrape_url(setup["url"]))), 15)
        assert sample(s, "vllm_fleet_canary_ttft_seconds") >= 3.0
    finally:
        proc.terminate()
        proc.wait(10)


def test_bad_config_exits_2(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"listen": "x:1", "nope": 1}')
    p = run_exporter(["--config", str(cfg)], capture=True)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 2 and b"nope" in err


def test_gpu_less_host_states_zero_gpus_expected_without_nvml(tmp_path, stub, state_dir):
    """NVML off (a GPU-less host): no vllm_fleet_gpus reading, but the expectation (0) is exported."""
    setup = full_setup(tmp_path, stub, state_dir, nvml="off", gpus_expected=0)
    p = run_exporter(["--config", str(setup["config"]), "--once"], env=dict(setup["env"]), capture=True)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    s = parse_exposition(out.decode())
    assert sample(s, "vllm_fleet_gpus_expected") == 0
    assert sample(s, "vllm_fleet_gpus") is None and sample(s, "vllm_fleet_nvml_available") is None
