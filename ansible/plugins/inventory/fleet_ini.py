# -*- coding: utf-8 -*-
"""Ansible's own INI inventory parser, with the slips it lets through turned into errors.

The builtin ``ini`` plugin accepts a mistyped file in ways that leave groups silently empty or
values silently wrong (a ``[group:vars]`` line without ``:vars`` becomes a host called
``key=value``; ``eth1 # fabric`` becomes the value; a YAML-style ``key: value`` only warns and
the whole file is dropped). This plugin reads the file line by line first and refuses it with one
line per slip (file, line number, the text, what to write instead); what passes is parsed by the
builtin plugin unchanged. ansible.cfg enables it in place of ``ini`` and makes an unparsed
inventory fatal (``unparsed_is_failed``), so no broken inventory reaches a play.
"""
from __future__ import annotations

DOCUMENTATION = r"""
name: fleet_ini
short_description: Ansible's INI inventory with parse slips reported as errors naming the line
description:
  - Parses INI inventories with the builtin C(ini) plugin after checking every line for slips the
    builtin plugin accepts silently or reports without a line number.
  - >-
    Refused - malformed section headers, unknown section types, group names with characters other
    than letters, digits and C(_), YAML-style C(key: value) lines, a C(key=value) line under a hosts
    section, values that swallowed an inline comment, a host given conflicting values for the same
    variable on two lines, a host and a group of the same name.
"""

import ast
import difflib
import re
import shlex

from ansible.errors import AnsibleParserError
from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.inventory.ini import InventoryModule as IniInventoryModule

SECTION_RE = re.compile(r"^\[([^:\]\s]+)(?::(\w+))?\]\s*(?:[#;].*)?$")
GROUP_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
VAR_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
COMMENT_MARKERS = ("#", ";")


def _is_literal(text: str) -> bool:
    try:
        ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False
    return True


def _swallowed_comment(value: str) -> bool:
    """`eth1  # fabric` in a vars section is the string 'eth1  # fabric' (Ansible strips a
    comment only where the value is a Python literal, e.g. `8080 # api`)."""
    value = value.strip()
    if not re.search(r"\s[#;]", value) or _is_literal(value):
        return False
    return not (value[:1] in "'\"" and value[-1:] == value[:1])


