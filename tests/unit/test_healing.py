"""The healer's decision rule (ansible/plugins/filter/fleet_healing.py) on values."""

import sys
from pathlib import Path

import pytest
from ansible.errors import AnsibleFilterError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ansible/plugins/filter"))
from fleet_healing import fleet_heal_decision, fleet_heal_log_text  # noqa: E402

HUNG = {"state": "unhealthy", "problems": [{"reason": "member_stopped",
                                            "detail": "node2: process 7 is stopped"}]}


@pytest.mark.parametrize("state", ["healthy", "starting", "maintenance", "unknown"])
def test_a_replica_that_is_not_unhealthy_is_never_relaunched(state):
    d = fleet_heal_decision({"state": state, "problems": []}, [], "a", 1000, 2)
    assert d["action"] == "skip" and state in d["why"]


def test_a_hung_replica_is_healed_with_its_reason():
    d = fleet_heal_decision(HUNG, [], "a", 1000, 2)
    assert d == {"action": "heal", "why": "node2: process 7 is stopped", "scope": "replica", "fabric_check": True}


def _verdict(*problems):
    return {"state": "unhealthy", "problems": [
        {k: v for k, v in zip(("reason", "cause", "process"), p) if v} | {"detail": "x"}
        for p in problems]}


CPU = ["engine", "ray"]  # what the healer allows where vLLM runs outside Ray (the cpu engine)


@pytest.mark.parametrize("problems", [
    [("member_stopped",)], [("member_frozen",)], [("member_exited",)], [("heartbeat_stale",)],
    [("collective_stuck",)], [("api_down",), ("canary_failing",)],
    [("member_host_unhealthy", "member_frozen"), ("collective_stuck",), ("api_down",)],
])
def test_the_engines_own_failures_relaunch_only_the_engine_where_allowed(problems):
    assert fleet_heal_decision(_verdict(*problems), [], "a", 1000, 2, CPU)["scope"] == "engine"
    assert fleet_heal_decision(_verdict(*problems), [], "a", 1000, 2, ["engine"])["scope"] == "engine"
    # a CUDA engine (its workers live in Ray) is never allowed it: the caller passes []
    assert fleet_heal_decision(_verdict(*problems), [], "a", 1000, 2, [])["scope"] == "replica"
    assert fleet_heal_decision(_verdict(*problems), [], "a", 1000, 2, ["ray"])["scope"] == "replica"


@pytest.mark.parametrize("problems", [
    [("ray_nodes_missing",)],
    [("process_missing", None, "raylet")],
    # kill-ray-node as the head reports it: the member's missing raylet, then Ray's own count
    [("member_host_unhealthy", "process_missing", "raylet"), ("ray_nodes_missing",)],
])
def test_a_ray_nodes_own_failures_relaunch_only_the_ray_nodes_where_allowed(problems):
    assert fleet_heal_decision(_verdict(*problems), [], "a", 1000, 2, CPU)["scope"] == "ray"
    assert fleet_heal_decision(_verdict(*problems), [], "a", 1000, 2, [])["scope"] == "replica"
    assert fleet_heal_decision(_verdict(*problems), [], "a", 1000, 2, ["engine"])["scope"] == "replica"


def test_partial_scopes_must_be_a_list():
    with pytest.raises(AnsibleFilterError, match="must be a list"):
        fleet_heal_decision(HUNG, [], "a", 1000, 2, "engine")


@pytest.mark.parametrize("problems", [
    [("process_missing",)],  # a missing class not named (an older exporter)
    [("process_missing", None, "engine")],  # the API server: not Ray's, and not a member's state
    [("fabric_link_down",)],
    [("member_host_unreachable",)], [("start_timeout",)], [("no_launch",)],
    [("member_launch_mismatch",)],
    [("member_stopped",), ("ray_nodes_missing",)],  # both parts
    [("member_host_unhealthy", "member_frozen"), ("member_host_unhealthy", "process_missing", "raylet")],
    [("member_host_unhealthy", "process_missing")],
    [("member_host_unhealthy",)],  # a member's problem without its cause (an older exporter)
    [],
])
def test_anything_else_relaunches_the_whole_replica(problems):
    assert fleet_heal_decision(_verdict(*problems), [], "a", 1000, 2, CPU)["scope"] == "replica"


