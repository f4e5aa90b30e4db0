"""Launcher (RFC): one process per device on this node, each told launch_id, world_size,
local_world_size, rank, local_rank, master_addr and master_port; plus what each rank runs.

Never hangs: every rank arms a hard timer per step and sends a heartbeat to the coordinator (its
own connection, every BEAT_S). When a step times out (the timer, or the process group's own
timeout inside a collective), the rank prints the step, the ranks that are behind it and the ranks
whose heartbeat stopped (frozen, stopped or cut off, even inside the same collective), each with
node, host and interface from the coordinator, and exits 124. The launcher kills a child that has
been stopped (state T/t: SIGSTOP, SIGTSTP, a debugger) longer than the hard timeout, naming it, and
any child that outlives the overall budget.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import sys
import threading
import time

from .report import EXIT_FAIL, EXIT_OK, EXIT_TIMEOUT, render_table

BEAT_S = 0.5  # heartbeat period; a rank silent for 4 periods is named as not responding
SILENT_S = 4 * BEAT_S
HARD_EXTRA_S = 5.0  # the hard timer fires this long after the step timeout (the pg timeout first)
ASK_S = 15.0  # on a timeout, how long asking the coordinator who is behind may take (busy host)


def default_sizes(max_bytes: int, min_bytes: int = 8) -> list[int]:
    sizes, s = [], min_bytes
    while s <= max_bytes:
        sizes.append(s)
        s *= 8 if s < (1 << 20) else 4
    if sizes and sizes[-1] != max_bytes and max_bytes > min_bytes:
        sizes.append(max_bytes)
    return sizes


def busbw(size_bytes: int, seconds: float, n: int) -> tuple[float, float]:
    """(algbw, busbw) in bytes/s; busbw = algbw * 2(n-1)/n (nccl-tests' all-reduce factor)."""
    algbw = size_bytes / seconds if seconds > 0 else 0.0
    return algbw, algbw * 2 * (n - 1) / n


class _HardTimer:
    def __init__(self, coord, timeout_s: float):
        self.coord, self.timeout_s = coord, timeout_s
        self.step, self.what, self.deadline = 0, "start", time.monotonic() + timeout_s
        self.started = time.monotonic()
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="fabric-hard-timeout").start()
        threading.Thread(target=self._beat, daemon=True, name="fabric-heartbeat").start()

    def _beat(self) -> None:
        try:
            store = self.coord.side_store()  # a TCPStore client is not thread-safe: our own
            while True:
                self.coord.beat(store)
                if self._stop.wait(BEAT_S):
                    return
        except Exception:
            return  # coordinator gone (the check ended, or node 0 is cut off): nothing to tell

    def enter(self, what: str) -> None:
        self.step += 1
        self.what = what
        self.started = time.monotonic()
        self.deadline = self.started + self.timeout_s
        try:
            self.coord.set_progress(self.step, what)
        except Exception:
            pass

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            if self._stop.is_set():
                return
            if time.monotonic() > self.deadline:
                self.fire()

    def fire(self, detail: str = "") -> None:
        elapsed = time.monotonic() - self.started
        result: list = []

        def ask():
            side = self.coord.side_store()  # own connection: the main thread may be inside one
            before = self.coord.beats(side)
            time.sleep(SILENT_S)
            after = self.coord.beats(side)
            silent = tuple(r for r in after if r != self.coord.rank and after[r] == before[r])
            result.append((self.coord.describe(self.coord.rank, side),
                           self.coord.laggards(self.step, side, silent, SILENT_S)))

        t = threading.Thread(target=ask, daemon=True)
        t.start()
        t.join(SILENT_S + ASK_S)
        me, behind = result[0] if result else (
            f"rank {self.coord.rank} on node {self.coord.node_rank} ({self.coord.host}, interface "
            f"{self.coord.ifname or '?'})",
            [f"coordinator at {self.coord.master_addr}:{self.coord.master_port} (node 0) "
             "unreachable"])
        msg = (f"FABRIC CHECK TIMEOUT: {me} gave up after {elapsed:.1f}s "
               f"in '{self.what}' (step timeout {self.timeout_s - HARD_EXTRA_S:.0f}s)"
               f"{': ' + detail if detail else ''}; behind: "
               f"{'; '.join(behind) or 'none (peer failed inside the collective)'}")
        print(msg, file=sys.stderr, flush=True)
        os._exit(EXIT_TIMEOUT)

    def stop(self) -> None:
        self._stop.set()


