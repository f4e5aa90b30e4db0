"""The firewall role's table with REAL nftables, in network namespaces made for the test.

A "host" namespace (management 10.251.0.10, fabric 10.252.0.10) runs TCP listeners on the ports
a serving head has (SSH, Ray's GCS, a launch-range port, the API, the exporter, an ephemeral port
on the fabric address like NCCL's, and an unrelated service of the site's). The real
ansible-playbook runs the role's table.yml inside that namespace; neighbours in their own
namespaces (a fabric peer, an intruder on the fabric network, the balancer, the monitoring host, a
scanner on the management network) then connect. The site's own table survives every step.
Needs root, nft, ip and unshare (the controller has them: tests/requirements-apt.txt).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("nft", "ip", "unshare")),
    reason="needs root, nft (package nftables), ip and unshare")

TAG = f"fw{os.getpid() % 100000}"
NS = {name: f"{TAG}-{name}" for name in ("host", "peer", "intruder", "lb", "mon", "scan", "member", "mgmt", "fab")}
HOST_MGMT, HOST_FAB = "10.251.0.10", "10.252.0.10"
NEIGHBOURS = {  # namespace -> (network, address)
    "peer": ("fab", "10.252.0.20"), "intruder": ("fab", "10.252.0.66"),
    "lb": ("mgmt", "10.251.0.5"), "mon": ("mgmt", "10.251.0.7"), "scan": ("mgmt", "10.251.0.99"),
    "member": ("mgmt", "10.251.0.20")}  # worker2's management address: the head's replica member
PORTS = {"ssh": 22, "gcs": 6379, "launch": 21000, "api": 8009, "exporter": 9445, "agent": 9446,
         "site": 5432}
# What a monitoring host that also heals listens on: Alertmanager and the healer's webhook.
MONITORING_PORTS = {"alertmanager": 9093, "healer": 5055}
NCCL_PORT = 45123  # a random NCCL/Gloo port on the fabric address
REGISTRY_PORT = 5000  # the in-fleet registry (fleet_registry_port), when head1 is the registry host

LISTEN = textwrap.dedent("""
    import socket, sys, threading, time
    specs = [s.split(":") for s in sys.argv[1:]]  # addr:port
    socks = []
    for addr, port in specs:
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, int(port))); s.listen(16); socks.append(s)
    def serve(s):
        while True:
            c, _ = s.accept(); c.close()
    for s in socks:
        threading.Thread(target=serve, args=(s,), daemon=True).start()
    print("ready", flush=True)
    time.sleep(3600)
""")

PLAYBOOK = """
- name: The firewall table of one host, in this network namespace
  hosts: head1
  gather_facts: true
  gather_subset: [network]
  tasks:
    - name: Converge the table with the real role
      ansible.builtin.include_role:
        name: firewall
        tasks_from: "{{ fw_tasks }}"
