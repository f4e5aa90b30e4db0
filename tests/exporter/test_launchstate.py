"""Launch-dir state files -> histograms, stuck/not-stuck/stale collectives (design.md contract)."""

import math
import os
import time

from exporter_testlib import (BOUNDS, DEAD_PID, collective, hist, parse_exposition, sample,
                              write_json)
from prometheus_client import CollectorRegistry, generate_latest

from vllm_fleet_exporter.collector import FleetExporter
from vllm_fleet_exporter.config import load_config
from vllm_fleet_exporter.launchstate import LaunchReader, newest_launch_dir


def scrape(state_dir, *extra):
    cfg = load_config(["--state-dir", str(state_dir), "--nvml", "off", *extra])
    exp = FleetExporter(cfg)
    exp.run_all_once()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(exp)
    return parse_exposition(generate_latest(reg).decode())


def test_histograms_are_summed_over_workers(state_dir):
    s = scrape(state_dir)
    lab = dict(backend="nccl", size_bytes="1048576", group="tp", scope="intra", source="probe")
    # two workers reported 5 observations each for this label set
    assert sample(s, "vllm_fleet_allreduce_latency_seconds_count", **lab) == 10
    assert math.isclose(sample(s, "vllm_fleet_allreduce_latency_seconds_sum", **lab), 0.004)
    assert sample(s, "vllm_fleet_allreduce_latency_seconds_bucket", le="0.0005", **lab) == 6
    assert sample(s, "vllm_fleet_allreduce_latency_seconds_bucket", le="0.00025", **lab) == 2
    assert sample(s, "vllm_fleet_allreduce_latency_seconds_bucket", le="+Inf", **lab) == 10
    ca = dict(lab, backend="custom_ar", size_bytes="4096")
    assert sample(s, "vllm_fleet_allreduce_latency_seconds_count", **ca) == 5


def test_stuck_and_not_stuck(state_dir):
    s = scrape(state_dir)
    assert sample(s, "vllm_fleet_collective_stuck", rank="0") == 0  # idle (current null)
    assert sample(s, "vllm_fleet_collective_inflight_seconds", rank="0") == 0
    assert sample(s, "vllm_fleet_collective_stuck", rank="1") == 1  # 120 s > 30 s threshold
    assert 119 < sample(s, "vllm_fleet_collective_inflight_seconds", rank="1") < 200
    assert sample(s, "vllm_fleet_collective_stuck_processes") == 1
    assert sample(s, "vllm_fleet_collective_completed_total", rank="0") == 7


def test_in_flight_below_threshold_is_not_stuck(tmp_path):
    ld = tmp_path / "launches" / "x"
    write_json(ld / "collective-h-1.json", collective(1, 0, start=time.time() - 5, threshold=30))
    s = scrape(tmp_path)
    assert sample(s, "vllm_fleet_collective_stuck", rank="0") == 0
    assert 4 < sample(s, "vllm_fleet_collective_inflight_seconds", rank="0") < 60
    # the exporter decides from current.start and now, not from the file's own flag:
    s = scrape(tmp_path, "--stuck-threshold-s", "2")
    assert sample(s, "vllm_fleet_collective_stuck", rank="0") == 1


def test_dead_pid_file_is_stale_not_stuck(tmp_path):
    ld = tmp_path / "launches" / "x"
    write_json(ld / f"collective-h-{DEAD_PID}.json",
               collective(DEAD_PID, 0, start=time.time() - 600))
    write_json(ld / f"collective-h-{os.getpid()}.json", collective(os.getpid(), 1))
    s = scrape(tmp_path)
    assert sample(s, "vllm_fleet_collective_stale_files") == 1
    assert sample(s, "vllm_fleet_collective_stuck_processes") == 0
    assert sample(s, "vllm_fleet_collective_stuck", rank="0") is None
    assert sample(s, "vllm_fleet_collective_processes") == 1
    # with the pid check off the same file counts as a stuck live process
    s = scrape(tmp_path, "--pid-check", "off")
    assert sample(s, "vllm_fleet_collective_stuck", rank="0") == 1


