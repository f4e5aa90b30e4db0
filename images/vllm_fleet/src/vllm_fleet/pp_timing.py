"""Sampled timing of the real pipeline-parallel transfers: the PP half of the probe's Recorder
(probe.py keeps the TP all-reduce probe and the eager sampling; ``probe.Recorder`` mixes this in).

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
import time

# The all-reduce probe's logger: PP timing's one "inactive" warning has always been logged there.
logger = logging.getLogger("vllm_fleet.probe")

PP_MAX_PENDING = 16         # PP works kept for a later duration read (each holds its tensor)
PP_MAX_DURATION_ERRORS = 3  # _get_duration failures, none succeeding, before PP timing turns off


def pow2_ceil(n: int) -> int:
    """Smallest power of two >= n (>= 1): PP send sizes vary with the batch, labels must not."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


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


class PPTiming:
    """The Recorder's PP part (a mixin: state of its own, ``_pp*`` / ``pp_*`` / ``_p2p_calls``).
    It records through the host's ``observe``, ``_timed_cuda``, ``eager_every`` and ``_dirty``
    (probe.Recorder), so that PP timings land in the same histograms and file."""

    def _init_pp(self) -> None:
        self._p2p_calls = 0
        self._pp_calls: dict[str, int] = {}     # source (isend|irecv) -> calls seen
        self._pp_pending: list = []             # (labels, work): PP works whose duration is due
        self.pp_off: str | None = None          # why PP work timing turned itself off
        self._pp_ok = 0                         # durations read
        self._pp_errors = 0                     # _get_duration failures
        # Wall time the PP wrappers add to the step path (CPU side), like event_stats.
        self.pp_stats = {"count": 0, "sum_s": 0.0, "max_s": 0.0, "sampled": 0}

    def _pp_flush(self, doc: dict) -> None:
        """The ``pp_timing`` entry of the allreduce-<host>-<pid>.json document (once PP calls
        ran)."""
        if self.pp_stats["count"]:
            doc["pp_timing"] = dict(self.pp_stats, durations=self._pp_ok,
                                    pending=len(self._pp_pending), off=self.pp_off)

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
