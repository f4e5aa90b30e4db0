"""The loadbalancer role's HAProxy configuration, rendered by ansible-playbook from the real role and
checked by the real `haproxy -c`; and the inventory validation of loadbalancer_* settings."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="haproxy is not installed (tests/requirements-apt.txt lists it)")

RENDER_PLAYBOOK = """
- name: Render the balancer configuration with the real role
  hosts: fleet_loadbalancer
  gather_facts: false
  tasks:
    - name: Write the HAProxy configuration
      ansible.builtin.include_role:
        name: loadbalancer
        tasks_from: config.yml
"""


def write_inventory(tmp: Path, heads: dict[str, tuple[str, int]], extra_hosts: str = "",
                    head_vars: dict[str, str] | None = None, **overrides) -> Path:
    """heads: replica -> (address, api port); head_vars: replica -> extra host vars of its head.
    Every host runs locally; the balancer writes under tmp. The balancer's settings go on its host
    line (INI [group:vars] values stay strings: a "False" there would be true)."""
    lb_vars = {
        "loadbalancer_config_path": tmp / "haproxy.cfg", "loadbalancer_admin_socket": tmp / "admin.sock",
        "loadbalancer_state_file": tmp / "server-state", "loadbalancer_chroot_dir": "",
        "loadbalancer_run_user": "", "loadbalancer_log_target": "", "loadbalancer_service_managed": "False",
        "loadbalancer_secrets_dir": tmp / "lb-secrets",
    }
    lb_vars.update(overrides)
    head_lines = "\n".join(f"head-{r} ansible_host={addr} fleet_replica={r} fleet_api_port={port} "
                           + (head_vars or {}).get(r, "") for r, (addr, port) in heads.items())
    text = f"""
[fleet_head]
{head_lines}

[fleet_workers]
{extra_hosts}

[fleet_serving:children]
fleet_head
fleet_workers

[fleet_loadbalancer]
lb {" ".join(f"{k}={shlex.quote(str(v))}" for k, v in lb_vars.items())}

