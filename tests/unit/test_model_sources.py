"""The model script (roles/model/files/fleet_model.py) against real source servers on 127.0.0.1.

Hugging Face: olah (a self-hosted Hub mirror from PyPI) serving a git-lfs repository made here,
behind nginx that wants a bearer token (how internal mirrors are usually fronted). S3: moto's
server with IAM authentication on (wrong keys are refused as AWS would). HTTP: nginx (Range
requests, so downloads resume). The script runs as the nodes run it: a subprocess, JSON out.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.model_servers import TOKEN, free_port, sha, start_hub, start_nginx, start_s3, stop, write_tree

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "roles/model/files/fleet_model.py"
LOOPBACK = "127.0.0.1"


def run_script(*args, timeout: float = 300) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr
    return proc.returncode, json.loads(lines[-1])


FILES = {"config.json": b'{"num_hidden_layers": 2}\n', "model-00001-of-00002.safetensors": os.urandom(3 << 20),
         "model-00002-of-00002.safetensors": os.urandom(2 << 20)}


@pytest.fixture(scope="module")
def tree():
    """World-readable (nginx's workers are not root; pytest's own tmp directories are 0700)."""
    root = write_tree(Path(tempfile.mkdtemp(prefix="fleet-model-tree-")), FILES)
    yield root
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def nginx(tmp_path_factory, tree):
    """The HTTP tree, and a token-checking proxy in front of the Hub mirror (tests/model_servers.py)."""
    work = tmp_path_factory.mktemp("nginx")
    proc, ports = start_nginx(work, LOOPBACK, tree)
    yield {"ports": ports, "work": work}
    stop(proc)


@pytest.fixture(scope="module")
def hub(tmp_path_factory, nginx):
    """olah serving acme/tiny: a git repository with the shards in git-lfs, made here."""
    proc, revision, repo = start_hub(tmp_path_factory.mktemp("hub"), LOOPBACK, nginx["ports"]["olah"], FILES)
    yield {"endpoint": f"http://{LOOPBACK}:{nginx['ports']['hf']}", "revision": revision, "repo": repo}
    stop(proc)


@pytest.fixture(scope="module")
def s3(tmp_path_factory, tree):
    """moto's server with authentication: a user, its key and the bucket; every call after signed."""
    proc, server = start_s3(tmp_path_factory.mktemp("moto"), LOOPBACK, tree, {"tiny": True, "nohashes": False})
    yield server
    stop(proc)


def spec_file(tmp_path: Path, source: dict, **extra) -> Path:
    spec = dict(source, include=[], exclude=[".gitattributes"], offline=False, ca_bundle="", region="us-east-1",
                addressing="path", pinned={}, record=str(tmp_path / "record.json"))
    spec.update(extra)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def secrets_file(tmp_path: Path, **kv) -> Path:
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps(kv))
    path.chmod(0o600)
    return path


