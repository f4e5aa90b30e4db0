"""Ray launcher (RFC "Launcher ... started by Ray"): the fabric check placed on an existing Ray
cluster from one driver, instead of the same command on every node.

    fleet-fabric-check --launcher ray --ray-address HEAD_IP:6379 --launch-id X [--nnodes N]
        [--ray-auth-token-file /run/secrets/ray-auth-token]

* a placement group with one bundle per node, strategy STRICT_SPREAD (every bundle on a different
  node), each bundle ``{"CPU": --ray-task-cpus, "GPU": nproc}`` (GPU only with NCCL); node rank =
  bundle index, so node 0 is whichever node Ray put bundle 0 on;
* one Ray task per node, in its bundle; it runs the direct launcher of that node as a child process
  (``fleet-fabric-check --launcher direct --node-rank i ...``): the same rank code, one rank
  process per device, the coordinator on node 0's address (the Ray node IP, i.e. the fabric
  address in the fleet) at the launch id's shared ``fabric`` port. The task captures the child's
  output and returns it with its exit code, so a rank's ``os._exit`` on a timeout never takes a Ray
  worker down and never loses the message;
* the interface is per node: ``--ifname`` when given, else each node's own
  ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` (the Ray node was started with the fabric env,
  and Ray workers inherit the raylet's environment);
* the driver gathers: every node's stderr (ready lines, ``FABRIC CHECK TIMEOUT`` lines) prefixed
  with its node, then node 0's table and JSON line; the exit code is the worst of the nodes;
* never hangs: the ranks' per-step timers and the node launchers' budgets apply as in the direct
  launch; on top, the driver gives up on the Ray connection, the placement group and the tasks at
  their own deadlines, naming the node(s) still running, and cancels them (exit 124).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

from .report import EXIT_FAIL, EXIT_OK, EXIT_TIMEOUT

START_SLACK_S = 60.0  # process + torch import on each node, on top of the ranks' own budget


def node_budget(base: dict, nnodes: int) -> float:
    """The direct launcher's budget on one node (launcher.launch_local) plus start-up slack."""
    return base["timeout_s"] * (len(base["sizes"]) + 4 + nnodes * nnodes) + 30 + START_SLACK_S


def node_argv(base: dict, node_rank: int, nnodes: int, nproc: int) -> list[str]:
    """The direct launcher's command line for one node (what an operator would run there)."""
    argv = ["--launcher", "direct", "--nnodes", str(nnodes), "--node-rank", str(node_rank),
            "--master-addr", base["master_addr"], "--master-port", str(base["master_port"]),
            "--nproc-per-node", str(nproc), "--launch-id", base["launch_id"],
            "--backend", base["backend"], "--timeout", str(base["timeout_s"]),
            "--min-size", str(base["min_size"]), "--max-size", str(base["max_size"]),
            "--pair-size", str(base["pair_size"])]
    if not base.get("pairs", True):
        argv.append("--no-pairs")
    if base.get("ifname"):
        argv += ["--ifname", base["ifname"]]
    return argv


def run_node(argv: list[str], timeout_s: float) -> dict:
    """Body of the Ray task on one node: the direct launcher as a child, output captured."""
    import ray

    where = {"ip": ray.util.get_node_ip_address(), "host": socket.gethostname(),
             "ifname": os.environ.get("GLOO_SOCKET_IFNAME") or os.environ.get("NCCL_SOCKET_IFNAME")}
    try:
        r = subprocess.run([sys.executable, "-m", "vllm_fleet.fabric_check.cli", *argv],
                           capture_output=True, text=True, timeout=timeout_s)
        return dict(where, exit=r.returncode, stdout=r.stdout, stderr=r.stderr)
    except subprocess.TimeoutExpired as exc:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")

        return dict(where, exit=EXIT_TIMEOUT, stdout=text(exc.stdout), stderr=text(exc.stderr) + (
            f"FABRIC CHECK TIMEOUT: node launcher on {where['host']} ({where['ip']}) still "
            f"running after {timeout_s:.0f}s; killed\n"))


def _deadline_guard(seconds: float, what: str) -> threading.Event:
    """Ends the process (exit 124, message naming ``what``) unless the event is set in time: for
    Ray calls that take no timeout of their own (connecting to the cluster)."""
    done = threading.Event()

    def guard():
        if not done.wait(seconds):
            print(f"FABRIC CHECK TIMEOUT: {what} after {seconds:.0f}s", file=sys.stderr,
                  flush=True)
            os._exit(EXIT_TIMEOUT)

    threading.Thread(target=guard, daemon=True, name="fabric-ray-deadline").start()
    return done


def _describe_nodes(nodes: list[dict]) -> str:
    return "; ".join(f"{n.get('NodeManagerAddress')} ({n.get('NodeManagerHostname')}): "
                     f"{ {k: v for k, v in n.get('Resources', {}).items() if k in ('CPU', 'GPU')} }"
                     for n in nodes) or "none"


