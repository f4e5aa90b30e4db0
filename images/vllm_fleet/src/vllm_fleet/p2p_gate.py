"""P2P / NVLink gate for vLLM's custom all-reduce.

Custom all-reduce writes into peer GPUs' memory through CUDA IPC. When the driver claims peer
access but the PCIe/IOMMU path silently drops or corrupts writes, TP>2 hangs at the first request
(../shared/seeds: cured only by --disable-custom-all-reduce). So before custom all-reduce is
trusted we verify, per local GPU pair, a real write + read-back through CUDA IPC, and check for
full NVLink connectivity via NVML. The decision is a pure function (``decide``) of those facts; the
probes that need CUDA are small functions exercised by the GPU run.

Decision table (``decide``):
  * not CUDA, or fewer than 2 local GPUs         -> not_applicable (nothing changes)
  * VLLM_FLEET_P2P=unavailable (operator says P2P is unusable here) -> disabled,
    NCCL_P2P_DISABLE=1, no probe
  * a pair with peer access whose IPC round trip fails -> disabled, NCCL_P2P_DISABLE=1
    (P2P itself is broken: NCCL must not use it either)
  * a pair without peer access                   -> disabled (custom all-reduce needs P2P)
  * more than 2 GPUs and not fully NVLink-connected  -> disabled (the PCIe TP>2 hang)
  * otherwise                                    -> enabled

Cache: ``<state root>/p2p-cache/<key>.json``, key = sha256(boot id, driver version, GPU UUIDs),
so a reboot, a driver update or another GPU set re-probes; cleanup removes other keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
from typing import Any, Sequence

from . import state

logger = logging.getLogger("vllm_fleet.p2p_gate")


@dataclasses.dataclass
class PairResult:
    a: int
    b: int
    peer_access: bool
    ipc_roundtrip_ok: bool


@dataclasses.dataclass
class Facts:
    platform: str                       # "cuda", "cpu", ...
    gpus: Sequence[str]                 # UUIDs (or indices) of the local GPUs in scope
    pairs: Sequence[PairResult]
    fully_nvlink: bool | None           # None: NVML not available


@dataclasses.dataclass
class Decision:
    decision: str                       # "enabled" | "disabled" | "not_applicable"
    reason: str
    nccl_p2p_disable: bool
    fully_nvlink: bool
    pairs: list
    cache_key: str | None

    def to_json(self) -> dict:
        doc = dataclasses.asdict(self)
        doc["pairs"] = [dataclasses.asdict(p) if isinstance(p, PairResult) else p
                        for p in self.pairs]
        return doc

    def log_line(self) -> str:
        return (f"vllm-fleet p2p gate: custom all-reduce {self.decision}"
                f"{' + NCCL_P2P_DISABLE=1' if self.nccl_p2p_disable else ''}: {self.reason}")


def decide(facts: Facts, cache_key: str | None = None, declared: str = "auto") -> Decision:
    """Pure decision from probe facts and the operator's declaration (see module docstring)."""
    pairs = list(facts.pairs)
    nvl = bool(facts.fully_nvlink)
    if facts.platform != "cuda":
        return Decision("not_applicable", f"platform {facts.platform}: no CUDA P2P / custom "
                        "all-reduce", False, False, pairs, cache_key)
    if len(facts.gpus) < 2:
        return Decision("not_applicable", f"{len(facts.gpus)} local GPU(s): no pairs", False,
                        nvl, pairs, cache_key)
    if declared == "unavailable":
        return Decision("disabled", "peer access declared unavailable (VLLM_FLEET_P2P=unavailable)",
                        True, nvl, pairs, cache_key)
    broken = [p for p in pairs if p.peer_access and not p.ipc_roundtrip_ok]
    if broken:
        names = ", ".join(f"{p.a}-{p.b}" for p in broken)
        return Decision("disabled", f"driver reports peer access but CUDA IPC write/read-back "
                        f"failed on GPU pair(s) {names}: P2P is broken", True, nvl, pairs,
                        cache_key)
    no_peer = [p for p in pairs if not p.peer_access]
    if no_peer:
        names = ", ".join(f"{p.a}-{p.b}" for p in no_peer)
        return Decision("disabled", f"no peer access on GPU pair(s) {names}", False, nvl,
                        pairs, cache_key)
    if len(facts.gpus) > 2 and not nvl:
        why = "NVML unavailable" if facts.fully_nvlink is None else "not fully NVLink-connected"
        return Decision("disabled", f"{len(facts.gpus)} GPUs, {why} (PCIe custom all-reduce with "
                        "TP>2 hangs)", False, nvl, pairs, cache_key)
    return Decision("enabled", f"{len(facts.gpus)} GPUs, all pairs pass CUDA IPC write/read-back"
                    f"{', fully NVLink-connected' if nvl else ''}", False, nvl, pairs, cache_key)