def _time_allreduce(comm, tensor, iters: int, group=None) -> float:
    import torch

    comm.allreduce(tensor, group)  # warm-up (connection setup, NCCL kernels)
    comm.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        comm.allreduce(tensor, group)
    comm.synchronize()
    elapsed = (time.perf_counter() - t0) / iters
    # the slowest rank defines the collective's latency
    t = torch.tensor([elapsed], dtype=torch.float64, device=comm.device)
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def _check_correct(comm, size: int, ranks: list[int], group=None) -> bool:
    import torch

    numel = max(1, size // 4)
    t = torch.full((numel,), float(comm.coord.rank + 1), dtype=torch.float32, device=comm.device)
    comm.allreduce(t, group)
    expect = float(sum(r + 1 for r in ranks))
    return bool(torch.all(t == expect).item())


def run_rank(cfg: dict) -> int:
    """Body of one rank. cfg: launch_id, rank, world_size, local_rank, local_world_size,
    node_rank, master_addr, master_port, backend, sizes, timeout_s, ifname, pairs, json_out."""
    if cfg.get("ifname"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", cfg["ifname"])
        os.environ.setdefault("NCCL_SOCKET_IFNAME", cfg["ifname"])
    from .communicator import Communicator
    from .coordinator import Coordinator, FabricTimeout

    try:
        coord = Coordinator(cfg["rank"], cfg["world_size"], cfg["local_rank"],
                            cfg["local_world_size"], cfg["node_rank"], cfg["master_addr"],
                            cfg["master_port"], cfg["launch_id"], cfg["timeout_s"], cfg["ifname"])
    except FabricTimeout as exc:
        print(f"FABRIC CHECK TIMEOUT: {exc}", file=sys.stderr, flush=True)
        return EXIT_TIMEOUT
    timer = _HardTimer(coord, cfg["timeout_s"] + HARD_EXTRA_S)
    try:
        timer.enter("join")
        coord.barrier("join")
        timer.enter("communicator init")
        comm = Communicator(coord, cfg["backend"])
        n = coord.world_size
        all_ranks = list(range(n))
        print(f"fabric check: {coord.describe(coord.rank)} pid {os.getpid()} ready "
              f"({comm.backend})", file=sys.stderr, flush=True)
        rows, ok_all = [], True
        for size in cfg["sizes"]:
            timer.enter(f"all_reduce {size} B over {n} ranks")
            ok = _check_correct(comm, size, all_ranks)
            iters = max(2, min(20, (64 << 20) // max(size, 1)))
            lat = _time_allreduce(comm, _buf(comm, size), iters)
            alg, bus = busbw(size, lat, n)
            rows.append({"size_bytes": size, "latency_s": lat, "algbw_Bps": alg, "busbw_Bps": bus,
                         "correct": ok, "iters": iters})
            ok_all &= ok
        pairs = _pair_phase(coord, comm, timer, cfg) if cfg.get("pairs", True) else []
        timer.enter("done")
        coord.barrier("done")
        if coord.is_master():
            report = {"launch_id": cfg["launch_id"], "backend": comm.backend, "world_size": n,
                      "ranks": [json.loads(coord.store.get(f"rank/{r}")) for r in all_ranks],
                      "results": rows, "pairs": pairs, "suspects": suspects(pairs),
                      "ok": ok_all and all(p["ok"] and not p["slow"] for p in pairs)}
            print(render_table(report), flush=True)
            print("JSON " + json.dumps(report), flush=True)
            if cfg.get("json_out"):
                with open(cfg["json_out"], "w", encoding="utf-8") as fh:
                    json.dump(report, fh, indent=1)
            # the coordinator's store lives in this process: the others may still be reading the
            # last barrier, and would see "coordinator unreachable" if it went away now
            coord.wait_left(min(cfg["timeout_s"], 10.0))
            return EXIT_OK if report["ok"] else EXIT_FAIL
        timer.stop()  # no heartbeat in flight once the master may go
        coord.leave()
        return EXIT_OK
    except FabricTimeout as exc:
        print(f"FABRIC CHECK TIMEOUT: {exc}", file=sys.stderr, flush=True)
        return EXIT_TIMEOUT
    except Exception as exc:  # gloo/NCCL timeout or peer loss surfaces here: name who is behind
        timer.fire(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return EXIT_TIMEOUT
    finally:
        timer.stop()


def _buf(comm, size: int):
    import torch

    return torch.zeros(max(1, size // 4), dtype=torch.float32, device=comm.device)


def _pair_phase(coord, comm, timer, cfg) -> list[dict]:
    """Isolation: all-reduce on every pair of units (node leaders when multi-node, else ranks),
    one pair at a time while the others wait at a barrier."""
    import itertools

    n = coord.world_size
    lws = coord.local_world_size
    units = list(range(0, n, lws)) if n > lws else list(range(n))
    if len(units) < 2:
        return []
    size = int(cfg.get("pair_size", 1 << 20))
    pairs = list(itertools.combinations(units, 2))
    groups = {p: comm.subgroup(p) for p in pairs}  # collective creation, same order everywhere
    out = []
    for a, b in pairs:
        timer.enter(f"pair {a}-{b} all_reduce {size} B")
        res = None
        if coord.rank in (a, b):
            ok = _check_correct(comm, size, [a, b], groups[(a, b)])
            lat = _time_allreduce(comm, _buf(comm, size), 5, groups[(a, b)])
            res = {"a": a, "b": b, "latency_s": lat, "busbw_Bps": busbw(size, lat, 2)[1], "ok": ok}
        payload = coord.broadcast(json.dumps(res).encode() if coord.rank == a else None, src=a)
        out.append(json.loads(payload))
        coord.barrier(f"pair {a}-{b}")
    lats = sorted(p["latency_s"] for p in out)
    median = lats[len(lats) // 2]
    for p in out:
        p["slow"] = len(out) >= 3 and p["latency_s"] > 3 * median
        p["hosts"] = [coord.describe(p["a"]), coord.describe(p["b"])]
    return out


def suspects(pairs: list[dict]) -> list[int]:
    """Units present in every bad pair they take part in (and in at least one, while another
    unit has a good pair): the node or link to look at."""
    bad = [p for p in pairs if not p["ok"] or p["slow"]]
    if not bad:
        return []
    units = sorted({p["a"] for p in pairs} | {p["b"] for p in pairs})
    out = []
    for u in units:
        mine = [p for p in pairs if u in (p["a"], p["b"])]
        if mine and all((not p["ok"] or p["slow"]) for p in mine):
            out.append(u)
    return out


def _child(cfg: dict) -> None:
    code = run_rank(cfg)
    sys.stdout.flush()
    sys.stderr.flush()
    # no interpreter teardown: gloo's destructors racing a peer that already exited can abort
    # the process ("terminate called without an active exception", SIGABRT) after a good check
    os._exit(code)


def _proc_state(pid: int) -> str:
    """One-letter process state from /proc (T: stopped, t: traced, Z: zombie); '' if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            data = fh.read()
        return data[data.rindex(")") + 2]
    except (OSError, ValueError, IndexError):
        return ""


def launch_local(base: dict, nproc_per_node: int, node_rank: int, nnodes: int) -> int:
    """Direct launcher: ``nproc_per_node`` spawned processes; returns the worst exit code."""
    ctx = mp.get_context("spawn")
    world = nnodes * nproc_per_node
    host = os.environ.get("FLEET_NODE_NAME") or socket.gethostname()
    procs = []
    for lr in range(nproc_per_node):
        cfg = dict(base, rank=node_rank * nproc_per_node + lr, world_size=world, local_rank=lr,
                   local_world_size=nproc_per_node, node_rank=node_rank)
        p = ctx.Process(target=_child, args=(cfg,), name=f"rank {cfg['rank']}")
        p.start()
        procs.append(p)
    # budget: every step has its own timer inside the ranks; this only catches a wedged process
    budget = base["timeout_s"] * (len(base["sizes"]) + 4 + nnodes * nnodes) + 30
    deadline = time.monotonic() + budget
    hard_s = base["timeout_s"] + HARD_EXTRA_S
    stopped_since: dict[int, float] = {}
    worst = EXIT_OK
    while time.monotonic() < deadline and any(p.is_alive() for p in procs):
        if any(p.exitcode == EXIT_TIMEOUT for p in procs):
            # one rank already named the culprit; the rest would only wait on the same peer
            for p in procs:
                p.join(2.0)
            break
        now = time.monotonic()
        for p in procs:
            # a stopped rank cannot fire its own timer (all its threads are stopped): name it here
            if p.is_alive() and _proc_state(p.pid) in ("T", "t"):
                since = stopped_since.setdefault(p.pid, now)
                if now - since > hard_s:
                    print(f"FABRIC CHECK TIMEOUT: {p.name} on node {node_rank} ({host}, interface "
                          f"{base.get('ifname') or '?'}, pid {p.pid}) has been stopped (SIGSTOP or "
                          f"a debugger) for {now - since:.0f}s; killed",
                          file=sys.stderr, flush=True)
                    p.kill()
                    p.join(5)
                    worst = EXIT_TIMEOUT
            else:
                stopped_since.pop(p.pid, None)
        time.sleep(0.1)
    for p in procs:
        if p.is_alive():
            print(f"FABRIC CHECK TIMEOUT: {p.name} on node {node_rank} ({host}, interface "
                  f"{base.get('ifname') or '?'}, pid {p.pid}) still running; killed",
                  file=sys.stderr, flush=True)
            p.kill()
            p.join(5)
            worst = EXIT_TIMEOUT
        elif p.exitcode not in (0, None):
            worst = max(worst, p.exitcode if p.exitcode > 0 else EXIT_FAIL)
    return worst