def launch_ray(args, make_base) -> int:
    """args: the CLI's namespace (ray_address, nnodes (None: every eligible node),
    nproc_per_node, ray_task_cpus, backend, master_addr, json_out, ...); make_base(args, backend,
    master_addr) -> what every rank is told (cli.make_base)."""
    from .. import ray_auth

    # Ray reads RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH when it starts up in this process: set first.
    if getattr(args, "ray_auth_token_file", None):
        ray_auth.use_token_file(os.environ, args.ray_auth_token_file)
    problem = ray_auth.token_problem(os.environ)
    if problem:
        print(f"fleet-fabric-check: error: {problem} (--ray-auth-token-file)", file=sys.stderr)
        return EXIT_FAIL
    try:
        import ray
        from ray.util.placement_group import (placement_group, placement_group_table,
                                              remove_placement_group)
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    except ImportError as exc:
        print(f"fleet-fabric-check: error: --launcher ray needs the ray package here ({exc})",
              file=sys.stderr)
        return EXIT_FAIL
    address = args.ray_address
    cpus = args.ray_task_cpus
    wait_s = args.ray_timeout  # connecting, and placing the placement group
    guard = _deadline_guard(wait_s, f"Ray cluster at {address} (--ray-address) not reachable")
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except Exception as exc:  # wrong address, no cluster, version mismatch
        print(f"fleet-fabric-check: error: cannot connect to the Ray cluster at {address} "
              f"(--ray-address / RAY_ADDRESS): {type(exc).__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return EXIT_FAIL
    finally:
        guard.set()
    pg = None
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        node_gpus = [int(n.get("Resources", {}).get("GPU", 0)) for n in alive]
        backend = args.backend
        if backend == "auto":  # from the cluster, not from the driver's own node
            backend = "nccl" if node_gpus and min(node_gpus) > 0 else "gloo"
        nproc = args.nproc_per_node or (min(node_gpus) if backend == "nccl" else 1)
        gpus = nproc if backend == "nccl" else 0
        eligible = [n for n in alive if n.get("Resources", {}).get("CPU", 0) >= cpus
                    and n.get("Resources", {}).get("GPU", 0) >= gpus]
        nnodes = args.nnodes or len(eligible)
        if nnodes < 1 or nnodes > len(eligible):
            print(f"fleet-fabric-check: error: Ray cluster at {address} has {len(eligible)} node(s) "
                  f"with {cpus} CPU and {gpus} GPU for one bundle, {nnodes or 'at least 1'} "
                  f"wanted; alive nodes: {_describe_nodes(alive)}", file=sys.stderr)
            return EXIT_FAIL
        bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        pg = placement_group([dict(bundle) for _ in range(nnodes)], strategy="STRICT_SPREAD",
                             name=f"fabric-check-{args.launch_id}")
        try:
            ray.get(pg.ready(), timeout=wait_s)
        except ray.exceptions.GetTimeoutError:
            print(f"FABRIC CHECK TIMEOUT: placement group of {nnodes} x {bundle} (STRICT_SPREAD) "
                  f"not placed on the Ray cluster at {address} after {wait_s:.0f}s; "
                  f"alive nodes: {_describe_nodes(alive)}", file=sys.stderr, flush=True)
            return EXIT_TIMEOUT
        by_id = {n["NodeID"]: n for n in alive}
        placed = placement_group_table(pg)["bundles_to_node_id"]
        where = [by_id.get(placed[i], {}) for i in range(nnodes)]
        base = make_base(args, backend, args.master_addr or where[0].get("NodeManagerAddress"))
        budget = node_budget(base, nnodes)
        task = ray.remote(max_retries=0)(run_node)
        refs = []
        for i in range(nnodes):
            strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
            refs.append(task.options(num_cpus=cpus, num_gpus=gpus, scheduling_strategy=strategy,
                                     name=f"fabric-check-node{i}")
                        .remote(node_argv(base, i, nnodes, nproc), budget))
        print(f"fabric check {base['launch_id']} on Ray {address}: {nnodes} node(s) "
              f"{[w.get('NodeManagerAddress') for w in where]} x {nproc} rank(s), coordinator "
              f"{base['master_addr']}:{base['master_port']}", file=sys.stderr, flush=True)
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=budget + 30)
        worst, results = EXIT_OK, {}
        for i, ref in enumerate(refs):
            w = where[i]
            label = f"node {i} ({w.get('NodeManagerHostname')}, {w.get('NodeManagerAddress')})"
            if ref in pending:
                print(f"FABRIC CHECK TIMEOUT: {label}: Ray task still running after "
                      f"{budget + 30:.0f}s; cancelled", file=sys.stderr, flush=True)
                ray.cancel(ref, force=True)
                worst = EXIT_TIMEOUT
                continue
            try:
                res = ray.get(ref, timeout=30)
            except Exception as exc:  # node died, worker crashed, task error
                print(f"FABRIC CHECK FAILED: {label}: Ray task failed: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr,
                      flush=True)
                worst = max(worst, EXIT_FAIL)
                continue
            results[i] = res
            for line in res["stderr"].splitlines():
                print(f"[node {i} {res['ip']}] {line}", file=sys.stderr)
            code = res["exit"] if res["exit"] >= 0 else EXIT_FAIL
            worst = max(worst, code)
        sys.stderr.flush()
        head = results.get(0)
        if head is not None:
            sys.stdout.write(head["stdout"])
            sys.stdout.flush()
            if args.json_out:
                line = next((x for x in head["stdout"].splitlines() if x.startswith("JSON ")), None)
                if line:
                    with open(args.json_out, "w", encoding="utf-8") as fh:
                        json.dump(json.loads(line[5:]), fh, indent=1)
        return worst
    finally:
        if pg is not None:
            try:
                remove_placement_group(pg)
            except Exception:
                pass
        ray.shutdown()
