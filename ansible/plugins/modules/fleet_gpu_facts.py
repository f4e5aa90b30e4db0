#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Decide what the gpu_driver role does on one host (vllm-fleet)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: fleet_gpu_facts
short_description: Decide the NVIDIA driver actions of one host
description:
  - Reads NVIDIA GPUs and NVSwitches from the PCI tree (C(<sysfs_root>/bus/pci/devices)), the
    loaded kernel module version (C(<sysfs_root>/module/nvidia/version)), C(nvidia-smi) and the
    installed packages, and returns one decision dict the role's tasks act on - branch,
    packages, install or no-op, Fabric Manager or not, reboot or not, and the reason.
  - Never changes the host. Fails (with the host and the variable named) on states that cannot
    work - no GPU on a host not marked GPU-less, the driver/library version mismatch, a needed
    reboot that is not allowed.
options:
  host:
    description: Inventory name (messages).
    type: str
    required: true
  phase:
    description: C(plan) before installing, C(verify) after.
    type: str
    default: plan
    choices: [plan, verify]
  driver_changed:
    description: The driver packages changed in this run (verify phase).
    type: bool
    default: false
  gpu_less:
    description: C(fleet_gpu_less).
    type: bool
    default: false
  branch:
    description: C(gpu_driver_branch), e.g. C(570).
    type: str
    required: true
  version:
    description: C(gpu_driver_version), exact version pin (empty - newest of the branch).
    type: str
    default: ''
  source:
    description: C(gpu_driver_source).
    type: str
    default: distro
    choices: [distro, cuda]
  flavor:
    description: C(gpu_driver_flavor) - Ubuntu's C(-server) (datacenter) packages or the desktop ones.
    type: str
    default: server
    choices: [server, desktop]
  distribution:
    description: C(ansible_facts.distribution) (Debian, Ubuntu).
    type: str
    required: true
  kernel:
    description: Running kernel release (headers package).
    type: str
    required: true
  reboot_allowed:
    description: C(gpu_driver_reboot_allowed).
    type: bool
    default: false
  connection:
    description: C(ansible_connection); never reboot a C(local) host (the controller).
    type: str
    default: ssh
  installed:
    description: Installed packages (name to version); omitted - asked from dpkg-query.
    type: dict
  sysfs_root:
    description: sysfs root (tests point it at a fake PCI tree).
    type: path
    default: /sys
  nvidia_smi:
    description: C(nvidia-smi) command (tests point it at a stub).
    type: str
    default: nvidia-smi
author: vllm-fleet
"""

EXAMPLES = r"""
- name: Plan the driver
  fleet_gpu_facts:
    host: "{{ inventory_hostname }}"
    branch: "570"
    distribution: "{{ ansible_facts['distribution'] }}"
    kernel: "{{ ansible_facts['kernel'] }}"
  register: plan
"""

RETURN = r"""
decision:
  description: state, action (install/noop/skip), packages, services, fabric_manager, reboot,
    reboot_needed, gpus, nvswitches, driver versions, reason.
  returned: always
  type: dict
