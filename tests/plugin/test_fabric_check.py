"""Fabric check over localhost with 2 Gloo processes, and its timeout paths (never hangs)."""
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import ENGINE_PY, child_env, engine_has
from tests.engine_parts import RAY_NET, freeze_env
from vllm_fleet.fabric_check import launcher
from vllm_fleet.fabric_check.cli import parse_size
from vllm_fleet.fabric_check.coordinator import fabric_port


def _cmd(py, *args):
    return [py, "-m", "vllm_fleet.fabric_check.cli", "--ifname", "lo", *args]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_busbw_formula_and_sizes():
    alg, bus = launcher.busbw(1 << 20, 1e-3, 4)
    assert alg == (1 << 20) / 1e-3 and bus == alg * 2 * 3 / 4
    assert launcher.busbw(8, 1.0, 2)[1] == 8.0  # n=2: factor 1
    sizes = launcher.default_sizes(1 << 30)
    assert sizes[0] == 8 and sizes[-1] == 1 << 30 and sizes == sorted(sizes)
    assert parse_size("16M") == 16 << 20 and parse_size("1G") == 1 << 30 and parse_size("8") == 8


def test_fabric_port_is_the_same_for_every_node():
    assert fabric_port("x-1") == fabric_port("x-1") and fabric_port("x-1") != fabric_port("x-2")


def test_suspects_isolate_the_common_node():
    def pair(a, b, ok=True, slow=False):
        return {"a": a, "b": b, "ok": ok, "slow": slow}
    pairs = [pair(0, 1), pair(0, 2, slow=True), pair(1, 2, ok=False)]
    assert launcher.suspects(pairs) == [2]
    assert launcher.suspects([pair(0, 1), pair(0, 2), pair(1, 2)]) == []


