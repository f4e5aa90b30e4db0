#!/usr/bin/env python3
"""GPU check of the plugin's PP isend/irecv timing with real ProcessGroupNCCL works, outside vLLM
(a quick test of this torch build's per-work timing before an engine relies on it).

Two ranks (GPUs 0 and 1 of CUDA_VISIBLE_DEVICES): rank 0 hands a tensor dict to rank 1 the way
vLLM 0.24's GroupCoordinator.isend_tensor_dict / irecv_tensor_dict do (torch.distributed
isend/irecv on an NCCL group, one work per tensor, waited on by the caller at its next step),
through the plugin's Recorder.pp_isend / pp_irecv with every call sampled. For comparison, rank 0
also times the same kind of send with CUDA events around isend + wait on the current stream.

--aligned: accuracy instead. Every send is set up alike: both devices synchronised, rank 1 posts
its receive, a gloo barrier, then rank 0 sends one tensor through the plugin with CUDA events
around the send + wait on its current stream (the reference; ~1 ms of GPU sleep before its start
event, so that it holds the transfer and not the CPU's launch latency); per size, the median of the
plugin's durations (NCCL work start to end on the NCCL stream) against the median of the
reference. --sockets: each rank its own NCCL_HOSTID and NCCL_SOCKET_IFNAME=lo, IB off, so NCCL
uses its socket transport between the two GPUs (the simulated inter-node path).

    python tests/gpu/pp_timing_check.py [--iters 200] [--mib 4]
    python tests/gpu/pp_timing_check.py --aligned [--sockets] [--iters 100] [--sizes-kib 64,256,1024,4096]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

# benchmarks/probe_vs_reference.py: free_port, gather_results
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))


def worker(rank: int, port: int, args, out_q) -> None:
    import torch
    import torch.distributed as dist

    from vllm_fleet import probe

    import faulthandler

    faulthandler.dump_traceback_later(max(5.0, args.deadline - 15), exit=False)  # where it hangs
    # gloo (the aligned mode's barrier) on loopback: by default it uses the address the host
    # name resolves to, which hung the first try on a 2x H200 machine
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if args.sockets:  # two "hosts" to NCCL: its socket transport between them
        os.environ.update(NCCL_HOSTID=f"pp-check-host-{rank}", NCCL_SOCKET_IFNAME="lo",
                          NCCL_IB_DISABLE="1", NCCL_MNNVL_ENABLE="0")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, device_id=torch.device("cuda", rank))
    pg = dist.new_group([0, 1], backend="nccl")
    numel = args.mib * (1 << 20) // 2

    class Coord:  # the parts of vLLM's GroupCoordinator the plugin uses
        device_group, _fleet_scope = pg, "intra"

        def isend_tensor_dict(self, td, *a, **k):
            return [dist.isend(t, dst=1, group=pg) for t in td.values()]

        def irecv_tensor_dict(self, *a, **k):
            td = {"hidden_states": torch.empty(numel, dtype=torch.bfloat16, device="cuda"),
                  "residual": torch.empty(numel, dtype=torch.bfloat16, device="cuda")}
            return td, [dist.irecv(t, src=0, group=pg) for t in td.values()], []

    rec, coord = probe.Recorder(), Coord()
    rec.eager_every = 1
    if args.aligned:
        out_q.put(aligned(rank, pg, rec, coord, args))
        dist.barrier()
        dist.destroy_process_group()
        return
    x = torch.randn(numel, device="cuda").to(torch.bfloat16)
    works = []
    for _ in range(args.iters):
        for w in works:  # vLLM waits on the previous step's works at the top of the next one
            w.wait()
        if rank == 0:
            works = rec.pp_isend(coord, coord.isend_tensor_dict,
                                 {"hidden_states": x * 1.0, "residual": x * 2.0})
        else:
            _, works, _ = rec.pp_irecv(coord, coord.irecv_tensor_dict)
        torch.cuda._sleep(20000)  # some compute between the steps (~10 µs)
    for w in works:
        w.wait()
    torch.cuda.synchronize()
    rec.pp_drain()
    ref = []
    for _ in range(50):  # the reference: events around isend + wait, one tensor
        torch.cuda.synchronize()
        dist.barrier()
        if rank == 0:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            dist.isend(x, dst=1, group=pg).wait()
            e.record()
            e.synchronize()
            ref.append(s.elapsed_time(e) / 1e3)
        else:
            buf = torch.empty_like(x)
            dist.irecv(buf, src=0, group=pg).wait()
            torch.cuda.synchronize()
    out = {"rank": rank, "pp_off": rec.pp_off, "stats": rec.pp_stats, "durations": rec._pp_ok,
           "hists": [{k: h[k] for k in ("size_bytes", "source", "scope", "count")}
                     | {"mean_us": h["sum_s"] / h["count"] * 1e6} for h in rec.hists.snapshot()],
           "reference_median_us": statistics.median(ref) * 1e6 if ref else None,
           "has_enable": hasattr(pg, "_enable_collectives_timing"),
           "torch": torch.__version__}
    out_q.put(out)
    dist.barrier()
    dist.destroy_process_group()


def aligned(rank, pg, rec, coord, args) -> dict:
    """One send at a time from the same state; plugin duration vs events around send + wait."""
    import torch
    import torch.distributed as dist

    gloo = dist.new_group([0, 1], backend="gloo")  # GLOO_SOCKET_IFNAME=lo: see worker()
    rows = []
    dist.barrier(group=gloo)
    # NCCL connects a send/recv pair on the host inside the first ncclSend/ncclRecv, which blocks
    # until the peer posts its side: one send before the aligned loop, whose barrier sits between
    # the receive and the send (the first try hung there)
    w = torch.ones(1024, dtype=torch.bfloat16, device="cuda")
    (dist.isend(w, dst=1, group=pg) if rank == 0 else dist.irecv(w, src=0, group=pg)).wait()
    torch.cuda.synchronize()
    print(f"rank {rank}: gloo barrier and first send/recv ok", file=sys.stderr, flush=True)
    for kib in (int(k) for k in args.sizes_kib.split(",")):
        print(f"rank {rank}: {kib} KiB", file=sys.stderr, flush=True)
        numel = kib * 1024 // 2
        x = torch.randn(numel, device="cuda").to(torch.bfloat16)
        buf = torch.empty_like(x)
        tapped, ref = [], []
        observe = rec.observe
        rec.observe = lambda *a: tapped.append(a[-1]) or observe(*a)
        for i in range(args.iters + 5):  # the first 5: warm-up, not counted
            torch.cuda.synchronize()
            if rank == 1:
                work = dist.irecv(buf, src=0, group=pg)
                dist.barrier(group=gloo)
                work.wait()
                torch.cuda.synchronize()
            else:
                dist.barrier(group=gloo)
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                # ~1 ms of GPU sleep first, so the CPU has enqueued everything before s fires:
                # the reference then holds the transfer, not Python's launch latency
                torch.cuda._sleep(2_000_000)
                s.record()
                works = rec.pp_isend(coord, coord.isend_tensor_dict, {"hidden_states": x})
                for w in works:
                    w.wait()
                e.record()
                e.synchronize()
                rec.pp_drain()
                if i >= 5:
                    ref.append(s.elapsed_time(e) / 1e3)
                else:
                    tapped.clear()
        rec.observe = observe
        if rank == 0:
            rows.append({"size_bytes": kib * 1024, "n": len(tapped),
                         "plugin_median_us": statistics.median(tapped) * 1e6,
                         "reference_median_us": statistics.median(ref) * 1e6,
                         "plugin_mean_us": statistics.fmean(tapped) * 1e6,
                         "reference_mean_us": statistics.fmean(ref) * 1e6})
    return {"rank": rank, "aligned": rows, "pp_off": rec.pp_off, "torch": torch.__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--mib", type=int, default=4)
    ap.add_argument("--aligned", action="store_true")
    ap.add_argument("--sockets", action="store_true")
    ap.add_argument("--sizes-kib", default="64,256,1024,4096")
    ap.add_argument("--deadline", type=float, default=150.0, help="seconds for the whole check")
    args = ap.parse_args()
    import torch.multiprocessing as mp
    from probe_vs_reference import free_port, gather_results

    os.environ.setdefault("VLLM_FLEET_STATE_DIR", "/tmp/vllm-fleet-bench")
    port = free_port()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, args, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    res = gather_results(q, procs, 2, args.deadline)
    if res is None:
        return 1
    if args.aligned:
        r0 = [r for r in res if r["rank"] == 0][0]
        print(f"aligned sends, {'NCCL sockets' if args.sockets else 'NCCL default (NVLink)'}, "
              f"torch {r0['torch']}, PP timing off: {r0['pp_off']}")
        print(f"{'size':>9} {'n':>4} {'plugin med us':>13} {'reference med us':>16} {'ratio':>6} "
              f"{'plugin mean':>11} {'ref mean':>9}")
        for row in r0["aligned"]:
            print(f"{row['size_bytes']:>9} {row['n']:>4} {row['plugin_median_us']:13.1f} "
                  f"{row['reference_median_us']:16.1f} "
                  f"{row['plugin_median_us'] / row['reference_median_us']:6.3f} "
                  f"{row['plugin_mean_us']:11.1f} {row['reference_mean_us']:9.1f}")
        print(json.dumps(res), file=sys.stderr)
        return 0 if r0["pp_off"] is None and r0["aligned"] and r0["aligned"][0]["n"] else 1
    ok = True
    for r in sorted(res, key=lambda r: r["rank"]):
        st = r["stats"]
        print(f"rank {r['rank']} (torch {r['torch']}, ProcessGroup._enable_collectives_timing: "
              f"{r['has_enable']}): off={r['pp_off']} durations={r['durations']} "
              f"wrapper calls={st['count']} mean {st['sum_s'] / max(1, st['count']) * 1e6:.1f} us "
              f"max {st['max_s'] * 1e6:.1f} us on the caller's path")
        for h in r["hists"]:
            print(f"  pp {h['source']:>5} {h['scope']} {h['size_bytes']:>9} B n={h['count']:>4} "
                  f"mean {h['mean_us']:9.1f} us")
        if r["reference_median_us"]:
            print(f"  reference (events around isend+wait on the current stream, {args.mib} MiB): "
                  f"median {r['reference_median_us']:.1f} us")
        ok = ok and r["pp_off"] is None and r["durations"] > 0
    print(json.dumps(res), file=sys.stderr)
    print("PP timing check:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
