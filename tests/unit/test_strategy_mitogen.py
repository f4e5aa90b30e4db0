"""The opt-in Mitogen strategy (ansible/plugins/strategy/mitogen_linear.py, `mitogen` pinned in
pyproject.toml) loads with this ansible-core and runs our own modules.

One playbook on this machine (connection local: Mitogen starts a real child interpreter for it),
run under Ansible's linear strategy and under mitogen_linear: the same merge result with our
`fleet_json_merge` module and a re-run that changes nothing, and the task's parent process tells
the two apart (a fresh module Python per task, or Mitogen's persistent interpreter).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PLAYBOOK = """
- name: One module of ours and the process that ran it
  hosts: here
  gather_facts: false
  tasks:
    - name: Merge keys with our module
      fleet_json_merge:
        path: "{{ out }}"
        content: {log-opts: {max-size: 50m}, live-restore: true}
    - name: The process that runs this task's module
      ansible.builtin.shell: ps -o args= -p $PPID
      register: parent
      changed_when: false
    - name: Show it
      ansible.builtin.debug:
        msg: "parent={{ parent.stdout }}"
"""


def run(tmp: Path, strategy: str) -> subprocess.CompletedProcess:
    (tmp / "inventory.ini").write_text(
        f"[here]\nlocalhost ansible_connection=local ansible_python_interpreter={sys.executable}\n")
    (tmp / "play.yml").write_text(PLAYBOOK)
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_STRATEGY=strategy,
               ANSIBLE_LOCALHOST_WARNING="0")
    return subprocess.run(["ansible-playbook", "-i", str(tmp / "inventory.ini"), str(tmp / "play.yml"),
                           "-e", f"out={tmp / 'daemon.json'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("strategy", ["linear", "mitogen_linear"])
def test_strategy_runs_our_module_and_a_rerun_changes_nothing(tmp_path, strategy):
    first = run(tmp_path, strategy)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    assert "changed=1" in first.stdout, first.stdout[-2000:]
    assert json.loads((tmp_path / "daemon.json").read_text()) == {"log-opts": {"max-size": "50m"},
                                                                  "live-restore": True}
    parent = next(line for line in first.stdout.splitlines() if "parent=" in line)
    # Mitogen's interpreter names itself "python(mitogen:<user>@<host>:<pid>)"; linear's module
    # Python runs the AnsiballZ file it was sent.
    if strategy == "mitogen_linear":
        assert "(mitogen:" in parent, parent
    else:
        assert "AnsiballZ_" in parent and "mitogen" not in parent, parent
    second = run(tmp_path, strategy)
    assert second.returncode == 0 and "changed=0" in second.stdout, second.stdout[-2000:]