def test_two_gloo_ranks_on_localhost(torch_py, tmp_path):
    out_json = tmp_path / "fabric.json"
    t0 = time.time()
    r = subprocess.run(_cmd(torch_py, "--nproc-per-node", "2", "--launch-id", "fc-ok",
                            "--max-size", "1M", "--master-port", str(_free_port()),
                            "--timeout", "30", "--json-out", str(out_json)),
                       capture_output=True, text=True, timeout=600, env=child_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "busbw_GB/s" in r.stdout and "RESULT: OK" in r.stdout
    report = json.loads(out_json.read_text())
    assert json.loads(r.stdout.split("JSON ", 1)[1].splitlines()[0]) == report
    assert report["backend"] == "gloo" and report["world_size"] == 2
    assert [row["size_bytes"] for row in report["results"]][0] == 8
    assert report["results"][-1]["size_bytes"] == 1 << 20
    for row in report["results"]:
        assert row["correct"] is True and row["latency_s"] > 0
        assert abs(row["busbw_Bps"] - row["size_bytes"] / row["latency_s"]) < 1e-6 * row["busbw_Bps"] + 1e-9
    assert len(report["pairs"]) == 1 and report["pairs"][0]["ok"]
    assert {r_["ifname"] for r_ in report["ranks"]} == {"lo"}
    print(f"fabric check 2 ranks: {time.time() - t0:.1f}s")


def test_missing_node_times_out_naming_it(torch_py):
    t0 = time.time()
    r = subprocess.run(_cmd(torch_py, "--nnodes", "2", "--node-rank", "0", "--nproc-per-node",
                            "1", "--launch-id", "fc-missing", "--master-port", str(_free_port()),
                            "--timeout", "4", "--max-size", "1K"),
                       capture_output=True, text=True, timeout=600, env=child_env())
    elapsed = time.time() - t0
    assert r.returncode == 124, r.stdout + r.stderr
    assert "FABRIC CHECK TIMEOUT" in r.stderr
    assert "rank 1 on node 1" in r.stderr and "interface lo" in r.stderr
    # ends on its own timers (4 s step, hard timer, asking who is behind), never hangs; the rest
    # is interpreter and torch start-up, which takes long on a busy machine
    assert elapsed < 4 + launcher.HARD_EXTRA_S + launcher.SILENT_S + launcher.ASK_S + 120


# Step timeout of the SIGSTOP tests: long enough for every rank to start, join and set up its
# communicator on a busy 2-core machine (ranks that start seconds apart, each importing torch),
# so that the timeout that ends the check is the stopped rank's, never a slow start's.
STOP_TIMEOUT_S = 30
FREEZE_STEP = 3  # the sweep's first all-reduce (1 join, 2 communicator init)
FROZEN_WAIT_S = 660  # every rank started (torch imported) on a busy machine


def _read_lines(stream, sink):
    for line in stream:
        sink.append(line)


def _plan_freeze(plan_dir: Path, launch_id: str, rank: int = 1) -> Path:
    """Rank ``rank`` of ``launch_id`` stops itself (SIGSTOP) on entering the sweep's first
    all-reduce (tests/freeze_rank): inside the sweep every time, however busy the machine."""
    plan, report = plan_dir / launch_id, plan_dir / f"{launch_id}.stopped"
    report.unlink(missing_ok=True)
    plan.write_text(f"{rank} {FREEZE_STEP}\n")
    return report


def _wait_frozen(report: Path, procs, output) -> tuple[int, float]:
    """(pid, time) of the frozen rank, once it has stopped itself; fails if the check ended
    first or nothing froze within FROZEN_WAIT_S."""
    deadline = time.time() + FROZEN_WAIT_S
    while not report.exists():
        if all(p.poll() is not None for p in procs) or time.time() > deadline:
            raise AssertionError(f"no rank froze within {FROZEN_WAIT_S}s (check ended: "
                                 f"{[p.poll() for p in procs]}):\n{output()[-6000:]}")
        time.sleep(0.2)
    pid, when, what = report.read_text().split(maxsplit=2)
    assert what.startswith("all_reduce "), what  # inside the sweep
    return int(pid), float(when)


def _resume_and_reap(stopped, procs):
    """Let a SIGSTOPped rank go on (it then ends by itself) and kill what is still running."""
    if stopped:
        try:
            os.kill(stopped, signal.SIGCONT)
        except OSError:
            pass
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_stopped_rank_is_named_and_every_node_ends_within_the_hard_timeout(torch_py, tmp_path):
    """A rank frozen for real (SIGSTOP) inside the all-reduce sweep, on the second of two nodes:
    its peer names it (node, rank, interface, not responding) and exits 124; its own node's
    launcher names it as stopped and ends too; both within the hard timeout, never hanging."""
    timeout = STOP_TIMEOUT_S
    port = _free_port()
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--launch-id", "fc-stop",
              "--master-port", str(port), "--timeout", str(timeout), "--max-size", "64M"]
    env = child_env(FLEET_NODE_NAME="fabhost", **freeze_env(tmp_path))
    nodes, out, stopped = [], {0: [], 1: []}, None
    report = _plan_freeze(tmp_path, "fc-stop")
    try:
        for rank in (0, 1):
            p = subprocess.Popen(_cmd(torch_py, "--node-rank", str(rank), *common), env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            nodes.append(p)
            for stream in (p.stdout, p.stderr):
                threading.Thread(target=_read_lines, args=(stream, out[rank]), daemon=True).start()
        stopped, t_stop = _wait_frozen(report, nodes, lambda: "".join(out[0] + out[1]))
        assert all(p.poll() is None for p in nodes), "".join(out[0] + out[1])
        hard = timeout + launcher.HARD_EXTRA_S
        for p in nodes:
            p.wait(timeout=hard + launcher.SILENT_S + launcher.ASK_S + 120)
        took = time.time() - t_stop
        text0, text1 = "".join(out[0]), "".join(out[1])
        assert nodes[0].returncode == 124, text0
        assert nodes[1].returncode == 124, text1
        assert "RESULT: OK" not in text0
        peer = next(x for x in out[0] if x.startswith("FABRIC CHECK TIMEOUT: rank 0 on node 0"))
        blamed = peer.split("behind: ", 1)[1]
        assert blamed.startswith("rank 1 on node 1 (fabhost, interface lo"), peer
        assert "not responding" in blamed and "still at: " in blamed, peer
        assert f"(step timeout {timeout}s)" in peer, peer
        assert f"fabric check: rank 1 on node 1 (fabhost, interface lo, 127.0.0.1) pid {stopped} " \
            "ready (gloo)" in text1 and "fabric check: rank 0 on node 0" in text0
        own = next(x for x in out[1] if x.startswith("FABRIC CHECK TIMEOUT: rank 1 on node 1"))
        assert "interface lo" in own and f"pid {stopped}" in own and "stopped" in own, own
        # the stuck node's launcher gives up after the hard timeout, not before; the peer after
        # the group's. The upper bound only says "ends by itself" (slack for a busy machine).
        assert hard - 1 <= took < hard + launcher.SILENT_S + launcher.ASK_S + 60, took
        print(f"SIGSTOP timeout path: both nodes ended {took:.1f}s after the stop\n{peer}{own}")
    finally:
        _resume_and_reap(stopped, nodes)


# --- Ray launcher: the real local Ray cluster of two nodes (tests/conftest.py: ray_cluster) ---


@pytest.mark.engine
def test_ray_launcher_places_one_task_per_node_and_gathers_the_table(ray_cluster, tmp_path):
    out_json = tmp_path / "fabric-ray.json"
    t0 = time.time()
    r = subprocess.run(_ray_cmd(ray_cluster, "fc-ray", "--max-size", "1M", "--timeout", "30",
                                "--ray-timeout", "180", "--json-out", str(out_json)),
                       capture_output=True, text=True, timeout=900, env=child_env())
    took = time.time() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RESULT: OK" in r.stdout and "busbw_GB/s" in r.stdout
    report = json.loads(r.stdout.split("JSON ", 1)[1].splitlines()[0])
    assert json.loads(out_json.read_text()) == report
    assert report["backend"] == "gloo" and report["world_size"] == 2
    assert all(row["correct"] for row in report["results"])
    assert report["results"][-1]["size_bytes"] == 1 << 20
    # one rank per Ray node, each on its own node, with the interface of its own environment
    hosts = {rk["node_rank"]: rk["host"] for rk in report["ranks"]}
    assert sorted(hosts) == [0, 1]
    assert set(hosts.values()) == {f"raynode-{RAY_NET}.2", f"raynode-{RAY_NET}.3"}
    assert {rk["ifname"] for rk in report["ranks"]} == {"lo"}
    assert len(report["pairs"]) == 1 and report["pairs"][0]["ok"]
    # the coordinator ran on node 0's Ray address at the launch id's shared fabric port
    head = r.stderr.split("coordinator ", 1)[1].split()[0]
    assert head.rsplit(":", 1)[1] == str(fabric_port("fc-ray"))
    assert head.rsplit(":", 1)[0] in (f"{RAY_NET}.2", f"{RAY_NET}.3")
    assert "[node 0 " in r.stderr and "[node 1 " in r.stderr and " ready (gloo)" in r.stderr
    print(f"fabric check via Ray, 2 nodes: {took:.1f}s")


def _ray_cmd(cluster, launch_id, *args, token=True):
    token_args = ["--ray-auth-token-file", cluster[0].token_file] if token else []
    return [str(ENGINE_PY), "-m", "vllm_fleet.fabric_check.cli", "--launcher", "ray",
            "--ray-address", cluster[0].address, "--launch-id", launch_id, *token_args, *args]


@pytest.mark.engine
def test_ray_launcher_without_the_token_is_refused_by_the_cluster(ray_cluster, tmp_path):
    """The cluster runs with token authentication: a driver without the token (none in its
    environment or home) cannot connect; with a token file that cannot be read it stops at once."""
    env = child_env(HOME=tmp_path)
    env.pop("RAY_AUTH_MODE", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    r = subprocess.run(_ray_cmd(ray_cluster, "fc-ray-noauth", "--ray-timeout", "40", token=False),
                       capture_output=True, text=True, timeout=200, env=env)
    assert r.returncode in (1, 124), r.stdout + r.stderr
    assert "RESULT: OK" not in r.stdout
    assert ray_cluster[0].address in r.stderr, r.stderr[-3000:]
    missing = tmp_path / "no-such-token"
    r = subprocess.run(_ray_cmd(ray_cluster, "fc-ray-badfile", token=False)
                       + ["--ray-auth-token-file", str(missing)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1 and f"token file {missing} cannot be read" in r.stderr, r.stderr


@pytest.mark.engine
def test_ray_launcher_names_the_node_of_a_stopped_rank(ray_cluster):
    """A rank frozen (SIGSTOP) on one Ray node: the driver still ends within the hard timeout,
    with that node's rank named as stopped and its peer naming it as not responding."""
    timeout = STOP_TIMEOUT_S
    report = _plan_freeze(ray_cluster[0].freeze_dir, "fc-ray-stop")
    p = subprocess.Popen(_ray_cmd(ray_cluster, "fc-ray-stop", "--max-size", "64M", "--timeout",
                                  str(timeout), "--ray-timeout", "180"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=child_env())
    out, err, stopped = [], [], None
    threading.Thread(target=_read_lines, args=(p.stdout, out), daemon=True).start()
    threading.Thread(target=_read_lines, args=(p.stderr, err), daemon=True).start()
    try:
        # the ranks' output comes back with the node's only at the end: the freeze report says
        # when rank 1 stopped
        stopped, t_stop = _wait_frozen(report, [p], lambda: "".join(out + err))
        assert p.poll() is None, "".join(out + err)
        p.wait(timeout=timeout + launcher.HARD_EXTRA_S + launcher.SILENT_S + launcher.ASK_S + 180)
        took = time.time() - t_stop
        text = "".join(err)
        assert p.returncode == 124, "".join(out) + text
        assert "RESULT: OK" not in "".join(out)
        own = next(x for x in err if "FABRIC CHECK TIMEOUT: rank 1 on node 1" in x)
        assert own.startswith(f"[node 1 {RAY_NET}.") and "stopped" in own and "interface lo" in own
        peer = next(x for x in err if "FABRIC CHECK TIMEOUT: rank 0 on node 0" in x)
        assert f"behind: rank 1 on node 1 (raynode-{RAY_NET}." in peer and "not responding" in peer
        # ends by itself: the ranks' timers, then Ray hands the nodes' output back (busy-box slack)
        assert took < timeout + launcher.HARD_EXTRA_S + launcher.SILENT_S + launcher.ASK_S + 120, took
        print(f"Ray launcher, SIGSTOP of rank 1: ended {took:.1f}s after the stop\n{own}{peer}")
    finally:
        _resume_and_reap(stopped, [p])


@pytest.mark.engine
def test_ray_launcher_more_nodes_than_the_cluster_has_fails_listing_the_nodes(ray_cluster):
    r = subprocess.run(_ray_cmd(ray_cluster, "fc-ray-3", "--nnodes", "3", "--ray-timeout", "180"),
                       capture_output=True, text=True, timeout=600, env=child_env())
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"Ray cluster at {ray_cluster[0].address} has 2 node(s)" in r.stderr, r.stderr
    assert "3 wanted" in r.stderr
    assert f"{RAY_NET}.2 (" in r.stderr and f"{RAY_NET}.3 (" in r.stderr


@pytest.mark.engine
def test_ray_launcher_gives_up_on_an_unreachable_cluster_naming_it():
    if not engine_has("ray"):
        pytest.skip("needs ray in the engine venv (tools/bootstrap.sh engine)")
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    t0 = time.time()
    r = subprocess.run([str(ENGINE_PY), "-m", "vllm_fleet.fabric_check.cli", "--launcher", "ray",
                        "--ray-address", address, "--launch-id", "fc-ray-none",
                        "--ray-timeout", "8"], capture_output=True, text=True, timeout=600,
                       env=child_env())
    took = time.time() - t0
    assert r.returncode in (1, 124), r.stdout + r.stderr
    assert address in r.stderr and ("not reachable" in r.stderr or "cannot connect" in r.stderr)
    # gives up at its own deadline (8 s after importing Ray; slack for a busy machine's start-up)
    assert took < 8 + 120, took
