"""P2P gate decision logic with fake probe results (the CUDA probe itself runs on the GPU host)."""
import json
import os

import pytest

from vllm_fleet import p2p_gate
from vllm_fleet.p2p_gate import Facts, PairResult


def fake_pairs(n, peer=True, ipc_ok=True, bad=()):
    """Fake probe output for n GPUs; pairs in ``bad`` get the opposite peer/ipc answer."""
    out = []
    for a in range(n):
        for b in range(a + 1, n):
            p, i = peer, ipc_ok
            if (a, b) in bad:
                p, i = bad[(a, b)]
            out.append(PairResult(a, b, p, i))
    return out


def test_cpu_is_not_applicable():
    d = p2p_gate.decide(Facts("cpu", [], [], None))
    assert d.decision == "not_applicable" and not d.nccl_p2p_disable


def test_single_gpu_is_not_applicable():
    d = p2p_gate.decide(Facts("cuda", ["GPU-a"], [], None))
    assert d.decision == "not_applicable"


def test_two_gpus_all_good_enabled_even_without_nvlink():
    d = p2p_gate.decide(Facts("cuda", ["a", "b"], fake_pairs(2), False))
    assert d.decision == "enabled" and not d.nccl_p2p_disable


def test_peer_access_claimed_but_ipc_fails_disables_and_sets_nccl_p2p_disable():
    pairs = fake_pairs(4, bad={(1, 3): (True, False)})
    d = p2p_gate.decide(Facts("cuda", list("abcd"), pairs, True))
    assert d.decision == "disabled"
    assert d.nccl_p2p_disable is True
    assert "1-3" in d.reason and "broken" in d.reason


def test_no_peer_access_disables_custom_ar_but_leaves_nccl_alone():
    pairs = fake_pairs(2, bad={(0, 1): (False, False)})
    d = p2p_gate.decide(Facts("cuda", ["a", "b"], pairs, None))
    assert d.decision == "disabled" and d.nccl_p2p_disable is False
    assert "no peer access" in d.reason


def test_declared_unavailable_disables_custom_ar_and_nccl_p2p_without_probing():
    d = p2p_gate.decide(Facts("cuda", ["GPU-a", "GPU-b"], [], True), declared="unavailable")
    assert d.decision == "disabled" and d.nccl_p2p_disable
    assert "declared unavailable" in d.reason
    # CPU stays not_applicable whatever is declared
    assert p2p_gate.decide(Facts("cpu", [], [], None), declared="unavailable").decision == "not_applicable"


def test_more_than_two_pcie_gpus_disabled():
    d = p2p_gate.decide(Facts("cuda", list("abcd"), fake_pairs(4), False))
    assert d.decision == "disabled" and "NVLink" in d.reason and not d.nccl_p2p_disable


def test_more_than_two_without_nvml_is_disabled_not_trusted():
    d = p2p_gate.decide(Facts("cuda", list("abcd"), fake_pairs(4), None))
    assert d.decision == "disabled" and "NVML unavailable" in d.reason


def test_fully_nvlinked_eight_gpus_enabled():
    d = p2p_gate.decide(Facts("cuda", list("abcdefgh"), fake_pairs(8), True))
    assert d.decision == "enabled" and d.fully_nvlink


def test_cache_key_changes_with_boot_driver_and_gpu_set_only():
    k = p2p_gate.cache_key("boot1", "550.1", ["g1", "g0"])
    assert k == p2p_gate.cache_key("boot1", "550.1", ["g0", "g1"])  # order-insensitive
    assert k != p2p_gate.cache_key("boot2", "550.1", ["g0", "g1"])
    assert k != p2p_gate.cache_key("boot1", "560.2", ["g0", "g1"])
    assert k != p2p_gate.cache_key("boot1", "550.1", ["g0"])


def test_evaluate_writes_state_and_cache(state_dir, monkeypatch):
    monkeypatch.setenv("FLEET_NODE_NAME", "nodeA")
    facts = Facts("cuda", ["a", "b", "c"], fake_pairs(3, bad={(0, 2): (True, False)}), False)
    d = p2p_gate.evaluate(facts=facts, key="k123")
    gate = json.loads((state_dir / "launches" / "_unlaunched" / "p2p-gate-nodeA.json").read_text())
    assert gate["decision"] == "disabled" and gate["nccl_p2p_disable"] is True
    assert gate["cache_key"] == "k123"
    assert {"a", "b", "peer_access", "ipc_roundtrip_ok"} <= set(gate["pairs"][0])
    cached = p2p_gate.load_cached("k123")
    assert cached.decision == d.decision and cached.pairs == d.pairs
    env = {}
    p2p_gate.apply_to_env(d, env)
    assert env == {"NCCL_P2P_DISABLE": "1"}


@pytest.mark.skipif(os.path.exists("/proc/driver/nvidia/version"), reason="GPU host")
def test_evaluate_on_this_cpu_host_is_not_applicable(state_dir):
    d = p2p_gate.evaluate()  # real gather: no NVIDIA driver here
    assert d.decision == "not_applicable"


def test_evaluate_isolated_runs_the_gate_in_a_child_process(state_dir):
    """Workers are daemonic: the probe runs as `python -m vllm_fleet.p2p_gate`, whose JSON answer
    becomes the decision (on this CPU host: not_applicable, and the gate file is written)."""
    d = p2p_gate.evaluate_isolated()  # the product default timeout (300 s)
    assert d.decision == "not_applicable", d.reason
    assert os.path.exists(p2p_gate.state.p2p_gate_path())


def test_evaluate_isolated_distrusts_a_probe_without_result(state_dir, monkeypatch):
    import sys as _sys
    monkeypatch.setattr(_sys, "executable", "/bin/false")
    d = p2p_gate.evaluate_isolated(timeout_s=30)
    assert d.decision == "disabled" and "no result" in d.reason
