"""The gpu_driver role's task wiring on localhost with a fake PCI tree and the stub nvidia-smi:
the GPU-less skip is one line, and a host without GPUs fails naming itself and the variable."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
sys.path.insert(0, str(FIXTURES))

from fake_sysfs import make_fake_pci  # noqa: E402


def run_role(tmp_path, *extra):
    root = make_fake_pci(tmp_path / "sys", "fake_pci_no_gpu")
    stub_bin = tmp_path / "bin"
    stub_bin.mkdir()
    (stub_bin / "nvidia-smi").symlink_to(FIXTURES / "stub_nvidia-smi")
    cmd = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,",
           str(FIXTURES / "play_gpu_driver.yml"), "-e", "ansible_python_interpreter=%s" % sys.executable,
           "-e", "test_fake_sysfs_root=%s" % root, "-e", "test_stub_bin=%s" % stub_bin, *extra]
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_LOCALHOST_WARNING="0",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="0", ANSIBLE_NOCOLOR="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def test_gpu_less_host_is_skipped_with_one_line(tmp_path):
    proc = run_role(tmp_path, "-e", '{"fleet_gpu_less": true}')
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.count("fleet_gpu_less=true: no NVIDIA driver") == 1
    assert "fleet_gpu_facts" not in proc.stdout and "changed=0" in proc.stdout


def test_host_without_gpu_fails_naming_host_and_variable(tmp_path):
    proc = run_role(tmp_path, "-e", '{"fleet_gpu_less": false}')
    assert proc.returncode != 0
    assert "host localhost: no NVIDIA GPU on the PCI bus" in proc.stdout
    assert "set fleet_gpu_less=true" in proc.stdout
    # the fixture play's fake tree reached the module (module_defaults), not this machine's /sys
    assert f"({tmp_path / 'sys'}/bus/pci/devices)" in proc.stdout.replace("\n", "")
