"""The locked-down cluster on the deployed lab (issue 15): real nftables, real HAProxy, real Ray.

* A port scan (Debian's nmap) from a container on the management network that is no cluster host:
  with the firewall switched off every Ray / vLLM / exporter port answers; with it on only SSH and
  the balancer's front door do. The monitoring host still reaches every exporter; the fabric peers
  still form Ray and serve PP=2 across hosts; a firewall re-run changes nothing.
* Ray refuses calls without the deployment's token (dashboard jobs API, a GCS client), from a
  fabric peer the firewall lets in; the cluster forms and the exporter's Ray metrics are there.
* The front door: TLS with the lab CA, HTTP redirected, no key / a wrong key 401, a tenant key 200
  (plain and streamed), a tenant over its rate limit 429 while another is served, per-tenant
  counters in Prometheus, /pause refused at the door and the head closed to outsiders.
* Two deployments on one host: tearing one down leaves every file and shm segment of the other.
"""
from __future__ import annotations

import json
import re
import subprocess
import textwrap
import time

import pytest
import requests

from tests.lab.conftest import first_replica, front_door, head_api, run_playbook
from tests.lab.lab import ensure_scanner, scanner_ip
from tests.lab.test_monitoring import prometheus_of, wait_for

pytestmark = pytest.mark.lab

SCAN_TIMEOUT = 240  # nmap's own --host-timeout is shorter; this bounds the whole docker exec


@pytest.fixture(scope="module")
def fleet(deployed_lab):
    r = first_replica(deployed_lab)
    return dict(deployed_lab, **r, peer=r["members"][1],
                balancer=deployed_lab["groups"]["fleet_loadbalancer"][0],
                monitoring=deployed_lab["groups"]["fleet_monitoring"][0],
                image=r["hostvars"][r["head"]].get("fleet_image"), api=head_api(deployed_lab, r["head"]),
                door=front_door(deployed_lab), limited=front_door(deployed_lab, "lab-limited"),
                prom=prometheus_of(deployed_lab))


def ssh(fleet, host, cmd, check=True, timeout=120) -> str:
    return fleet["hosts"][host].run(cmd, check=check, timeout=timeout).stdout


# HTTP status of a GET from a lab host (they have python3, not curl). The bearer token comes from a
# root-only file read by the script itself ("file:PATH"), or is given ("value:TOKEN", a wrong one).
HTTP_STATUS = textwrap.dedent("""
    import sys, urllib.error, urllib.request
    headers = {}
    if len(sys.argv) > 2:
        kind, _, arg = sys.argv[2].partition(":")
        token = open(arg).read().strip() if kind == "file" else arg
        headers["Authorization"] = "Bearer " + token
    try:
        with urllib.request.urlopen(urllib.request.Request(sys.argv[1], headers=headers), timeout=20) as r:
            print(r.status)
    except urllib.error.HTTPError as exc:
        print(exc.code)
    except OSError as exc:
        print("000", exc)
""")


def http_status(fleet, host, url, auth="") -> str:
    fleet["hosts"][host].run(f"cat > /tmp/fleet-http-status.py <<'EOF'\n{HTTP_STATUS}\nEOF")
    return ssh(fleet, host, f"sudo python3 /tmp/fleet-http-status.py {url} {auth}").strip().split()[0]


def fabric_ip(fleet, host) -> str:
    env = ssh(fleet, host, "cat /etc/vllm-fleet/fabric.env")
    return re.search(r"^FLEET_RAY_NODE_IP=(\S+)$", env, re.M).group(1)


def listening_ports(fleet) -> list[int]:
    """Every TCP port something listens on, on any lab host, outside loopback: what a scan must try."""
    ports = set()
    for host in fleet["hosts"]:
        for line in ssh(fleet, host, "ss -Htln").splitlines():
            local = line.split()[3]
            addr, port = local.rsplit(":", 1)
            if not addr.strip("[]").startswith(("127.", "::1")):
                ports.add(int(port))
    return sorted(ports)


def scan(fleet, ports: list[int]) -> dict[str, set[int]]:
    """nmap (TCP connect, no ping) from the scanner container: open ports per lab host address."""
    scanner = ensure_scanner()
    addrs = {h.address: name for name, h in fleet["hosts"].items()}
    out = subprocess.run(["docker", "exec", scanner, "nmap", "-Pn", "-sT", "-n", "--max-retries", "1",
                          "--host-timeout", "120s", "-T4", "-oG", "-", "-p", ",".join(map(str, ports)), *addrs],
                         capture_output=True, text=True, timeout=SCAN_TIMEOUT, check=True).stdout
    found = {name: set() for name in addrs.values()}
    for line in out.splitlines():
        m = re.match(r"Host: (\S+) .*Ports: (.*)", line)
        if m:
            found[addrs[m.group(1)]] = {int(p.split("/")[0]) for p in m.group(2).split(", ") if "/open/" in p}
    return found


