"""The verdict as the exporter runs it: a 1 s job that judges this host (and, on a head, the
replica), a job that asks the replica's other hosts for their verdicts, the metrics, and the line
the HAProxy agent-check answers. The rules themselves are in verdict.py."""

from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Dict, List, Optional

from prometheus_client.core import GaugeMetricFamily, Metric

from .config import Config
from .jobs import Job
from .launchstate import JsonCache, LaunchReader
from .members import MemberTracker, read_roles
from .checks import fetch_verdict
from .fabric import fabric_links, links_down
from .verdict import (HOST_REASONS, REPLICA_REASONS, STATES, CanaryStreak, MemberReport, ReplicaJudge, Verdict,
                      host_problems, read_maintenance)

log = logging.getLogger(__name__)
P = "vllm_fleet_"
AGENT_LINE_MAX = 200  # HAProxy shows the '#' description on its stats page: keep it short


class VerdictKeeper:
    def __init__(self, cfg: Config, pid_alive, process_counts=lambda: None):
        self.cfg = cfg
        self.pid_alive = pid_alive
        # the processes job's last counts {class: n}, None while it has none (unknown is not missing)
        self.process_counts = process_counts
        self.is_head = bool(cfg.engine_url)
        # own reader (jobs run in their own thread), of this deployment's launches only
        self.reader = LaunchReader(cfg.launches_dir, cfg.deployment)
        self.tracker = MemberTracker(cfg.proc_root, cfg.cgroup_root)
        self._fabric_json = JsonCache()
        self.judge = ReplicaJudge(cfg.host, is_head=self.is_head,
                                  start_timeout_s=cfg.start_timeout_s,
                                  api_max_silence_s=cfg.api_max_silence_s,
                                  member_max_silence_s=cfg.member_max_silence_s,
                                  canary_max_failures=cfg.canary_max_failures)
        self.reports: Dict[str, MemberReport] = {u: MemberReport(u) for u in cfg.replica_member_urls}
        self.last_health_ok: Optional[float] = None
        self.canary = CanaryStreak()  # failed probes in a row, of the launch serving now
        self.ray_state: Optional[int] = None  # ALIVE nodes at the last successful Ray query
        self.host_verdict: Optional[Verdict] = None
        self.jobs: Dict[str, Job] = {
            "verdict": Job("verdict", self.evaluate, cfg.verdict_interval_s,
                           max_age_s=5 * cfg.verdict_interval_s + 5)}
        if self.reports:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=min(16, len(self.reports)), thread_name_prefix="peer")
            self.jobs["peers"] = Job("peers", self.ask_peers, cfg.verdict_interval_s,
                                     max_age_s=5 * cfg.verdict_interval_s + cfg.member_timeout_s + 5)

    # ---- inputs fed by the other jobs --------------------------------------------------------
    def health_result(self, up: bool, when: float) -> None:
        if up:
            self.last_health_ok = when

    def canary_result(self, success: bool, started: float) -> None:
        self.canary.result(success, started)

    def ray_result(self, alive: Optional[int]) -> None:
        self.ray_state = alive

    # ---- jobs --------------------------------------------------------------------------------
    def ask_peers(self) -> int:
        def one(rep: MemberReport) -> None:
            try:
                rep.verdict = fetch_verdict(rep.url, self.cfg.member_timeout_s)
                rep.last_answer = time.time()
                rep.error = ""
            except Exception as exc:  # unreachable, timeout, garbage: judged by silence
                rep.error = f"{type(exc).__name__}: {exc}"[:200]
        list(self._pool.map(one, self.reports.values()))
        return sum(1 for r in self.reports.values() if not r.error)

    def evaluate(self) -> Verdict:
        now = time.time()
        st = self.reader.read(now, self.pid_alive, self.cfg.stuck_threshold_s,
                              self.cfg.collective_stale_after_s)
        launch_id = str(st.launch.get("launch_id") or "") if st.launch_dir else ""
        created = st.launch.get("created") if st.launch_dir else None
        members = []
        if st.launch_dir:
            roles = dict(read_roles(st.launch_dir))
            members = self.tracker.states(sorted(roles), roles)
        counts = self.process_counts()
        shortfalls = [] if counts is None else [
            (pc.name, counts.get(pc.name, 0), pc.expected) for pc in self.cfg.processes
            if counts.get(pc.name, 0) < pc.expected]
        own = host_problems(self.cfg.host, st.launch_dir, members, st.collectives, now,
                            self.cfg.heartbeat_max_age_s, self.cfg.expect_engine, shortfalls,
                            self.fabric_links_down())
        maintenance = read_maintenance(self.cfg.state_dir, self.cfg.deployment, now)
        self.host_verdict = Verdict("maintenance" if maintenance else
                                    ("unhealthy" if own else "healthy"),
                                    own, launch_id, self.cfg.host, now, now)
        expected = self.cfg.ray_expected_nodes if self.is_head else None
        v = self.judge.judge(
            now, launch_id=launch_id,
            launch_created=float(created) if isinstance(created, (int, float)) else None,
            own=own, maintenance=maintenance, last_health_ok=self.last_health_ok,
            members=list(self.reports.values()), ray_alive=self.ray_state,
            ray_expected=expected, canary_failures=self.canary.observe(now, launch_id, maintenance))
        if v.state == "unhealthy" and (self.latest() is None or not self.latest().state == v.state):
            log.warning("verdict: %s", v.summary())
        elif v.state != "unhealthy" and self.latest() is not None \
                and self.latest().state == "unhealthy":
            log.warning("verdict: %s again", v.state)
        return v

    def fabric_links_down(self) -> List[str]:
        """The links' state is read with each verdict (a few sysfs files), so a cut link is out in
        seconds; fabric.json itself is parsed again only when it changes (a deploy)."""
        if not self.cfg.fabric_link_check:
            return []
        links = fabric_links(self.cfg.fabric_file, self._fabric_json.load)
        return [] if links is None else links_down(*links, sys_root=self.cfg.sys_root)

    # ---- outputs -----------------------------------------------------------------------------
    def latest(self, now: Optional[float] = None) -> Optional[Verdict]:
        res = self.jobs["verdict"].fresh(now)
        return res.value if res is not None and res.success else None

    def agent_line(self) -> str:
        """HAProxy agent-check answer: 'down #why' only on positive evidence of a hung replica;
        'up' otherwise (no verdict yet, a stale one, starting, maintenance), which hands the
        decision back to HAProxy's own /health check (HAProxy: only the agent can lift its own
        'down')."""
        v = self.latest()
        if v is None or v.state != "unhealthy":
            return "up\n"
        why = " ".join(v.summary().split())  # one line, no CR/LF
        return f"down #{why[:AGENT_LINE_MAX]}\n"

    def http_body(self) -> "tuple[int, Dict]":
        v = self.latest()
        if v is None:
            return 503, {"state": "unknown", "host": self.cfg.host, "launch_id": "",
                         "problems": [{"reason": "no_verdict", "detail": "no fresh verdict"}]}
        doc = v.to_json()
        if self.is_head and self.host_verdict is not None:
            doc["host_verdict"] = self.host_verdict.to_json()
        return (503 if v.state == "unhealthy" else 200), doc

    def metrics(self, now: float) -> List[Metric]:
        v = self.latest(now)
        if v is None:
            return []
        hv = self.host_verdict or v
        out: List[Metric] = []
        hh = GaugeMetricFamily(P + "host_healthy",
                               "0 when a process of this host's launch is exited, stopped, "
                               "frozen, silent or stuck (the host verdict; 1 in maintenance).")
        hh.add_metric([], 0 if hv.state == "unhealthy" else 1)
        hp = GaugeMetricFamily(P + "host_problem", "1 while the host verdict has this problem.",
                               labels=["reason"])
        active = {p.reason for p in hv.problems}
        for r in HOST_REASONS:
            hp.add_metric([r], 1 if r in active else 0)
        out += [hh, hp]
        if not self.is_head:
            return out
        rs = GaugeMetricFamily(P + "replica_state",
                               "The replica's verdict (1 for the current state): healthy, "
                               "starting, maintenance or unhealthy.", labels=["state"])
        for s in STATES:
            rs.add_metric([s], 1 if v.state == s else 0)
        since = GaugeMetricFamily(P + "replica_state_since_timestamp_seconds",
                                  "Unix time the replica entered its current state.")
        since.add_metric([], v.phase_since)
        rp = GaugeMetricFamily(P + "replica_problem",
                               "1 while the replica verdict has this problem.", labels=["reason"])
        ractive = {p.reason for p in v.problems}
        for r in REPLICA_REASONS:
            rp.add_metric([r], 1 if r in ractive else 0)
        out += [rs, since, rp]
        if self.reports:
            reach = GaugeMetricFamily(P + "replica_member_reachable",
                                      "1 when the other host's exporter answered its verdict "
                                      "recently.", labels=["member"])
            for url, rep in sorted(self.reports.items()):
                ok = rep.verdict is not None and now - rep.last_answer <= \
                    self.cfg.member_max_silence_s
                reach.add_metric([url], 1 if ok else 0)
            out.append(reach)
        return out
