#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Record the serving image a node holds; remove the images it replaced, when provably ours."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: fleet_node_images
short_description: Record a node's serving image ID; remove recorded images it replaced
description:
  - Keeps a record on the node (C(record), JSON) of the image IDs the image role verified there as
    a deployment's wanted image, with the names it gave them. The record is the proof an image is
    ours; an image the record does not name is never touched.
  - C(state=recorded) records the ID C(image) names now as the deployment's current image.
  - C(state=pruned) also removes every recorded image that is no deployment's current image, has
    no name the record did not give it, and is used by no container (running or stopped). Docker
    itself refuses to remove an image a container uses; the module checks first so that it can
    say which container keeps it. A replaced image is about the image's size on every node (3 GB
    for the lab's, far more for CUDA).
  - C(state=absent) (teardown) forgets the deployment's current image, then prunes the same way, so
    the deployment's own images go unless another deployment on the node still wants them.
  - Supports check mode (nothing written, nothing removed; C(removed) lists what would go).
options:
  image:
    description: The serving image's name (C(fleet_image)); required unless C(state=absent).
    type: str
  deployment:
    description: The deployment (C(fleet_deployment)) whose current image this is.
    type: str
    required: true
  names:
    description: Further names the role gave the image (e.g. its registry reference).
    type: list
    elements: str
    default: []
  state:
    description: >-
      C(recorded) only records; C(pruned) records and removes replaced images; C(absent) forgets
      the deployment and removes its recorded images.
    type: str
    default: recorded
    choices: [recorded, pruned, absent]
  record:
    description: The record file; its directory is created root-only (0700) when missing.
    type: path
    default: /var/lib/vllm-fleet/images/node-images.json
author: vllm-fleet
"""

EXAMPLES = r"""
- name: Remove the serving images this node's last relaunch replaced
  fleet_node_images:
    image: "{{ fleet_image }}"
    deployment: "{{ fleet_deployment }}"
    state: pruned
"""

RETURN = r"""
current:
  description: The image ID C(image) names on this node (empty with C(state=absent)).
  returned: always
  type: str
removed:
  description: Replaced images removed (or that would be, in check mode), with their size in bytes.
  returned: always
  type: list
kept:
  description: Replaced images kept, each with the reason (a container uses it, a foreign name).
  returned: always
  type: list
freed_bytes:
  description: Bytes the removed images took (Docker's image size).
  returned: always
  type: int
"""

import json
import os
import tempfile

from ansible.module_utils.basic import AnsibleModule


def docker(module, *args):
    rc, out, err = module.run_command(["docker", *args])
    return rc, out, err


def inspect_image(module, ref):
    rc, out, _ = docker(module, "image", "inspect", ref)
    if rc != 0:
        return None
    return json.loads(out)[0]


def container_images(module):
    """{image ID: [container names]} over every container, running or stopped."""
    rc, out, err = docker(module, "ps", "-aq", "--no-trunc")
    if rc != 0:
        module.fail_json(msg=f"docker ps failed: {err.strip()}")
    ids = out.split()
    used = {}
    if not ids:
        return used
    rc, out, err = docker(module, "container", "inspect", "--format", "{{.Image}} {{.Name}}", *ids)
    for line in out.splitlines():  # a container removed meanwhile only shortens the list
        image, _, name = line.partition(" ")
        used.setdefault(image, []).append(name.lstrip("/"))
    return used


def load_record(module, path):
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except FileNotFoundError:
        return {"current": {}, "images": {}}
    except (OSError, ValueError) as exc:
        module.fail_json(msg=f"cannot read the image record {path}: {exc}")
    if not isinstance(rec.get("current"), dict) or not isinstance(rec.get("images"), dict):
        module.fail_json(msg=f"the image record {path} is not this module's (no current/images maps)")
    return rec


def save_record(path, rec):
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".node-images.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(rec, f, indent=1, sort_keys=True)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            image=dict(type="str", default=""),
            deployment=dict(type="str", required=True),
            names=dict(type="list", elements="str", default=[]),
            state=dict(type="str", default="recorded", choices=["recorded", "pruned", "absent"]),
            record=dict(type="path", default="/var/lib/vllm-fleet/images/node-images.json"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    if not p["deployment"] or (not p["image"] and p["state"] != "absent"):
        module.fail_json(msg="image and deployment must not be empty")
    current = {"Id": ""}
    if p["state"] != "absent":
        current = inspect_image(module, p["image"])
        if current is None:
            module.fail_json(msg=f"this node has no image {p['image']}: nothing to record")
    rec = load_record(module, p["record"])
    before = json.dumps(rec, sort_keys=True)
    if p["state"] == "absent":
        rec["current"].pop(p["deployment"], None)
    else:
        rec["current"][p["deployment"]] = current["Id"]
        entry = rec["images"].setdefault(current["Id"], {"names": []})
        entry["names"] = sorted(set(entry["names"]) | {p["image"], *p["names"]})

    removed, kept = [], []
    if p["state"] in ("pruned", "absent"):
        keep = set(rec["current"].values())
        used = None
        for image_id in sorted(set(rec["images"]) - keep):
            names = set(rec["images"][image_id]["names"])
            info = inspect_image(module, image_id)
            if info is None:  # gone already (removed by hand): nothing is ours to remove any more
                del rec["images"][image_id]
                continue
            foreign = sorted(set(info.get("RepoTags") or []) - names)
            if foreign:
                kept.append({"id": image_id, "reason": f"also named {', '.join(foreign)}, a name the record did not give it"})
                continue
            if used is None:
                used = container_images(module)
            if used.get(image_id):
                kept.append({"id": image_id, "reason": f"used by container(s) {', '.join(sorted(used[image_id]))}"})
                continue
            item = {"id": image_id, "names": sorted(info.get("RepoTags") or []), "size": int(info.get("Size") or 0)}
            if not module.check_mode:
                # Our names first (the last one going takes the image with it), then the ID.
                for ref in item["names"]:
                    docker(module, "image", "rm", ref)
                rc, _, err = docker(module, "image", "rm", image_id)
                if rc != 0 and inspect_image(module, image_id) is not None:
                    kept.append({"id": image_id, "reason": f"docker image rm refused: {err.strip()}"})
                    continue
                del rec["images"][image_id]
            removed.append(item)
    changed = bool(removed) or json.dumps(rec, sort_keys=True) != before
    if changed and not module.check_mode:
        save_record(p["record"], rec)
    module.exit_json(changed=changed, current=current["Id"], removed=removed, kept=kept,
                     freed_bytes=sum(i["size"] for i in removed))


if __name__ == "__main__":
    main()
