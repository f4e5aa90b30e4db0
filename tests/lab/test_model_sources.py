"""Lab test of the model stage from each remote source, through the role, to every serving node
(issue 16), with real servers on the lab's management gateway (tests/model_servers.py):

- a Hugging Face mirror (olah behind nginx's token check), addressed by HF_ENDPOINT in the
  controller's environment, the token from an ansible-vault encrypted variable;
- S3 (moto with IAM authentication), keys from vault; a prefix without hashes taken on trust on
  first use and checked against that record afterwards;
- an HTTP tree (nginx), whose download is cut on the seed and resumed by the next run;
- a directory on the seed (node:), with no server at all (make test-day2).

Each source is fetched once (the source's bytes counted by nftables: about one model, not one per
node) onto the seed and pulled node to node over the fabric, every node checked against the
source's own hashes. No secret appears in the output. The model is a few MB at a path of its own
(the served model is not touched); the real-size figures are benchmarks/model_distribution.py's.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.lab.conftest import INVENTORY, LAB_DIR, REPO, PlaybookRun
from tests.model_servers import (TOKEN, Egress, fetch_wheels, sha, start_hub, start_nginx, start_s3, stop,
                                 write_tree)

pytestmark = pytest.mark.lab

PATH = "/var/lib/vllm-fleet/models/labsources"
STATE = "/var/lib/vllm-fleet/model-state"
KEY = hashlib.sha1(PATH.encode()).hexdigest()[:12]
SHARD = "model-00001-of-00002.safetensors"
FILES = {"config.json": b'{"num_hidden_layers": 2}\n', SHARD: os.urandom(6 << 20),
         "model-00002-of-00002.safetensors": os.urandom(3 << 20)}
SIZE = sum(len(d) for d in FILES.values())
VAULT_PASSWORD = "lab-vault-password"
LOGS = REPO / "build" / "lab-model-sources"


def on(lab, host, cmd, check=True, timeout=120):
    return lab["hosts"][host].run(f"sudo sh -c '{cmd}'", check=check, timeout=timeout).stdout.strip()


def flat(run) -> str:
    return " ".join(run.output.split())


def wipe(lab) -> None:
    """This module's model and its records only (the fetch venv on the seed is kept)."""
    for h in lab["serving"]:
        on(lab, h, f"rm -rf {PATH} {STATE}/{KEY}.* {STATE}/work-{KEY}")


def vaulted(tmp: Path, **secrets: str) -> list[str]:
    """ansible-vault encrypted variables in a vars file, and the arguments that read it."""
    pw = tmp / "vault-pass"
    pw.write_text(VAULT_PASSWORD)
    pw.chmod(0o600)
    lines = []
    for name, value in secrets.items():
        out = subprocess.run(["ansible-vault", "encrypt_string", "--vault-password-file", str(pw),
                              "--stdin-name", name], input=value, capture_output=True, text=True, check=True,
                             cwd=REPO, timeout=120).stdout
        lines.append(out)
    (tmp / "secrets.yml").write_text("\n".join(lines))
    return ["-e", f"@{tmp / 'secrets.yml'}", "--vault-password-file", str(pw)]


def model_stage(tmp: Path, extra: dict, *args: str, env: dict | None = None, kill_when=None) -> PlaybookRun:
    (tmp / "vars.json").write_text(json.dumps({"fleet_model_path": PATH, "model_check_layers": False, **extra}))
    argv = ["ansible-playbook", "-i", str(INVENTORY), str(REPO / "deploy.yml"), "--tags", "model",
            "-e", f"@{tmp / 'vars.json'}", *args]
    with subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, **(env or {}))) as proc:
        if kill_when:
            threading.Thread(target=kill_when, daemon=True).start()
        try:
            out, _ = proc.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    LOGS.mkdir(parents=True, exist_ok=True)
    (LOGS / f"{time.strftime('%H%M%S')}-rc{proc.returncode}.log").write_text(out)  # every run's whole output
    return PlaybookRun(proc.returncode, out)


@pytest.fixture(scope="module")
def sources(lab, tmp_path_factory):
    """The tree, nginx (tree, slow tree, token proxy), olah and moto on the management gateway."""
    gateway = lab["hosts"][lab["serving"][0]].address.rsplit(".", 1)[0] + ".1"
    work = tmp_path_factory.mktemp("sources")
    # world-readable to its root (nginx's workers are not root; pytest's directories are 0700)
    tree = write_tree(Path(tempfile.mkdtemp(prefix="fleet-labsources-")), FILES)
    procs, egress = [], None
    try:
        nginx, ports = start_nginx(work, gateway, tree, slow_rate="512k")
        procs.append(nginx)
        hub, revision, _ = start_hub(work / "hub", gateway, ports["olah"], FILES)
        procs.append(hub)
        s3, s3info = start_s3(work, gateway, tree, {"tiny": True, "nohashes": False})
        procs.append(s3)
        egress = Egress(gateway.rsplit(".", 1)[0] + ".0/24", {**ports, "s3": s3info["port"]}, "fleetmodel_labtest")
        wipe(lab)
        yield dict(lab, gateway=gateway, ports=ports, revision=revision, s3=s3info, egress=egress, tree=tree,
                   wheels=str(fetch_wheels(LAB_DIR / "model-wheels")), seed=lab["groups"]["fleet_head"][0])
    finally:
        for proc in procs:
            stop(proc)
        if egress:
            egress.remove()
        shutil.rmtree(tree, ignore_errors=True)
        wipe(lab)