[all:vars]
ansible_connection=local
ansible_python_interpreter={sys.executable}
ansible_become=False
fleet_deployment=lbtest
fleet_engine=cpu
fleet_model_path=/var/lib/vllm-fleet/models/tiny-llama
fleet_served_model_name=tiny-llama
"""
    path = tmp / "inventory.ini"
    path.write_text(text)
    return path


def render_config(tmp: Path, heads: dict[str, tuple[str, int]], head_vars: dict[str, str] | None = None,
                  **overrides) -> str:
    inventory = write_inventory(tmp, heads, head_vars=head_vars, **overrides)
    playbook = tmp / "render.yml"
    playbook.write_text(RENDER_PLAYBOOK)
    proc = subprocess.run(["ansible-playbook", "-i", str(inventory), str(playbook)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return (tmp / "haproxy.cfg").read_text()


def section(config: str, header: str) -> str:
    match = re.search(rf"^{re.escape(header)}\n((?:[ \t].*\n|\n)*)", config, re.M)
    assert match, f"no section {header!r} in:\n{config}"
    return match.group(1)


def test_config_has_one_server_per_replica_head_and_passes_haproxy_check(tmp_path):
    config = render_config(tmp_path, {"r1": ("10.0.0.11", 8009), "r2": ("10.0.0.21", 8010)},
                           extra_hosts="worker-r1 fleet_replica=r1 fleet_api_port=8009\n"
                                       "worker-r2 fleet_replica=r2 fleet_api_port=8010")
    check = subprocess.run(["haproxy", "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    backend = section(config, "backend vllm")
    servers = re.findall(r"^\s+server (\S+) (\S+) agent-check agent-port 9446 agent-inter 1s$", backend, re.M)
    assert servers == [("r1", "10.0.0.11:8009"), ("r2", "10.0.0.21:8010")], "workers are never servers"
    backups = re.findall(r"^\s+server (\S+) (\S+) backup$", backend, re.M)
    assert backups == [("r1-fallback", "10.0.0.11:8009"), ("r2-fallback", "10.0.0.21:8010")]
    assert re.search(r"^\s+option allbackups$", backend, re.M), "all replicas judged hung: all still serve"
    assert "on-marked-down shutdown-sessions" in backend, "requests on a hung replica end when it goes down"
    assert "option httpchk GET /health" in backend
    assert re.search(r"http-check expect status 200", backend)
    assert "balance leastconn" in backend
    defaults = section(config, "defaults")
    assert re.search(r"timeout server 15m", defaults), "long server timeout for streamed / long completions"
    assert re.search(r"timeout client 15m", defaults)
    assert re.search(r"^\s+retries 3$", defaults, re.M)
    assert re.search(r"option redispatch 1$", defaults, re.M), "every retry may go to another replica"
    assert "retry-on conn-failure empty-response 500 503" in defaults
    assert re.search(r"^\s+option http-buffer-request$", defaults, re.M), "only a buffered request can be replayed"
    assert "load-server-state-from-file global" in defaults
    glob = section(config, "global")
    assert f"stats socket {tmp_path / 'admin.sock'} mode 660 level admin" in glob
    assert f"server-state-file {tmp_path / 'server-state'}" in glob
    front = section(config, "frontend vllm_api")
    assert re.search(rf"bind :8443 ssl crt {tmp_path}/lb-secrets/tls.pem alpn http/1.1$", front, re.M)
    assert re.search(r"bind :8080$", front, re.M) and "redirect scheme https code 308 unless { ssl_fc }" in front
    assert "http-request deny deny_status 403 unless fleet_api or fleet_health" in front
    assert "http_auth_bearer" not in front, "fleet_engine=cpu: API auth auto is off"
    assert re.search(r"bind 127\.0\.0\.1:8404$", section(config, "listen stats"), re.M)
    # the lab CA signed this balancer's certificate; the PEM HAProxy loads is root-only
    ca = tmp_path / "fleet-secrets" / "lbtest" / "lab-ca"
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(ca / "ca.crt"), str(ca / "lb.crt")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert (tmp_path / "lb-secrets" / "tls.pem").stat().st_mode & 0o077 == 0


def test_server_address_override_ipv6_and_custom_settings(tmp_path):
    inventory_heads = {"blue": ("fd00::5", 8000), "green": ("gpu-7.example", 8000)}
    config = render_config(tmp_path, inventory_heads, loadbalancer_frontend_port=9000,
                           loadbalancer_timeout_server="1h", loadbalancer_server_maxconn=64,
                           loadbalancer_backend_name="llm")
    backend = section(config, "backend llm")
    assert "server blue [fd00::5]:8000" in backend
    assert "server green gpu-7.example:8000" in backend
    assert "maxconn 64" in backend and "init-addr last,libc,none" in backend
    assert "timeout server 1h" in section(config, "defaults")
    assert "default_backend llm" in section(config, "frontend vllm_api")
    check = subprocess.run(["haproxy", "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def validate(tmp_path: Path, inventory: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["ansible-playbook", "-i", str(inventory), str(REPO / "ansible/playbooks/00_validate.yml"),
                           "--tags", "validate"], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_validation_knows_loadbalancer_settings_and_rejects_a_misspelling(tmp_path):
    good = write_inventory(tmp_path, {"r1": ("10.0.0.11", 8009), "r2": ("10.0.0.21", 8009)})
    proc = validate(tmp_path, good)
    assert proc.returncode == 0, proc.stdout[-4000:]
    bad = write_inventory(tmp_path, {"r1": ("10.0.0.11", 8009), "r2": ("10.0.0.21", 8009)},
                          loadbalancer_frontend_prot=8080)
    proc = validate(tmp_path, bad)
    assert proc.returncode != 0
    assert "loadbalancer_frontend_prot" in proc.stdout and "did you mean loadbalancer_frontend_port" in proc.stdout


def test_frontend_port_clashing_with_the_api_port_is_rejected(tmp_path):
    inventory = write_inventory(tmp_path, {"r1": ("10.0.0.11", 8080)}, extra_hosts="")
    text = inventory.read_text().replace("[fleet_loadbalancer]\nlb", "[fleet_loadbalancer]\nhead-r1")
    inventory.write_text(text)
    proc = validate(tmp_path, inventory)
    assert proc.returncode != 0
    assert re.search(r"head-r1: loadbalancer_frontend_port=8080: clashes with fleet_api_port=8080|"
                     r"head-r1: fleet_api_port=8080: clashes with loadbalancer_frontend_port=8080", proc.stdout), \
        proc.stdout[-3000:]
