#!/usr/bin/env python3
"""Model distribution on the lab: every source, real servers, controller egress, resume, re-run.

    python benchmarks/model_distribution.py --out DIR [--size-gib 3] [--hosts node1,node2,node3,node4]
        [--sources controller,node,hf,s3,http] [--old] [--interrupt] [--keep]

Makes a random-weight model of --size-gib (1 GiB safetensors shards + config.json + its own
MANIFEST.sha256) under .lab/bench-model, serves it from real servers on the lab's management
gateway (hf: olah, a self-hosted Hub mirror from PyPI (.venv), serving a git-lfs repo made here; s3:
moto's server; http: nginx from Debian), and for each source runs `deploy.yml --tags model` on
--hosts with fleet_model_path=/var/lib/vllm-fleet/models/bench (the lab's own model is not
touched), then again with nothing changed. Counts what leaves this machine towards the lab's
management network with nftables counters in a table of its own (inet fleetmodel_bench, removed at
the end; `nft` from Debian's nftables): the controller's SSH (Ansible + the controller-directory push) and each source server. The
node-to-node fan-out runs on the fabric network and never crosses this machine's stack.

--old also runs the previous copy path (the model role of `main` at the commit named by
--old-ref, ansible.builtin.copy from the controller) for comparison; --interrupt kills the first
receiver's rsync (SIGTERM, by pid) mid-pull and shows the next run resuming from what arrived.
Every playbook log and a results.json go to --out. Figures are printed as a table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.lab.conftest import read_inventory  # noqa: E402  (the lab's own inventory reader)
from tests.model_servers import Egress, fetch_wheels, spawn, wait_port  # noqa: E402  (shared with the tests)
from tests.model_servers import stop as stop_server  # noqa: E402

LAB = Path(os.environ.get("FLEETLAB_DIR", REPO / ".lab"))
MODEL_PATH = "/var/lib/vllm-fleet/models/bench"
TABLE = "fleetmodel_bench"
PORTS = {"hf": 18090, "s3": 18091, "http": 18092}
GIB = 1 << 30
# moto's server here checks no keys; the role's validation wants real-looking ones (>= 8 characters)
S3_KEY, S3_SECRET = "benchkey", "benchsecret"


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def sh(cmd, check=True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{cmd}: {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


# --- the model ----------------------------------------------------------------------------------

def make_model(root: Path, size_gib: float) -> Path:
    """1 GiB safetensors shards of random bytes (one U8 tensor each), config.json, MANIFEST.sha256."""
    shards = max(1, round(size_gib))
    per = int(size_gib * GIB / shards)
    stamp = root / f".made-{shards}x{per}"
    if stamp.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    lines = []
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        header = json.dumps({"w": {"dtype": "U8", "shape": [per], "data_offsets": [0, per]}}).encode()
        header += b" " * (-len(header) % 8)
        sha = hashlib.sha256()
        with open(root / name, "wb") as fh:
            for chunk in (len(header).to_bytes(8, "little"), header):
                fh.write(chunk)
                sha.update(chunk)
            left = per
            while left:
                chunk = os.urandom(min(left, 1 << 24))
                fh.write(chunk)
                sha.update(chunk)
                left -= len(chunk)
        lines.append(f"{sha.hexdigest()}  {name}")
    config = json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}).encode()
    (root / "config.json").write_bytes(config)
    lines.append(f"{hashlib.sha256(config).hexdigest()}  config.json")
    (root / "MANIFEST.sha256").write_text("\n".join(sorted(lines, key=lambda x: x[66:])) + "\n")
    stamp.touch()
    return root


def model_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.iterdir() if p.is_file() and not p.name.startswith("."))


# --- the servers --------------------------------------------------------------------------------

class Servers:
    def __init__(self, model: Path, gateway: str, work: Path):
        self.model, self.gateway, self.work = model, gateway, work
        self.procs: list[subprocess.Popen] = []
        self.hf_revision = ""

    def stop(self) -> None:
        for proc in self.procs:
            stop_server(proc)
        self.procs.clear()

    def _spawn(self, argv, name, **kw) -> None:
        self.procs.append(spawn(argv, self.work / f"{name}.log", **kw))

    def _wait_port(self, port: int, timeout: float = 120) -> None:
        wait_port(self.gateway, port, self.procs[-1], timeout)

    def hf(self) -> str:
        repo = self.work / "hf" / "mirrors" / "models" / "bench" / "model"
        if not (repo / ".git").exists():
            shutil.rmtree(repo, ignore_errors=True)
            repo.mkdir(parents=True)
            git = ["git", "-C", str(repo), "-c", "user.email=bench@fleet", "-c", "user.name=bench"]
            sh(git + ["init", "-q"])
            sh(git + ["lfs", "install", "--local"])
            sh(git + ["lfs", "track", "*.safetensors"])
            for f in self.model.iterdir():
                if f.is_file() and not f.name.startswith(".") and f.name != "MANIFEST.sha256":
                    os.link(f, repo / f.name)
            sh(git + ["add", "-A"], timeout=1800)
            sh(git + ["commit", "-qm", "bench model"])
            for f in repo.glob("*.safetensors"):  # olah serves LFS content from .git/lfs/objects
                f.unlink()
        self.hf_revision = sh(["git", "-C", str(repo), "rev-parse", "HEAD"]).stdout.strip()
        conf = self.work / "olah.toml"
        conf.write_text(f'[basic]\nhost = "{self.gateway}"\nport = {PORTS["hf"]}\n'
                        f'mirrors-path = ["{self.work / "hf" / "mirrors"}"]\nrepos-path = "{self.work / "hf" / "cache"}"\n'
                        f'[accessibility]\noffline = true\n')
        self._spawn([str(Path(sys.executable).parent / "olah-cli"), "-c", str(conf)], "olah", cwd=self.work)
        self._wait_port(PORTS["hf"])
        return f"hf://bench/model@{self.hf_revision}"

    def s3(self) -> str:
        self._spawn([str(Path(sys.executable).parent / "moto_server"), "-H", self.gateway, "-p", str(PORTS["s3"])],
                    "moto")
        self._wait_port(PORTS["s3"])
        import boto3
        client = boto3.client("s3", endpoint_url=f"http://{self.gateway}:{PORTS['s3']}", region_name="us-east-1",
                              aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET)
        client.create_bucket(Bucket="models")
        for f in self.model.iterdir():
            if f.is_file() and not f.name.startswith("."):
                client.upload_file(str(f), "models", f"bench/{f.name}")
        return "s3://models/bench"

    def http(self) -> str:
        conf = self.work / "nginx.conf"
        conf.write_text(f"""daemon off; worker_processes 1; pid {self.work}/nginx.pid; error_log {self.work}/nginx-error.log;