"""


def sh(*cmd, check=True):
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60)


def in_ns(ns, *cmd, check=True):
    return sh("ip", "netns", "exec", ns, *cmd, check=check)


@pytest.fixture(scope="module")
def netns(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fw")
    made, listeners = [], []
    try:
        for name in NS.values():
            sh("ip", "netns", "add", name)
            made.append(name)
            in_ns(name, "ip", "link", "set", "lo", "up")
        for net in ("mgmt", "fab"):
            in_ns(NS[net], "ip", "link", "add", "br0", "type", "bridge")
            in_ns(NS[net], "ip", "link", "set", "br0", "up")

        wires = []

        def wire(ns, net, addr, ifname):
            wires.append(ns)
            peer = f"{TAG}v{len(wires)}"
            sh("ip", "link", "add", peer, "netns", NS[net], "type", "veth", "peer", "name", ifname, "netns", NS[ns])
            in_ns(NS[net], "ip", "link", "set", peer, "master", "br0", "up")
            in_ns(NS[ns], "ip", "addr", "add", f"{addr}/24", "dev", ifname)
            in_ns(NS[ns], "ip", "link", "set", ifname, "up")

        wire("host", "mgmt", HOST_MGMT, "eth0")
        wire("host", "fab", HOST_FAB, "eth1")
        in_ns(NS["host"], "ip", "route", "add", "default", "via", "10.251.0.1")  # management = default route
        for ns, (net, addr) in NEIGHBOURS.items():
            wire(ns, net, addr, "eth0")
        specs = ([f"0.0.0.0:{p}" for p in {**PORTS, **MONITORING_PORTS}.values()]
                 + [f"{HOST_FAB}:{NCCL_PORT}", f"0.0.0.0:{REGISTRY_PORT}"])
        proc = subprocess.Popen(["ip", "netns", "exec", NS["host"], sys.executable, "-c", LISTEN, *specs],
                                stdout=subprocess.PIPE, text=True)
        listeners.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        # the site's own rules: a table we must never flush or change
        in_ns(NS["host"], "nft", "add", "table", "inet", "site_rules")
        in_ns(NS["host"], "nft", "add", "chain", "inet", "site_rules", "input",
              "{ type filter hook input priority 10; policy accept; }")
        in_ns(NS["host"], "nft", "add", "rule", "inet", "site_rules", "input", "tcp", "dport", "5432", "counter")
        yield tmp
    finally:
        for proc in listeners:
            proc.kill()
            proc.wait(10)
        for name in made:
            sh("ip", "netns", "delete", name, check=False)


def inventory(tmp: Path, head_monitors: bool = False, registry: bool = False, spare: bool = False,
              **host_vars) -> Path:
    """head_monitors: head1 is also a monitoring host and the healer host (fleet_healer);
    registry: head1 is also the in-fleet registry's host (fleet_registry); spare: head1 is a spare
    of replica a (fleet_spare) and worker2 that replica's head."""
    hv = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
          "ansible_host": HOST_MGMT, "fleet_replica": "a", "firewall_ruleset_path": str(tmp / "firewall.nft"),
          "fw_tasks": "table.yml", **host_vars}
    head1 = "head1 " + " ".join(f"{k}={shlex.quote(json.dumps(v)) if not isinstance(v, str) else repr(v)}"
                                for k, v in hv.items())
    worker2 = "worker2 ansible_host=10.251.0.20 fleet_replica=a"
    text = f"""
[fleet_head]
{worker2 if spare else head1}
[fleet_workers]
{"" if spare else worker2}
[fleet_spare]
{head1 if spare else ""}
[fleet_serving:children]
fleet_head
fleet_workers
[fleet_loadbalancer]
lb ansible_host={NEIGHBOURS["lb"][1]}
[fleet_monitoring]
{"head1" if head_monitors else ""}
mon ansible_host={NEIGHBOURS["mon"][1]}
[fleet_healer]
{"head1" if head_monitors else ""}
[fleet_registry]
{"head1" if registry else ""}
[all:vars]
fleet_deployment=fwtest
fleet_api_port={PORTS["api"]}
"""
    path = tmp / "inventory.ini"
    path.write_text(text)
    return path


def converge(tmp: Path, *args, **host_vars):
    """The role's table.yml in the host's namespace; the fabric addresses as the fabric stage wrote them."""
    (tmp / "play.yml").write_text(PLAYBOOK)
    fabric = {"results": [{"item": h, "content": __import__("base64").b64encode(
        f"FLEET_RAY_NODE_IP={ip}\nVLLM_HOST_IP={ip}\n".encode()).decode()}
        for h, ip in (("head1", HOST_FAB), ("worker2", NEIGHBOURS["peer"][1]))]}
    extra = tmp / "extra.json"
    extra.write_text(json.dumps({"_firewall_fabric_env": fabric}))
    proc = in_ns(NS["host"], "env", f"PATH={Path(sys.executable).parent}:{os.environ['PATH']}",
                 f"ANSIBLE_CONFIG={REPO / 'ansible.cfg'}", "ANSIBLE_LOCALHOST_WARNING=0",
                 "ansible-playbook", "-i", str(inventory(tmp, **host_vars)), str(tmp / "play.yml"),
                 "-e", f"@{extra}", *args, check=False)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    recap = [ln for ln in proc.stdout.splitlines() if ln.startswith("head1 ") and "ok=" in ln]
    return proc.stdout, int(recap[-1].split("changed=")[1].split()[0])


def reachable(src: str, addr: str, port: int) -> bool:
    code = ("import socket, sys\ns = socket.socket(); s.settimeout(3)\n"
            "sys.exit(0 if s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0 else 1)")
    return in_ns(NS[src], sys.executable, "-c", code, addr, str(port), check=False).returncode == 0


def open_ports(src: str, addr: str) -> set[str]:
    return {name for name, port in PORTS.items() if reachable(src, addr, port)}


