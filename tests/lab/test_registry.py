"""The in-fleet registry on the lab (issue 18, item 1): node3 runs Debian's docker-registry (role
registry), the controller (the lab's build host) pushes to it, the nodes pull by digest.

One test, in order, on the deployed lab with an inventory overlay that puts node3 in
[fleet_registry] (the lab's own inventory, and so every other test, keeps the air-gapped path):
1. the image and firewall stages through the registry: the controller fills it (the whole image,
   once); its port answers the nodes and not the scanner on the management network; every node
   keeps the image it holds (same ID: nothing pulled);
2. a one-line change to our package: a new image ID; the controller sends the registry about one
   layer (nftables counts the bytes), each node trusts the lab CA and pulls by digest (Docker
   verifies the registry's certificate), and every node holds the new ID, named by that digest;
3. a node whose image differs (its fleet_image name removed) is named and fixed;
4. the change undone: the original ID everywhere again (the running containers never changed).
Finally the registry is stopped and the lab's firewall converged again without it.
"""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.lab.conftest import REPO, run_playbook
from tests.lab.lab import ensure_scanner
from tests.model_servers import Egress

pytestmark = pytest.mark.day2
REGISTRY_HOST = "node3"
PLUGIN_FILE = REPO / "images/vllm_fleet/src/vllm_fleet/__init__.py"
LOGS = REPO / "build" / "lab-registry"


def playbook(overlay: Path, name: str, *args: str):
    run = run_playbook("deploy.yml", "-i", str(overlay), *args, timeout=3600)
    LOGS.mkdir(parents=True, exist_ok=True)
    (LOGS / f"{time.strftime('%H%M%S')}-{name}-rc{run.rc}.log").write_text(run.output)
    assert run.rc == 0, run.output[-15000:]
    return run


def image_ids(lab, image: str) -> dict[str, str]:
    return {h: lab["hosts"][h].run(f"sudo docker image inspect -f '{{{{.Id}}}}' {image} 2>/dev/null || true")
            .stdout.strip() for h in lab["serving"]}


def test_registry_moves_only_the_changed_layer_and_fixes_a_node_that_differs(deployed_lab, tmp_path):
    lab = deployed_lab
    hv = lab["inventory_vars"]["_meta"]["hostvars"]
    head = lab["groups"]["fleet_head"][0]
    image = hv[head]["fleet_image"]
    registry_ip = lab["hosts"][REGISTRY_HOST].address
    endpoint = f"{registry_ip}:5000"
    overlay = tmp_path / "registry.ini"
    overlay.write_text(f"[fleet_registry]\n{REGISTRY_HOST}\n")
    before = image_ids(lab, image)
    assert len(set(before.values())) == 1 and "" not in before.values(), before
    original = PLUGIN_FILE.read_text()
    subnet = registry_ip.rsplit(".", 1)[0] + ".0/24"
    egress = Egress(subnet, {}, "fleetregistry_labtest", dports={"registry": 5000})
    try:
        # 1: through the registry, nothing to move
        first = playbook(overlay, "first", "--tags", "validate,firewall,image")
        assert f"registry :5000 from" in first.output
        assert "pulling" not in first.output, first.output[-6000:]
        assert image_ids(lab, image) == before
        # a node reaches it (its CA is installed where a node pulls: the pulls below verify TLS)
        ok = lab["hosts"][head].run(f"curl -sk -o /dev/null -w '%{{http_code}}' https://{endpoint}/v2/")
        assert ok.stdout.strip() == "200", ok.stdout
        outsider = subprocess.run(["docker", "exec", ensure_scanner(), "curl", "-sk", "-m", "10", "-o", "/dev/null",
                                   "-w", "%{http_code}", f"https://{endpoint}/v2/"], capture_output=True, text=True,
                                  timeout=60)
        assert outsider.stdout.strip() in ("000", ""), f"the scanner reached the registry: {outsider.stdout}"

        # 2: a one-line change to our package
        PLUGIN_FILE.write_text(original + f"\n# test_registry {time.time()}\n")
        egress.reset()
        changed = playbook(overlay, "changed", "--tags", "validate,image")
        sent = egress.read()
        after = image_ids(lab, image)
        assert len(set(after.values())) == 1 and after[head] != before[head], (before, after)
        # the whole image is 3 GB; our package's layer is well under 10 MB
        assert sent["dest_registry"] < 50e6, sent
        assert sent["controller_ssh"] < 20e6, sent
        digest = re.search(r"@(sha256:[0-9a-f]{64})", changed.output)
        assert digest, changed.output[-6000:]
        for h in lab["serving"]:
            digests = lab["hosts"][h].run(f"sudo docker image inspect -f '{{{{json .RepoDigests}}}}' {image}").stdout
            assert digest[1] in digests, (h, digests)
        print(f"one-line change: sent the registry {sent['dest_registry'] / 1e6:.1f} MB, SSH {sent['controller_ssh'] / 1e6:.1f} MB")

        # 3: a node whose image differs is named and fixed
        victim = lab["serving"][-1]
        lab["hosts"][victim].run(f"sudo docker image rm -f {image} {endpoint}/vllm-fleet/{image}")
        fixed = playbook(overlay, "fixed", "--tags", "validate,image")
        assert re.search(rf"node {victim}: image {re.escape(image)} is missing", fixed.output), fixed.output[-6000:]
        assert image_ids(lab, image)[victim] == after[head]
    finally:
        PLUGIN_FILE.write_text(original)
        egress.remove()
        # 4: back to the original image everywhere (its layers are all still on every node)
        back = playbook(overlay, "restored", "--tags", "validate,image")
        assert image_ids(lab, image) == before, back.output[-6000:]
        lab["hosts"][REGISTRY_HOST].run("sudo systemctl disable --now docker-registry", check=False)
        run_playbook("deploy.yml", "--tags", "validate,firewall", timeout=3600)
    # the image stage alone never touched the serving containers: they still run the original ID
    running = {h: lab["hosts"][h].run("sudo docker ps --filter label=vllm-fleet.component=vllm -q "
                                      "| xargs -r sudo docker inspect -f '{{.Image}}'").stdout.split()
               for h in lab["serving"]}
    assert all(set(ids) <= {before[h]} for h, ids in running.items()), (running, before)
