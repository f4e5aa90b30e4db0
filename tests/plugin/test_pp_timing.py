"""PP timing on vLLM's isend_tensor_dict / irecv_tensor_dict path (RayExecutorV2, mp executor):
per-work NCCL timing of the PP device group, kept works polled on later calls, never waited for;
the CPU engine path untouched. Fake* classes stand in for torch's CUDA Work and ProcessGroup and
vLLM's GroupCoordinator (no CUDA here; the CUDA side is proven on GPU:
docs/benchmarks/2026-11-21-h200x4-tp2pp2.md); one test uses real gloo works."""
import json
import logging
import subprocess

import pytest

from conftest import child_env
from vllm_fleet import pp_timing, probe, state
from vllm_fleet.hooks import core
from vllm_fleet.hooks import pp as pp_hook


class FakeTensor:
    def __init__(self, nbytes, cuda=True, itemsize=2):
        self._n, self._item, self.is_cuda = nbytes // itemsize, itemsize, cuda

    def numel(self):
        return self._n

    def element_size(self):
        return self._item


class FakeWork:
    """torch.distributed Work as ProcessGroupNCCL returns it: is_completed() is an event query;
    _get_duration() in ms, valid once completed and only for works created with timing on."""

    def __init__(self, pg, ms=0.25):
        self.timed, self.ms, self.done, self.waited = pg.timing, ms, False, 0

    def is_completed(self):
        return self.done

    def _get_duration(self):
        if not self.timed:
            raise RuntimeError("getDuration only works if timing was enabled")
        assert self.done, "the plugin must never read an unfinished work"
        return self.ms

    def wait(self):
        self.waited += 1


class FakePG:
    def __init__(self, can_time=True):
        self.timing, self.enabled_calls = False, 0
        if not can_time:
            self._enable_collectives_timing = None

    def _enable_collectives_timing(self):
        self.enabled_calls += 1
        self.timing = True


class FakeCoord:
    """GroupCoordinator's PP side as vLLM 0.24 has it (all-gather split over the TP group)."""
    world_size, rank_in_group, unique_name = 2, 0, "pp:0"

    def __init__(self, pg=None, scope="inter"):
        self.device_group = pg or FakePG()
        self._fleet_scope = scope
        self.works, self.calls = [], []

    def _should_use_all_gather(self, key, numel, group, tensors):
        use = numel % group.world_size == 0
        return tensors.get(key, use) if tensors is not None else use

    def isend_tensor_dict(self, tensor_dict, dst=None, all_gather_group=None,
                          all_gather_tensors=None):
        self.calls.append("isend")
        out = [FakeWork(self.device_group) for v in tensor_dict.values()
               if isinstance(v, FakeTensor) and v.numel()]
        self.works += out
        return out

    def irecv_tensor_dict(self, src=None, all_gather_group=None, all_gather_tensors=None):
        self.calls.append("irecv")
        td = {"hidden_states": FakeTensor(8192), "residual": FakeTensor(8192), "meta": 3,
              "empty": FakeTensor(0)}
        out = [FakeWork(self.device_group) for _ in range(2)]
        self.works += out
        return td, out, ["postprocess"]


class FakeTP:
    world_size = 2


def sends(every=2):
    rec = probe.Recorder()
    rec.eager_every = every
    return rec


def hists(rec):
    return {(h["backend"], h["size_bytes"], h["group"], h["scope"], h["source"]): h
            for h in rec.hists.snapshot()}


def test_sampled_isend_works_are_read_on_a_later_call_once_completed():
    rec, coord = sends(every=2), FakeCoord()
    td = {"hidden_states": FakeTensor(3 << 20), "residual": FakeTensor(3 << 20), "n": 7,
          "cpu": FakeTensor(64, cuda=False), "empty": FakeTensor(0)}
    kw = dict(all_gather_group=FakeTP(), all_gather_tensors={"residual": False})
    out = rec.pp_isend(coord, coord.isend_tensor_dict, td, **kw)
    assert out == coord.works and len(out) == 3          # vLLM's handles, unchanged
    assert coord.device_group.enabled_calls == 0 and rec._pp_pending == []   # call 1: not sampled
    out = rec.pp_isend(coord, coord.isend_tensor_dict, td, **kw)              # call 2: sampled
    assert coord.device_group.enabled_calls == 1 and all(w.timed for w in out)
    assert len(rec._pp_pending) == 2                      # the CPU tensor's gloo work is not kept
    rec.pp_isend(coord, coord.isend_tensor_dict, td, **kw)                    # not completed yet
    assert len(rec.hists) == 0 and len(rec._pp_pending) == 2
    for w in out:
        w.done = True
    rec.pp_isend(coord, coord.isend_tensor_dict, td, **kw)                    # call 4: read
    h = hists(rec)
    # hidden_states is split over the TP group (one slice each), residual is not (all_gather
    # override); sizes rounded up to a power of two
    assert set(h) == {("nccl", 2 << 20, "pp", "inter", "isend"),
                      ("nccl", 4 << 20, "pp", "inter", "isend")}
    assert all(x["count"] == 1 and x["sum_s"] == pytest.approx(0.25e-3) for x in h.values())
    assert coord.device_group.enabled_calls == 1          # switched on once per group
    assert not any(w.waited for w in coord.works)         # the plugin never waits
    assert coord.calls == ["isend"] * 4                   # vLLM's call ran exactly once each time
    assert rec.pp_stats["count"] == 4 and rec.pp_stats["sampled"] == 2


