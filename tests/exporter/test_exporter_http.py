"""The exporter as it runs on a host: a subprocess serving HTTP, scraped for real. Every collector
against the real engine and Ray, promtool on that output and engine-down: test_exporter_engine.py
(engine tier). Here: what needs no engine, and a canary held by stub_engine (a first token that
only comes when the test says)."""

import threading
import time
import urllib.error
import urllib.request

import pytest
from exporter_testlib import (full_setup, parse_exposition, run_exporter, sample, scrape_url,
                              stop_exporter, wait_for)


def test_only_get_is_served(tmp_path, state_dir):
    setup = full_setup(tmp_path, state_dir)  # no engine, no Ray: nothing to probe
    proc = run_exporter(["--config", str(setup["config"])], env=dict(setup["env"]))
    try:
        wait_for(lambda: scrape_url(setup["url"]), 120)
        req = urllib.request.Request(setup["url"], data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=30)
        assert exc.value.code in (405, 501)
    finally:
        stop_exporter(proc)


def test_held_canary_does_not_hold_scrapes(tmp_path, stub_engine, state_dir):
    """A canary whose first token does not come until the test releases it: every scrape meanwhile
    answers (from the collectors' last results) and reports no canary result yet; once released,
    the canary's TTFT covers the whole hold."""
    held = stub_engine.state.hold_first_token = threading.Event()
    # one canary only (the first runs at start): a later, unheld one would replace its TTFT before
    # a scrape on a busy machine sees it
    setup = full_setup(tmp_path, state_dir, engine_url=stub_engine.url, canary_interval_s=600,
                       canary_timeout_s=600)
    proc = run_exporter(["--config", str(setup["config"])], env=dict(setup["env"]))
    try:
        wait_for(lambda: scrape_url(setup["url"]), 120)
        wait_for(lambda: stub_engine.state.chat_requests, 120)  # a canary is now in flight, held
        t_held = time.monotonic()
        for _ in range(10):
            s = parse_exposition(scrape_url(setup["url"], timeout=60))
            assert sample(s, "vllm_fleet_engine_up") in (None, 1)
            assert sample(s, "vllm_fleet_canary_success") is None  # nothing finished: still held
            time.sleep(0.1)
        held.set()
        released = time.monotonic() - t_held
        s = wait_for(lambda: (lambda s: s if sample(s, "vllm_fleet_canary_success") else None)(
            parse_exposition(scrape_url(setup["url"]))), 120)
        assert sample(s, "vllm_fleet_canary_ttft_seconds") >= released
    finally:
        stop_exporter(proc)


def test_bad_config_exits_2(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"listen": "x:1", "nope": 1}')
    p = run_exporter(["--config", str(cfg)], capture=True)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and b"nope" in err


def test_gpu_less_host_states_zero_gpus_expected_without_nvml(tmp_path, state_dir):
    """NVML off (a GPU-less host): no vllm_fleet_gpus reading, but the expectation (0) is exported."""
    setup = full_setup(tmp_path, state_dir, nvml="off", gpus_expected=0)
    p = run_exporter(["--config", str(setup["config"]), "--once"], env=dict(setup["env"]), capture=True)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    s = parse_exposition(out.decode())
    assert sample(s, "vllm_fleet_gpus_expected") == 0
    assert sample(s, "vllm_fleet_gpus") is None and sample(s, "vllm_fleet_nvml_available") is None
