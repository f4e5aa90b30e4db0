"""fleet_node_images (the image role's record and prune.yml) through Ansible's real module call
against the real Docker engine: a replaced image the record names goes once no container uses it;
an image the record does not name, another deployment's current image, an image someone else also
named, and one a stopped container still uses stay, each with its reason; check mode removes
nothing; bad input fails naming what is wrong."""
from __future__ import annotations

import io
import json
import subprocess
import tarfile
import uuid

import pytest

from tests.fixtures.ansible_adhoc import run_module

MODULE = "fleet_node_images"


def docker(*args: str, stdin: bytes | None = None, check: bool = True) -> str:
    proc = subprocess.run(["docker", *args], input=stdin, capture_output=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {proc.stderr.decode()}")
    return proc.stdout.decode().strip()


def exists(image_id: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", image_id], capture_output=True,
                          timeout=60).returncode == 0


@pytest.fixture
def images():
    """make(tag) imports a tiny image (one small file) carrying the serving images' title label and
    tags it, moving the tag off any image that had it, like a `docker load` of a new build."""
    made, containers = [], []

    def make(tag: str) -> str:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            data = uuid.uuid4().hex.encode()
            info = tarfile.TarInfo("marker")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        image_id = docker("image", "import", "--change",
                          'LABEL org.opencontainers.image.title="vllm-fleet (test)"', "-", tag,
                          stdin=buf.getvalue())
        made.append(image_id)
        return image_id

    def container(image_id: str) -> str:
        name = f"fleet-node-images-{uuid.uuid4().hex[:8]}"
        docker("container", "create", "--name", name, image_id, "/marker")
        containers.append(name)
        return name

    make.container = container
    yield make
    for name in containers:
        docker("container", "rm", "-f", name, check=False)
    for image_id in made:
        docker("image", "rm", "-f", image_id, check=False)


def call(record, image, state="recorded", deployment="d1", check=False, **extra):
    return run_module(MODULE, dict(image=image, deployment=deployment, state=state,
                                   record=str(record), **extra), check=check)


def test_replaced_image_goes_once_unused_and_only_then(tmp_path, images):
    record = tmp_path / "images" / "node-images.json"
    tag = f"fleet-node-images-{uuid.uuid4().hex[:8]}:v"
    old = images(tag)
    first = call(record, tag)
    assert first["changed"] and first["current"] == old
    assert oct(record.parent.stat().st_mode & 0o777) == "0o700"
    assert call(record, tag)["changed"] is False  # recording again changes nothing

    new = images(tag)  # the tag moves: old is now untagged, like after `docker load`
    holder = images.container(old)  # the replica's old container, not yet relaunched
    res = call(record, tag, state="pruned")
    assert res["current"] == new and res["removed"] == []
    assert res["kept"] == [{"id": old, "reason": f"used by container(s) {holder}"}], res
    assert exists(old)

    docker("container", "rm", holder)
    dry = call(record, tag, state="pruned", check=True)
    assert [i["id"] for i in dry["removed"]] == [old] and dry["changed"]
    assert exists(old), "check mode removed an image"

    res = call(record, tag, state="pruned")
    assert [i["id"] for i in res["removed"]] == [old] and res["changed"], res
    assert not exists(old) and exists(new)
    assert list(json.loads(record.read_text())["images"]) == [new]
    again = call(record, tag, state="pruned")
    assert again["changed"] is False and again["removed"] == [] and again["kept"] == []


def test_what_is_not_provably_ours_or_still_wanted_stays(tmp_path, images):
    record = tmp_path / "node-images.json"
    run = uuid.uuid4().hex[:8]
    mine, theirs, stranger = f"fleet-a-{run}:v", f"fleet-b-{run}:v", f"someone-{run}:v"

    other_current = images(theirs)
    call(record, theirs, deployment="d2")  # another deployment on the same node
    unrecorded = images(stranger)
    images(stranger)  # unrecorded is now untagged, labelled like ours, unused: still not ours
    named_old = images(mine)
    call(record, mine)
    images(mine)
    docker("image", "tag", named_old, f"kept-by-user-{run}:1")  # someone named the old image

    res = call(record, mine, state="pruned")
    assert res["removed"] == [], res
    assert res["kept"] == [{"id": named_old,
                            "reason": f"also named kept-by-user-{run}:1, a name the record did not give it"}]
    assert exists(unrecorded) and exists(named_old) and exists(other_current)
    assert json.loads(record.read_text())["current"]["d2"] == other_current

    docker("image", "rm", f"kept-by-user-{run}:1")  # its last name: Docker removes the image itself
    res = call(record, mine, state="pruned")
    assert res["removed"] == [] and res["changed"], res  # the record forgets an image gone by hand
    assert named_old not in json.loads(record.read_text())["images"]
    assert exists(unrecorded) and exists(other_current)


def test_registry_name_is_recorded_and_removed_with_the_image(tmp_path, images):
    record = tmp_path / "node-images.json"
    run = uuid.uuid4().hex[:8]
    tag, ref = f"fleet-c-{run}:v", f"registry.fabric:5000/fleet-c-{run}:v"
    old = images(tag)
    docker("image", "tag", old, ref)  # what the registry path's pull + tag leaves
    call(record, tag, names=[ref])
    images(tag)
    docker("image", "tag", tag, ref)  # the next pull moves the registry name too
    res = call(record, tag, state="pruned", names=[ref])
    assert [i["id"] for i in res["removed"]] == [old] and not exists(old), res


def test_teardown_removes_the_deployments_images_and_keeps_anothers(tmp_path, images):
    record = tmp_path / "node-images.json"
    run = uuid.uuid4().hex[:8]
    mine, shared = f"fleet-d-{run}:v", f"fleet-e-{run}:v"
    replaced = images(mine)
    call(record, mine)
    current = images(mine)
    call(record, mine)
    both = images(shared)
    call(record, shared, deployment="d1-old")
    call(record, shared, deployment="d2")  # d2 also serves this one
    res = run_module(MODULE, dict(deployment="d1", record=str(record), state="absent"))
    assert sorted(i["id"] for i in res["removed"]) == sorted([replaced, current]), res
    assert not exists(replaced) and not exists(current) and exists(both)
    assert set(json.loads(record.read_text())["current"]) == {"d1-old", "d2"}
    res = run_module(MODULE, dict(deployment="d1-old", record=str(record), state="absent"))
    assert res["removed"] == [] and exists(both), res  # still d2's


@pytest.mark.parametrize("case", ["missing-image", "empty-deployment", "foreign-record", "unreadable-record"])
def test_bad_input_fails_naming_it(tmp_path, images, case):
    record = tmp_path / "node-images.json"
    image, deployment = f"fleet-node-images-{uuid.uuid4().hex[:8]}:v", "d1"
    want = f"this node has no image {image}"
    if case != "missing-image":
        images(image)
    if case == "empty-deployment":
        deployment, want = "", "image and deployment must not be empty"
    elif case == "foreign-record":
        record.write_text('{"images": []}')
        want = f"the image record {record} is not this module's"
    elif case == "unreadable-record":
        record.write_text("{not json")
        want = f"cannot read the image record {record}"
    before = record.read_text() if record.exists() else None
    res = run_module(MODULE, dict(image=image, deployment=deployment, record=str(record)))
    assert res.get("failed") and want in res["msg"], res
    assert (record.read_text() if record.exists() else None) == before, "a failed call wrote the record"
