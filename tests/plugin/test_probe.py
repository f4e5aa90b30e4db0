"""Probe cadence, histogram format and backend labelling (no engine needed)."""
import math

from vllm_fleet import pp_timing, probe, state
from conftest import child_env  # tests/plugin/conftest.py, as the other plugin tests do


def test_cadence_is_a_pure_function_of_the_step_counter():
    every = 4
    picked = [s for s in range(1, 20) if probe.should_probe(s, every)]
    assert picked == [1, 5, 9, 13, 17]
    assert [s for s in range(1, 5) if probe.should_probe(s, 1)] == [1, 2, 3, 4]
    assert not any(probe.should_probe(s, 0) for s in range(1, 10))


def test_probe_events_take_turns_over_the_sizes():
    sizes = probe.DEFAULT_SIZES
    picked = [probe.rotation(k, sizes) for k in range(2 * len(sizes))]
    assert picked == [(s,) for s in sizes] * 2
    assert probe.rotation(3, ()) == ()


def test_histogram_is_cumulative_with_inf_bucket():
    h = state.Histogram({"backend": "shm"})
    for v in (5e-6, 3e-4, 3e-4, 7.0):
        h.observe(v)
    b = state.BUCKET_BOUNDS_S
    assert h.counts[b.index(1e-5)] == 1
    assert h.counts[b.index(2.5e-4)] == 1 and h.counts[b.index(5e-4)] == 3
    assert h.counts[b.index(2.5)] == 3 and h.counts[-1] == 4 == h.count
    assert math.isclose(h.sum_s, 5e-6 + 6e-4 + 7.0)


def test_allreduce_doc_matches_design(monkeypatch):
    monkeypatch.setenv("VLLM_FLEET_LAUNCH_ID", "l-1")
    monkeypatch.setenv("FLEET_NODE_NAME", "h1")
    hs = state.HistogramSet()
    hs.observe("shm", 8192, "tp", "intra", "probe", 1e-4)
    doc = state.allreduce_doc(hs.snapshot(), rank=1)
    assert doc["bucket_bounds_s"][-1] == "+Inf" and doc["bucket_bounds_s"][0] == 1e-5
    assert set(doc) == {"launch_id", "host", "pid", "rank", "updated", "bucket_bounds_s",
                        "histograms"}
    (h,) = doc["histograms"]
    assert set(h) == {"backend", "size_bytes", "group", "scope", "source", "bucket_counts",
                      "sum_s", "count"}
    assert doc["launch_id"] == "l-1" and doc["host"] == "h1"


class FakeShm:  # named like vLLM's class: backend_of dispatches on class names
    pass


FakeShm.__name__ = "_CPUSHMDistributed"


class CpuCommunicator:
    def __init__(self, dist):
        self.dist_module = dist


class FakeCA:
    disabled = False

    def __init__(self, limit):
        self.limit = limit

    def should_custom_ar(self, t):
        return t.nbytes <= self.limit


class CudaCommunicator:
    def __init__(self, ca, pynccl):
        self.ca_comm, self.pynccl_comm = ca, pynccl


class FakePynccl:
    disabled = False


class FakeCoordinator:
    def __init__(self, comm, name="tp:0"):
        self.device_communicator, self.unique_name = comm, name


class FakeTensor:
    def __init__(self, nbytes):
        self.nbytes = nbytes


def test_backend_labels_follow_vllm_dispatch_with_fakes():
    assert probe.backend_of(FakeCoordinator(CpuCommunicator(FakeShm())), None) == "shm"
    assert probe.backend_of(FakeCoordinator(CpuCommunicator(object())), None) == "gloo"
    cuda = FakeCoordinator(CudaCommunicator(FakeCA(8 << 20), FakePynccl()))
    assert probe.backend_of(cuda, FakeTensor(1 << 20)) == "custom_ar"
    assert probe.backend_of(cuda, FakeTensor(16 << 20)) == "pynccl"
    assert probe.backend_of(FakeCoordinator(CudaCommunicator(None, None)), FakeTensor(1)) == "nccl"
    assert probe.group_label(FakeCoordinator(None, "pp:3")) == "pp"