def test_a_silent_head_relaunches_the_whole_replica():
    assert fleet_heal_decision(None, [], "a", 1000, 2, CPU)["scope"] == "replica"


def test_a_head_that_does_not_answer_is_healed():
    assert fleet_heal_decision(None, [], "a", 1000, 2)["action"] == "heal"


def test_rate_limit_counts_this_replicas_heals_of_the_last_hour_only():
    records = [{"ts": 100, "replica": "a", "result": "started"},      # older than an hour
               {"ts": 9000, "replica": "a", "result": "started"},
               {"ts": 9100, "replica": "a", "result": "healed"},
               {"ts": 9200, "replica": "b", "result": "started"},
               {"ts": 9300, "replica": "a", "result": "skipped"}]
    assert fleet_heal_decision(HUNG, records, "a", 10000, 2)["action"] == "heal"
    records.append({"ts": 9500, "replica": "a", "result": "started"})
    d = fleet_heal_decision(HUNG, records, "a", 10000, 2)
    assert d["action"] == "refuse" and "2 times" in d["why"] and "process 7" in d["why"]
    assert fleet_heal_decision(HUNG, records, "b", 10000, 2)["action"] == "heal"


VALIDATE_LIKE_HEAL = """
- name: The validate task as heal.yml and the healer's rolling restart run it
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Validate
      fleet_validate_inventory:
        roles_path: "{{ playbook_dir }}/roles"
        controller_paths: "{{ controller_paths }}"
"""


@pytest.mark.parametrize("controller_paths", [True, False])
def test_heals_validate_without_the_controllers_files(tmp_path, controller_paths):
    """The healer host is not the controller: a controller directory named as the model source
    (checked there by deploy.yml) must not refuse a heal, yet deploy.yml's own check refuses it."""
    import subprocess
    repo = Path(__file__).resolve().parents[2]
    missing = tmp_path / "not-on-this-host" / "model"
    inventory = tmp_path / "inventory.ini"
    inventory.write_text(f"""[fleet_head]
gpu-a ansible_host=192.0.2.10 fleet_replica=a

[fleet_serving:children]
fleet_head

[fleet_monitoring]
mon ansible_host=192.0.2.20

[all:vars]
fleet_engine=cpu
fleet_gpu_less=True
fleet_model_path=/var/lib/models/tiny
fleet_served_model_name=tiny
fleet_model_source={missing}
model_trust_on_first_use=True
""")
    playbook = repo / f".heal-validate-{tmp_path.name}.yml"  # beside roles/ (playbook_dir)
    playbook.write_text(VALIDATE_LIKE_HEAL)
    try:
        proc = subprocess.run(["ansible-playbook", "-i", str(inventory), str(playbook),
                               "-e", f"controller_paths={controller_paths}"],
                              cwd=repo, capture_output=True, text=True, timeout=300)
    finally:
        playbook.unlink()
    if controller_paths:
        assert proc.returncode != 0 and f"fleet_model_source='{missing}'" in proc.stdout, proc.stdout[-3000:]
        assert "does not exist on the controller" in proc.stdout
    else:
        assert proc.returncode == 0, proc.stdout[-3000:]


RECORD_TWICE = """
- name: The healer's record task, twice (started, then healed)
  hosts: localhost
  gather_facts: false
  vars:
    healer_record_host: localhost
    healer_replica: b
    healer_alert: "member_stopped "
  tasks:
    - name: Record
      ansible.builtin.include_tasks: "{{ playbook_dir }}/roles/healer/tasks/record.yml"
      vars:
        healer_result: "{{ item }}"
        healer_why: "node4: worker 43 is stopped; a 'quoted' word"
      loop: [started, healed]
"""


