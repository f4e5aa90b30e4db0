"""A real teardown of the deployed lab: last test of the lab tier (it removes the deployment).

teardown.yml must leave nothing of ours running or on disk that it owns (containers labelled
with the deployment, the exporter and healer services, HAProxy, this deployment's launch
directories and the shm segments they recorded, its vLLM cache, the key files) and nothing of
anyone else's touched: another deployment whose name starts with ours (x-y when tearing down x)
with its launch state and cache, a container of someone else, a /dev/shm file that matches our
old patterns but is not ours. A second run
changes nothing. The lab is redeployed by the next `make test` (lab.py up + deploy.yml).
"""
from __future__ import annotations

import uuid

import pytest

from tests.lab.conftest import run_playbook

pytestmark = pytest.mark.lab


def _first(inv: dict, group: str) -> str:
    hosts = inv.get(group, {}).get("hosts", [])
    assert hosts, f"the lab has no host in {group}"
    return hosts[0]


def test_teardown_removes_ours_and_leaves_everyone_elses(deployed_lab):
    inv = deployed_lab["inventory_vars"]
    hostvars = inv["_meta"]["hostvars"]
    head = _first(inv, "fleet_head")
    deployment = hostvars[head].get("fleet_deployment", "vllm-fleet")
    hosts = deployed_lab["hosts"]
    serving = deployed_lab["serving"]
    lb = _first(inv, "fleet_loadbalancer")
    image = hostvars[head].get("fleet_image") or hosts[head].run(
        f"sudo docker inspect -f '{{{{.Config.Image}}}}' {deployment}-vllm").stdout.strip()
    tag = uuid.uuid4().hex[:8]
    other = f"{deployment}-other{tag}"  # a deployment whose name starts with ours
    foreign_container = f"foreign-{tag}"
    foreign_shm = [f"/dev/shm/nccl-foreign-{tag}", f"/dev/shm/vllm-fleet-foreign-{tag}", f"/dev/shm/psm_{tag}"]
    foreign_launch = f"/run/vllm-fleet/launches/{other}-1"
    foreign_cache = f"/var/cache/vllm-fleet/{other}/vllm-modelinfos/keep.json"
    our_cache = f"/var/cache/vllm-fleet/{deployment}"

    host = hosts[head]
    # Someone else's things on a serving host, made the way they would be there.
    host.run(f"sudo docker run -d --name {foreign_container} --label vllm-fleet.deployment={other} "
             f"--entrypoint sleep {image} infinity", timeout=300)
    host.run(f"sudo docker run -d --name {foreign_container}-plain --entrypoint sleep {image} infinity",
             timeout=300)
    host.run("sudo sh -c '" + " ".join(f"echo x > {p};" for p in foreign_shm)
             + f" mkdir -p {foreign_launch} && echo {{\"deployment\": \"{other}\"}} > {foreign_launch}/launch.json"
             + f" && mkdir -p {foreign_cache.rsplit('/', 1)[0]} && echo {{}} > {foreign_cache}'")
    # vLLM wrote its model info into the kept cache at the head's launch (vllm_serve's mount)
    cached = host.run(f"sudo ls {our_cache}/vllm-modelinfos").stdout.split()
    assert any(n.endswith("ForCausalLM.json") for n in cached), f"{head}: {our_cache}: {cached}"
    ours_before = {h: hosts[h].run(f"sudo docker ps -q --filter label=vllm-fleet.deployment={deployment}")
                   .stdout.split() for h in serving}
    assert all(ours_before.values()), ours_before  # every serving host runs containers of ours
    try:
        run = run_playbook("teardown.yml", "-e", f"teardown_confirm={deployment}", timeout=1800)
        assert run.rc == 0, run.output[-15000:]

        for name in serving:
            h = hosts[name]
            left = h.run(f"sudo docker ps -aq --filter label=vllm-fleet.deployment={deployment}").stdout.split()
            assert left == [], f"{name}: containers of {deployment} left: {left}"
            launches = h.run(f"sudo grep -ls '\"deployment\": *\"{deployment}\"' "
                             "/run/vllm-fleet/launches/*/launch.json || true").stdout.split()
            assert launches == [], f"{name}: launch state of {deployment} left: {launches}"
            assert h.run(f"sudo test -e {our_cache} || echo gone").stdout.strip() == "gone", \
                f"{name}: {our_cache} left"
            active = h.run("systemctl is-active vllm-fleet-exporter || true").stdout.strip()
            assert active != "active", f"{name}: exporter still {active}"
        assert hosts[lb].run("systemctl is-active haproxy || true").stdout.strip() != "active"
        healer = inv.get("fleet_healer", {}).get("hosts") or inv.get("fleet_monitoring", {}).get("hosts", [])
        if healer:
            assert hosts[healer[0]].run("systemctl is-active vllm-fleet-healer || true").stdout.strip() != "active"

        # Nothing of anyone else's was touched.
        running = host.run("sudo docker ps --format '{{.Names}}'").stdout.split()
        assert foreign_container in running and f"{foreign_container}-plain" in running, running
        paths = foreign_shm + [foreign_launch, foreign_cache]
        kept = host.run("for p in " + " ".join(paths) + "; do [ -e $p ] && echo $p; done; true").stdout.split()
        assert kept == paths, f"teardown removed what is not ours: {sorted(set(paths) - set(kept))}"

        again = run_playbook("teardown.yml", "-e", f"teardown_confirm={deployment}", timeout=1800)
        assert again.rc == 0 and again.changed_total() == 0, again.output[-15000:]
    finally:
        host.run(f"sudo docker rm -f {foreign_container} {foreign_container}-plain; sudo rm -rf "
                 + " ".join(foreign_shm + [foreign_launch, f"/var/cache/vllm-fleet/{other}"]),
                 check=False, timeout=300)
