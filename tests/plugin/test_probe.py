"""Probe cadence, histogram format and backend labelling (no engine needed)."""
import math

from vllm_fleet import probe, state


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