def test_only_the_hosts_that_need_a_port_reach_it(netns):
    assert open_ports("scan", HOST_MGMT) == set(PORTS), "before: every port answers the scanner"
    out, changed = converge(netns)
    assert changed == 1, out[-3000:]
    # the scanner on the management network: SSH and the site's own service, nothing of ours
    assert open_ports("scan", HOST_MGMT) == {"ssh", "site"}
    assert open_ports("lb", HOST_MGMT) == {"ssh", "site", "api", "exporter", "agent"}
    assert open_ports("mon", HOST_MGMT) == {"ssh", "site", "api", "exporter", "agent"}
    # a host of the head's replica: the API (health waits) and the exporter (its head's exporter
    # asks its members' exporters for their /verdict)
    assert open_ports("member", HOST_MGMT) == {"ssh", "site", "api", "exporter", "agent"}
    # the fabric: the replica's peer reaches Ray, the launch range and NCCL's random port; an
    # intruder on the same network reaches none of them
    for port in (PORTS["gcs"], PORTS["launch"], NCCL_PORT):
        assert reachable("peer", HOST_FAB, port), port
        assert not reachable("intruder", HOST_FAB, port), port
    assert reachable("intruder", HOST_FAB, PORTS["ssh"])
    listing = in_ns(NS["host"], "nft", "list", "ruleset").stdout
    assert "table inet site_rules" in listing and "tcp dport 5432 counter" in listing


def test_alertmanager_and_the_healer_webhook_take_only_the_monitoring_hosts(netns):
    """head1 also monitors and heals: Prometheus sends alerts to Alertmanager (9093) and
    Alertmanager posts them to the healer's webhook (5055), both from the monitoring hosts only."""
    out, _ = converge(netns, head_monitors=True)
    for name, port in MONITORING_PORTS.items():
        assert reachable("mon", HOST_MGMT, port), (name, out[-3000:])
        for src in ("scan", "lb", "member"):
            assert not reachable(src, HOST_MGMT, port), (src, name)
    converge(netns)  # back to the plain head for the other tests


def test_the_in_fleet_registry_takes_the_serving_hosts_and_the_build_host_only(netns):
    """head1 also runs the in-fleet registry: the serving hosts pull from it (worker2, the member),
    the build host pushes (mon here; the controller, by the address the registry host sees its SSH
    from, when the controller builds), nobody else reaches it."""
    out, _ = converge(netns, registry=True, image_build_host="mon")
    assert reachable("member", HOST_MGMT, REGISTRY_PORT) and reachable("mon", HOST_MGMT, REGISTRY_PORT), out[-3000:]
    for src in ("scan", "lb"):
        assert not reachable(src, HOST_MGMT, REGISTRY_PORT), src
    listing = in_ns(NS["host"], "nft", "list", "table", "inet", "vllm_fleet").stdout
    assert f"tcp dport {REGISTRY_PORT} ip saddr @registry_sources_v4 accept" in listing, listing
    controller = json.dumps({"_firewall_controller_address": {"stdout": NEIGHBOURS["lb"][1] + "\n"}})
    out, _ = converge(netns, "-e", controller, registry=True)
    assert reachable("lb", HOST_MGMT, REGISTRY_PORT), out[-3000:]
    assert not reachable("mon", HOST_MGMT, REGISTRY_PORT) and not reachable("scan", HOST_MGMT, REGISTRY_PORT)
    converge(netns)  # no registry: the port is not ours, the table names it no more
    assert reachable("scan", HOST_MGMT, REGISTRY_PORT)


def test_a_spare_keeps_only_its_exporter_to_monitoring_and_balancers(netns):
    """head1 as a spare of replica a: nothing of the cluster is ours to guard there (nothing of ours
    listens), so the table names only SSH and the exporter, which the monitoring host and the
    balancer reach; the scanner and the replica's hosts (a head asks only its members) do not."""
    out, _ = converge(netns, spare=True)
    for src in ("mon", "lb"):
        assert {"exporter", "agent"} <= open_ports(src, HOST_MGMT), (src, out[-3000:])
    for src in ("scan", "member"):
        assert not {"exporter", "agent"} & open_ports(src, HOST_MGMT), src
    listing = in_ns(NS["host"], "nft", "list", "table", "inet", "vllm_fleet").stdout
    assert "fabric_peers_v4 accept" not in listing and f"dport {PORTS['api']}" not in listing, listing
    converge(netns)  # back to the plain head for the other tests


def test_rerun_changes_nothing_and_check_diff_shows_a_new_source(netns):
    converge(netns)
    out, changed = converge(netns)
    assert changed == 0, out[-3000:]
    out, changed = converge(netns, "--check", "--diff", firewall_api_sources=[NEIGHBOURS["scan"][1]])
    assert changed == 1 and NEIGHBOURS["scan"][1] in out, out[-3000:]
    assert not reachable("scan", HOST_MGMT, PORTS["api"]), "--check must not change the live table"
    converge(netns, firewall_api_sources=[NEIGHBOURS["scan"][1]])
    assert reachable("scan", HOST_MGMT, PORTS["api"]) and not reachable("scan", HOST_MGMT, PORTS["gcs"])