events {{ worker_connections 64; }}
http {{ access_log {self.work}/nginx-access.log; sendfile on;
  server {{ listen {self.gateway}:{PORTS['http']}; root {self.model}; autoindex off; }} }}
""")
        self._spawn(["nginx", "-c", str(conf), "-p", str(self.work)], "nginx")
        self._wait_port(PORTS["http"])
        return f"http://{self.gateway}:{PORTS['http']}/"


# --- runs ---------------------------------------------------------------------------------------

def node(hosts, name, cmd, check=True, timeout=600):
    return hosts[name].run(f"sudo sh -c {shlex_quote(cmd)}", check=check, timeout=timeout)


def shlex_quote(s: str) -> str:
    import shlex
    return shlex.quote(s)


def wipe(hosts, names) -> None:
    """The bench model and its state only (the lab's own model and tests keep theirs)."""
    key = hashlib.sha1(MODEL_PATH.encode()).hexdigest()[:12]
    state = "/var/lib/vllm-fleet/model-state"
    for n in names:
        node(hosts, n, f"rm -rf {MODEL_PATH} {state}/{key}.* {state}/work-{key} {state}/wheels /srv/bench-src")


def playbook(repo: Path, inventory: Path, extra: dict, limit: str, logfile: Path, kill_when=None) -> dict:
    extra_file = logfile.with_suffix(".vars.json")
    extra_file.write_text(json.dumps(extra))
    argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory), str(repo / "deploy.yml"),
            "--tags", "model", "--limit", limit, "-e", f"@{extra_file}"]
    env = dict(os.environ, ANSIBLE_CONFIG=str(repo / "ansible.cfg"))
    started = time.monotonic()
    with open(logfile, "w") as out:
        proc = subprocess.Popen(argv, cwd=repo, stdout=out, stderr=subprocess.STDOUT, env=env)
        killer = threading.Thread(target=kill_when, args=(proc,), daemon=True) if kill_when else None
        if killer:
            killer.start()
        rc = proc.wait(timeout=7200)
    elapsed = time.monotonic() - started
    text = logfile.read_text()
    changed = sum(int(x) for x in __import__("re").findall(r"changed=(\d+)", text.split("PLAY RECAP")[-1]))
    return {"rc": rc, "seconds": round(elapsed, 1), "changed": changed, "log": logfile.name}


