#!/usr/bin/env python3
"""Time a cold deploy and a re-run of deploy.yml; print both and the ratio (goal: re-run <= 25%).

    .venv/bin/python benchmarks/deploy_time.py [-i .lab/inventory.ini] [--cold] [--json OUT]
                                               [--log-dir DIR]

--cold first removes what the image/model/ray/serve stages made on the serving nodes (serving
and Ray containers, the serving image, the model directory) and the controller's docker-save
archive, so the timed run rebuilds from hosts that only have Docker (provision + fabric stay; the
lab itself is never brought down). Without --cold the first run is whatever state the hosts are in.
The build host's layer cache is kept (a from-scratch image build adds ~6 min on the lab machine).
"""
import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def run_deploy(inv, log=None):
    t = time.monotonic()
    p = subprocess.run([str(REPO / ".venv/bin/ansible-playbook"), "-i", inv, "deploy.yml"],
                       cwd=REPO, text=True, capture_output=True, timeout=7200)
    secs = time.monotonic() - t
    if log:
        Path(log).write_text(p.stdout + p.stderr)
    recap = {m[0]: {"changed": int(m[2]), "failed": int(m[4])} for m in RECAP.findall(p.stdout)}
    if p.returncode:
        sys.stderr.write(p.stdout[-5000:] + p.stderr[-2000:])
        raise SystemExit(f"deploy.yml failed (rc {p.returncode}) after {secs:.0f}s")
    return secs, recap


def make_cold(inv, extra_vars):
    """Remove the image/model/ray/serve stages' results from every serving node."""
    dep = extra_vars.get("fleet_deployment", "vllm-fleet")
    image = extra_vars.get("fleet_image", "vllm-fleet:latest")
    model = extra_vars.get("fleet_model_path", "")
    script = (f"docker rm -f {dep}-vllm {dep}-ray >/dev/null 2>&1; "
              f"docker image rm -f {image} >/dev/null 2>&1; docker image prune -f >/dev/null; "
              + (f"rm -rf {model}; " if model.startswith("/var/lib/vllm-fleet/") else "") + "true")
    subprocess.run([str(REPO / ".venv/bin/ansible"), "-i", inv, "fleet_serving", "-b", "-m",
                    "ansible.builtin.shell", "-a", script], cwd=REPO, check=True,
                   capture_output=True, text=True, timeout=600)
    for tar in (REPO / "build" / "images").glob("*.tar"):
        tar.unlink()


def inventory_vars(inv):
    out = {}
    section = None
    for line in Path(inv).read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "all:vars" and "=" in line:
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-i", "--inventory", default=str(REPO / ".lab" / "inventory.ini"))
    ap.add_argument("--cold", action="store_true", help="remove stage results first (see above)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--log-dir", help="keep each run's ansible output here (cold.log, rerun.log)")
    a = ap.parse_args()
    if a.cold:
        make_cold(a.inventory, inventory_vars(a.inventory))
    logs = Path(a.log_dir) if a.log_dir else None
    if logs:
        logs.mkdir(parents=True, exist_ok=True)
    cold, _ = run_deploy(a.inventory, logs and logs / "cold.log")
    rerun, recap = run_deploy(a.inventory, logs and logs / "rerun.log")
    changed = sum(r["changed"] for r in recap.values())
    ratio = rerun / cold if cold else float("nan")
    res = {"cold_s": round(cold, 1), "rerun_s": round(rerun, 1), "ratio": round(ratio, 3),
           "rerun_changed": changed, "cold_from_scratch": a.cold, "goal_ratio": 0.25}
    print(f"cold deploy: {cold:7.1f} s{' (stage results removed first)' if a.cold else ''}")
    print(f"re-run:      {rerun:7.1f} s  changed={changed}")
    print(f"ratio:       {ratio:7.1%}  (goal <= 25%: {'met' if ratio <= 0.25 else 'NOT met'})")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if changed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