def test_a_flushed_table_is_restored_and_the_off_switch_removes_only_ours(netns):
    converge(netns)
    in_ns(NS["host"], "nft", "delete", "table", "inet", "vllm_fleet")  # e.g. an operator's mistake
    assert reachable("scan", HOST_MGMT, PORTS["gcs"])
    _, changed = converge(netns)
    assert changed == 1 and not reachable("scan", HOST_MGMT, PORTS["gcs"])
    out, changed = converge(netns, firewall_enabled=False, fw_tasks="remove_table.yml")
    assert changed == 1, out[-3000:]
    assert open_ports("scan", HOST_MGMT) == set(PORTS)
    listing = in_ns(NS["host"], "nft", "list", "ruleset").stdout
    assert "vllm_fleet" not in listing and "table inet site_rules" in listing
    assert not (netns / "firewall.nft").exists()


def test_ports_the_firewall_names_by_default_are_the_ports_the_other_roles_use():
    """The firewall reads ray_cluster_* / vllm_serve_* from the inventory with fallbacks, and the
    launch range from launch.py's constants: they must agree with those roles and that module."""
    import re

    import yaml

    sys.path.insert(0, str(REPO / "images" / "vllm_fleet" / "src"))
    from vllm_fleet import launch

    fw = (REPO / "roles/firewall/vars/main.yml").read_text()
    defaults = {**yaml.safe_load((REPO / "roles/ray_cluster/defaults/main.yml").read_text()),
                **yaml.safe_load((REPO / "roles/vllm_serve/defaults/main.yml").read_text()),
                **yaml.safe_load((REPO / "roles/loadbalancer/defaults/main.yml").read_text()),
                **yaml.safe_load((REPO / "roles/model/defaults/main.yml").read_text())}
    fallbacks = dict(re.findall(r"((?:ray_cluster|vllm_serve|loadbalancer|model)_\w+_port) \| default\((\d+)\)", fw))
    assert set(fallbacks) == {"ray_cluster_dashboard_agent_grpc_port", "ray_cluster_runtime_env_agent_port",
                              "vllm_serve_master_port", "loadbalancer_tls_port", "loadbalancer_frontend_port",
                              "model_sync_ssh_port"}
    for name, value in fallbacks.items():
        assert defaults[name] == int(value), name
    assert f'firewall_launch_ports: "{launch.PORT_LO}-{launch.PORT_HI - 1}"' in fw


def test_host_addresses_leave_out_container_bridges_and_link_local():
    """The sources the firewall and the front door allow: a host's own interfaces, never the
    docker0 address every Docker host shares (172.17.0.1), never link-local IPv6."""
    sys.path.insert(0, str(REPO / "ansible" / "plugins" / "filter"))
    from fleet import fleet_host_addresses

    facts = {"interfaces": ["lo", "eth0", "docker0", "br-1a2b", "veth9", "fab0", "eth0.100"],
             "lo": {"ipv4": {"address": "127.0.0.1"}},
             "eth0": {"ipv4": {"address": "10.0.0.5"}, "ipv6": [{"address": "fe80::1"}, {"address": "2001:db8::5"}]},
             "docker0": {"ipv4": {"address": "172.17.0.1"}}, "br_1a2b": {"ipv4": {"address": "172.18.0.1"}},
             "fab0": {"ipv4": {"address": "10.1.0.5"}, "ipv4_secondaries": [{"address": "10.1.0.6"}]},
             "eth0_100": {"ipv4": {"address": "10.2.0.5"}}}
    hostvars = {"a": {"ansible_facts": facts, "ansible_host": "10.0.0.5"}, "b": {"ansible_host": "lb.example"},
                "c": {"ansible_host": "10.9.9.9"}}
    assert fleet_host_addresses(hostvars, ["a", "b", "c"]) == [
        "10.0.0.5", "2001:db8::5", "10.2.0.5", "10.1.0.5", "10.1.0.6", "10.9.9.9"]
    # The same interfaces listed in another order (the kernel's order changes when docker0 is
    # added): the same list, so a re-run rewrites nothing.
    shuffled = dict(hostvars, a=dict(hostvars["a"], ansible_facts=dict(facts, interfaces=facts["interfaces"][::-1])))
    assert fleet_host_addresses(shuffled, ["a", "b", "c"]) == fleet_host_addresses(hostvars, ["a", "b", "c"])
