"""Real model-source servers for tests, on an address the caller chooses (127.0.0.1 for the unit
tier's script tests, the lab's management gateway for the lab tier's runs through the role).

- an HTTP file tree: nginx from Debian (Range requests, so downloads resume);
- a Hugging Face mirror: olah (a self-hosted Hub mirror from PyPI) serving a git-lfs repository
  made here, behind nginx that wants a bearer token (how internal mirrors are usually fronted);
- S3: moto's server with IAM authentication on (wrong keys are refused as AWS would).

Every server is a child process in a session of its own; `stop` ends it. Egress counts the bytes
each server sends, with an nftables table of its own (no other table touched).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
TOKEN = "hf_good_token_for_tests"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def spawn(argv, log: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True, **kw)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}")
        with socket.socket() as s:
            s.settimeout(2)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"nothing on {host}:{port} after {timeout:.0f}s")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    """The files and their MANIFEST.sha256, world-readable (nginx's workers are not root)."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    for name, data in files.items():
        (root / name).write_bytes(data)
        (root / name).chmod(0o644)
    (root / "MANIFEST.sha256").write_text("".join(f"{sha(d)}  {n}\n" for n, d in sorted(files.items())))
    (root / "MANIFEST.sha256").chmod(0o644)
    return root


def start_nginx(work: Path, host: str, tree: Path, *, slow_rate: str = "1m") -> tuple[subprocess.Popen, dict]:
    """Three servers: the tree (`http`), the tree at `slow_rate` per connection (`slow`: a download
    long enough to cut), and a token-checking proxy (`hf`) in front of olah's port (`olah`)."""
    ports = {"http": free_port(host), "slow": free_port(host), "hf": free_port(host), "olah": free_port(host)}
    (work / "nginx.conf").write_text(f"""daemon off; worker_processes 1; pid {work}/nginx.pid;
error_log {work}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log {work}/access.log;
  server {{ listen {host}:{ports['http']}; root {tree}; }}
  server {{ listen {host}:{ports['slow']}; root {tree}; limit_rate {slow_rate}; }}
  server {{ listen {host}:{ports['hf']};
    location / {{
      if ($http_authorization != "Bearer {TOKEN}") {{ return 401; }}
      proxy_pass http://{host}:{ports['olah']}; proxy_set_header Host $http_host; proxy_buffering off;
    }}
  }}
}}
""")
    proc = spawn(["nginx", "-c", str(work / "nginx.conf"), "-p", str(work)], work / "nginx.log")
    wait_port(host, ports["http"], proc)
    return proc, ports


def start_hub(work: Path, host: str, port: int, files: dict[str, bytes], repo_id: str = "acme/tiny"
              ) -> tuple[subprocess.Popen, str, Path]:
    """olah on host:port serving repo_id: a git repository with the shards in git-lfs, made here.
    Returns the process, the commit (the revision to pin) and the repository's path."""
    repo = work / "mirrors" / "models" / repo_id
    repo.mkdir(parents=True)
    git = ["git", "-C", str(repo), "-c", "user.email=t@fleet", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["lfs", "install", "--local"], check=True, capture_output=True)
    subprocess.run(git + ["lfs", "track", "*.safetensors"], check=True, capture_output=True)
    for name, data in files.items():
        (repo / name).write_bytes(data)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "tiny"], check=True)
    revision = subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    (work / "olah.toml").write_text(f'[basic]\nhost = "{host}"\nport = {port}\nmirrors-path = ["{work / "mirrors"}"]\n'
                                    f'repos-path = "{work / "cache"}"\n[accessibility]\noffline = true\n')
    proc = spawn([str(BIN / "olah-cli"), "-c", str(work / "olah.toml")], work / "olah.log", cwd=work)
    wait_port(host, port, proc)
    return proc, revision, repo


def start_s3(work: Path, host: str, tree: Path, prefixes: dict[str, bool]) -> tuple[subprocess.Popen, dict]:
    """moto with authentication: the first calls (unauthenticated) make a user, its key, a policy
    and the bucket `models`; everything after must be signed with that key. The tree goes under
    each prefix, with its MANIFEST.sha256 where prefixes[prefix] is true."""
    import boto3
    port = free_port(host)
    proc = spawn([str(BIN / "moto_server"), "-H", host, "-p", str(port)], work / "moto.log",
                 env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="4"))
    wait_port(host, port, proc)
    endpoint = f"http://{host}:{port}"
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="boot",
                       aws_secret_access_key="boot")
    iam.create_user(UserName="fleet")
    key = iam.create_access_key(UserName="fleet")["AccessKey"]
    iam.put_user_policy(UserName="fleet", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
    client.create_bucket(Bucket="models")
    for prefix, with_manifest in prefixes.items():
        for f in tree.iterdir():
            if f.is_file() and (with_manifest or f.name != "MANIFEST.sha256"):
                client.upload_file(str(f), "models", f"{prefix}/{f.name}")
    return proc, {"endpoint": endpoint, "port": port, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"],
                  "client": client}


class Egress:
    """Bytes this machine sends from each named server port towards `subnet` (and to its port 22:
    the controller's SSH; and to each named destination port, e.g. a registry the controller pushes
    to), counted by the nftables table `table`, which only this class touches."""

    def __init__(self, subnet: str, ports: dict[str, int], table: str, dports: dict[str, int] | None = None):
        self.subnet, self.ports, self.table, self.dports = subnet, ports, table, dports or {}
        self.names = (["controller_ssh"] + [f"source_{k}" for k in ports]
                      + [f"dest_{k}" for k in self.dports])
        self.reset()

    def _nft(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(["nft", *args], capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"nft {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def reset(self) -> None:
        self._nft("delete", "table", "inet", self.table, check=False)
        self._nft(f"add table inet {self.table}; add chain inet {self.table} out {{ type filter hook output "
                  f"priority 0; policy accept; }}")
        rules = [f"ip daddr {self.subnet} tcp dport 22 counter"]
        rules += [f"ip daddr {self.subnet} tcp sport {port} counter" for port in self.ports.values()]
        rules += [f"ip daddr {self.subnet} tcp dport {port} counter" for port in self.dports.values()]
        for rule in rules:
            self._nft(f"add rule inet {self.table} out {rule}")

    def read(self) -> dict[str, int]:
        counts = [int(b) for b in re.findall(r"counter packets \d+ bytes (\d+)", self._nft("list", "table", "inet",
                                                                                           self.table))]
        return dict(zip(self.names, counts))

    def remove(self) -> None:
        self._nft("delete", "table", "inet", self.table, check=False)


def fetch_wheels(where: Path) -> Path:
    """The seed's remote clients (the model role's model_fetch_packages) as wheels, for hosts that
    reach no package index of their own (the lab's): pip download, once."""
    import yaml
    pins = yaml.safe_load((Path(__file__).resolve().parents[1] / "roles/model/defaults/main.yml").read_text())[
        "model_fetch_packages"]
    stamp = where / (".pins-" + hashlib.sha1(json.dumps(pins).encode()).hexdigest()[:12])
    if not stamp.exists():
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(where), *pins], check=True,
                       timeout=900)
        stamp.touch()
    return where