def test_every_heal_step_is_one_json_line_that_the_decision_reads(tmp_path):
    """record.yml appends one JSON line per step to actions.jsonl (what the rate limit, the
    exporter's heal counters and the heal alerts read)."""
    import json
    import subprocess
    repo = Path(__file__).resolve().parents[2]
    actions = tmp_path / "actions.jsonl"
    playbook = repo / f".heal-record-{tmp_path.name}.yml"
    playbook.write_text(RECORD_TWICE)
    try:
        proc = subprocess.run(["ansible-playbook", "-i", "localhost,", "-c", "local", str(playbook),
                               "-e", f"healer_actions_file={actions}", "-e", f"ansible_python_interpreter={sys.executable}",
                               "-e", "ansible_become=false"],
                              cwd=repo, capture_output=True, text=True, timeout=300)
    finally:
        playbook.unlink()
    assert proc.returncode == 0, proc.stdout[-3000:]
    records = [json.loads(line) for line in actions.read_text().splitlines()]
    assert [r["result"] for r in records] == ["started", "healed"]
    assert all(isinstance(r["ts"], float) and r["replica"] == "b" for r in records)
    assert records[0]["why"] == "node4: worker 43 is stopped; a 'quoted' word"
    assert fleet_heal_decision(HUNG, records, "b", records[-1]["ts"] + 1, 1)["action"] == "refuse"


MAINTENANCE = """
- name: The serve role's maintenance marker, written then removed
  hosts: localhost
  gather_facts: false
  vars:
    fleet_deployment: labx
  tasks:
    - name: Write
      ansible.builtin.include_tasks: "{{ playbook_dir }}/roles/vllm_serve/tasks/maintenance.yml"
      vars:
        _vllm_serve_maintenance: "{{ write }}"
        _vllm_serve_maintenance_ttl: 600
        _vllm_serve_maintenance_reason: "rolling restart: test"
"""


def test_maintenance_marker_holds_until_and_reason_and_goes(tmp_path):
    """roles/vllm_serve/tasks/maintenance.yml (deploy relaunches and rolling restarts): the marker
    the verdict reads is JSON with until and reason; removing it leaves nothing."""
    import json
    import subprocess
    import time
    repo = Path(__file__).resolve().parents[2]
    marker = tmp_path / "maintenance-labx.json"
    playbook = repo / f".maintenance-{tmp_path.name}.yml"
    playbook.write_text(MAINTENANCE)

    def run(write: bool):
        return subprocess.run(["ansible-playbook", "-i", "localhost,", "-c", "local", str(playbook),
                               "-e", f"_f={marker}", "-e", f"write={write}",
                               "-e", f"ansible_python_interpreter={sys.executable}"],
                              cwd=repo, capture_output=True, text=True, timeout=300)
    try:
        t0 = time.time()
        wrote = run(True)
        assert wrote.returncode == 0, wrote.stdout[-3000:]
        doc = json.loads(marker.read_text())
        assert doc["reason"] == "rolling restart: test" and t0 + 590 < doc["until"] < time.time() + 610
        removed = run(False)
        assert removed.returncode == 0, removed.stdout[-3000:]
        assert not marker.exists()
    finally:
        playbook.unlink()


PACK = Path(__file__).resolve().parents[2] / "roles/healer/files/pack_inventory.sh"


def _pack(tmp_path, secrets, *sources):
    import subprocess
    import tarfile
    out = tmp_path / "inventory.tar"
    subprocess.run([str(PACK), str(out), str(secrets), *map(str, sources)], check=True, capture_output=True, text=True)
    with tarfile.open(out) as t:
        return sorted(m.name for m in t.getmembers())


def _inventory_dir(root):
    (root / "group_vars").mkdir(parents=True)
    (root / "hosts.ini").write_text("[fleet_head]\nnode1\n")
    (root / "group_vars" / "all.yml").write_text("fleet_deployment: a\n")
    for dep in ("a", "b"):
        (root / "fleet-secrets" / dep).mkdir(parents=True)
        (root / "fleet-secrets" / dep / "engine-api-key").write_text("secret\n")
    (root / "fleet-secrets" / "tls-key.pem").write_text("key\n")
    return root


