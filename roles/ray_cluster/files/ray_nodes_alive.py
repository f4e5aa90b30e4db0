"""Wait until Ray's GCS lists the given node IPs ALIVE; print them as JSON.

Runs once per wait inside the head's Ray container (`docker exec -i ... python3 - ARGS`, this
file on stdin), so Ray is imported once, not once per attempt as `ray list nodes` did (a Python
start-up with Ray's import each time, about a minute at load 50), and the answer comes from the
GCS itself, not through the dashboard's state API (the wait no longer needs a dashboard). Ray's
token authentication is read from the container's environment (RAY_AUTH_MODE /
RAY_AUTH_TOKEN_PATH), never from a command line.

Usage: python3 - GCS_ADDRESS TIMEOUT_SECONDS WANT_IPS_JSON   (the deadline counts from start-up,
       before Ray is imported, on this host's clock)
stdout: JSON list of the ALIVE nodes ({"node_ip", "node_id", "state", "resources_total"}), the
        last answer, also on failure. stderr: one line per change of what is missing.
exit:   0 when every wanted IP is ALIVE, 1 at the deadline.
"""
import json
import sys
import time

ATTEMPT_TIMEOUT_S = 10.0  # one GCS call; the GCS answers in ms when up, so this only bounds a dead one
PAUSE_S = 2.0


def alive_nodes(nodes):
    """Dict NodeID -> GcsNodeInfo (as the GCS client returns it) -> our JSON records, ALIVE only."""
    out = []
    for node_id, info in nodes.items():
        if info.state != 0:  # GcsNodeInfo.GcsNodeState: ALIVE = 0, DEAD = 1
            continue
        out.append({
            "node_ip": info.node_manager_address,
            "node_id": node_id.hex() if hasattr(node_id, "hex") else str(node_id),
            "state": "ALIVE",
            "resources_total": {k: float(v) for k, v in dict(info.resources_total).items()},
        })
    return sorted(out, key=lambda n: n["node_ip"])


def wait(query, want, deadline, clock=time.time, sleep=time.sleep, log=None):
    """Polls query(timeout_s) -> alive records until every IP in `want` is listed or the deadline
    passes. Returns (ok, last records). A failing query counts as "not yet", with its error logged."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    last, said = [], None
    while True:
        left = deadline - clock()
        if left <= 0:
            return False, last
        try:
            last = query(min(ATTEMPT_TIMEOUT_S, left))
            missing = sorted(set(want) - {n["node_ip"] for n in last})
            line = "not alive yet: " + ", ".join(missing) if missing else ""
        except Exception as exc:  # the GCS not up yet, a timeout: keep waiting until the deadline
            missing, line = want, f"GCS query failed: {type(exc).__name__}: {str(exc)[:200]}"
        if not missing:
            return True, last
        if line != said:
            log(f"{time.strftime('%H:%M:%S')} {line}")
            said = line
        sleep(max(0.0, min(PAUSE_S, deadline - clock())))


def main(argv):
    address, deadline, want = argv[1], time.time() + float(argv[2]), json.loads(argv[3])
    from ray._raylet import GcsClient  # noqa: PLC0415 - Ray exists only in the image

    client = []

    def query(timeout_s):
        if not client:  # built lazily: the constructor fails while the GCS is not up
            client.append(GcsClient(address=address))
        return alive_nodes(client[0].get_all_node_info(timeout=timeout_s))

    ok, last = wait(query, want, deadline)
    print(json.dumps(last))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
