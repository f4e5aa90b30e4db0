#!/usr/bin/env python3
"""An image upgrade after a one-line change to our package, air-gapped against the in-fleet
registry, on the lab: time of the image stage and bytes the controller sends, side by side.

    python benchmarks/image_upgrade.py --out DIR [--registry-host node3] [--rounds 1]

For each way (archive: the lab's own inventory, docker save -> copy -> docker load; registry: the
same inventory plus an overlay with --registry-host in [fleet_registry], push once -> pull by
digest) it appends one comment line to images/vllm_fleet/src/vllm_fleet/__init__.py (a new image
ID, as a one-line plugin fix gives), runs `deploy.yml --tags validate,image` and counts, with
nftables counters in a table of its own (inet fleetimage_bench, removed at the end), what this
machine sends towards the lab's management network: its SSH (Ansible, the archive copies) and the
registry port. The registry way first runs once without a change (the registry gets the current
image whole: a one-off, reported apart). At the end the file is restored and the original image
redistributed the same way; the serving containers are never relaunched (image stage only).
Every playbook log and results.json go to --out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.lab.conftest import INVENTORY, read_inventory  # noqa: E402  (the lab's own inventory reader)
from tests.model_servers import Egress  # noqa: E402  (shared with the tests)

PLUGIN_FILE = REPO / "images/vllm_fleet/src/vllm_fleet/__init__.py"
TABLE = "fleetimage_bench"


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def stage(out: Path, name: str, overlay: Path | None) -> dict:
    cmd = ["ansible-playbook", "-i", str(INVENTORY)] + (["-i", str(overlay)] if overlay else []) + [
        str(REPO / "deploy.yml"), "--tags", "validate,image"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=7200)
    seconds = time.monotonic() - t0
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: deploy.yml --tags image failed (rc {proc.returncode}); see {out / name}.log")
    return {"seconds": round(seconds, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--registry-host", default="node3")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    hosts, _ = read_inventory()
    registry_ip = hosts[args.registry_host].address
    subnet = registry_ip.rsplit(".", 1)[0] + ".0/24"
    overlay = args.out / "registry.ini"
    overlay.write_text(f"[fleet_registry]\n{args.registry_host}\n")
    egress = Egress(subnet, {}, TABLE, dports={"registry": 5000})
    original = PLUGIN_FILE.read_text()
    results: dict = {"rounds": []}

    def measured(name: str, ov: Path | None) -> dict:
        egress.reset()
        row = stage(args.out, name, ov)
        sent = egress.read()
        row.update(ssh_mb=round(sent["controller_ssh"] / 1e6, 1), registry_mb=round(sent["dest_registry"] / 1e6, 1))
        log(f"{name}: {row}")
        return row

    try:
        results["registry_first_fill"] = measured("registry-fill", overlay)
        for r in range(1, args.rounds + 1):
            row = {}
            for way, ov in (("archive", None), ("registry", overlay)):
                PLUGIN_FILE.write_text(original + f"\n# image_upgrade benchmark {way} {r} {time.time()}\n")
                row[way] = measured(f"{way}-{r}", ov)
            results["rounds"].append(row)
    finally:
        PLUGIN_FILE.write_text(original)
        results["restore"] = measured("restore", overlay)
        egress.remove()
        hosts[args.registry_host].run("sudo systemctl disable --now docker-registry", check=False)
        subprocess.run(["ansible-playbook", "-i", str(INVENTORY), str(REPO / "deploy.yml"), "--tags",
                        "validate,firewall"], cwd=REPO, capture_output=True, timeout=3600)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'round':>5} {'way':>9} {'seconds':>8} {'ssh MB':>8} {'registry MB':>12}")
    for r, row in enumerate(results["rounds"], 1):
        for way in ("archive", "registry"):
            x = row[way]
            print(f"{r:>5} {way:>9} {x['seconds']:>8} {x['ssh_mb']:>8} {x['registry_mb']:>12}")
        a, g = row["archive"], row["registry"]
        print(f"      registry/archive: time {g['seconds'] / a['seconds']:.2f}x, controller bytes "
              f"{(g['ssh_mb'] + g['registry_mb']) / max(a['ssh_mb'] + a['registry_mb'], 0.1):.3f}x")
    f = results["registry_first_fill"]
    print(f"registry's first fill (one-off): {f['seconds']} s, {f['registry_mb']} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