def test_irecv_is_timed_with_its_own_source_and_passed_through():
    rec, coord = sends(every=1), FakeCoord(scope="intra")
    result = rec.pp_irecv(coord, coord.irecv_tensor_dict, all_gather_group=FakeTP())
    assert result[1] == coord.works and result[2] == ["postprocess"]
    for w in coord.works:
        w.done = True
    rec.pp_drain()
    assert set(hists(rec)) == {("nccl", 8192, "pp", "intra", "irecv")}
    assert hists(rec)[("nccl", 8192, "pp", "intra", "irecv")]["count"] == 2


def test_no_work_timing_in_torch_turns_it_off_once_and_serving_goes_on(caplog):
    rec, coord = sends(every=1), FakeCoord(pg=FakePG(can_time=False))
    td = {"hidden_states": FakeTensor(4096)}
    with caplog.at_level(logging.WARNING, logger="vllm_fleet.probe"):
        for _ in range(5):
            assert len(rec.pp_isend(coord, coord.isend_tensor_dict, td)) == 1
    assert coord.calls == ["isend"] * 5 and rec._pp_pending == []
    assert rec.pp_off and "no per-work NCCL timing" in rec.pp_off
    assert caplog.text.count("inactive: PP isend/irecv timing") == 1


def test_duration_errors_turn_it_off_after_a_few_and_never_raise():
    rec, coord = sends(every=1), FakeCoord()
    coord._fleet_work_timing = True  # switched on, but the backend cannot time its works
    td = {"hidden_states": FakeTensor(4096)}
    for _ in range(pp_timing.PP_MAX_DURATION_ERRORS + 3):
        assert len(rec.pp_isend(coord, coord.isend_tensor_dict, td)) == 1
        for w in coord.works:
            w.done = True
    assert rec.pp_off and "_get_duration failed" in rec.pp_off and len(rec.hists) == 0
    assert len(coord.calls) == pp_timing.PP_MAX_DURATION_ERRORS + 3


def test_a_changed_vllm_hand_over_is_not_guessed_at():
    class Odd(FakeCoord):
        def isend_tensor_dict(self, tensor_dict, *a, **k):
            return [FakeWork(self.device_group)]  # one work for two tensors

    rec, coord = sends(every=1), Odd()
    out = rec.pp_isend(coord, coord.isend_tensor_dict, {"a": FakeTensor(8), "b": FakeTensor(8)})
    assert len(out) == 1 and rec.pp_off and "1 works for 2 tensors" in rec.pp_off


def test_kept_works_are_bounded_and_stats_are_written(state_dir, monkeypatch):
    monkeypatch.setenv("VLLM_FLEET_LAUNCH_ID", "pp-1")
    rec, coord = sends(every=1), FakeCoord()
    for _ in range(pp_timing.PP_MAX_PENDING + 10):  # nothing ever completes
        rec.pp_isend(coord, coord.isend_tensor_dict, {"h": FakeTensor(1024)})
    assert len(rec._pp_pending) == pp_timing.PP_MAX_PENDING
    rec.flush()
    doc = json.loads(open(state.allreduce_path()).read())
    assert doc["pp_timing"]["count"] == pp_timing.PP_MAX_PENDING + 10
    assert doc["pp_timing"]["pending"] == pp_timing.PP_MAX_PENDING and \
        doc["pp_timing"]["off"] is None


def test_off_when_sampling_is_off():
    rec, coord = sends(every=0), FakeCoord()
    rec.pp_isend(coord, coord.isend_tensor_dict, {"h": FakeTensor(1024)})
    assert coord.device_group.enabled_calls == 0 and rec._pp_pending == []


