# Over 350 lines on purpose (issue 19): one prometheus_client collector; each _collect_* turns one
# job's cached result into its families, and splitting them out would scatter one scrape's code.
"""The custom collector: every scrape builds fresh metric families from cached job results and
from the (cheap, stat-cached) launch state files. Nothing here waits on the network."""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Dict, Iterator, List, Optional

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, InfoMetricFamily, Metric)

from . import __version__
from .config import Config, read_secret
from .fabric import INFO_KEYS, ib_expected, load_fabric, ray_node_ip
from .gpu import Nvml
from .heals import HealLog
from .jobs import Job
from .launchstate import HIST_LABELS, LaunchReader, newest_launch_dir
from .nccl import TRANSPORTS, NcclLogParser
from .checks import check_health, query_ray, run_canary
from .procscan import scan
from .tenants import read_tenants
from .replica import VerdictKeeper

log = logging.getLogger(__name__)
P = "vllm_fleet_"


def _fmt_le(b: float) -> str:
    return "+Inf" if math.isinf(b) else repr(float(b))


class FleetExporter:
    """Owns the background jobs and is the prometheus_client collector."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.launch_reader = LaunchReader(cfg.launches_dir, cfg.deployment)
        self.nccl = NcclLogParser()
        self.nvml = Nvml()
        self.canary_runs = {"success": 0, "failure": 0}
        self._canary_model = cfg.canary_model
        self.jobs: Dict[str, Job] = {}
        if cfg.engine_url:
            self.jobs["health"] = Job("health", self._health, cfg.health_interval_s,
                                      max_age_s=2 * cfg.health_interval_s + cfg.health_timeout_s + 1)
            if cfg.canary_enabled:
                self.jobs["canary"] = Job("canary", self._canary, cfg.canary_interval_s,
                                          max_age_s=3 * cfg.canary_interval_s + cfg.canary_timeout_s)
        if cfg.ray_url or cfg.ray_command:
            self.jobs["ray"] = Job("ray", self._ray, cfg.ray_interval_s,
                                   max_age_s=3 * cfg.ray_interval_s + cfg.ray_timeout_s)
        if cfg.tenants_url:
            self.jobs["tenants"] = Job("tenants", self._tenants, cfg.tenants_interval_s,
                                       max_age_s=3 * cfg.tenants_interval_s + cfg.tenants_timeout_s)
        if cfg.processes or cfg.pid_check == "auto":
            self.jobs["processes"] = Job("processes", self._processes, cfg.process_interval_s)
        self.jobs["nccl"] = Job("nccl", self._nccl, cfg.nccl_interval_s)
        if cfg.nvml == "auto":
            self.jobs["nvml"] = Job("nvml", self.nvml.read, cfg.nvml_interval_s)
        self.heal_log = HealLog(cfg.heal_log, cfg.heal_replicas) if cfg.heal_log else None
        self.verdict: Optional[VerdictKeeper] = None
        if cfg.verdict_enabled:
            self.verdict = VerdictKeeper(cfg, self.pid_alive, self.process_counts)
            self.jobs.update(self.verdict.jobs)

    # ---- background job bodies -------------------------------------------------------------
    def _health(self):
        res = check_health(self.cfg.engine_url, self.cfg.health_timeout_s)
        if self.verdict is not None:
            self.verdict.health_result(res.up, time.time())
        return res

    def _canary(self):
        key = read_secret(self.cfg.api_key_file)  # re-read: key rotation needs no restart
        started = time.time()
        res = run_canary(self.cfg.engine_url, self._canary_model, self.cfg.canary_prompt,
                         self.cfg.canary_max_tokens, key, self.cfg.canary_timeout_s)
        if res.success and not self.cfg.canary_model:
            self._canary_model = res.model
        elif not res.success and not self.cfg.canary_model:
            self._canary_model = ""  # rediscover: the engine may serve another model now
        self.canary_runs["success" if res.success else "failure"] += 1
        if self.verdict is not None:
            self.verdict.canary_result(res.success, started)
        if not res.success:
            log.info("canary failed: %s", res.error)
        return res

    def _ray(self):
        url = self.cfg.ray_url
        if "{ray_node_ip}" in url:
            try:
                env = load_fabric(self.cfg.fabric_file)
            except (OSError, ValueError):
                env = None
            url = url.replace("{ray_node_ip}", ray_node_ip(env))
        res = query_ray(url, self.cfg.ray_command, self.cfg.ray_timeout_s, self.cfg.ray_token_file)
        if self.verdict is not None:  # only a successful query is evidence (a slow one is not)
            self.verdict.ray_result(res.nodes_alive)
        return res

    def _tenants(self):
        return read_tenants(self.cfg.tenants_url, self.cfg.tenants_timeout_s)

    def _processes(self):
        return scan(self.cfg.proc_root, self.cfg.processes, self.cfg.pid_check == "auto")

    def _nccl(self):
        newest = newest_launch_dir(self.cfg.launches_dir, self.cfg.deployment)
        return self.nccl.update(self.cfg.nccl_log_globs, newest)

    def start(self) -> None:
        for job in self.jobs.values():
            job.start()

    def stop(self) -> None:
        for job in self.jobs.values():
            job.stop()

    def run_all_once(self) -> None:
        """Run every job once in the caller's thread (tests, --once)."""
        for job in self.jobs.values():
            job.run_once()

    # ---- scrape ----------------------------------------------------------------------------
    def pid_alive(self, pid: int) -> Optional[bool]:
        mode = self.cfg.pid_check
        if mode == "off":
            return None
        exists = os.path.exists(os.path.join(self.cfg.proc_root, str(pid)))
        if mode == "host":
            return exists
        last = self._last_scan()
        if last is None:
            return True if exists else None
        return exists or pid in last.host_pids or pid in last.ns_pids

    def _last_scan(self):
        """The processes job's last fresh, successful /proc scan (procscan.ProcessState); None
        without one."""
        job = self.jobs.get("processes")
        res = job.fresh() if job else None
        return res.value if res is not None and res.success else None

    def process_counts(self) -> Optional[Dict[str, int]]:
        """The last fresh /proc scan's count per process class; None without one."""
        last = self._last_scan()
        return None if last is None else dict(last.counts)

    def describe(self) -> List[Metric]:
        return []  # families vary with the configuration; nothing to pre-register

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        meta = []  # (collector, success, duration_s, last_run)
        out: List[Metric] = []

        info = GaugeMetricFamily(P + "exporter_build_info", "vllm-fleet exporter version.",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        out.append(info)
        if self.cfg.gpus_expected is not None:  # also where NVML is off: a GPU-less host states 0
            e = GaugeMetricFamily(P + "gpus_expected", "GPUs this host should have.")
            e.add_metric([], self.cfg.gpus_expected)
            out.append(e)

        readers = [("launch_state", self._collect_launch), ("fabric", self._collect_fabric)]
        if self.heal_log is not None:
            readers.append(("heal_log", lambda now: self.heal_log.metrics()))
        for name, fn in readers:
            t0 = time.perf_counter()
            try:
                out.extend(fn(now))
                ok = True
            except Exception:
                log.exception("collector %s failed", name)
                ok = False
            meta.append((name, ok, time.perf_counter() - t0, now))

        builders = {"health": self._collect_health, "canary": self._collect_canary,
                    "ray": self._collect_ray, "processes": self._collect_processes,
                    "nccl": self._collect_nccl, "nvml": self._collect_nvml,
                    "tenants": self._collect_tenants,
                    "verdict": self._collect_verdict, "peers": lambda job, now: []}
        for name, job in self.jobs.items():
            res = job.last
            fresh = job.fresh(now)
            try:
                out.extend(builders[name](job, now))
            except Exception:
                log.exception("building %s metrics failed", name)
            if res is not None:
                meta.append((name, bool(fresh is not None and res.success), res.duration_s,
                             res.finished))

        ok_f = GaugeMetricFamily(P + "collector_success",
                                 "1 when the collector's last run succeeded and is recent.",
                                 labels=["collector"])
        dur_f = GaugeMetricFamily(P + "collector_duration_seconds",
                                  "Duration of the collector's last run.", labels=["collector"])
        ts_f = GaugeMetricFamily(P + "collector_last_run_timestamp_seconds",
                                 "Unix time the collector's last run finished.",
                                 labels=["collector"])
        for name, ok, dur, ts in meta:
            ok_f.add_metric([name], 1 if ok else 0)
            dur_f.add_metric([name], dur)
            ts_f.add_metric([name], ts)
        out.extend([ok_f, dur_f, ts_f])
        return iter(out)

    # ---- builders --------------------------------------------------------------------------
    def _collect_health(self, job: Job, now: float) -> List[Metric]:
        res = job.fresh(now)
        up = GaugeMetricFamily(P + "engine_up",
                               "1 when the engine's /health answered 200 at the last probe "
                               "(0 when it did not, or the probe result is stale).")
        up.add_metric([], 1 if (res and res.success and res.value.up) else 0)
        out: List[Metric] = [up]
        if res and res.success:
            d = GaugeMetricFamily(P + "engine_health_probe_duration_seconds",
                                  "Duration of the last /health probe.")
            d.add_metric([], res.value.duration_s)
            out.append(d)
        return out

    def _collect_canary(self, job: Job, now: float) -> List[Metric]:
        out: List[Metric] = []
        runs = CounterMetricFamily(P + "canary_runs", "Canary completions by result.",
                                   labels=["result"])
        for k in ("success", "failure"):
            runs.add_metric([k], self.canary_runs[k])
        out.append(runs)
        res = job.fresh(now)
        if not (res and res.success):
            return out
        c = res.value
        s = GaugeMetricFamily(P + "canary_success",
                              "1 when the last canary chat completion streamed tokens and ended.")
        s.add_metric([], 1 if c.success else 0)
        d = GaugeMetricFamily(P + "canary_duration_seconds", "Duration of the last canary.")
        d.add_metric([], c.duration_s)
        out += [s, d]
        if c.ttft_s is not None:
            t = GaugeMetricFamily(P + "canary_ttft_seconds",
                                  "Time to first token of the last canary completion.")
            t.add_metric([], c.ttft_s)
            out.append(t)
        return out

    def _collect_ray(self, job: Job, now: float) -> List[Metric]:
        out: List[Metric] = []
        cfg = self.cfg
        for name, val, help_ in (
                ("ray_nodes_expected", cfg.ray_expected_nodes, "Ray nodes this replica should have."),
                ("ray_gpus_expected", cfg.ray_expected_gpus, "GPUs the Ray cluster should have."),
                ("ray_cpus_expected", cfg.ray_expected_cpus, "CPUs the Ray cluster should have.")):
            if val is not None:
                g = GaugeMetricFamily(P + name, help_)
                g.add_metric([], val)
                out.append(g)
        res = job.fresh(now)
        if res and res.success:
            r = res.value
            for name, val, help_ in (
                    ("ray_nodes_alive", r.nodes_alive, "Ray nodes in state ALIVE."),
                    ("ray_nodes_dead", r.nodes_dead, "Ray nodes known but not ALIVE."),
                    ("ray_gpus", r.gpus, "GPUs summed over alive Ray nodes."),
                    ("ray_cpus", r.cpus, "CPUs summed over alive Ray nodes.")):
                g = GaugeMetricFamily(P + name, help_)
                g.add_metric([], val)
                out.append(g)
        return out

    def _collect_tenants(self, job: Job, now: float) -> List[Metric]:
        res = job.fresh(now)
        if not (res and res.success):
            return []
        reqs = CounterMetricFamily(P + "tenant_requests",
                                   "Requests of the tenant (API key) seen by this balancer.",
                                   labels=["tenant"])
        limited = CounterMetricFamily(P + "tenant_rate_limited",
                                      "Requests of the tenant refused by its rate limit (429).",
                                      labels=["tenant"])
        rate = GaugeMetricFamily(P + "tenant_request_rate",
                                 "Requests of the tenant in the balancer's rate-limit period.",
                                 labels=["tenant"])
        for tenant, c in sorted(res.value.items()):
            reqs.add_metric([tenant], c.requests)
            limited.add_metric([tenant], c.rate_limited)
            rate.add_metric([tenant], c.rate)
        return [reqs, limited, rate]

    def _collect_processes(self, job: Job, now: float) -> List[Metric]:
        if not self.cfg.processes:
            return []
        exp = GaugeMetricFamily(P + "processes_expected",
                                "Processes of this class that should be running.",
                                labels=["process"])
        for pc in self.cfg.processes:
            exp.add_metric([pc.name], pc.expected)
        out: List[Metric] = [exp]
        res = job.fresh(now)
        if res and res.success:
            cnt = GaugeMetricFamily(P + "processes",
                                    "Running processes whose command line matches the class.",
                                    labels=["process"])
            start = GaugeMetricFamily(P + "process_start_time_seconds",
                                      "Start time of the oldest process of the class.",
                                      labels=["process"])
            for pc in self.cfg.processes:
                cnt.add_metric([pc.name], res.value.counts.get(pc.name, 0))
                if pc.name in res.value.oldest_start:
                    start.add_metric([pc.name], res.value.oldest_start[pc.name])
            out += [cnt, start]
        return out

    def _collect_verdict(self, job: Job, now: float) -> List[Metric]:
        return self.verdict.metrics(now) if self.verdict is not None else []

    def _collect_nccl(self, job: Job, now: float) -> List[Metric]:
        res = job.fresh(now)
        if not (res and res.success):
            return []
        v = res.value
        files = GaugeMetricFamily(P + "nccl_log_files", "NCCL log files read for this launch.")
        files.add_metric([], v["files"])
        use = GaugeMetricFamily(P + "nccl_transport_in_use",
                                "1 when NCCL's INFO log shows the transport in use on this host.",
                                labels=["transport"])
        conns = GaugeMetricFamily(P + "nccl_transport_connections",
                                  "Channel connections NCCL logged per transport (this launch).",
                                  labels=["transport"])
        for t in TRANSPORTS:
            use.add_metric([t], v["in_use"][t])
            conns.add_metric([t], v["connections"][t])
        return [files, use, conns]

    def _collect_nvml(self, job: Job, now: float) -> List[Metric]:
        out: List[Metric] = []
        res = job.fresh(now)
        if res and res.success:
            a = GaugeMetricFamily(P + "nvml_available", "1 when NVML initialised on this host.")
            a.add_metric([], 1 if res.value.available else 0)
            out.append(a)
            if res.value.count is not None:
                g = GaugeMetricFamily(P + "gpus", "GPUs NVML sees on this host.")
                g.add_metric([], res.value.count)
                out.append(g)
        return out

    def _collect_fabric(self, now: float) -> List[Metric]:
        env = load_fabric(self.cfg.fabric_file)
        if env is None:
            return []
        info = InfoMetricFamily(P + "fabric", "Fabric settings from fabric.json.")
        info.add_metric([], {k.lower(): env.get(k, "") for k in INFO_KEYS})
        ib = GaugeMetricFamily(P + "nccl_ib_expected",
                               "1 when the fabric role expects NCCL to use IB/RoCE.")
        ib.add_metric([], 1 if ib_expected(env) else 0)
        return [info, ib]

    def _collect_launch(self, now: float) -> List[Metric]:
        st = self.launch_reader.read(now, self.pid_alive, self.cfg.stuck_threshold_s,
                                     self.cfg.collective_stale_after_s)
        out: List[Metric] = []
        bad = GaugeMetricFamily(P + "state_files_unparseable",
                                "State files of the newest launch that could not be parsed.")
        bad.add_metric([], st.bad_files)
        procs = GaugeMetricFamily(P + "collective_processes",
                                  "Live worker processes with a collective watchdog file.")
        procs.add_metric([], len(st.collectives))
        stale = GaugeMetricFamily(P + "collective_stale_files",
                                  "Watchdog files of dead processes (ignored for stuck).")
        stale.add_metric([], st.stale_collective_files)
        nstuck = GaugeMetricFamily(P + "collective_stuck_processes",
                                   "Processes whose current collective is older than its threshold.")
        nstuck.add_metric([], sum(1 for c in st.collectives if c.stuck))
        out += [bad, procs, stale, nstuck]
        if st.launch_dir is None:
            return out
        li = InfoMetricFamily(P + "launch", "The newest launch on this host.")
        li.add_metric([], {"launch_id": str(st.launch.get("launch_id")
                                            or os.path.basename(st.launch_dir)),
                           "deployment": str(st.launch.get("deployment", ""))})
        out.append(li)
        if isinstance(st.launch.get("created"), (int, float)):
            c = GaugeMetricFamily(P + "launch_created_timestamp_seconds",
                                  "Unix time the newest launch was created.")
            c.add_metric([], float(st.launch["created"]))
            out.append(c)
        if st.collectives:
            stuck = GaugeMetricFamily(P + "collective_stuck",
                                      "1 while the rank's current collective is older than the "
                                      "threshold.", labels=["rank"])
            infl = GaugeMetricFamily(P + "collective_inflight_seconds",
                                     "Age of the rank's current collective (0: none in flight).",
                                     labels=["rank"])
            thr = GaugeMetricFamily(P + "collective_threshold_seconds",
                                    "Age at which a collective counts as stuck.", labels=["rank"])
            hb = GaugeMetricFamily(P + "collective_heartbeat_age_seconds",
                                   "Time since the rank's watchdog file was updated.",
                                   labels=["rank"])
            done = CounterMetricFamily(P + "collective_completed",
                                       "Collectives the rank completed (this launch).",
                                       labels=["rank"])
            for col in st.collectives:
                stuck.add_metric([col.rank], 1 if col.stuck else 0)
                infl.add_metric([col.rank], col.inflight_s)
                thr.add_metric([col.rank], col.threshold_s)
                hb.add_metric([col.rank], max(0.0, now - col.updated))
                done.add_metric([col.rank], col.completed_total)
            out += [stuck, infl, thr, hb, done]
        if st.histograms:
            h = HistogramMetricFamily(P + "allreduce_latency_seconds",
                                      "All-reduce latency from the plugin's probe and eager "
                                      "sampling, summed over this host's workers.",
                                      labels=list(HIST_LABELS))
            for hist in st.histograms:
                h.add_metric(list(hist.labels),
                             [(_fmt_le(b), c) for b, c in zip(hist.bounds, hist.counts)],
                             hist.sum_s)
            out.append(h)
        if st.p2p_gate:
            g = InfoMetricFamily(P + "p2p_gate", "The P2P gate's decision for this launch.")
            g.add_metric([], {
                "decision": str(st.p2p_gate.get("decision", "")),
                "nccl_p2p_disable": str(bool(st.p2p_gate.get("nccl_p2p_disable"))).lower(),
                "fully_nvlink": str(bool(st.p2p_gate.get("fully_nvlink"))).lower()})
            out.append(g)
        return out
