#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Merge keys into a JSON object file without dropping keys someone else set."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: fleet_json_merge
short_description: Merge our keys into a JSON object file, keeping everyone else's
description:
  - Reads the JSON object at I(path) (missing or empty file is C({})), deep-merges I(content)
    into it and writes it back atomically only when the result differs.
  - Objects merge recursively; any other value (string, number, list, null) in I(content)
    replaces the existing value. Keys not in I(content) are never dropped.
  - Keys listed in I(remove) (dotted paths) are deleted (for settings we used to own).
  - Supports check mode and diff mode. Fails on a file that is not a JSON object.
options:
  path:
    description: The JSON file (e.g. /etc/docker/daemon.json).
    type: path
    required: true
  content:
    description: Keys to merge in.
    type: dict
    required: true
  remove:
    description: Dotted key paths to delete, e.g. C(runtimes.nvidia).
    type: list
    elements: str
    default: []
  host:
    description: Inventory name put in front of failure messages.
    type: str
    default: ''
  mode:
    description: File mode when the file is created.
    type: str
    default: '0644'
author: vllm-fleet
"""

EXAMPLES = r"""
- name: Merge log rotation and live-restore into daemon.json
  fleet_json_merge:
    path: /etc/docker/daemon.json
    content:
      live-restore: true
      log-opts: {max-size: 100m, max-file: "5"}
"""

RETURN = r"""
merged:
  description: The whole object as written (or as it would be written in check mode).
  returned: success
  type: dict
"""

import copy
import json
import os
import tempfile

from ansible.module_utils.basic import AnsibleModule


class MergeError(Exception):
    pass


def deep_merge(existing, ours):
    """Return existing with ours merged in (neither argument is modified)."""
    result = copy.deepcopy(existing)
    for key, value in ours.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = deep_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def remove_paths(data, paths):
    result = copy.deepcopy(data)
    for path in paths:
        parts = path.split(".")
        node = result
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return result


def parse_existing(text, path):
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise MergeError("%s is not valid JSON (%s); fix or remove it, nothing was changed"
                         % (path, exc))
    if not isinstance(data, dict):
        raise MergeError("%s holds a JSON %s, not an object; nothing was changed"
                         % (path, type(data).__name__))
    return data


def render(data):
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def plan(text, ours, remove=(), path="file"):
    """(changed, merged, new_text) for existing file text (None: no file)."""
    existing = parse_existing(text or "", path)
    merged = remove_paths(deep_merge(existing, ours), remove)
    changed = text is None or merged != existing
    return changed, merged, render(merged) if changed else text


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            content=dict(type="dict", required=True),
            remove=dict(type="list", elements="str", default=[]),
            mode=dict(type="str", default="0644"),
            host=dict(type="str", default=""),
        ),
        supports_check_mode=True,
    )
    path = module.params["path"]
    text = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    try:
        changed, merged, new_text = plan(text, module.params["content"], module.params["remove"], path)
    except MergeError as exc:
        prefix = "host %s: " % module.params["host"] if module.params["host"] else ""
        module.fail_json(msg=prefix + str(exc))
    result = dict(changed=changed, merged=merged, path=path)
    if changed and module._diff:
        result["diff"] = dict(before=text or "", after=new_text, before_header=path, after_header=path)
    if changed and not module.check_mode:
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            os.makedirs(directory, 0o755)
        fd, tmp = tempfile.mkstemp(prefix=".fleet_json_merge.", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(new_text)
        if text is None:
            os.chmod(tmp, int(module.params["mode"], 8))
        module.atomic_move(tmp, path)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