def test_enable_work_timing_tries_the_cuda_backend_and_says_why_not(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(device=lambda kind: kind))

    class Backend:
        def __init__(self):
            self.on = False

        def _enable_collectives_timing(self):
            self.on = True

    class PGNoTiming:
        def __init__(self, backend):
            self.backend = backend

        def _get_backend(self, device):
            assert device == "cuda"
            return self.backend

    b = Backend()
    assert pp_timing.enable_work_timing(PGNoTiming(b)) is None and b.on
    why = pp_timing.enable_work_timing(object())
    assert "no _enable_collectives_timing" in why and "CUDA backend" in why


# ------------------------------------------------------------------ plugin wiring


class FakeDevice:
    def __init__(self, kind):
        self.type = kind


class FakeWiredCoord(FakeCoord):
    def __init__(self, kind="cuda", name="pp:0"):
        super().__init__()
        del self._fleet_scope
        self.unique_name, self.device = name, FakeDevice(kind)

        class Comm:
            def send(self, tensor, dst=None):
                return "sent"

        self.device_communicator = Comm()


def test_plugin_wraps_cuda_pp_groups_only(monkeypatch, caplog):
    gathers = []
    monkeypatch.setattr(pp_hook, "_gather_hosts",
                        lambda c: gathers.append(c.unique_name) or ["node-a", "node-b"])
    cpu = FakeWiredCoord("cpu")
    core._logged_once.discard("pp-timing-cpu")
    with caplog.at_level(logging.INFO, logger="vllm_fleet"):
        core.logger.propagate = True
        try:
            pp_hook._wrap_pp(cpu)
            pp_hook._wrap_pp(FakeWiredCoord("cpu"))
        finally:
            core.logger.propagate = False
    assert caplog.text.count("inactive: PP timing (CUDA only") == 1   # logged once
    assert "isend_tensor_dict" not in vars(cpu) and not getattr(cpu, "_fleet_pp", False)
    tp = FakeWiredCoord("cuda", "tp:0")
    pp_hook._wrap_pp(tp)
    assert "isend_tensor_dict" not in vars(tp) and gathers == []

    pp = FakeWiredCoord("cuda")
    pp_hook._wrap_pp(pp)
    assert gathers == ["pp:0"] and pp._fleet_scope == "inter" and pp._fleet_pp
    assert pp.device_communicator._fleet_send and pp.device_communicator._fleet_scope == "inter"
    td = {"h": FakeTensor(4096)}
    assert len(pp.isend_tensor_dict(td, all_gather_group=None)) == 1 and pp.calls == ["isend"]
    assert pp.irecv_tensor_dict()[2] == ["postprocess"] and pp.calls == ["isend", "irecv"]
    pp_hook._wrap_pp(pp)  # a second call neither wraps twice nor gathers again
    assert gathers == ["pp:0"]
    monkeypatch.setenv("VLLM_FLEET_PP_TIMING", "0")
    off = FakeWiredCoord("cuda")
    pp_hook._wrap_pp(off)
    assert "isend_tensor_dict" not in vars(off) and gathers == ["pp:0"]


# A real gloo work (what a CPU PP group's transfers would give): torch can switch timing on for
# the group but the backend cannot time works, so PP timing turns itself off after a few tries,
# and every call still returns vLLM's own result.
GLOO = r"""
import json, os, torch, torch.distributed as dist
from vllm_fleet import probe
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % int(os.environ["PORT"]),
                        rank=0, world_size=1)
class Coord:
    device_group, _fleet_scope = dist.group.WORLD, "intra"
    def isend_tensor_dict(self, td, *a, **k):  # one real async work per tensor
        return [dist.all_reduce(t, async_op=True) for t in td.values()]
rec, coord = probe.Recorder(), Coord()
rec.eager_every = 1
done = 0
for _ in range(10):
    works = rec.pp_isend(coord, coord.isend_tensor_dict, {"h": torch.ones(4)})
    for w in works:
        w.wait()
    done += len(works)
print("RESULT " + json.dumps({"off": rec.pp_off, "done": done, "hists": len(rec.hists)}), flush=True)
os._exit(0)
"""


def test_real_gloo_works_turn_timing_off_without_breaking_calls(torch_py, state_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Tensor stand-ins report is_cuda False for CPU tensors: force the CUDA branch so that the
    # real works are kept and read
    script = GLOO.replace("from vllm_fleet import probe",
                          "from vllm_fleet import pp_timing, probe\n"
                          "pp_timing.isend_sizes = lambda c, td, *a: [(16, True) for _ in td]")
    out = subprocess.run([torch_py, "-c", script], env=child_env(PORT=port,
                         VLLM_FLEET_STATE_DIR=state_dir), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    res = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert res["done"] == 10 and res["hists"] == 0
    assert res["off"] and ("_get_duration failed" in res["off"] or "no per-work" in res["off"])