def resolve_and_fetch(tmp_path: Path, spec: Path, secrets: Path, dest: Path | None = None, **kw):
    rc, manifest = run_script("resolve", "--spec", spec, "--secrets", secrets)
    if rc:
        return rc, manifest, None
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    dest = dest or tmp_path / "model"
    extra = [x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", v)]
    rc, out = run_script("fetch", "--spec", spec, "--secrets", secrets, "--manifest", tmp_path / "manifest.json",
                         "--dest", dest, "--cache", tmp_path / "cache.json", "--progress", tmp_path / "p.log", *extra)
    return rc, manifest, out


def hf_source(hub) -> dict:
    return {"scheme": "hf", "source": f"hf://acme/tiny@{hub['revision']}", "repo": "acme/tiny",
            "revision": hub["revision"], "endpoint": hub["endpoint"]}


# --- Hugging Face -------------------------------------------------------------------------------

def test_hf_mirror_gives_hub_hashes_and_the_files_arrive_verified(tmp_path, hub):
    spec = spec_file(tmp_path, hf_source(hub))
    rc, manifest, out = resolve_and_fetch(tmp_path, spec, secrets_file(tmp_path, hf_token=TOKEN))
    assert rc == 0, out or manifest
    files = manifest["files"]
    # LFS files carry the Hub's sha256, small files their git blob sha1
    assert files["model-00001-of-00002.safetensors"]["sha256"] == sha(FILES["model-00001-of-00002.safetensors"])
    blob = FILES["config.json"]
    assert files["config.json"]["gitsha1"] == hashlib.sha1(b"blob %d\0" % len(blob) + blob).hexdigest()
    assert ".gitattributes" not in files
    for name, data in FILES.items():
        assert (tmp_path / "model" / name).read_bytes() == data
    rc, report = run_script("verify", "--manifest", tmp_path / "manifest.json", "--dest", tmp_path / "model",
                            "--cache", tmp_path / "cache.json", "--record", tmp_path / "record.json")
    assert rc == 0 and report["complete"] and report["recorded"], report
    written = (tmp_path / "model" / "MANIFEST.sha256").read_text()
    assert f"{sha(blob)}  config.json" in written  # sha256 also for the files the Hub gave a sha1
    assert not (tmp_path / "model" / ".fleet-partial").exists()


def test_hf_wrong_token_is_named(tmp_path, hub):
    rc, out = run_script("resolve", "--spec", spec_file(tmp_path, hf_source(hub)),
                         "--secrets", secrets_file(tmp_path, hf_token="hf_wrong"))
    assert rc == 2
    assert "token (model_hf_token) is missing or wrong" in out["error"], out


def test_hf_unknown_revision_is_named(tmp_path, hub):
    src = dict(hf_source(hub), revision="1" * 40)
    rc, out = run_script("resolve", "--spec", spec_file(tmp_path, src), "--secrets", secrets_file(tmp_path, hf_token=TOKEN))
    assert rc == 2
    assert "1" * 40 in out["error"] and "acme/tiny" in out["error"], out


def test_hf_offline_without_a_record_fetches_nothing(tmp_path, hub):
    rc, out = run_script("resolve", "--spec", spec_file(tmp_path, hf_source(hub), offline=True),
                         "--secrets", secrets_file(tmp_path, hf_token=TOKEN))
    assert rc == 2
    assert "HF_HUB_OFFLINE is set and no manifest" in out["error"], out


def test_hf_offline_uses_the_recorded_manifest_without_the_network(tmp_path, hub):
    spec = spec_file(tmp_path, hf_source(hub))
    rc, manifest = run_script("resolve", "--spec", spec, "--secrets", secrets_file(tmp_path, hf_token=TOKEN))
    assert rc == 0, manifest
    (tmp_path / "record.json").write_text(json.dumps(manifest))
    offline = spec_file(tmp_path, dict(hf_source(hub), endpoint="http://127.0.0.1:9"), offline=True)
    rc, again = run_script("resolve", "--spec", offline, "--secrets", secrets_file(tmp_path))
    assert rc == 0 and again["files"] == manifest["files"], again


def test_hf_mirror_serving_other_bytes_is_caught_and_nothing_is_placed(tmp_path, hub):
    name = "model-00002-of-00002.safetensors"
    oid = sha(FILES[name])
    obj = hub["repo"] / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    good = obj.read_bytes()
    obj.chmod(0o644)
    obj.write_bytes(b"\0" * len(good))  # the mirror's storage rots: same size, other bytes
    try:
        rc, _, out = resolve_and_fetch(tmp_path, spec_file(tmp_path, hf_source(hub)),
                                       secrets_file(tmp_path, hf_token=TOKEN))
    finally:
        obj.write_bytes(good)
    assert rc == 2
    assert f"{name}: the source sent bytes that do not match its manifest: expected sha256 {oid}, got sha256 " \
           f"{sha(bytes(len(good)))}" in out["error"], out
    assert not (tmp_path / "model" / name).exists()


# --- S3 -----------------------------------------------------------------------------------------

def s3_source(prefix="tiny", bucket="models") -> dict:
    return {"scheme": "s3", "source": f"s3://{bucket}/{prefix}", "bucket": bucket, "prefix": prefix}


def test_s3_manifest_object_is_the_source_hashes_and_download_resumes(tmp_path, s3):
    spec = spec_file(tmp_path, s3_source(), endpoint=s3["endpoint"])
    secrets = secrets_file(tmp_path, s3_access_key_id=s3["key"], s3_secret_access_key=s3["secret"])
    name = "model-00001-of-00002.safetensors"
    # an earlier download was cut after 1 MiB; only the rest is asked for (a Range GET), so a
    # prefix that is wrong shows up as a hash mismatch, and is dropped
    partial = tmp_path / "model" / ".fleet-partial" / "fetch" / name
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\xff" * (1 << 20))
    rc, manifest, out = resolve_and_fetch(tmp_path, spec, secrets)
    assert "s3://models/tiny/MANIFEST.sha256" in manifest["origin"]
    assert rc == 2 and f"{name}: the source sent bytes that do not match" in out["error"], out
    assert not partial.exists()
    partial.write_bytes(FILES[name][: 1 << 20])  # a good prefix: resumed and complete
    rc, manifest, out = resolve_and_fetch(tmp_path, spec, secrets)
    assert rc == 0, out
    assert all((tmp_path / "model" / n).read_bytes() == d for n, d in FILES.items())


def test_s3_wrong_credentials_are_named(tmp_path, s3):
    rc, out = run_script("resolve", "--spec", spec_file(tmp_path, s3_source(), endpoint=s3["endpoint"]),
                         "--secrets", secrets_file(tmp_path, s3_access_key_id=s3["key"], s3_secret_access_key="no"))
    assert rc == 2
    assert "SignatureDoesNotMatch: the credentials (model_s3_access_key_id / model_s3_secret_access_key) are wrong" \
        in out["error"], out


def test_s3_missing_bucket_is_named(tmp_path, s3):
    rc, out = run_script("resolve", "--spec", spec_file(tmp_path, s3_source(bucket="nope"), endpoint=s3["endpoint"]),
                         "--secrets", secrets_file(tmp_path, s3_access_key_id=s3["key"], s3_secret_access_key=s3["secret"]))
    assert rc == 2 and "bucket 'nope' does not exist" in out["error"], out


def test_s3_prefix_without_manifest_gives_no_hashes(tmp_path, s3):
    rc, out = run_script("resolve", "--spec", spec_file(tmp_path, s3_source("nohashes"), endpoint=s3["endpoint"]),
                         "--secrets", secrets_file(tmp_path, s3_access_key_id=s3["key"], s3_secret_access_key=s3["secret"]))
    assert rc == 0 and "no source hashes" in out["origin"]
    assert {f["sha256"] for f in out["files"].values()} == {None}


def test_unreachable_s3_endpoint_is_named(tmp_path):
    rc, out = run_script("resolve", "--spec", spec_file(tmp_path, s3_source(), endpoint=f"http://127.0.0.1:{free_port()}"),
                         "--secrets", secrets_file(tmp_path, s3_access_key_id="a", s3_secret_access_key="b"))
    assert rc == 2 and "source unreachable" in out["error"], out


# --- HTTP ---------------------------------------------------------------------------------------

def http_source(nginx, path="") -> dict:
    url = f"http://127.0.0.1:{nginx['ports']['http']}/{path}"
    return {"scheme": "http", "source": url, "url": url}


def test_http_tree_resumes_a_cut_download_with_a_range_request(tmp_path, nginx):
    name = "model-00002-of-00002.safetensors"
    partial = tmp_path / "model" / ".fleet-partial" / "fetch" / name
    partial.parent.mkdir(parents=True)
    partial.write_bytes(FILES[name][: 1 << 20])
    rc, manifest, out = resolve_and_fetch(tmp_path, spec_file(tmp_path, http_source(nginx)), secrets_file(tmp_path))
    assert rc == 0, out
    assert out["bytes_kept"] == 1 << 20, out  # what the report says was resumed, not fetched
    assert (tmp_path / "model" / name).read_bytes() == FILES[name]
    log = (nginx["work"] / "access.log").read_text().splitlines()
    assert any(f"GET /{name} HTTP/1.1\" 206 {len(FILES[name]) - (1 << 20)}" in line for line in log), log[-5:]


def test_http_partial_that_is_already_whole_is_checked_not_asked_for_again(tmp_path, nginx):
    # cut between its last byte and its check: a range from its end would be refused (HTTP 416)
    name, longer = "model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"
    fetch_dir = tmp_path / "model" / ".fleet-partial" / "fetch"
    fetch_dir.mkdir(parents=True)
    (fetch_dir / name).write_bytes(FILES[name])
    (fetch_dir / longer).write_bytes(FILES[longer] + b"tail of an older file")  # ours, too long: fetched anew
    before = len((nginx["work"] / "access.log").read_text().splitlines())
    rc, _, out = resolve_and_fetch(tmp_path, spec_file(tmp_path, http_source(nginx)), secrets_file(tmp_path))
    assert rc == 0, out
    assert all((tmp_path / "model" / n).read_bytes() == d for n, d in FILES.items())
    gets = [line for line in (nginx["work"] / "access.log").read_text().splitlines()[before:] if '"GET /' in line]
    assert not any(f"GET /{name} " in line for line in gets), gets
    assert any(f"GET /{longer} HTTP/1.1\" 200 {len(FILES[longer])}" in line for line in gets), gets


def test_a_killed_download_leaves_no_transfer_running(tmp_path, nginx):
    """SIGKILL of the script (a node's OOM killer, a job's timeout): its curl goes with it, so
    nothing keeps writing into .fleet-partial beside the next run."""
    name = "model-00001-of-00002.safetensors"
    url = f"http://{LOOPBACK}:{nginx['ports']['slow']}/"
    spec = spec_file(tmp_path, {"scheme": "http", "source": url, "url": url})
    rc, manifest = run_script("resolve", "--spec", spec, "--secrets", secrets_file(tmp_path))
    assert rc == 0, manifest
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    partial = tmp_path / "model" / ".fleet-partial" / "fetch" / name
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "fetch", "--spec", str(spec), "--secrets",
                             str(tmp_path / "secrets.json"), "--manifest", str(tmp_path / "manifest.json"),
                             "--dest", str(tmp_path / "model"), "--cache", str(tmp_path / "cache.json"),
                             "--progress", str(tmp_path / "p.log"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (partial.exists() and partial.stat().st_size >= 256 << 10):
        assert proc.poll() is None and time.monotonic() < deadline, "the download never got under way"
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=30)

    def curls() -> list[str]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if cmd.startswith("curl ") and str(partial) in cmd:
                found.append(cmd)
        return found

    while curls():  # SIGTERM on its parent's death; gone within seconds even on a busy machine
        assert time.monotonic() < deadline, curls()
        time.sleep(0.2)
    size = partial.stat().st_size
    assert size < len(FILES[name])
    time.sleep(2)
    assert partial.stat().st_size == size, "something still writes into the partial file"


def test_http_tree_without_manifest_is_named(tmp_path, nginx, tree):
    rc, out = run_script("resolve", "--spec", spec_file(tmp_path, http_source(nginx, "no/such/dir/")),
                         "--secrets", secrets_file(tmp_path))
    assert rc == 2 and "an http(s) source needs a MANIFEST.sha256 at its root" in out["error"], out


def test_unreachable_http_source_is_named(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/m/"
    rc, out = run_script("resolve", "--spec", spec_file(tmp_path, {"scheme": "http", "source": url, "url": url}),
                         "--secrets", secrets_file(tmp_path))
    assert rc == 2 and "source unreachable" in out["error"], out


def test_manifest_with_a_path_out_of_the_model_directory_is_refused(tmp_path):
    work = tmp_path / "evil"
    work.mkdir()
    (work / "config.json").write_text("{}")
    (work / "MANIFEST.sha256").write_text(f"{'0' * 64}  ../../etc/cron.d/x\n")
    rc, out = run_script("manifest-dir", work, "--cache", tmp_path / "c.json")
    assert rc == 2 and "unsafe path '../../etc/cron.d/x'" in out["error"], out


# --- verification on a node ---------------------------------------------------------------------

def manifest_of(tmp_path: Path, files: dict) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"origin": "test", "source": "", "files": {
        n: {"size": len(d), "sha256": sha(d), "gitsha1": None} for n, d in files.items()}}))
    return path


