"""Fixtures for lab tests: the running lab, SSH into its hosts, ansible-playbook runs.

The lab tier expects `python3 tests/lab/lab.py up` to have run (make test-lab does it); a lab test
that finds no lab fails instead of skipping, so a broken lab can never pass as green.
"""
from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import fleet_endpoint  # noqa: E402  (where clients connect: the front door, a head; key and CA files)
LAB_DIR = REPO / ".lab"
INVENTORY = LAB_DIR / "inventory.ini"
RECAP_RE = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


@dataclass
class PlaybookRun:
    rc: int
    output: str

    def recap(self) -> dict[str, dict[str, int]]:
        return {m[0]: {"ok": int(m[1]), "changed": int(m[2]), "unreachable": int(m[3]), "failed": int(m[4])}
                for m in RECAP_RE.findall(self.output)}

    def changed_total(self) -> int:
        return sum(h["changed"] for h in self.recap().values())


def run_playbook(playbook: str, *args: str, inventory: Path = INVENTORY, timeout: float = 3600) -> PlaybookRun:
    proc = subprocess.run(["ansible-playbook", "-i", str(inventory), str(REPO / playbook), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return PlaybookRun(proc.returncode, proc.stdout + proc.stderr)


@dataclass
class LabHost:
    name: str
    address: str

    def run(self, command: str, *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(["ssh", "-i", str(LAB_DIR / "id_ed25519"), "-o", "StrictHostKeyChecking=no",
                               "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                               "-o", "ConnectTimeout=5", "-o", "BatchMode=yes", f"fleet@{self.address}", command],
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{self.name}: `{command}` failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
        return proc


def read_inventory(path: Path = INVENTORY) -> tuple[dict[str, LabHost], dict[str, list[str]]]:
    parser = configparser.ConfigParser(allow_no_value=True, delimiters=("\n",), strict=False)
    parser.optionxform = str
    parser.read(path)
    hosts: dict[str, LabHost] = {}
    groups: dict[str, list[str]] = {}
    for section in parser.sections():
        if ":" in section:
            continue
        for line in parser[section]:
            name, *pairs = shlex.split(line)  # host vars may be quoted, with spaces
            kv = dict(p.split("=", 1) for p in pairs)
            if "ansible_host" in kv:
                hosts[name] = LabHost(name, kv["ansible_host"])
            groups.setdefault(section, []).append(name)
    return hosts, groups


def inventory_vars(path: Path = INVENTORY) -> dict:
    """`ansible-inventory --list` of the lab: groups and every host's variables, as Ansible sees them."""
    out = subprocess.run(["ansible-inventory", "-i", str(path), "--list"], cwd=REPO, capture_output=True,
                         text=True, check=True, timeout=120).stdout
    return json.loads(out)


@pytest.fixture(scope="session")
def lab():
    if not INVENTORY.exists():
        pytest.fail("no lab: run `python3 tests/lab/lab.py up` (make test-lab does)")
    hosts, groups = read_inventory()
    return {"hosts": hosts, "groups": groups, "inventory": INVENTORY, "inventory_vars": inventory_vars(),
            "serving": groups.get("fleet_head", []) + groups.get("fleet_workers", [])}


def head_api(lab: dict, head: str) -> dict:
    """A head's own API: {url (…/v1), key (the engine key; '' without API auth), model}. The lab's
    firewall lets the controller in (firewall_api_sources)."""
    h = fleet_endpoint.head(INVENTORY, lab["inventory_vars"], head)
    return dict(h, key=fleet_endpoint.read_key(h["key_file"]))


def first_replica(lab: dict) -> dict:
    """The first head, its replica's serving hosts (head first) and the deployment's name."""
    hostvars = lab["inventory_vars"]["_meta"]["hostvars"]
    head = lab["groups"]["fleet_head"][0]
    hv = hostvars[head]
    members = [h for h in lab["serving"] if hostvars[h].get("fleet_replica") == hv.get("fleet_replica")]
    return {"head": head, "members": members, "hostvars": hostvars,
            "deployment": hv.get("fleet_deployment", "vllm-fleet")}


def front_door(lab: dict, tenant: str = "") -> dict:
    """The balancer: {url (https://…/v1), ca_file (the lab CA), key_file and key of the tenant, model}."""
    door = fleet_endpoint.front_door(INVENTORY, lab["inventory_vars"], tenant)
    return dict(door, key=fleet_endpoint.read_key(door["key_file"]))


def am_silence(lab, matchers: dict[str, str], comment: str, minutes: int = 240) -> tuple[str, str]:
    """A real Alertmanager silence on the lab's monitoring host: (Alertmanager URL, silence id)."""
    import time
    import urllib.request
    hv = lab["inventory_vars"]["_meta"]["hostvars"]
    mon = lab["groups"]["fleet_monitoring"][0]
    url = f"http://{hv[mon]['ansible_host']}:{hv[mon].get('fleet_alertmanager_port', 9093)}"
    now = time.time()
    body = {"matchers": [{"name": k, "value": v, "isRegex": False, "isEqual": True} for k, v in matchers.items()],
            "startsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 60)),
            "endsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + minutes * 60)),
            "createdBy": "tests/lab", "comment": comment}
    req = urllib.request.Request(f"{url}/api/v2/silences", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return url, json.loads(r.read())["silenceID"]


def am_unsilence(url: str, silence_id: str) -> None:
    import urllib.request
    urllib.request.urlopen(urllib.request.Request(f"{url}/api/v2/silence/{silence_id}", method="DELETE"),
                           timeout=30).close()


def am_lift_test_silences(url: str, matchers: dict[str, str]) -> list[str]:
    """Expire every silence these tests made (createdBy tests/lab) with exactly these matchers,
    also ones an earlier, interrupted session left: Alertmanager restores silences from its last
    snapshot after a restart, so a silence lifted before the restart can come back. Returns the
    ids lifted."""
    import urllib.request
    with urllib.request.urlopen(f"{url}/api/v2/silences", timeout=30) as r:
        silences = json.loads(r.read())
    want = {(k, v) for k, v in matchers.items()}
    ours = [s["id"] for s in silences if s.get("createdBy") == "tests/lab" and s["status"]["state"] != "expired"
            and {(m["name"], m["value"]) for m in s["matchers"]} == want]
    for silence_id in ours:
        am_unsilence(url, silence_id)
    return ours


@pytest.fixture(scope="session")
def deployed_lab(lab):
    """deploy.yml run once on the lab for the whole session; later tests read the result.

    `make test` runs the cold deploy in the background while the other tiers run and hands its
    output over in FLEET_LAB_DEPLOY_LOG (only when it succeeded and the inventory did not change
    since); otherwise this runs deploy.yml itself."""
    log = os.environ.get("FLEET_LAB_DEPLOY_LOG")
    if log and Path(log).exists() and Path(log).stat().st_mtime >= INVENTORY.stat().st_mtime:
        first = PlaybookRun(0, Path(log).read_text())
    else:
        first = run_playbook("deploy.yml")
    assert first.rc == 0, first.output[-20000:]
    # Lab tests break replicas on purpose (bad settings, kill -9, cut links): the hung-replica page,
    # and with it the healer, is silenced in the lab's real Alertmanager meanwhile, as an operator
    # injecting faults would do; tests/lab/test_hang.py lifts it for the faults it wants healed.
    deployment = lab["inventory_vars"]["_meta"]["hostvars"][lab["groups"]["fleet_head"][0]].get(
        "fleet_deployment", "vllm-fleet")
    heal_page = {"alertname": "VllmFleetReplicaUnhealthy", "fleet_deployment": deployment}
    url, silence_id = am_silence(lab, heal_page, "lab tests break replicas on purpose")
    deployed = dict(lab, first_run=first, heal_silence=(url, silence_id), heal_page=heal_page, deployment=deployment)
    yield deployed
    try:  # the current silence (test_hang makes a new one after its own)
        am_unsilence(*deployed["heal_silence"])
    except OSError:
        pass


# The lab tier shares one deployed lab: read-only checks first (test_security switches the firewall
# off and on and tears down deployments of its own only), then tests that restart replicas,
# then the fault tests that kill, cut and restart things (each repairs what it broke).
# test_model runs after the re-run checks (test_provision, test_serve): its model stage runs for
# another model path rewrite the fan-out's keys, which the next full deploy.yml puts back (changed).
# test_registry (day2) leaves every node on the image it found, the registry stopped.
LAB_MODULE_ORDER = ["test_lab", "test_provision", "test_serve", "test_monitoring", "test_security", "test_model",
                    "test_model_sources", "test_registry", "test_verdict",
                    "test_rolling_restart", "test_hang", "test_faults", "test_teardown"]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = Path(str(item.fspath)).stem
        return LAB_MODULE_ORDER.index(name) if name in LAB_MODULE_ORDER else -1
    items.sort(key=rank)