def find_slips(lines: list[str]) -> list[tuple[int, str, str]]:
    """Every slip of an INI inventory: [(line number, line text, what is wrong and what to write)]."""
    slips: list[tuple[int, str, str]] = []
    state, group = "hosts", "ungrouped"
    host_values: dict[tuple[str, str], tuple[int, str]] = {}
    hosts: dict[str, int] = {}
    groups: dict[str, int] = {}
    children: list[tuple[int, str, str]] = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith(COMMENT_MARKERS):
            continue
        if line.startswith("["):
            match = SECTION_RE.match(line)
            if not match:
                slips.append((number, line, "not a section header: write [group], [group:vars] or [group:children]"))
                state = "broken"
                continue
            group, kind = match.group(1), match.group(2) or "hosts"
            if kind not in ("hosts", "vars", "children"):
                slips.append((number, line, f"unknown section type {kind!r}: use [{group}:vars] or [{group}:children]"))
                state = "broken"
                continue
            if not GROUP_NAME_RE.match(group):
                safe = re.sub(r"[^A-Za-z0-9_]", "_", group)
                slips.append((number, line, f"group name {group!r} has characters Ansible does not allow in group "
                                            f"names (letters, digits and _ only): did you mean [{safe}]?"))
            groups.setdefault(group, number)
            state = kind
            continue
        if line in ("---", "...") or re.match(r"^(all|hosts|children|vars)\s*:\s*$", line):
            slips.append((number, line, "YAML in an INI inventory: name the file .yml, or write it in INI form"))
            continue
        if state == "broken":
            continue  # under a header already reported
        if state == "vars":
            if "=" not in line:
                if re.match(r"^[A-Za-z_][A-Za-z0-9_]*\s*:", line):
                    slips.append((number, line, "YAML-style 'key: value' in an INI inventory: write key=value"))
                else:
                    slips.append((number, line, f"expected key=value in [{group}:vars]"))
                continue
            key, value = (part.strip() for part in line.split("=", 1))
            if not VAR_NAME_RE.match(key):
                slips.append((number, line, f"{key!r} is not a variable name"))
            elif _swallowed_comment(value):
                slips.append((number, line, f"the value of {key} would include the comment ({value!r}): "
                                            "put comments on their own line"))
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as exc:  # unbalanced quotes
            slips.append((number, line, f"unbalanced quotes ({exc})"))
            continue
        if not tokens:
            continue
        if state == "children":
            if len(tokens) > 1 or "=" in tokens[0] or not GROUP_NAME_RE.match(tokens[0]):
                slips.append((number, line, f"[{group}:children] lists group names, one per line"))
            else:
                children.append((number, line, tokens[0]))
            continue
        name = tokens[0]
        if "=" in name:
            slips.append((number, line, f"a variable under [{group}], which lists hosts: variables of the group "
                                        f"go under [{group}:vars]"))
            continue
        if name.endswith(":") and not re.search(r":\d+$", name):
            slips.append((number, line, "YAML-style 'name:' in an INI inventory: hosts are listed one per line, "
                                        "name then key=value pairs"))
            continue
        hosts.setdefault(name, number)
        for token in tokens[1:]:
            if "=" not in token:
                hint = ("YAML-style 'key: value': write key=value" if token.endswith(":") or ":" in token
                        else "expected key=value after the host name (quote values with spaces)")
                slips.append((number, line, f"{token!r}: {hint}"))
                break
            key, value = token.split("=", 1)
            if not VAR_NAME_RE.match(key):
                slips.append((number, line, f"{key!r} is not a variable name"))
                break
            seen = host_values.get((name, key))
            if seen and seen[1] != value:
                slips.append((number, line, f"host {name}: {key}={value} here but {key}={seen[1]} on line {seen[0]}; "
                                            "a host has one value per variable (set it on one line)"))
            host_values.setdefault((name, key), (number, value))
    for number, line, child in children:
        if child not in groups:
            close = difflib.get_close_matches(child, list(groups), n=1, cutoff=0.75)
            slips.append((number, line, f"group {child!r} has no [{child}] section in this file"
                                        + (f" (is [{close[0]}] a typo of it?)" if close else "")))
    for name in sorted(set(hosts) & set(groups)):
        slips.append((hosts[name], name, f"{name!r} is both a host and a group; rename one"))
    return slips


def format_slips(path: str, slips: list[tuple[int, str, str]]) -> str:
    lines = [f"{len(slips)} problem(s) in inventory {path}; nothing was changed on any host:"]
    lines += [f"  {path}:{number}: {text!r}: {why}" for number, text, why in slips]
    return "\n".join(lines)


class InventoryModule(IniInventoryModule):
    NAME = "fleet_ini"

    def parse(self, inventory, loader, path, cache=True):
        if loader:
            b_data, _private = loader._get_file_contents(path)  # what the builtin plugin reads
        else:
            with open(path, "rb") as handle:
                b_data = handle.read()
        lines = to_text(b_data, errors="surrogate_then_replace").splitlines()
        slips = find_slips(lines)
        if slips:
            raise AnsibleParserError(format_slips(path, slips))
        self._fleet_failed_line = None
        try:
            super().parse(inventory, loader, path, cache)
        except AnsibleParserError as exc:
            number = self._fleet_failed_line
            text = lines[number - 1].strip() if number and number <= len(lines) else ""
            cause = exc.__cause__
            # ini's own messages are plain sentences; anything else is Python's, which says nothing
            # to someone editing an inventory.
            reason = str(cause) if cause is not None and (
                type(cause).__module__.startswith("ansible") or str(cause).startswith("Section [")) \
                else "cannot be parsed as a host, a [section] header or key=value"
            raise AnsibleParserError(format_slips(path, [(number or 0, text, reason)])) from None

    def _parse(self, lines):
        try:
            super()._parse(lines)
        except Exception:
            self._fleet_failed_line = self._origin.line_num if self._origin else None
            raise