def set_firewall(enabled: bool):
    run = run_playbook("deploy.yml", "--tags", "firewall", "-e", json.dumps({"firewall_enabled": enabled}))
    assert run.rc == 0, run.output[-10000:]
    return run


def test_port_scan_before_and_after_the_firewall(fleet, tmp_path):
    ports = listening_ports(fleet)
    door = fleet["hostvars"][fleet["balancer"]]
    front = {door.get("loadbalancer_tls_port", 8443), door.get("loadbalancer_frontend_port", 8080)}
    assert {6379, 8009, 9445} <= set(ports), ports  # Ray's GCS, the API, the exporter listen
    try:
        set_firewall(False)
        before = scan(fleet, ports)
    finally:
        after_run = set_firewall(True)
    after = scan(fleet, ports)
    (tmp_path / "scan.json").write_text(json.dumps({"ports": ports, "before": {k: sorted(v) for k, v in before.items()},
                                                    "after": {k: sorted(v) for k, v in after.items()}}))
    print(f"scanned {len(ports)} ports from {scanner_ip()}: before {before}; after {after}")
    assert {6379, 8009, 9445} <= before[fleet["head"]], before  # the scan sees what is open
    for host, open_ports in after.items():
        want = {22} | (front if host == fleet["balancer"] else set())
        assert open_ports == want, (host, open_ports)
    assert after_run.changed_total() > 0  # it put the table back
    again = run_playbook("deploy.yml", "--tags", "firewall")
    assert again.rc == 0 and again.changed_total() == 0, again.output[-10000:]


def test_monitoring_reaches_every_exporter_and_the_fabric_peers_serve_and_form_ray(fleet):
    mon = fleet["monitoring"]
    for name, host in fleet["hosts"].items():
        code = http_status(fleet, mon, f"http://{host.address}:9445/metrics")
        assert code == "200", (name, code)
    targets = fleet["prom"].targets()
    assert targets and all(t["health"] == "up" for t in targets), [(t["scrapeUrl"], t["health"]) for t in targets]
    # PP=2 across node1/node2 over the fabric, through the front door
    r = requests.post(f"{fleet['door']['url']}/chat/completions", verify=fleet["door"]["ca_file"], timeout=120,
                      headers={"Authorization": f"Bearer {fleet['door']['key']}"},
                      json={"model": fleet["door"]["model"], "max_tokens": 8,
                            "messages": [{"role": "user", "content": "through the front door"}]})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    nodes = json.loads(ssh(fleet, fleet["head"], f"sudo docker exec -e RAY_ADDRESS=http://{fabric_ip(fleet, fleet['head'])}"
                                                  f":8265 {fleet['deployment']}-ray ray list nodes --format json "
                                                  "--filter state=ALIVE"))
    assert sorted(n["node_ip"] for n in nodes) == sorted(fabric_ip(fleet, h) for h in fleet["members"])
    # the exporter's Ray collector (token as a bearer token) sees the same
    wait_for("the exporter's Ray metrics", lambda: fleet["prom"].query(
        f'vllm_fleet_ray_nodes_alive{{host="{fleet["head"]}"}} == vllm_fleet_ray_nodes_expected'), timeout=120)


# A GCS client (Ray's own, as `ray list nodes` and tests/gpu/ray_nodes_json.py use it): the node
# table, or why not. No driver: a driver would also need the node's raylet socket.
GCS_CLIENT = textwrap.dedent("""
    import sys
    from ray._raylet import GcsClient
    try:
        nodes = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=20)
        print("CONNECTED", len(nodes))
    except Exception as exc:
        print("REFUSED", type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
""")


def test_ray_refuses_calls_without_the_token(fleet):
    """From a fabric peer (the firewall lets it in): only the token opens Ray."""
    head_ip, peer = fabric_ip(fleet, fleet["head"]), fleet["peer"]
    token_file = f"/etc/vllm-fleet/secrets/{fleet['deployment']}/ray-auth-token"
    jobs = f"http://{head_ip}:8265/api/jobs/"
    assert http_status(fleet, peer, jobs) == "401"
    assert http_status(fleet, peer, jobs, "value:not-the-token") == "403"
    assert http_status(fleet, peer, jobs, f"file:{token_file}") == "200"
    # a GCS client without the token (none in its environment or home): refused by the GCS
    script = "/tmp/fleet-gcs-client.py"
    fleet["hosts"][peer].run(f"cat > {script} <<'EOF'\n{GCS_CLIENT}\nEOF")
    run = f"sudo timeout 150 docker run --rm --network host -e HOME=/tmp -v {script}:{script}:ro --entrypoint python3 " \
          f"{fleet['image']} {script} {head_ip}:6379"
    assert "REFUSED" in ssh(fleet, peer, run, timeout=200)
    # ... and the same client with the token mounted as the fleet does it connects
    authed = run.replace("-e HOME=/tmp", f"-e HOME=/tmp -e RAY_AUTH_MODE=token -e RAY_AUTH_TOKEN_PATH=/t "
                                         f"-v {token_file}:/t:ro")
    assert "CONNECTED" in ssh(fleet, peer, authed, timeout=200)
    # the token is never in a container's environment; the Ray container sees fabric.env and its token only
    inspect = json.loads(ssh(fleet, fleet["head"], f"sudo docker inspect {fleet['deployment']}-ray"))[0]
    token = ssh(fleet, fleet["head"], f"sudo cat {token_file}").strip()
    assert token and token not in json.dumps(inspect["Config"]["Env"])
    assert "RAY_AUTH_MODE=token" in inspect["Config"]["Env"]
    mounts = {m["Destination"] for m in inspect["Mounts"]}
    assert "/etc/vllm-fleet/fabric.env" in mounts and "/etc/vllm-fleet" not in mounts
    assert not any("api-key" in m for m in mounts)