def manifest_on(lab, host) -> dict[str, str]:
    text = on(lab, host, f"cat {PATH}/MANIFEST.sha256")
    return {name: digest for digest, name in (line.split(None, 1) for line in text.splitlines())}


def assert_arrived_once(src, run: PlaybookRun, label: str, source_port: str) -> None:
    """Fetched once on the seed, pulled by every other node over the fabric, the source's hashes on
    every node, the source's bytes about one model."""
    assert run.rc == 0, run.output[-5000:]
    seed = src["seed"]
    assert re.search(rf"\[{seed}\] {re.escape(label)}: done in \d+ s", run.output), run.output[-3000:]
    pulls = re.findall(r"\[(\S+)\] pulling from \S+ \(\S+\) over the fabric: done in", run.output)
    assert sorted(pulls) == sorted(h for h in src["serving"] if h != seed), pulls
    want = {name: sha(data) for name, data in FILES.items()}
    for h in src["serving"]:
        assert manifest_on(src, h) == want, h
        on(src, h, f"cd {PATH} && sha256sum --check --strict --quiet MANIFEST.sha256")
    sent = src["egress"].read()[f"source_{source_port}"]
    assert SIZE <= sent < 1.5 * SIZE, f"the source sent {sent} bytes for a {SIZE}-byte model to {len(pulls) + 1} nodes"


def test_hf_mirror_by_hf_endpoint_with_a_vaulted_token(sources, tmp_path):
    src = sources
    wipe(src)
    src["egress"].reset()
    endpoint = f"http://{src['gateway']}:{src['ports']['hf']}"
    source = f"hf://acme/tiny@{src['revision']}"
    extra = {"fleet_model_source": source, "model_fetch_wheelhouse": src["wheels"]}
    secret_args = vaulted(tmp_path, model_hf_token=TOKEN)
    run = model_stage(tmp_path, extra, *secret_args, env={"HF_ENDPOINT": endpoint})
    assert_arrived_once(src, run, f"downloading {source}", "hf")
    assert f"model {PATH} verified (Hugging Face acme/tiny@{src['revision']} on {endpoint}:" in flat(run), run.output[-3000:]
    assert TOKEN not in run.output
    # nothing changed: the Hub is asked for its hashes again, no byte moves, nothing changes
    src["egress"].reset()
    again = model_stage(tmp_path, extra, *secret_args, env={"HF_ENDPOINT": endpoint})
    assert again.rc == 0, again.output[-4000:]
    assert again.changed_total() == 0, again.recap()
    assert "downloading" not in again.output and "pulling from" not in again.output
    assert src["egress"].read()["source_hf"] < SIZE / 10


def test_wrong_vaulted_hf_token_is_named_before_a_byte_moves(sources, tmp_path):
    src = sources
    wipe(src)
    source = f"hf://acme/tiny@{src['revision']}"
    run = model_stage(tmp_path, {"fleet_model_source": source, "model_fetch_wheelhouse": src["wheels"],
                                 "model_hf_endpoint": f"http://{src['gateway']}:{src['ports']['hf']}"},
                      *vaulted(tmp_path, model_hf_token="hf_wrong_token"))
    assert run.rc != 0
    assert f"node {src['seed']}: fleet_model_source {source}:" in flat(run), run.output[-3000:]
    assert "token (model_hf_token) is missing or wrong" in flat(run), run.output[-3000:]
    for h in src["serving"]:
        assert on(src, h, f"find {PATH} -type f 2>/dev/null | wc -l") == "0", h