"""

import os

from ansible.module_utils.basic import AnsibleModule

NVIDIA_VENDOR = "0x10de"
GPU_CLASSES = ("0x0300", "0x0302")  # VGA / 3D controller
NVSWITCH_CLASS = "0x0680"  # "Bridge: other" - NVSwitch on HGX/DGX baseboards
MISMATCH_TEXT = "driver/library version mismatch"


def _read(path):
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return None


def scan_pci(sysfs_root):
    """NVIDIA GPUs and NVSwitches on the PCI bus: ([{bus_id, device}], [{bus_id, device}])."""
    base = os.path.join(sysfs_root, "bus", "pci", "devices")
    gpus, switches = [], []
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return gpus, switches
    for name in names:
        vendor = (_read(os.path.join(base, name, "vendor")) or "").lower()
        if vendor != NVIDIA_VENDOR:
            continue
        klass = (_read(os.path.join(base, name, "class")) or "").lower()
        entry = {"bus_id": name, "device": (_read(os.path.join(base, name, "device")) or "").lower()}
        if klass.startswith(GPU_CLASSES):
            gpus.append(entry)
        elif klass.startswith(NVSWITCH_CLASS):
            switches.append(entry)
    return gpus, switches


def classify_smi(rc, out, err):
    """(state, driver_version, detail) from an nvidia-smi --query-gpu run (rc None: absent)."""
    text = "%s\n%s" % (out or "", err or "")
    if rc is None:
        return "absent", None, "nvidia-smi not installed"
    if MISMATCH_TEXT in text.lower():
        return "mismatch", None, text.strip()
    if rc == 0:
        versions = sorted({line.split(",")[-1].strip() for line in (out or "").splitlines()
                           if line.strip()})
        if len(versions) == 1:
            return "ok", versions[0], "%s GPU(s) answer" % len((out or "").strip().splitlines())
        return "error", None, "nvidia-smi reported driver versions %s" % versions
    return "not_loaded", None, text.strip() or "nvidia-smi exit %s" % rc


def package_plan(source, distribution, branch, version, kernel, fabric_manager, flavor="server"):
    """(driver_packages, fabric_manager_packages, key_package, fm_key_package, error)."""
    dist = (distribution or "").lower()
    headers = "linux-headers-%s" % kernel
    fm = ["nvidia-fabricmanager-%s" % branch, "libnvidia-nscq-%s" % branch]
    if source == "cuda":
        key = "cuda-drivers-%s" % branch
        driver = [key, "dkms", headers]
    elif dist == "ubuntu":
        suffix = "-server" if flavor == "server" else ""
        key = "nvidia-driver-%s%s" % (branch, suffix)
        driver = [key, "nvidia-dkms-%s%s" % (branch, suffix), headers]
    elif dist == "debian":
        key = "nvidia-driver"
        driver = [key, "nvidia-kernel-dkms", "nvidia-persistenced", headers]
        if fabric_manager:
            return driver, [], key, None, (
                "NVSwitches are present but Debian's repository has no Fabric Manager; set "
                "gpu_driver_source=cuda")
    else:
        return [], [], None, None, ("distribution %r is not supported by gpu_driver_source=%s "
                                    "(Debian, Ubuntu)" % (distribution, source))
    return driver, (fm if fabric_manager else []), key, (fm[0] if fabric_manager else None), None


def _pinned(name, version, pin_names):
    return "%s=%s*" % (name, version) if version and name in pin_names else name


def decide(p, pci, smi, loaded_version, installed):
    """The whole decision table. p: module params; pci: (gpus, switches); smi: (state, version,
    detail); installed: {package: version}. Returns the decision dict ('failed' + 'msg' when it
    cannot work)."""
    host = p["host"]
    gpus, switches = pci
    smi_state, smi_version, smi_detail = smi
    d = {"host": host, "branch": p["branch"], "version": p["version"] or None, "source": p["source"],
         "gpus": gpus, "gpu_count": len(gpus), "nvswitches": len(switches),
         "fabric_manager": bool(switches), "packages": [], "services": [], "action": "noop",
         "state": "ok", "reboot": False, "reboot_needed": False, "loaded_version": loaded_version,
         "smi_state": smi_state, "smi_version": smi_version, "installed_version": None,
         "failed": False, "msg": "", "reason": ""}

    def fail(state, msg):
        d.update(state=state, failed=True, msg="host %s: %s" % (host, msg), reason=msg)
        return d

    if p["gpu_less"]:
        d.update(action="skip", state="gpu_less", fabric_manager=False,
                 reason="fleet_gpu_less=true: no driver")
        return d
    if not gpus:
        return fail("no_gpu", "no NVIDIA GPU on the PCI bus (%s/bus/pci/devices); set "
                              "fleet_gpu_less=true for hosts without GPUs" % p["sysfs_root"])
    if not str(p["branch"]).isdigit():
        return fail("bad_input", "gpu_driver_branch=%r must be a driver branch number such as "
                                 "570" % p["branch"])
    if p["version"] and not p["version"].startswith(str(p["branch"]) + "."):
        return fail("bad_input", "gpu_driver_version=%s is not on gpu_driver_branch=%s"
                                 % (p["version"], p["branch"]))
    driver, fm, key, fm_key, error = package_plan(p["source"], p["distribution"], p["branch"],
                                                  p["version"], p["kernel"], bool(switches),
                                                  p.get("flavor", "server"))
    if error:
        return fail("unsupported", error)
    d["services"] = ["nvidia-persistenced"] + (["nvidia-fabricmanager"] if switches else [])
    key_version = installed.get(key)
    d["installed_version"] = key_version
    want_prefix = (p["version"] or str(p["branch"])) + ("" if p["version"] else ".")
    # Debian's nvidia-driver carries an epoch-less "535.216.01-1"; Ubuntu's "570.133.20-0ubuntu..".
    missing = [n for n in driver + fm if n not in installed]
    wrong = []
    if key_version and not key_version.split(":")[-1].startswith(want_prefix):
        wrong.append(key)
    if fm_key and installed.get(fm_key) and not installed[fm_key].split(":")[-1].startswith(want_prefix):
        wrong.append(fm_key)
    pins = {key, fm_key} | set(fm) if p["version"] else set()
    if missing or wrong:
        d["action"] = "install"
        d["packages"] = [_pinned(n, p["version"], pins) for n in driver + fm]
        d["reason"] = "; ".join(
            (["missing: %s" % ", ".join(missing)] if missing else [])
            + (["not on %s: %s" % (want_prefix.rstrip("."), ", ".join(
                "%s %s" % (n, installed.get(n)) for n in wrong))] if wrong else []))
        if p["phase"] == "plan":
            # Whatever is loaded now, the install decides; verify runs after it.
            return d
        return fail("install_incomplete", "packages still missing or on the wrong version after "
                                          "the install: %s" % d["reason"])

    # Packages are right. Is the right driver loaded and answering?
    loaded = smi_version or loaded_version
    reboot_needed = (smi_state in ("mismatch", "not_loaded")
                     or (loaded and key_version and not key_version.split(":")[-1].startswith(loaded)))
    if smi_state == "error":
        return fail("error", "nvidia-smi: %s" % smi_detail)
    if smi_state == "absent":
        return fail("error", "nvidia-smi is missing although %s %s is installed" % (key, key_version))
    if reboot_needed:
        d["reboot_needed"] = True
        can_reboot = (p["reboot_allowed"] and p["connection"] != "local")
        if p["driver_changed"] and can_reboot:
            d.update(state="reboot", reboot=True,
                     reason="driver changed to %s; loaded: %s (%s): rebooting"
                            % (key_version, loaded or "none", smi_state))
            return d
        if p["driver_changed"]:
            why = ("the controller itself (ansible_connection=local) is never rebooted"
                   if p["connection"] == "local" else "gpu_driver_reboot_allowed is false")
            return fail("reboot_required",
                        "driver changed to %s but the loaded driver is %s (%s) and %s; reboot the "
                        "host, or set gpu_driver_reboot_allowed=true and rerun"
                        % (key_version, loaded or "none", smi_state, why))
        if smi_state == "mismatch":
            return fail("mismatch",
                        "NVIDIA driver/library version mismatch: the loaded kernel module (%s) is not "
                        "the installed driver %s. Remedy: stop GPU workloads and reboot the host (or "
                        "unload nvidia_uvm nvidia_drm nvidia_modeset nvidia and run nvidia-smi); the "
                        "driver was not changed in this run so it is not rebooted automatically"
                        % (loaded_version or "unknown", key_version))
        return fail("not_loaded",
                    "driver %s is installed but not loaded (%s). Remedy: check `dkms status` for a "
                    "build for kernel %s, then reboot the host"
                    % (key_version, smi_detail.splitlines()[0] if smi_detail else smi_state, p["kernel"]))
    if fm_key and not installed[fm_key].split(":")[-1].startswith(loaded):
        return fail("fabric_manager_mismatch",
                    "Fabric Manager %s %s does not match the driver %s; pin gpu_driver_version "
                    "so both install the same version" % (fm_key, installed[fm_key], loaded))
    d["reason"] = "driver %s loaded on %s GPU(s)%s" % (
        loaded, len(gpus), ", Fabric Manager for %s NVSwitch(es)" % len(switches) if switches else "")
    return d


def dpkg_installed(module, names):
    dpkg = module.get_bin_path("dpkg-query")
    if not dpkg or not names:
        return {}
    rc, out, _ = module.run_command([dpkg, "-W", "-f", "${Package} ${Version} ${db:Status-Abbrev}\n"]
                                    + list(names))
    installed = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2].startswith("ii"):
            installed[fields[0]] = fields[1]
    return installed


def main():
    module = AnsibleModule(
        argument_spec=dict(
            host=dict(type="str", required=True),
            phase=dict(type="str", default="plan", choices=["plan", "verify"]),
            driver_changed=dict(type="bool", default=False),
            gpu_less=dict(type="bool", default=False),
            branch=dict(type="str", required=True),
            version=dict(type="str", default=""),
            source=dict(type="str", default="distro", choices=["distro", "cuda"]),
            flavor=dict(type="str", default="server", choices=["server", "desktop"]),
            distribution=dict(type="str", required=True),
            kernel=dict(type="str", required=True),
            reboot_allowed=dict(type="bool", default=False),
            connection=dict(type="str", default="ssh"),
            installed=dict(type="dict"),
            sysfs_root=dict(type="path", default="/sys"),
            nvidia_smi=dict(type="str", default="nvidia-smi"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    pci = scan_pci(p["sysfs_root"])
    loaded_version = _read(os.path.join(p["sysfs_root"], "module", "nvidia", "version"))
    smi_path = module.get_bin_path(p["nvidia_smi"]) if not os.path.isabs(p["nvidia_smi"]) else (
        p["nvidia_smi"] if os.access(p["nvidia_smi"], os.X_OK) else None)
    if p["gpu_less"] or not pci[0] or not smi_path:
        smi = classify_smi(None, "", "") if not smi_path else ("absent", None, "not run")
    else:
        rc, out, err = module.run_command(
            [smi_path, "--query-gpu=index,pci.bus_id,name,driver_version", "--format=csv,noheader"],
            environ_update={"LC_ALL": "C"})
        smi = classify_smi(rc, out, err)
    installed = p["installed"]
    if installed is None:
        names = set()
        for source_pkgs in package_plan(p["source"], p["distribution"], p["branch"], p["version"],
                                        p["kernel"], True, p["flavor"])[:2]:
            names.update(source_pkgs)
        installed = dpkg_installed(module, sorted(names))
    installed = {k: str(v) for k, v in installed.items()}
    decision = decide(p, pci, smi, loaded_version, installed)
    if decision["failed"]:
        module.fail_json(msg=decision["msg"], decision=decision)
    module.exit_json(changed=False, decision=decision)


if __name__ == "__main__":
    main()
