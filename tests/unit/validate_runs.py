"""Runs of the real validate playbook on test inventories, a few at a time.

deploy.yml imports ansible/playbooks/00_validate.yml as its first playbook (checked in
test_validate_inventory.py); that playbook is the validation play followed by the SSH pre-flight
play, so a run of it alone shows whether a bad inventory was refused before any host was contacted,
at a third of the cost of parsing all of deploy.yml (~1 s instead of ~3 s per case on 2 cores).
"""
from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping

REPO = Path(__file__).resolve().parents[2]
VALIDATE = REPO / "ansible" / "playbooks" / "00_validate.yml"
DEPLOY = REPO / "deploy.yml"


def run_playbook(playbook: Path, inventory_text: str, workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    inventory = workdir / "inventory.ini"
    inventory.write_text(inventory_text)
    return subprocess.run(["ansible-playbook", "-i", str(inventory), str(playbook), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def selected_cases(request, param: str) -> set[str]:
    """Ids of the cases of parameter `param` that this pytest session will run."""
    return {item.callspec.params[param][0] for item in request.session.items
            if getattr(item, "callspec", None) and param in item.callspec.params}


def run_all(inventories: Mapping[str, str], tmp: Path, workers: int = 3) -> dict[str, subprocess.CompletedProcess]:
    """The validate playbook on each {case id: inventory text}, `workers` processes at a time."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {case: pool.submit(run_playbook, VALIDATE, text, tmp / case) for case, text in inventories.items()}
        return {case: future.result() for case, future in futures.items()}
