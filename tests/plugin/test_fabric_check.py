"""Fabric check over localhost with 2 Gloo processes, and its timeout paths (never hangs)."""
import json
import socket
import subprocess
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


def test_hung_rank_is_named_by_its_peer(torch_py):
    t0 = time.time()
    r = subprocess.run(_cmd(torch_py, "--nproc-per-node", "2", "--launch-id", "fc-hang",
                            "--master-port", str(_free_port()), "--timeout", "4",
                            "--max-size", "1K"),
                       capture_output=True, text=True, timeout=120,
                       env=child_env(VLLM_FLEET_FABRIC_TEST_HANG_RANK=1))
    elapsed = time.time() - t0
    assert r.returncode == 124, r.stdout + r.stderr
    line = next(x for x in r.stderr.splitlines() if x.startswith("FABRIC CHECK TIMEOUT: rank 0"))
    assert "behind: rank 1 on node 0" in line and "interface lo" in line
    assert elapsed < 60
