"""Lab test of the model stage alone (issue 16) with the lab's tiny model at a path of its own
(/var/lib/vllm-fleet/models/labtest: the served model is not touched).

A controller directory reaches every serving node (pushed to the seed, pulled node to node over the
fabric), a re-run moves nothing and changes nothing, and bad cases fail before anything is served,
naming the node and what is wrong, deleting nothing: a corrupted shard on one node, an extra file,
a full disk, a node source with no hashes. The real-size runs from every source (Hub mirror, S3,
HTTP, node, controller), controller egress and an interrupted transfer are
benchmarks/model_distribution.py's (docs/benchmarks/2026-12-06-lab-model-distribution.md).
"""
from __future__ import annotations

import hashlib
import json
import re

import pytest

from tests.lab.conftest import LAB_DIR, run_playbook

pytestmark = pytest.mark.lab

PATH = "/var/lib/vllm-fleet/models/labtest"
SHARD = "model.safetensors"


def model_stage(lab, tmp_path, **extra):
    extra = {"fleet_model_path": PATH, "fleet_model_source": str(LAB_DIR / "models" / "tiny-llama"), **extra}
    (tmp_path / "vars.json").write_text(json.dumps(extra))
    return run_playbook("deploy.yml", "--tags", "model", "-e", f"@{tmp_path / 'vars.json'}", timeout=1800)


def flat(run) -> str:
    """The output with YAML's line wrapping undone (messages are searched as one line)."""
    return " ".join(run.output.split())


def on(lab, host, cmd, check=True):
    return lab["hosts"][host].run(f"sudo sh -c '{cmd}'", check=check).stdout.strip()


@pytest.fixture(scope="module")
def placed(lab, tmp_path_factory):
    """The tiny model at PATH on every serving node, through the new path, once per module."""
    for h in lab["serving"]:
        on(lab, h, f"rm -rf {PATH}")
    run = model_stage(lab, tmp_path_factory.mktemp("placed"))
    assert run.rc == 0, run.output[-5000:]
    yield dict(lab, first=run)
    for h in lab["serving"]:
        on(lab, h, f"rm -rf {PATH}", check=False)


def test_controller_directory_reaches_every_node_through_the_fabric(placed):
    out = placed["first"].output
    seed = placed["groups"]["fleet_head"][0]
    # each job's closing line: "[host] <label>: done in N s (B bytes sent|received)"
    assert re.search(rf"\[{seed}\] pushing \S+ to {seed}: done in \d+ s \([\d,]+ bytes sent\)", out), out[-3000:]
    fabric = {h: on(placed, h, "sed -n s/^VLLM_HOST_IP=//p /etc/vllm-fleet/fabric.env") for h in placed["serving"]}
    pulls = re.findall(r"\[(\S+)\] pulling from (\S+) \((\S+)\) over the fabric: done in \d+ s "
                       r"\([\d,]+ bytes received", out)
    assert sorted(h for h, _, _ in pulls) == sorted(h for h in placed["serving"] if h != seed), pulls
    assert all(fabric[sender] == ip for _, sender, ip in pulls), (pulls, fabric)
    sums = {h: on(placed, h, f"sha256sum {PATH}/MANIFEST.sha256").split()[0] for h in placed["serving"]}
    assert len(set(sums.values())) == 1, sums
    for h in placed["serving"]:
        on(placed, h, f"cd {PATH} && sha256sum --check --strict --quiet MANIFEST.sha256")


def test_rerun_moves_nothing_and_changes_nothing(placed, tmp_path):
    run = model_stage(placed, tmp_path)
    assert run.rc == 0, run.output[-5000:]
    assert run.changed_total() == 0, run.recap()
    assert "pushing" not in run.output and "pulling from" not in run.output


