"""The gpu_driver role's decision table (module fleet_gpu_facts) on fake PCI trees and a stub
nvidia-smi. Every row spells out the whole decision: a changed decision fails a test."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
sys.path.insert(0, str(FIXTURES))

from ansible_adhoc import run_module  # noqa: E402
from fake_sysfs import make_fake_pci  # noqa: E402

STUB_SMI = FIXTURES / "stub_nvidia-smi"
_spec = importlib.util.spec_from_file_location(
    "fleet_gpu_facts_under_test", REPO / "ansible" / "plugins" / "modules" / "fleet_gpu_facts.py")
gf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gf)

KERNEL = "6.8.0-45-generic"
UBUNTU_570 = {"nvidia-driver-570-server": "570.133.20-0ubuntu0.24.04.1",
              "nvidia-dkms-570-server": "570.133.20-0ubuntu0.24.04.1",
              "linux-headers-%s" % KERNEL: "6.8.0-45.45"}
UBUNTU_570_FM = dict(UBUNTU_570, **{"nvidia-fabricmanager-570": "570.133.20-1",
                                    "libnvidia-nscq-570": "570.133.20-1"})
UBUNTU_550 = {"nvidia-driver-550-server": "550.127.05-0ubuntu0.24.04.1",
              "nvidia-dkms-550-server": "550.127.05-0ubuntu0.24.04.1",
              "linux-headers-%s" % KERNEL: "6.8.0-45.45"}


def stub_smi(mode="ok", version="570.133.20", gpus=4):
    """Run the stub nvidia-smi exactly as the module does and classify its answer."""
    env = dict(os.environ, STUB_NVIDIA_SMI_MODE=mode, STUB_NVIDIA_SMI_VERSION=version,
               STUB_NVIDIA_SMI_GPUS=str(gpus))
    proc = subprocess.run([str(STUB_SMI), "--query-gpu=index,pci.bus_id,name,driver_version",
                           "--format=csv,noheader"], env=env, capture_output=True, text=True, timeout=30)
    return gf.classify_smi(proc.returncode, proc.stdout, proc.stderr)


def params(**kw):
    p = {"host": "gpu-a", "phase": "plan", "driver_changed": False, "gpu_less": False, "branch": "570",
         "version": "", "source": "distro", "flavor": "server", "distribution": "Ubuntu", "kernel": KERNEL,
         "reboot_allowed": False, "connection": "ssh", "sysfs_root": "/fake/sys"}
    p.update(kw)
    return p


def decide(tmp_path, layout, smi, installed, nvidia_module=None, **kw):
    root = make_fake_pci(tmp_path / "sys", layout, nvidia_module)
    p = params(sysfs_root=str(root), **kw)
    loaded = gf._read(os.path.join(str(root), "module", "nvidia", "version"))
    return gf.decide(p, gf.scan_pci(str(root)), smi, loaded, installed)


def pick(d, *keys):
    return {k: d[k] for k in keys}


KEYS = ("state", "action", "packages", "services", "fabric_manager", "reboot", "reboot_needed", "failed")


def test_pci_scan_finds_gpus_and_nvswitches(tmp_path):
    gpus, switches = gf.scan_pci(str(make_fake_pci(tmp_path, "fake_pci_hgx_8gpu_nvswitch")))
    assert (len(gpus), len(switches)) == (8, 4)
    assert gpus[0] == {"bus_id": "0000:18:00.0", "device": "0x2330"}
    assert gf.scan_pci(str(make_fake_pci(tmp_path / "a", "fake_pci_nvidia_audio_only"))) == ([], [])


def test_stub_nvidia_smi_states():
    assert stub_smi("ok")[:2] == ("ok", "570.133.20")
    assert stub_smi("mismatch")[0] == "mismatch"
    assert stub_smi("no_driver")[0] == "not_loaded"
    assert gf.classify_smi(None, "", "")[0] == "absent"


# --- the decision table -------------------------------------------------------------------------

def test_fresh_pcie_host_installs_branch_without_fabric_manager(tmp_path):
    d = decide(tmp_path, "fake_pci_4gpu_pcie", gf.classify_smi(None, "", ""), {})
    assert pick(d, *KEYS) == {
        "state": "ok", "action": "install",
        "packages": ["nvidia-driver-570-server", "nvidia-dkms-570-server", "linux-headers-%s" % KERNEL],
        "services": ["nvidia-persistenced"], "fabric_manager": False, "reboot": False, "reboot_needed": False,
        "failed": False}
    assert d["gpu_count"] == 4 and d["reason"].startswith("missing: nvidia-driver-570-server")


def test_nvswitch_host_adds_fabric_manager_of_same_pinned_version(tmp_path):
    d = decide(tmp_path, "fake_pci_hgx_8gpu_nvswitch", gf.classify_smi(None, "", ""), {},
               version="570.133.20")
    assert pick(d, *KEYS) == {
        "state": "ok", "action": "install",
        "packages": ["nvidia-driver-570-server=570.133.20*", "nvidia-dkms-570-server", "linux-headers-%s" % KERNEL,
                     "nvidia-fabricmanager-570=570.133.20*", "libnvidia-nscq-570=570.133.20*"],
        "services": ["nvidia-persistenced", "nvidia-fabricmanager"], "fabric_manager": True,
        "reboot": False, "reboot_needed": False, "failed": False}
    assert d["nvswitches"] == 4


def test_cuda_repository_packages(tmp_path):
    d = decide(tmp_path, "fake_pci_hgx_8gpu_nvswitch", gf.classify_smi(None, "", ""), {}, source="cuda",
               distribution="Debian", kernel="6.1.0-26-amd64")
    assert d["packages"] == ["cuda-drivers-570", "dkms", "linux-headers-6.1.0-26-amd64",
                             "nvidia-fabricmanager-570", "libnvidia-nscq-570"]


def test_debian_distro_packages_without_nvswitch(tmp_path):
    d = decide(tmp_path, "fake_pci_1gpu_vga", gf.classify_smi(None, "", ""), {}, distribution="Debian",
               branch="535", kernel="6.1.0-26-amd64")
    assert d["packages"] == ["nvidia-driver", "nvidia-kernel-dkms", "nvidia-persistenced",
                             "linux-headers-6.1.0-26-amd64"]


def test_debian_distro_with_nvswitch_fails_asking_for_cuda_source(tmp_path):
    d = decide(tmp_path, "fake_pci_hgx_8gpu_nvswitch", gf.classify_smi(None, "", ""), {}, distribution="Debian")
    assert d["failed"] and d["state"] == "unsupported"
    assert d["msg"].startswith("host gpu-a: NVSwitches are present") and "gpu_driver_source=cuda" in d["msg"]


def test_installed_and_loaded_is_a_noop(tmp_path):
    d = decide(tmp_path, "fake_pci_4gpu_pcie", stub_smi("ok"), UBUNTU_570, nvidia_module="570.133.20")
    assert pick(d, *KEYS) == {"state": "ok", "action": "noop", "packages": [], "services": ["nvidia-persistenced"],
                              "fabric_manager": False, "reboot": False, "reboot_needed": False, "failed": False}
    assert d["reason"] == "driver 570.133.20 loaded on 4 GPU(s)"


def test_nvswitch_host_installed_is_a_noop_with_fabric_manager_service(tmp_path):
    d = decide(tmp_path, "fake_pci_hgx_8gpu_nvswitch", stub_smi("ok", gpus=8), UBUNTU_570_FM)
    assert (d["action"], d["services"], d["failed"]) == ("noop", ["nvidia-persistenced", "nvidia-fabricmanager"],
                                                         False)


def test_other_branch_installed_is_an_upgrade(tmp_path):
    d = decide(tmp_path, "fake_pci_4gpu_pcie", stub_smi("ok", version="550.127.05"), UBUNTU_550)
    assert (d["action"], d["failed"], d["reboot"]) == ("install", False, False)
    assert d["packages"][0] == "nvidia-driver-570-server"


def test_pinned_version_differs_from_installed_is_an_install(tmp_path):
    d = decide(tmp_path, "fake_pci_4gpu_pcie", stub_smi("ok"), UBUNTU_570, version="570.172.08")
    assert d["action"] == "install" and d["packages"][0] == "nvidia-driver-570-server=570.172.08*"
    assert "not on 570.172.08" in d["reason"]


def test_mismatch_without_a_driver_change_fails_with_remedy(tmp_path):
    d = decide(tmp_path, "fake_pci_4gpu_pcie", stub_smi("mismatch"), UBUNTU_570, nvidia_module="570.124.06",
               reboot_allowed=True)
    assert (d["state"], d["failed"], d["reboot"]) == ("mismatch", True, False)
    assert d["msg"].startswith("host gpu-a: NVIDIA driver/library version mismatch")
    assert "570.124.06" in d["msg"] and "reboot the host" in d["msg"]


def test_after_install_mismatch_reboots_when_allowed(tmp_path):
    d = decide(tmp_path, "fake_pci_4gpu_pcie", stub_smi("mismatch"), UBUNTU_570, nvidia_module="550.127.05",
               phase="verify", driver_changed=True, reboot_allowed=True)
    assert pick(d, "state", "reboot", "reboot_needed", "failed") == {
        "state": "reboot", "reboot": True, "reboot_needed": True, "failed": False}


def test_after_install_mismatch_without_permission_fails_naming_the_variable(tmp_path):
    d = decide(tmp_path, "fake_pci_4gpu_pcie", stub_smi("mismatch"), UBUNTU_570, nvidia_module="550.127.05",
               phase="verify", driver_changed=True, reboot_allowed=False)
    assert (d["state"], d["reboot"], d["failed"]) == ("reboot_required", False, True)
    assert "gpu_driver_reboot_allowed is false" in d["msg"]


def test_controller_is_never_rebooted(tmp_path):
    d = decide(tmp_path, "fake_pci_4gpu_pcie", stub_smi("mismatch"), UBUNTU_570, phase="verify",
               driver_changed=True, reboot_allowed=True, connection="local")
    assert (d["reboot"], d["failed"]) == (False, True)
    assert "ansible_connection=local" in d["msg"]


def test_fresh_install_that_loads_needs_no_reboot(tmp_path):
    d = decide(tmp_path, "fake_pci_4gpu_pcie", stub_smi("ok"), UBUNTU_570, phase="verify", driver_changed=True,
               reboot_allowed=True)
    assert (d["state"], d["reboot"], d["reboot_needed"], d["failed"]) == ("ok", False, False, False)


def test_installed_but_not_loaded_fails_with_dkms_hint(tmp_path):
    d = decide(tmp_path, "fake_pci_4gpu_pcie", stub_smi("no_driver"), UBUNTU_570)
    assert (d["state"], d["failed"]) == ("not_loaded", True)
    assert "dkms status" in d["msg"] and KERNEL in d["msg"]


def test_fabric_manager_version_must_match_driver(tmp_path):
    installed = dict(UBUNTU_570_FM, **{"nvidia-fabricmanager-570": "570.124.06-1"})
    d = decide(tmp_path, "fake_pci_hgx_8gpu_nvswitch", stub_smi("ok", gpus=8), installed)
    assert (d["state"], d["failed"]) == ("fabric_manager_mismatch", True)


def test_no_gpu_fails_unless_gpu_less(tmp_path):
    d = decide(tmp_path, "fake_pci_no_gpu", gf.classify_smi(None, "", ""), {})
    assert (d["state"], d["failed"]) == ("no_gpu", True)
    assert d["msg"].startswith("host gpu-a: no NVIDIA GPU on the PCI bus") and "fleet_gpu_less=true" in d["msg"]
    skip = decide(tmp_path / "b", "fake_pci_no_gpu", gf.classify_smi(None, "", ""), {}, gpu_less=True)
    assert pick(skip, "state", "action", "packages", "failed") == {
        "state": "gpu_less", "action": "skip", "packages": [], "failed": False}


@pytest.mark.parametrize("kw,fragment", [
    ({"branch": "latest"}, "gpu_driver_branch='latest'"),
    ({"version": "550.127.05"}, "gpu_driver_version=550.127.05 is not on gpu_driver_branch=570"),
])
def test_bad_branch_or_version_fails_naming_the_variable(tmp_path, kw, fragment):
    d = decide(tmp_path, "fake_pci_4gpu_pcie", gf.classify_smi(None, "", ""), {}, **kw)
    assert d["failed"] and fragment in d["msg"] and d["msg"].startswith("host gpu-a:")


# --- the module through ansible's real invocation --------------------------------------------------

def test_fleet_gpu_facts_module_smoke(tmp_path):
    root = make_fake_pci(tmp_path / "sys", "fake_pci_hgx_8gpu_nvswitch", nvidia_module="570.133.20")
    args = {"host": "gpu-a", "branch": "570", "distribution": "Ubuntu", "kernel": KERNEL,
            "installed": UBUNTU_570_FM, "sysfs_root": str(root), "nvidia_smi": str(STUB_SMI)}
    ok = run_module("fleet_gpu_facts", args, env={"STUB_NVIDIA_SMI_MODE": "ok", "STUB_NVIDIA_SMI_GPUS": "8"})
    assert not ok.get("failed"), ok
    assert (ok["decision"]["action"], ok["decision"]["fabric_manager"], ok["decision"]["gpu_count"]) == (
        "noop", True, 8)
    bad = run_module("fleet_gpu_facts", args, env={"STUB_NVIDIA_SMI_MODE": "mismatch"})
    assert bad["failed"] and "version mismatch" in bad["msg"] and bad["decision"]["state"] == "mismatch"