def test_only_new_sizes_need_a_vote_and_pp_sizes_are_bucketed():
    assert probe.vote_needed(set(), (8, 16)) == (8, 16)
    assert probe.vote_needed({8, 16}, (16,)) == ()
    assert probe.vote_needed({8}, (8, 32)) == (32,)
    assert [pp_timing.pow2_ceil(n) for n in (0, 1, 2, 3, 8192, 8193, 851968)] == \
        [1, 1, 2, 4, 8192, 16384, 1 << 20]


def test_probe_event_cost_is_written_beside_the_histograms(state_dir, monkeypatch):
    import json

    monkeypatch.setenv("VLLM_FLEET_LAUNCH_ID", "l-2")
    monkeypatch.setenv("FLEET_NODE_NAME", "h2")
    rec = probe.Recorder()
    rec.flush(force=True)
    doc = json.loads(open(state.allreduce_path()).read())
    assert "probe_events" not in doc  # optional key: only once a probe event ran
    rec.note_event(0.002)
    rec.note_event(0.004)
    rec.flush()
    doc = json.loads(open(state.allreduce_path()).read())
    assert doc["probe_events"] == {"count": 2, "sum_s": 0.006, "max_s": 0.004}


def test_pp_send_is_passed_through_unsampled_off_cuda():
    class Comm:
        _fleet_scope = "inter"

    calls = []
    rec = probe.Recorder()
    rec.eager_every = 1
    tensor = FakeTensor(1024)
    tensor.is_cuda = False
    for _ in range(3):
        assert rec.p2p_send(Comm(), lambda t, dst=None: calls.append((t, dst)) or "sent",
                            tensor, dst=1) == "sent"
    assert calls == [(tensor, 1)] * 3 and rec._pending == [] and len(rec.hists) == 0


# Two gloo ranks run the real Recorder.run_probe on a minimal coordinator. Rank 1 fails to
# allocate at the first probe event: both must skip it together (no hang), vote again at the
# next one, and need no vote after that while the sizes take turns.
VOTE_RANKS = r"""
import datetime, json, os, sys
import torch, torch.distributed as dist
from vllm_fleet import probe
rank, port = int(sys.argv[1]), sys.argv[2]
os.environ["FLEET_NODE_NAME"] = f"host{rank}"
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=600))
class Coord:
    world_size, unique_name, device = 2, "tp:0", torch.device("cpu")
    cpu_group, device_communicator = dist.group.WORLD, None
    def all_reduce(self, t):
        dist.all_reduce(t)
        return t
real_zeros, fail = torch.zeros, [rank == 1]
def zeros(*a, **k):
    if fail[0]:
        fail[0] = False
        raise RuntimeError("injected allocation failure")
    return real_zeros(*a, **k)
torch.zeros = zeros
rec, coord, seen = probe.Recorder(), Coord(), []
for event in range(6):
    rec.run_probe([coord], iters=2)
    seen.append((rec.votes, len(rec.hists)))
hists = rec.hists.snapshot()
print("RESULT " + json.dumps({"seen": seen, "sizes": sorted(h["size_bytes"] for h in hists),
                              "labels": sorted({(h["backend"], h["group"], h["scope"], h["source"])
                                                for h in hists}),
                              "counts": sorted({h["count"] for h in hists})}), flush=True)
# gloo's threads can abort interpreter teardown ("terminate called without an active exception"):
# the result is out, so leave without it.
import os
os._exit(0)
"""


def test_readiness_vote_once_and_rank_local_failure_skips_all_ranks(torch_py, state_dir):
    import json
    import socket
    import subprocess


    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = child_env(VLLM_FLEET_STATE_DIR=state_dir, VLLM_FLEET_LAUNCH_ID="vote-1")
    procs = [subprocess.Popen([torch_py, "-c", VOTE_RANKS, str(r), str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    results = []
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    assert results[0] == results[1]
    res = results[0]
    # event 1: vote fails (rank 1 could not allocate) -> nothing timed on either rank;
    # event 2: vote again, succeeds; events 3-6: no vote, one size each
    assert [v for v, _ in res["seen"]] == [1, 2, 2, 2, 2, 2]
    assert [n for _, n in res["seen"]] == [0, 1, 2, 3, 4, 5]
    assert res["sizes"] == sorted(probe.DEFAULT_SIZES)
    assert res["labels"] == [["gloo", "tp", "inter", "probe"]]  # FLEET_NODE_NAME differs per rank
    assert res["counts"] == [2]