def verify(tmp_path, dest, *extra):
    return run_script("verify", "--manifest", tmp_path / "manifest.json", "--dest", dest, "--cache",
                      tmp_path / "cache.json", "--progress", tmp_path / "verify.progress", *extra)


def test_node_directory_copy_reports_the_bytes_it_copied(tmp_path, tree):
    rc, manifest = run_script("manifest-dir", tree, "--cache", tmp_path / "src-cache.json")
    assert rc == 0, manifest
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    rc, out = run_script("local", tree, "--manifest", tmp_path / "manifest.json", "--dest", tmp_path / "model",
                         "--cache", tmp_path / "cache.json", "--margin-mib", "0")
    assert rc == 0, out
    # a local rsync's data is what its client sent (what it received is the replies: tens of bytes)
    assert sum(len(d) for d in FILES.values()) <= out["bytes_copied"] < sum(len(d) for d in FILES.values()) + 65536, out
    assert all((tmp_path / "model" / n).read_bytes() == d for n, d in FILES.items())


def test_verify_names_wrong_extra_and_missing_files_and_deletes_nothing(tmp_path, tree):
    dest = tmp_path / "model"
    shutil.copytree(tree, dest)
    (dest / "MANIFEST.sha256").unlink()
    manifest_of(tmp_path, FILES)
    rc, report = verify(tmp_path, dest, "--record", tmp_path / "record.json")
    assert rc == 0 and report["complete"] and report["recorded"]
    shard = dest / "model-00001-of-00002.safetensors"
    stat = shard.stat()
    with open(shard, "r+b") as fh:  # bit rot: same size, mtime put back
        fh.write(b"\0" * 16)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (dest / "model-00003-of-00002.safetensors").write_bytes(b"stray")
    (dest / "config.json").unlink()
    rc, report = verify(tmp_path, dest)
    assert rc == 0 and not report["complete"]
    assert report["missing"] == ["config.json"]
    assert report["extra"] == ["model-00003-of-00002.safetensors"]
    bad = report["mismatched"][0]
    assert bad["file"] == shard.name and bad["expected"] == f"sha256 {sha(FILES[shard.name])}"
    assert bad["got"] == f"sha256 {sha(shard.read_bytes())}"
    assert (dest / "model-00003-of-00002.safetensors").exists() and shard.exists()


