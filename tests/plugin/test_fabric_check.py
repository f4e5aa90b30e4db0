"""Fabric check over localhost with 2 Gloo processes, and its timeout paths (never hangs)."""
import json
import os
import signal
import socket
import subprocess
import threading
import time

from conftest import child_env
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
                       capture_output=True, text=True, timeout=180, env=child_env())
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
                       capture_output=True, text=True, timeout=120, env=child_env())
    elapsed = time.time() - t0
    assert r.returncode == 124, r.stdout + r.stderr
    assert "FABRIC CHECK TIMEOUT" in r.stderr
    assert "rank 1 on node 1" in r.stderr and "interface lo" in r.stderr
    assert elapsed < 60


def _read_lines(stream, sink):
    for line in stream:
        sink.append(line)


def test_stopped_rank_is_named_and_every_node_ends_within_the_hard_timeout(torch_py):
    """A rank frozen for real (SIGSTOP) in the middle of the check, on the second of two nodes:
    its peer names it (node, rank, interface, not responding) and exits 124; its own node's
    launcher names it as stopped and ends too; both within the hard timeout, never hanging."""
    timeout = 4
    port = _free_port()
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--launch-id", "fc-stop",
              "--master-port", str(port), "--timeout", str(timeout), "--max-size", "64M"]
    env = child_env(FLEET_NODE_NAME="fabhost")
    nodes, out, stopped = [], {0: [], 1: []}, None
    try:
        for rank in (0, 1):
            p = subprocess.Popen(_cmd(torch_py, "--node-rank", str(rank), *common), env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            nodes.append(p)
            for stream in (p.stdout, p.stderr):
                threading.Thread(target=_read_lines, args=(stream, out[rank]), daemon=True).start()
        deadline = time.time() + 120
        while stopped is None and time.time() < deadline:
            ready = [x for x in out[1] if x.startswith("fabric check: rank 1 on node 1")]
            if ready:
                stopped = int(ready[0].split(" pid ")[1].split()[0])
                os.kill(stopped, signal.SIGSTOP)  # frozen inside the sweep (64 MiB sizes)
                break
            assert all(p.poll() is None for p in nodes), "".join(out[0] + out[1])
            time.sleep(0.02)
        assert stopped, "rank 1 never reported ready:\n" + "".join(out[0] + out[1])
        t_stop = time.time()
        hard = timeout + launcher.HARD_EXTRA_S
        for p in nodes:
            p.wait(timeout=hard + launcher.SILENT_S + 30)
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
        own = next(x for x in out[1] if x.startswith("FABRIC CHECK TIMEOUT: rank 1 on node 1"))
        assert "interface lo" in own and f"pid {stopped}" in own and "stopped" in own, own
        # the stuck node's launcher gives up after the hard timeout; the peer after the group's
        assert hard <= took < hard + launcher.SILENT_S + 15, took
        print(f"SIGSTOP timeout path: both nodes ended {took:.1f}s after the stop\n{peer}{own}")
    finally:
        if stopped:
            try:
                os.kill(stopped, signal.SIGCONT)
            except OSError:
                pass
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.wait(10)