def test_heartbeat_staleness_is_opt_in(tmp_path):
    ld = tmp_path / "launches" / "x"
    write_json(ld / "collective-h-1.json", collective(1, 0, updated=time.time() - 500))
    assert sample(scrape(tmp_path), "vllm_fleet_collective_stale_files") == 0
    s = scrape(tmp_path, "--collective-stale-after-s", "60")
    assert sample(s, "vllm_fleet_collective_stale_files") == 1


def test_newest_launch_wins_and_bad_files_are_counted(state_dir):
    newer = state_dir / "launches" / "vllm-fleet-1800000000-bbbb"
    write_json(newer / "launch.json", {"launch_id": "vllm-fleet-1800000000-bbbb",
                                       "deployment": "vllm-fleet", "created": 1800000000.0})
    (newer / "allreduce-h-9.json").write_text("{not json")
    write_json(newer / "allreduce-h-10.json", {"bucket_bounds_s": BOUNDS,
                                               "histograms": [hist(counts=[1, 2])]})
    assert newest_launch_dir(str(state_dir / "launches")) == str(newer)
    s = scrape(state_dir)
    assert sample(s, "vllm_fleet_launch_info", launch_id="vllm-fleet-1800000000-bbbb",
                  deployment="vllm-fleet") == 1
    assert sample(s, "vllm_fleet_state_files_unparseable") == 2
    assert not any(k[0].startswith("vllm_fleet_allreduce") for k in s)


def test_reader_reparses_only_changed_files(state_dir):
    reader = LaunchReader(str(state_dir / "launches"))
    first = reader.read(time.time(), lambda pid: None)
    ld = state_dir / "launches" / "vllm-fleet-1700000000-aaaa"
    write_json(ld / "allreduce-h-100.json", {"bucket_bounds_s": BOUNDS,
                                             "histograms": [hist(source="eager")]})
    second = reader.read(time.time(), lambda pid: None)
    srcs = lambda st: sorted({h.labels[4] for h in st.histograms})  # noqa: E731
    assert srcs(first) == ["probe"] and srcs(second) == ["eager", "probe"]


def test_no_launch_dir_still_reports_zero(tmp_path):
    s = scrape(tmp_path)
    assert sample(s, "vllm_fleet_collective_stuck_processes") == 0
    assert sample(s, "vllm_fleet_collector_success", collector="launch_state") == 1


def test_only_this_deployments_launches_are_read(tmp_path):
    """Deployments x and x-y on one host: x's exporter reads x's newest launch, never x-y's newer
    one (its verdict once saw "node2 runs launch x-y-..., head runs x-..."). The deployment is
    launch.json's, else a member record's; a launch that records none is nobody's."""
    launches = tmp_path / "launches"
    write_json(launches / "x-1700000000-aaaaaa" / "launch.json",
               {"launch_id": "x-1700000000-aaaaaa", "deployment": "x", "created": 1700000000.0})
    write_json(launches / "x-y-1800000000-bbbbbb" / "launch.json",
               {"launch_id": "x-y-1800000000-bbbbbb", "deployment": "x-y", "created": 1800000000.0})
    members_only = launches / "x-1750000000-cccccc"
    write_json(members_only / "members" / "4242", {"pid": 4242, "deployment": "x"})
    os.utime(members_only, (1750000000, 1750000000))
    write_json(launches / "unowned" / "launch.json", {"created": 1900000000.0})

    assert newest_launch_dir(str(launches)) == str(launches / "unowned")  # no filter: any
    assert newest_launch_dir(str(launches), "x") == str(members_only)
    assert newest_launch_dir(str(launches), "x-y") == str(launches / "x-y-1800000000-bbbbbb")
    assert newest_launch_dir(str(launches), "z") is None
    assert LaunchReader(str(launches), "x").read(time.time(), lambda pid: None).launch_dir == str(members_only)
    s = scrape(tmp_path, "--deployment", "x-y")
    assert sample(s, "vllm_fleet_launch_info", launch_id="x-y-1800000000-bbbbbb", deployment="x-y") == 1