def test_verified_files_are_not_read_again(tmp_path, tree):
    dest = tmp_path / "model"
    shutil.copytree(tree, dest)
    manifest_of(tmp_path, FILES)
    verify(tmp_path, dest)
    assert "verifying" in (tmp_path / "verify.progress").read_text()
    rc, report = verify(tmp_path, dest)
    assert rc == 0 and report["complete"]
    assert (tmp_path / "verify.progress").read_text() == ""  # nothing hashed: every file from the cache


def test_a_file_ours_from_an_older_manifest_is_outdated_not_foreign(tmp_path, tree):
    dest = tmp_path / "model"
    shutil.copytree(tree, dest)
    manifest_of(tmp_path, FILES)
    verify(tmp_path, dest)
    newer = dict(FILES, **{"config.json": b'{"num_hidden_layers": 4}\n'})
    manifest_of(tmp_path, newer)
    rc, report = verify(tmp_path, dest)
    assert report["outdated"] == ["config.json"] and report["mismatched"] == []


def test_full_disk_is_refused_before_a_byte_moves(tmp_path, tree):
    spec = spec_file(tmp_path, {"scheme": "http", "source": "http://127.0.0.1:9/", "url": "http://127.0.0.1:9/"})
    manifest_of(tmp_path, FILES)
    free = shutil.disk_usage(tmp_path).free
    rc, out = run_script("fetch", "--spec", spec, "--manifest", tmp_path / "manifest.json", "--dest",
                         tmp_path / "model", "--cache", tmp_path / "cache.json",
                         "--margin-mib", str(free // 2**20 + 1024))
    assert rc == 2 and "not enough disk space for the model at" in out["error"] and "nothing was copied" in out["error"]
    assert [p.name for p in (tmp_path / "model").iterdir()] == [".fleet-partial"]