def receiver_pulls(hosts, receiver: str, fraction: float, total: int):
    """Kill the receiver's rsync with SIGTERM (by pid, from the job's lock file) once `fraction`
    of the model sits in its .fleet-partial."""
    def watch(proc):
        deadline = time.monotonic() + 1800
        while proc.poll() is None and time.monotonic() < deadline:
            got = node(hosts, receiver, f"du -sb {MODEL_PATH} 2>/dev/null | cut -f1", check=False).stdout.strip()
            if got.isdigit() and int(got) > fraction * total:
                pid = node(hosts, receiver, f"cat {MODEL_PATH}/.fleet-partial/.lock", check=False).stdout.strip()
                if pid.isdigit():
                    kids = node(hosts, receiver, f"pgrep -P {pid} -x rsync", check=False).stdout.split()
                    for kid in kids:
                        node(hosts, receiver, f"kill -TERM {kid}", check=False)
                    if kids:
                        log(f"killed rsync {kids} on {receiver} at {int(got) / GIB:.2f} GiB")
                        return
            time.sleep(2)
    return watch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size-gib", type=float, default=3)
    ap.add_argument("--hosts", default="node1,node2,node3,node4")
    ap.add_argument("--sources", default="controller,node,hf,s3,http")
    ap.add_argument("--old", action="store_true")
    ap.add_argument("--old-ref", default="main")
    ap.add_argument("--interrupt", action="store_true")
    ap.add_argument("--keep", action="store_true", help="leave the model on the nodes at the end")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    inventory = LAB / "inventory.ini"
    hosts, _ = read_inventory(inventory)
    names = args.hosts.split(",")
    gateway = hosts[names[0]].address.rsplit(".", 1)[0] + ".1"
    work = LAB / "bench-sources"
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(LAB / "bench-model", args.size_gib)
    size = model_bytes(model)
    log(f"model {model}: {size / GIB:.2f} GiB; hosts {names}; gateway {gateway}")
    egress = Egress(gateway.rsplit(".", 1)[0] + ".0/24", PORTS, TABLE)
    servers = Servers(model, gateway, work)
    results = {"size_bytes": size, "hosts": names, "runs": []}
    def run_old() -> None:
        """The previous model role (`--old-ref`, ansible.builtin.copy from the controller)."""
        wipe(hosts, names)
        old_tree = Path(tempfile.mkdtemp(prefix="fleetmodel-old-"))
        try:
            sh(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old_tree), args.old_ref])
            (old_tree / ".venv").symlink_to(REPO / ".venv")
            extra = {"fleet_model_path": MODEL_PATH, "fleet_model_source": str(model), "model_check_layers": False}
            egress.reset()
            old = playbook(old_tree, inventory, extra, ",".join(names), out / f"old-copy-{len(names)}-first.log")
            old.update(egress.read(), source="old-copy", run="first", nodes=len(names))
            results["runs"].append(old)
            log(json.dumps(old))
        finally:
            sh(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old_tree)], check=False)

    try:
        if args.old:  # on empty nodes, like every source after it
            run_old()
        for source in [s for s in args.sources.split(",") if s]:
            wipe(hosts, names)
            extra = {"fleet_model_path": MODEL_PATH, "model_check_layers": False}
            if source == "controller":
                extra["fleet_model_source"] = str(model)
            elif source == "node":
                sh(["docker", "exec", f"{os.environ.get('FLEETLAB_PREFIX', 'fleetlab')}-{names[0]}", "mkdir", "-p",
                    "/srv/bench-src"])
                sh(["docker", "cp", f"{model}/.", f"{os.environ.get('FLEETLAB_PREFIX', 'fleetlab')}-{names[0]}:/srv/bench-src"],
                   timeout=1800)
                extra["fleet_model_source"] = "node:/srv/bench-src"
            elif source == "hf":
                extra.update(fleet_model_source=servers.hf(), model_hf_endpoint=f"http://{gateway}:{PORTS['hf']}",
                             model_fetch_wheelhouse=str(fetch_wheels(LAB / "model-wheels")))
            elif source == "s3":
                extra.update(fleet_model_source=servers.s3(), model_s3_endpoint_url=f"http://{gateway}:{PORTS['s3']}",
                             model_s3_region="us-east-1", model_s3_access_key_id=S3_KEY,
                             model_s3_secret_access_key=S3_SECRET, model_fetch_wheelhouse=str(fetch_wheels(LAB / "model-wheels")))
            elif source == "http":
                extra["fleet_model_source"] = servers.http()
            egress.reset()
            kill = receiver_pulls(hosts, names[1], 0.4, size) if args.interrupt and source == "controller" else None
            first = playbook(REPO, inventory, extra, ",".join(names), out / f"{source}-{len(names)}-first.log", kill)
            first.update(egress.read(), source=source, run="first", nodes=len(names))
            results["runs"].append(first)
            log(json.dumps(first))
            if kill:
                egress.reset()
                resumed = playbook(REPO, inventory, extra, ",".join(names), out / f"{source}-{len(names)}-resumed.log")
                resumed.update(egress.read(), source=source, run="resumed", nodes=len(names))
                results["runs"].append(resumed)
                log(json.dumps(resumed))
            egress.reset()
            again = playbook(REPO, inventory, extra, ",".join(names), out / f"{source}-{len(names)}-rerun.log")
            again.update(egress.read(), source=source, run="rerun", nodes=len(names))
            results["runs"].append(again)
            log(json.dumps(again))
            servers.stop()
            if source == "node":
                node(hosts, names[0], "rm -rf /srv/bench-src")
            shutil.rmtree(work / "hf", ignore_errors=True)  # the mirror's git-lfs copy of the model
    finally:
        servers.stop()
        egress.remove()
        if not args.keep:
            wipe(hosts, names)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"{'source':12} {'nodes':>5} {'run':8} {'rc':>3} {'seconds':>8} {'changed':>7} {'ctrl MiB':>9} {'srv MiB':>8}")
    for r in results["runs"]:
        srv = sum(v for k, v in r.items() if k.startswith("source_"))
        print(f"{r['source']:12} {r['nodes']:>5} {r['run']:8} {r['rc']:>3} {r['seconds']:>8} {r['changed']:>7} "
              f"{r['controller_ssh'] / 2**20:>9.1f} {srv / 2**20:>8.1f}")
    return 0 if all(r["rc"] == 0 or r["run"] == "first" and args.interrupt for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
