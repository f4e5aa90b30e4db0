"""One verdict per host and per replica: healthy, starting, maintenance or unhealthy, with reasons.

vLLM's /health stays 200 while an engine is wedged (a stopped worker, a frozen pipeline stage, a
collective that never returns), so the verdict is built from what each host can see of its own
launch (the launch's registered processes, the watchdog heartbeats and in-flight collectives the
plugin writes) and, on a replica's head, from the API, the other hosts' verdicts, Ray and the
canary. The balancer (HAProxy agent-check, agent.py) and the alert rules read this verdict;
nothing else decides whether a replica is hung.

Host verdict (every serving host, facts local to it):
  member_exited    a registered process of the launch is gone (kill -9, crash)
  member_stopped   a registered process is stopped (SIGSTOP: state T)
  member_frozen    a registered process's cgroup is frozen (docker pause)
  heartbeat_stale  a rank's watchdog file is older than heartbeat_max_age_s (any freeze the two
                   above miss: the flusher thread of a live process stopped running)
  collective_stuck a rank's current collective / PP transfer is older than its threshold
  no_launch        this host should run engine processes and has no launch
  process_missing  a process class this host must run (its Ray node's raylet; the API server on
                   a head) has fewer processes than expected in the last /proc scan (a dead Ray
                   node is seen here in seconds; Ray's own health check takes ~30 s)
  fabric_link_down a link the replica's inter-node traffic uses (fabric.json's socket interface,
                   its IB ports) is down by the kernel's account (hosts of multi-host replicas):
                   a cut link is seen in a second instead of when a transfer passes its
                   threshold (a fabric that drops traffic with its links up still shows there)
Replica verdict (head only) adds:
  api_down                 no /health 200 within api_max_silence_s
  member_host_unhealthy    another host of the replica reports a problem
  member_host_unreachable  another host's exporter did not answer within member_max_silence_s
  member_launch_mismatch   another host runs another launch than the head
  ray_nodes_missing        fewer Ray nodes ALIVE than the replica has hosts
  canary_failing           canary_max_failures canaries in a row failed
  start_timeout            the launch was not healthy start_timeout_s after it was created

Phases: a launch is ``starting`` until the API first answers /health (members that come and go
while vLLM starts are not problems then), ``healthy``/``unhealthy`` after. ``maintenance`` while a
playbook that stops the replica on purpose (rolling restart, teardown, healing) holds the
maintenance marker (``<state_dir>/maintenance-<deployment>.json``, ``{"until": <unix time>,
"reason": ...}``): no alert and no healing then; the marker expires on its own, so a playbook that
died cannot silence a replica for good.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from typing import Any, Dict, List, Optional

HOST_REASONS = ("no_launch", "member_exited", "member_stopped", "member_frozen",
                "heartbeat_stale", "collective_stuck", "process_missing", "fabric_link_down")
REPLICA_REASONS = HOST_REASONS + ("api_down", "member_host_unhealthy", "member_host_unreachable",
                                  "member_launch_mismatch", "ray_nodes_missing", "canary_failing",
                                  "start_timeout")
STATES = ("healthy", "starting", "maintenance", "unhealthy")


@dataclasses.dataclass(frozen=True)
class Problem:
    reason: str  # one of REPLICA_REASONS (a fixed set: metric label values)
    detail: str  # human text: which host, rank, pid, for how long
    cause: str = ""  # member_host_unhealthy: the member's own reason (the healer's scope reads it)
    process: str = ""  # process_missing (or its cause): the process class short of its count

    def to_json(self) -> Dict[str, str]:
        out = {"reason": self.reason, "detail": self.detail}
        if self.cause:
            out["cause"] = self.cause
        if self.process:
            out["process"] = self.process
        return out


@dataclasses.dataclass(frozen=True)
class Verdict:
    state: str  # one of STATES
    problems: List[Problem]
    launch_id: str
    host: str
    computed: float  # Unix time
    phase_since: float  # Unix time the state last changed

    @property
    def healthy(self) -> bool:
        return self.state == "healthy"

    def summary(self) -> str:
        if not self.problems:
            return self.state
        return f"{self.state}: " + "; ".join(p.detail for p in self.problems)

    def to_json(self) -> Dict[str, Any]:
        return {"state": self.state, "launch_id": self.launch_id, "host": self.host,
                "computed": self.computed, "since": self.phase_since,
                "problems": [p.to_json() for p in self.problems]}


def host_problems(host: str, launch_dir: Optional[str], members, collectives, now: float,
                  heartbeat_max_age_s: float, expect_engine: bool,
                  shortfalls=(), links_down=()) -> List[Problem]:
    """Problems of this host's own launch. `members`: members.Member list; `collectives`:
    launchstate.Collective list (live processes only); `shortfalls`: (class, running, expected)
    of the process classes below their expected count in the last /proc scan; `links_down`: text
    naming each fabric link that is down (fabric.links_down)."""
    # problems of the host itself, judged with or without a launch
    host_level = [Problem("process_missing", f"{host}: {running} of {expected} {name} process(es) running",
                          process=name)
                  for name, running, expected in shortfalls]
    host_level += [Problem("fabric_link_down", f"{host}: {what}") for what in links_down]
    if launch_dir is None:
        if expect_engine:
            return [Problem("no_launch", f"{host}: no launch of this deployment")] + host_level
        return host_level
    out = host_level
    for m in members:
        what = f"{host}: {m.role or 'process'} {m.pid}"
        if m.state == "exited":
            out.append(Problem("member_exited", f"{what} of the launch exited"))
        elif m.state == "stopped":
            out.append(Problem("member_stopped", f"{what} (host pid {m.host_pid}) is stopped"))
        elif m.state == "frozen":
            out.append(Problem("member_frozen", f"{what} (host pid {m.host_pid}) is frozen"))
    for c in collectives:
        age = now - c.updated
        if heartbeat_max_age_s > 0 and age > heartbeat_max_age_s:
            out.append(Problem("heartbeat_stale",
                               f"{host}: rank {c.rank} (pid {c.pid}) heartbeat {age:.0f}s old"))
        if c.stuck:
            out.append(Problem("collective_stuck",
                               f"{host}: rank {c.rank} stuck {c.inflight_s:.0f}s in "
                               f"{c.group} {c.op}"))
    return out


def read_maintenance(state_dir: str, deployment: str, now: float) -> Optional[str]:
    """The reason of an unexpired maintenance marker, else None."""
    names = [f"maintenance-{deployment}.json"] if deployment else []
    for name in names:
        try:
            with open(os.path.join(state_dir, name), encoding="utf-8") as fh:
                doc = json.load(fh)
            if float(doc.get("until", 0)) > now:
                return str(doc.get("reason") or "maintenance")
        except (OSError, ValueError, TypeError, AttributeError):
            continue
    return None


@dataclasses.dataclass
class MemberReport:
    """What the head last heard from another host of its replica."""

    url: str
    last_answer: float = 0.0  # Unix time of the last answer
    verdict: Optional[Dict[str, Any]] = None
    error: str = ""


class CanaryStreak:
    """Failed canaries in a row that speak about the launch serving now. A probe that started before
    the launch changed, or while the replica was in maintenance (its engine stopped on purpose),
    says nothing about the launch that serves after it: without this, a rolling restart's failed
    probes made the relaunched replica "canary_failing" the moment its maintenance ended, and paged
    (seen in CI) until the next probe succeeded. The canary job calls result(); the verdict job
    calls observe() (another thread: a lock)."""

    def __init__(self):
        self.failures = 0
        self._launch: Optional[str] = None
        self._counts_from = 0.0
        self._lock = threading.Lock()

    def result(self, success: bool, started: float) -> None:
        with self._lock:
            if success:
                self.failures = 0
            elif started >= self._counts_from:
                self.failures += 1

    def observe(self, now: float, launch_id: str, maintenance: Optional[str]) -> int:
        with self._lock:
            if maintenance is not None or launch_id != self._launch:
                self._launch, self._counts_from, self.failures = launch_id, now, 0
            return self.failures


class ReplicaJudge:
    """Keeps the phase of the current launch across evaluations (pure: time is passed in)."""

    def __init__(self, host: str, *, is_head: bool, start_timeout_s: float,
                 api_max_silence_s: float, member_max_silence_s: float,
                 canary_max_failures: int):
        self.host = host
        self.is_head = is_head
        self.start_timeout_s = start_timeout_s
        self.api_max_silence_s = api_max_silence_s
        self.member_max_silence_s = member_max_silence_s
        self.canary_max_failures = canary_max_failures
        self._launch = ""
        self._serving_since: Optional[float] = None
        self._state = "starting"
        self._since = time.time()

    def judge(self, now: float, *, launch_id: str, launch_created: Optional[float],
              own: List[Problem], maintenance: Optional[str],
              last_health_ok: Optional[float] = None,
              members: Optional[List[MemberReport]] = None,
              ray_alive: Optional[int] = None, ray_expected: Optional[int] = None,
              canary_failures: int = 0) -> Verdict:
        if launch_id != self._launch:
            self._launch = launch_id
            self._serving_since = None
        problems = list(own)
        if self.is_head:
            if (last_health_ok is not None and launch_created is not None
                    and last_health_ok >= launch_created and self._serving_since is None):
                self._serving_since = last_health_ok
            if self._serving_since is not None and (
                    last_health_ok is None or now - last_health_ok > self.api_max_silence_s):
                ago = "never" if last_health_ok is None else f"{now - last_health_ok:.0f}s ago"
                problems.append(Problem("api_down", f"{self.host}: last /health 200 {ago}"))
            for m in members or []:
                problems.extend(self._member_problems(m, now, launch_id))
            if ray_expected is not None and ray_alive is not None and ray_alive < ray_expected:
                problems.append(Problem("ray_nodes_missing",
                                        f"Ray: {ray_alive} of {ray_expected} nodes alive"))
            if self.canary_max_failures > 0 and canary_failures >= self.canary_max_failures:
                problems.append(Problem("canary_failing",
                                        f"{self.host}: {canary_failures} canaries in a row failed"))
        if maintenance is not None:
            state = "maintenance"
        elif self.is_head and self._serving_since is None and launch_id:
            age = now - launch_created if launch_created else 0.0
            if self.start_timeout_s > 0 and age > self.start_timeout_s:
                problems.append(Problem("start_timeout",
                                        f"{self.host}: launch {launch_id} not serving after "
                                        f"{age:.0f}s"))
                state = "unhealthy"
            else:
                state = "starting"
        else:
            state = "unhealthy" if problems else "healthy"
        if state != self._state:
            self._state, self._since = state, now
        return Verdict(state, problems, launch_id, self.host, now, self._since)

    def _member_problems(self, m: MemberReport, now: float, launch_id: str) -> List[Problem]:
        if m.verdict is None or now - m.last_answer > self.member_max_silence_s:
            ago = "never" if not m.last_answer else f"{now - m.last_answer:.0f}s ago"
            return [Problem("member_host_unreachable",
                            f"{m.url}: no verdict (last answer {ago}; {m.error or 'no error'})")]
        out = []
        v = m.verdict
        host = v.get("host") or m.url
        other = str(v.get("launch_id") or "")
        if other and launch_id and other != launch_id:
            out.append(Problem("member_launch_mismatch",
                               f"{host}: runs launch {other}, head runs {launch_id}"))
        for p in v.get("problems") or []:
            if isinstance(p, dict) and p.get("reason") in HOST_REASONS:
                out.append(Problem("member_host_unhealthy", str(p.get("detail", "")),
                                   cause=str(p["reason"]), process=str(p.get("process") or "")))
        return out