# ---------------------------------------------------------------- cache key and cache

def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:
        return "unknown-boot"


def driver_version() -> str | None:
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as fh:
            first = fh.readline()
    except OSError:
        return None
    for token in first.split():
        if token.count(".") >= 1 and token.replace(".", "").isdigit():
            return token
    return first.strip() or None


def cache_key(boot: str, driver: str, gpus: Sequence[str]) -> str:
    raw = json.dumps([boot, driver, sorted(gpus)]).encode()
    return hashlib.sha256(raw).hexdigest()[:32]


def cache_dir(env: dict | None = None) -> str:
    return os.path.join(state.state_root(env), "p2p-cache")


def current_cache_key_or_none() -> str | None:
    """Key for this boot/driver/GPU set, from files only (no CUDA, no NVML): /proc for the driver,
    CUDA_VISIBLE_DEVICES or /proc/driver/nvidia/gpus for the GPU set. None on GPU-less hosts."""
    driver = driver_version()
    if driver is None:
        return None
    try:
        gpus = sorted(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        gpus = []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        gpus = [g.strip() for g in visible.split(",") if g.strip()]
    return cache_key(boot_id(), driver, gpus)


def load_cached(key: str, env: dict | None = None) -> Decision | None:
    doc = state.read_json(os.path.join(cache_dir(env), f"{key}.json"))
    if not isinstance(doc, dict):
        return None
    try:
        pairs = [PairResult(**p) for p in doc["pairs"]]
        return Decision(doc["decision"], doc["reason"] + " (cached)", doc["nccl_p2p_disable"],
                        doc["fully_nvlink"], pairs, key)
    except (KeyError, TypeError):
        return None


def store_cached(decision: Decision, env: dict | None = None) -> None:
    if not decision.cache_key:
        return
    os.makedirs(cache_dir(env), exist_ok=True)
    state.write_json_atomic(os.path.join(cache_dir(env), f"{decision.cache_key}.json"),
                            decision.to_json())


# ---------------------------------------------------------------- CUDA / NVML probes (GPU run)

def nvml_fully_connected(indices: Sequence[int]) -> bool | None:
    """True if every pair has an active NVLink (NVML P2P status NVLINK OK); None without pynvml."""
    try:
        import pynvml  # type: ignore
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
            for h1, h2 in itertools.combinations(handles, 2):
                status = pynvml.nvmlDeviceGetP2PStatus(h1, h2, pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
                if status != pynvml.NVML_P2P_STATUS_OK:
                    return False
            return True
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVML errors: unknown rather than a wrong "yes"
        logger.debug("NVML NVLink query failed", exc_info=True)
        return None


def _ipc_peer(src: int, dst: int, handle_q, result_q) -> None:
    """Child process: open src's buffer through CUDA IPC while running on dst (exactly the access
    custom all-reduce makes), check the pattern, write the answer pattern back through IPC."""
    try:
        import torch

        torch.cuda.set_device(dst)
        remote = handle_q.get(timeout=60)  # torch rebuilds it from a cudaIpcMemHandle
        local = torch.empty_like(remote, device=f"cuda:{dst}")
        local.copy_(remote)  # peer read src -> dst
        ok = bool(torch.equal(local.cpu(), torch.arange(remote.numel(), dtype=remote.dtype)))
        remote.copy_(local.flip(0))  # peer write dst -> src
        torch.cuda.synchronize(dst)
        result_q.put(ok)
    except Exception as exc:  # reported as a failed round trip
        result_q.put(f"error: {exc!r}")


def cuda_ipc_roundtrip(src: int, dst: int, numel: int = 1 << 20, timeout_s: float = 60.0) -> bool:
    """Real P2P check for one ordered pair: a 4 MiB buffer on ``src`` is read and rewritten by
    another process on ``dst`` through CUDA IPC; the parent reads it back on ``src``."""
    import torch
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    handle_q, result_q = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_ipc_peer, args=(src, dst, handle_q, result_q), daemon=True)
    proc.start()
    try:
        buf = torch.arange(numel, dtype=torch.float32, device=f"cuda:{src}")
        handle_q.put(buf)
        first = result_q.get(timeout=timeout_s)
        torch.cuda.synchronize(src)
        back = buf.cpu()
        return first is True and bool(torch.equal(back, torch.arange(numel, dtype=torch.float32)
                                                  .flip(0)))
    except Exception:
        logger.debug("IPC round trip %d->%d failed", src, dst, exc_info=True)
        return False
    finally:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()


def probe_cuda(indices: Sequence[int]) -> list[PairResult]:
    """Per unordered pair: driver's peer-access answer and real IPC round trips both ways."""
    import torch

    out = []
    for a, b in itertools.combinations(indices, 2):
        peer = bool(torch.cuda.can_device_access_peer(a, b) and
                    torch.cuda.can_device_access_peer(b, a))
        ok = peer and cuda_ipc_roundtrip(a, b) and cuda_ipc_roundtrip(b, a)
        out.append(PairResult(a, b, peer, ok))
    return out


def gather_facts(probe: bool = True) -> tuple[Facts, str | None]:
    """Facts for this process's platform. Only called where a GPU is owned (workers) or from the
    CLI; on CPU it never imports CUDA-touching code. ``probe=False`` skips the pair probes."""
    if driver_version() is None:
        return Facts("cpu", [], [], None), None
    import torch

    if not torch.cuda.is_available():
        return Facts("cpu", [], [], None), None
    n = torch.cuda.device_count()
    uuids = []
    for i in range(n):
        props = torch.cuda.get_device_properties(i)
        uuids.append(str(getattr(props, "uuid", i)))
    key = cache_key(boot_id(), driver_version() or "", uuids)
    cached = load_cached(key)
    if cached is not None:
        return Facts("cuda", uuids, cached.pairs, cached.fully_nvlink), key
    indices = list(range(n))
    if not probe:
        return Facts("cuda", uuids, [], nvml_fully_connected(indices)), key
    return Facts("cuda", uuids, probe_cuda(indices), nvml_fully_connected(indices)), key


def evaluate(write: bool = True, facts: Facts | None = None, key: str | None = None,
             env: dict | None = None) -> Decision:
    """Gather (or take) facts, decide, cache, write ``p2p-gate-<host>.json``, log one line."""
    declared = (os.environ if env is None else env).get("VLLM_FLEET_P2P", "auto")
    if facts is None:
        facts, key = gather_facts(probe=declared != "unavailable")
    decision = decide(facts, key, declared)
    if write:
        try:
            if declared != "unavailable":  # a declaration has no probe results to cache
                store_cached(decision, env)
            state.write_json_atomic(state.p2p_gate_path(env), decision.to_json())
        except OSError:
            logger.warning("vllm-fleet p2p gate: could not write state", exc_info=True)
    logger.info(decision.log_line())
    return decision


def evaluate_isolated(timeout_s: float = 300.0) -> Decision:
    """``evaluate()`` in a separate process (``python -m vllm_fleet.p2p_gate``).

    Used from vLLM workers: they are daemonic multiprocessing children (which may not start
    multiprocessing children of their own), and a worker must not open CUDA contexts on the other
    GPUs, which the pair probe does. A probe that fails or times out leaves custom all-reduce off:
    it is trusted only once proven."""
    import subprocess
    import sys

    # The child imports this very package, wherever it was imported from here.
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH", "")) if p))
    try:
        proc = subprocess.run([sys.executable, "-m", "vllm_fleet.p2p_gate"], capture_output=True,
                              text=True, timeout=timeout_s, check=False, env=env)
        doc = json.loads(proc.stdout.strip().splitlines()[-1])
        return Decision(**doc)
    except Exception as exc:  # no result: do not trust custom all-reduce
        detail = exc.__class__.__name__ if not isinstance(exc, subprocess.TimeoutExpired) \
            else f"timed out after {timeout_s:.0f}s"
        decision = Decision("disabled", f"P2P probe gave no result ({detail}); custom all-reduce "
                            "is not trusted unproven", False, False, [], None)
        logger.info(decision.log_line())
        return decision


def apply_to_env(decision: Decision, env: Any = None) -> None:
    """NCCL reads NCCL_P2P_DISABLE at communicator init: set it before vLLM creates groups."""
    env = os.environ if env is None else env
    if decision.nccl_p2p_disable:
        env["NCCL_P2P_DISABLE"] = "1"


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vllm_fleet.p2p_gate")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    decision = evaluate(write=not args.no_write)
    print(json.dumps(decision.to_json()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