def test_s3_prefix_without_hashes_is_taken_on_trust_once_and_checked_after(sources, tmp_path):
    src = sources
    wipe(src)
    s3, seed = src["s3"], src["seed"]
    source = "s3://models/nohashes"
    extra = {"fleet_model_source": source, "model_s3_endpoint_url": s3["endpoint"], "model_s3_region": "us-east-1",
             "model_s3_addressing_style": "path", "model_fetch_wheelhouse": src["wheels"]}
    secret_args = vaulted(tmp_path, model_s3_access_key_id=s3["key"], model_s3_secret_access_key=s3["secret"])
    refused = model_stage(tmp_path, extra, *secret_args)
    assert refused.rc != 0
    assert f"node {seed}: fleet_model_source {source} gives no hashes" in flat(refused), refused.output[-3000:]
    assert "set model_trust_on_first_use=True" in flat(refused)
    src["egress"].reset()
    trusted = model_stage(tmp_path, dict(extra, model_trust_on_first_use=True), *secret_args)
    assert_arrived_once(src, trusted, f"downloading {source} (trust on first use)", "s3")
    # (the YAML callback doubles a single quote)
    assert re.search(rf"model {PATH}: trust on first use: {seed}''?s copy of {source} hashed at ", flat(trusted)), \
        trusted.output[-3000:]
    assert s3["secret"] not in trusted.output and s3["secret"] not in refused.output
    # Later runs, without the flag, check against that record: the bucket's config.json changed
    # since, and the seed, which lost its copy, is refused the new bytes; the others keep theirs.
    changed = b'{"num_hidden_layers": 4}\n'
    s3["client"].put_object(Bucket="models", Key="nohashes/config.json", Body=changed)
    try:
        on(src, seed, f"rm -f {PATH}/config.json")
        caught = model_stage(tmp_path, extra, *secret_args)
    finally:
        s3["client"].put_object(Bucket="models", Key="nohashes/config.json", Body=FILES["config.json"])
    assert caught.rc != 0
    assert (f"config.json: the source sent bytes that do not match its manifest: expected sha256 "
            f"{sha(FILES['config.json'])}, got sha256 {sha(changed)}") in flat(caught), caught.output[-3000:]
    assert on(src, seed, f"test -e {PATH}/config.json && echo yes || echo no") == "no"
    for h in src["serving"][1:]:
        assert on(src, h, f"sha256sum {PATH}/config.json").split()[0] == sha(FILES["config.json"]), h


def test_http_download_cut_on_the_seed_resumes_where_it_stopped(sources, tmp_path):
    src = sources
    wipe(src)
    seed = src["seed"]
    source = f"http://{src['gateway']}:{src['ports']['slow']}/"
    partial = f"{PATH}/.fleet-partial/fetch/{SHARD}"
    cut_at = {}

    def cut() -> None:
        """SIGTERM to the seed's download once 1 MiB of the big shard has arrived (512 KiB/s)."""
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            got = on(src, seed, f"stat -c %s {partial} 2>/dev/null || echo 0", check=False)
            if got.isdigit() and int(got) >= 1 << 20:
                on(src, seed, "pkill -TERM -f \"fleet_model[.]py fetch\"", check=False)  # [.]: not this shell
                cut_at["bytes"] = int(got)
                return
            time.sleep(0.5)

    src["egress"].reset()
    first = model_stage(tmp_path, {"fleet_model_source": source}, kill_when=cut)
    assert cut_at, "the download was never seen under way"
    assert first.rc != 0, first.output[-3000:]
    assert f"node {seed}: downloading {source}: stopped by SIGTERM; what arrived is kept in .fleet-partial" \
        in flat(first), first.output[-3000:]
    kept = int(on(src, seed, f"stat -c %s {partial}"))
    assert kept >= cut_at["bytes"]
    src["egress"].reset()
    second = model_stage(tmp_path, {"fleet_model_source": source})
    assert second.rc == 0, second.output[-4000:]
    said = re.search(rf"\[{seed}\] downloading {re.escape(source)}: done in \d+ s \(\d+ file\(s\), ([\d,]+) bytes "
                     r"downloaded, ([\d,]+) resumed from an interrupted run\)", second.output)
    assert said, second.output[-3000:]
    assert int(said[2].replace(",", "")) >= kept
    # the shard's first `kept` bytes were not asked for again (a Range request)
    assert src["egress"].read()["source_slow"] < SIZE - kept + (256 << 10)
    want = {name: sha(data) for name, data in FILES.items()}
    for h in src["serving"]:
        assert manifest_on(src, h) == want, h


@pytest.mark.day2
def test_http_tree_and_node_directory_reach_every_node(sources, tmp_path):
    src = sources
    wipe(src)
    source = f"http://{src['gateway']}:{src['ports']['http']}/"
    src["egress"].reset()
    assert_arrived_once(src, model_stage(tmp_path, {"fleet_model_source": source}), f"downloading {source}", "http")
    wipe(src)
    container = f"{os.environ.get('FLEETLAB_PREFIX', 'fleetlab')}-{src['seed']}"
    subprocess.run(["docker", "exec", container, "mkdir", "-p", "/srv/labsources"], check=True, timeout=120)
    subprocess.run(["docker", "cp", f"{src['tree']}/.", f"{container}:/srv/labsources"], check=True, timeout=600)
    try:
        run = model_stage(tmp_path, {"fleet_model_source": "node:/srv/labsources"})
    finally:
        on(src, src["seed"], "rm -rf /srv/labsources")
    assert run.rc == 0, run.output[-4000:]
    assert f"model {PATH} verified (MANIFEST.sha256 in /srv/labsources)" in flat(run), run.output[-3000:]
    for h in src["serving"]:
        assert manifest_on(src, h) == {n: sha(d) for n, d in FILES.items()}, h