def test_front_door_tls_keys_rate_limits_and_counters(fleet):
    from openai import DefaultHttpxClient, OpenAI

    door, limited = fleet["door"], fleet["limited"]
    base, ca = door["url"].removesuffix("/v1"), door["ca_file"]
    plain = requests.get(base.replace("https://", "http://").replace(":8443", ":8080") + "/v1/models",
                         allow_redirects=False, timeout=30)
    assert plain.status_code == 308 and plain.headers["location"].startswith("https://")
    assert requests.get(f"{base}/v1/models", verify=ca, timeout=30).status_code == 401
    assert requests.get(f"{base}/v1/models", verify=ca, timeout=30,
                        headers={"Authorization": "Bearer wrong-key-wrong-key"}).status_code == 401
    client = OpenAI(base_url=door["url"], api_key=door["key"], timeout=120, max_retries=0,
                    http_client=DefaultHttpxClient(verify=ca))
    r = client.chat.completions.create(model=door["model"], max_tokens=8,
                                       messages=[{"role": "user", "content": "hello"}])
    assert r.usage.completion_tokens > 0
    chunks = [c for c in client.chat.completions.create(model=door["model"], max_tokens=8, stream=True,
                                                         messages=[{"role": "user", "content": "hi"}]) if c.choices]
    assert chunks
    # the tenant's key opens only the door: the engine does not take it
    direct = requests.get(f"{fleet['api']['url']}/models", timeout=30, headers={"Authorization": f"Bearer {door['key']}"})
    assert direct.status_code == 401
    # a tenant over its rate limit (3 per 10 s) gets 429 while the other tenant is served
    codes = [requests.get(f"{base}/v1/models", verify=ca, timeout=30,
                          headers={"Authorization": f"Bearer {limited['key']}"}).status_code for _ in range(6)]
    other = requests.get(f"{base}/v1/models", verify=ca, timeout=30, headers={"Authorization": f"Bearer {door['key']}"})
    assert 429 in codes and codes[0] == 200 and other.status_code == 200, codes
    # vLLM's other endpoints never pass the door, and the head's API is closed to outsiders
    pause = requests.post(f"{base}/pause", verify=ca, timeout=30, headers={"Authorization": f"Bearer {door['key']}"})
    assert pause.status_code == 403
    head = fleet["hosts"][fleet["head"]].address
    outsider = subprocess.run(["docker", "exec", ensure_scanner(), "curl", "-s", "-m", "10", "-o", "/dev/null", "-w",
                               "%{http_code}", "-X", "POST", f"http://{head}:8009/pause"], capture_output=True, text=True)
    assert outsider.stdout == "000", outsider  # connection refused by the firewall
    # per-tenant counters, from the exporter on the balancer, in Prometheus
    wait_for("per-tenant counters in Prometheus", lambda: fleet["prom"].query(
        'vllm_fleet_tenant_rate_limited_total{tenant="lab-limited"} > 0'), timeout=120)
    assert fleet["prom"].query('vllm_fleet_tenant_requests_total{tenant="lab"} > 0')


OWNER = textwrap.dedent("""
    import json, os, time
    from multiprocessing import shared_memory, resource_tracker
    from vllm_fleet import state
    from vllm_fleet.hooks import shm
    lid = os.environ["VLLM_FLEET_LAUNCH_ID"]
    state.write_json_atomic(os.path.join(state.launch_dir(lid), "launch.json"),
                            {"launch_id": lid, "deployment": state.deployment(), "created": time.time()})
    state.register_member()
    shm._record_shm_segments()
    shm = shared_memory.SharedMemory(create=True, size=1 << 20)
    resource_tracker.unregister(shm._name, "shared_memory")
    print(shm.name, flush=True)
    time.sleep(3600)
""")