def test_corrupted_shard_on_one_node_is_named_with_expected_and_got(placed, tmp_path):
    node = placed["serving"][-1]
    good = on(placed, node, f"sha256sum {PATH}/{SHARD}").split()[0]
    inode = on(placed, node, f"stat -c %i {PATH}/{SHARD}")
    # bit rot: same size, mtime put back (rsync's quick check would not see it)
    on(placed, node, f"cp -p {PATH}/{SHARD} /tmp/good && printf XXXX | dd of={PATH}/{SHARD} bs=1 seek=100 "
                     f"conv=notrunc status=none && touch -r /tmp/good {PATH}/{SHARD}")
    bad = on(placed, node, f"sha256sum {PATH}/{SHARD}").split()[0]
    try:
        run = model_stage(placed, tmp_path)
        assert run.rc != 0
        assert f"node {node}: model files in {PATH} differ from the manifest" in flat(run), run.output[-4000:]
        assert f"{SHARD}: expected sha256 {good}, got sha256 {bad}" in flat(run), run.output[-4000:]
        assert "pulling from" not in run.output and "pushing" not in run.output
        assert on(placed, node, f"stat -c %i {PATH}/{SHARD}") == inode  # nothing deleted or replaced
    finally:
        on(placed, node, f"cp -p /tmp/good {PATH}/{SHARD} && rm -f /tmp/good")
    repaired = model_stage(placed, tmp_path)
    assert repaired.rc == 0, repaired.output[-4000:]


def test_extra_file_on_one_node_is_named_and_kept(placed, tmp_path):
    node = placed["serving"][1]
    on(placed, node, f"echo stray > {PATH}/model-00009.safetensors")
    try:
        run = model_stage(placed, tmp_path)
        assert run.rc != 0
        assert re.search(rf"node {node}: model files in {PATH} differ from the manifest .*model-00009\.safetensors: "
                         r"extra file, not in the manifest", flat(run)), run.output[-4000:]
        assert on(placed, node, f"cat {PATH}/model-00009.safetensors") == "stray"
    finally:
        on(placed, node, f"rm -f {PATH}/model-00009.safetensors")


def test_full_disk_fails_before_a_byte_moves(lab, tmp_path):
    node = lab["serving"][1]
    small = "/var/lib/vllm-fleet/models/small"
    on(lab, node, f"mkdir -p {small} && mount -t tmpfs -o size=8m tmpfs {small}")
    try:
        run = model_stage(lab, tmp_path, fleet_model_path=f"{small}/m", model_disk_margin_mib=16)
        assert run.rc != 0
        assert re.search(rf"node {node}: not enough disk space for the model at {small}/m: .* 16 MiB margin .* free "
                         rf"on {small}", flat(run)), run.output[-4000:]
        for h in lab["serving"]:
            assert on(lab, h, f"find {small}/m -type f 2>/dev/null | wc -l") == "0", h
    finally:
        on(lab, node, f"umount {small} && rmdir {small}", check=False)
        for h in lab["serving"]:
            on(lab, h, f"rm -rf {small}", check=False)


def test_model_already_on_nodes_needs_a_pinned_manifest_or_trust_on_first_use(lab, tmp_path):
    fresh = "/var/lib/vllm-fleet/models/unvouched"
    run = model_stage(lab, tmp_path, fleet_model_path=fresh, fleet_model_source="")
    assert run.rc != 0
    assert "no run recorded its manifest: pin model_manifest in the inventory" in flat(run), run.output[-4000:]
    assert "model_trust_on_first_use=True" in flat(run)


def test_pinned_manifest_that_the_files_do_not_match_is_named(placed, tmp_path):
    wrong = hashlib.sha256(b"not the shard").hexdigest()
    record = f"/var/lib/vllm-fleet/model-state/{hashlib.sha1(PATH.encode()).hexdigest()[:12]}.manifest.json"
    files = json.loads(on(placed, placed["serving"][0], f"cat {record}"))
    pinned = {rel: (wrong if rel == SHARD else f["sha256"]) for rel, f in files["files"].items()}
    run = model_stage(placed, tmp_path, model_manifest=pinned)
    assert run.rc != 0
    assert f"{SHARD}: the pinned manifest says sha256 {wrong}, the source says" in flat(run), run.output[-4000:]