def test_healer_inventory_from_a_directory_leaves_the_secrets_directory_home(tmp_path):
    inv = _inventory_dir(tmp_path / "inv")
    names = _pack(tmp_path, inv / "fleet-secrets", inv)
    assert "./0/hosts.ini" in names and "./0/group_vars/all.yml" in names
    assert not [n for n in names if "fleet-secrets" in n or "engine-api-key" in n], names


def test_healer_inventory_from_a_file_takes_its_vars_dirs_and_no_secrets(tmp_path):
    inv = _inventory_dir(tmp_path / "inv")
    names = _pack(tmp_path, inv / "fleet-secrets", inv / "hosts.ini")
    assert {"./0/hosts.ini", "./0/group_vars/all.yml"} <= set(names)
    assert not [n for n in names if "fleet-secrets" in n], names


def test_healer_inventory_secrets_elsewhere_and_the_archive_is_reproducible(tmp_path):
    import subprocess
    inv = _inventory_dir(tmp_path / "inv")
    (inv / "fleet-secrets" / "a" / "engine-api-key").unlink()  # still a directory of its own
    first = _pack(tmp_path, tmp_path / "elsewhere", inv)
    assert "./0/fleet-secrets/tls-key.pem" in first  # not the secrets dir: an ordinary inventory file
    data = (tmp_path / "inventory.tar").read_bytes()
    (inv / "hosts.ini").touch()
    _pack(tmp_path, tmp_path / "elsewhere", inv)
    assert (tmp_path / "inventory.tar").read_bytes() == data
    r = subprocess.run([str(PACK), str(tmp_path / "x.tar"), str(inv), str(inv)], capture_output=True, text=True)
    assert r.returncode == 2 and "is the inventory directory" in r.stderr


def test_heal_log_is_plain_text():
    """What the healer's relaunch printed under ansible-rulebook (bytes seen on the lab): each line
    behind ansible-runner's event marker, plus colour; the log keeps the lines only."""
    raw = ("\x1b[KeyJ1dWlkIjogIjllMzIzOTRlIn0=\x1b[64D\x1b[K\nPLAY [Rolling restart - plan] ***\n"
           "\x1b[Ke30=\x1b[4D\x1b[K\x1b[0;31mfatal: [node4]: FAILED!\x1b[0m\n"
           "vllm_serve : Wait for the head's /health - 140.01s\n")
    assert fleet_heal_log_text(raw) == ("\nPLAY [Rolling restart - plan] ***\nfatal: [node4]: FAILED!\n"
                                        "vllm_serve : Wait for the head's /health - 140.01s\n")
    assert fleet_heal_log_text(None) == ""
    assert fleet_heal_log_text(["out\x1b[0m", "err"]) == "out\nerr"  # stdout, stderr


@pytest.mark.parametrize("problems,scopes,fabric_check", [
    ([("member_stopped",)], CPU, False),                      # a stopped process: no fabric in it
    ([("member_frozen",), ("api_down",)], CPU, False),
    ([("member_host_unhealthy", "heartbeat_stale")], CPU, False),
    ([("collective_stuck",)], CPU, True),                     # a link that still says up can do this
    ([("member_stopped",), ("collective_stuck",)], CPU, True),
    ([("member_host_unhealthy", "collective_stuck")], CPU, True),
    ([("member_stopped",)], [], True),                        # a whole-replica heal keeps the check
    ([("fabric_link_down",)], CPU, True),
    ([("ray_nodes_missing",)], CPU, True),
])
def test_an_engine_only_heal_skips_the_fabric_check_only_when_no_fabric_fault_explains_it(problems, scopes,
                                                                                          fabric_check):
    d = fleet_heal_decision(_verdict(*problems), [], "a", 1000, 2, scopes)
    assert d["action"] == "heal" and d["fabric_check"] is fabric_check, d