def test_teardown_of_one_deployment_leaves_every_file_and_segment_of_the_other(fleet, tmp_path):
    """Deployments x and x-y on one host (containers with the host's IPC, as vllm_serve_ipc_host
    runs them, each with a recorded segment, launch state and secrets), plus someone else's NCCL
    segment in /dev/shm. teardown.yml of x removes x's and nothing of x-y's, nor the foreign file,
    nor the lab's own deployment there."""
    host = fleet["peer"]
    x, xy = "lockx", "lockx-y"
    epoch = int(time.time())
    script = "/tmp/fleet-shm-owner.py"
    fleet["hosts"][host].run(f"cat > {script} <<'EOF'\n{OWNER}\nEOF")
    segs = {}
    try:
        for dep in (x, xy):
            lid = f"{dep}-{epoch}-abcdef"
            ssh(fleet, host, f"sudo install -d -m 0700 /etc/vllm-fleet/secrets/{dep} && "
                             f"echo s3cret | sudo tee /etc/vllm-fleet/secrets/{dep}/api-key >/dev/null && "
                             f"sudo docker run -d --init --name {dep}-vllm --ipc=host --label vllm-fleet.deployment={dep} "
                             f"--label vllm-fleet.component=vllm -v /run/vllm-fleet:/run/vllm-fleet "
                             f"-v {script}:{script}:ro -e VLLM_FLEET_DEPLOYMENT={dep} -e VLLM_FLEET_LAUNCH_ID={lid} "
                             f"--entrypoint python3 {fleet['image']} {script} >/dev/null")
            wait_for(f"{dep}'s recorded segment", lambda d=dep: ssh(
                fleet, host, f"sudo docker logs {d}-vllm 2>&1 | grep -m1 '^psm_'", check=False).strip(), timeout=120)
            segs[dep] = ssh(fleet, host, f"sudo docker logs {dep}-vllm 2>&1 | grep -m1 '^psm_'").strip()
        foreign = ssh(fleet, host, "f=/dev/shm/nccl-lockdown$$; sudo dd if=/dev/zero of=$f bs=4k count=1 status=none;"
                                   " echo $f").strip()
        lab_before = ssh(fleet, host, f"sudo docker ps -q --filter label=vllm-fleet.deployment={fleet['deployment']}")
        run = run_playbook("teardown.yml", "--limit", host, "-e", json.dumps({
            "fleet_deployment": x, "teardown_confirm": x, "teardown_stop_exporter": False,
            "teardown_stop_loadbalancer": False, "teardown_stop_timeout": 10}), timeout=900)
        assert run.rc == 0, run.output[-10000:]
        listing = ssh(fleet, host, "sudo ls /run/vllm-fleet/launches/ /etc/vllm-fleet/secrets/ /dev/shm/")
        assert f"{xy}-{epoch}-abcdef" in listing and segs[xy] in listing and foreign.split("/")[-1] in listing
        # x's own recorded segment: removed where the teardown sees every process (a real host, and
        # tests/unit/test_launch_state.py); a lab host is a container that cannot prove its processes
        # gone, so the segment is kept and reported, never guessed
        report = re.search(r"(\d+) recorded shm segment\(s\)\s+removed,\s+(\d+)\s+kept", run.output)
        assert report and int(report.group(1)) + int(report.group(2)) == 1, run.output[-3000:]
        assert (segs[x] in listing) == (report.group(2) == "1")
        assert (f"{x}-{epoch}-abcdef" in listing) == (report.group(2) == "1")  # the record stays with it
        assert re.search(rf"^{re.escape(xy)}$", listing, re.M) and not re.search(rf"^{re.escape(x)}$", listing, re.M)
        assert ssh(fleet, host, f"sudo docker inspect -f '{{{{.State.Running}}}}' {xy}-vllm").strip() == "true"
        assert ssh(fleet, host, f"sudo docker ps -aq --filter name=^{x}-vllm$").strip() == ""
        assert ssh(fleet, host, f"sudo docker ps -q --filter label=vllm-fleet.deployment={fleet['deployment']}") == \
            lab_before
        assert ssh(fleet, host, f"sudo ls /run/vllm-fleet/launches/ | grep -c '^{fleet['deployment']}-'").strip() != "0"
    finally:
        ssh(fleet, host, f"sudo docker rm -f {x}-vllm {xy}-vllm >/dev/null 2>&1; "
                         f"sudo rm -rf /etc/vllm-fleet/secrets/{x} /etc/vllm-fleet/secrets/{xy} "
                         f"/run/vllm-fleet/launches/{x}-{epoch}-abcdef /run/vllm-fleet/launches/{xy}-{epoch}-abcdef "
                         f"/dev/shm/nccl-lockdown* {' '.join('/dev/shm/' + s for s in segs.values())}", check=False)
