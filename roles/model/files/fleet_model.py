#!/usr/bin/env python3
"""vllm-fleet model files: source manifests, fetch, node-to-node pull, verification.

One script for the controller and the nodes (roles/model copies it to every serving node). The
standard library covers everything but the remote clients, which are imported only by the command
that needs them: huggingface_hub (hf://), boto3 (s3://); http(s):// uses curl. Every command
prints one JSON object on stdout; a failure exits 2 with {"error": "..."} naming what is wrong.

  manifest-dir DIR [--cache FILE]           the manifest of a directory (its MANIFEST.sha256 when it
                                            has one, else hashed, with the verified-file cache)
  resolve --spec SPEC                       the manifest of a remote source (hf, s3, http)
  verify --manifest M --dest D --cache C    classify D's files against M; --record writes
                                            MANIFEST.sha256 and the trusted manifest beside the
                                            cache when every file is verified
  fetch --spec SPEC --manifest M --dest D --cache C     download what D lacks from the source
  pull --peer USER@ADDR --manifest M --dest D ...       rsync over SSH from a verified node
  tofu --dest D --cache C                   hash D as it is (trust on first use, recorded as such)

Manifest (JSON): {"source", "origin", "files": {relpath: {"size", "sha256", "gitsha1"}}}; size or
one hash may be null (the Hub gives LFS files a sha256 and other files their git blob sha1).
Files in flight live in .fleet-partial/ under the model directory and are renamed into place
only once complete and verified, so a served path never holds half a file.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

MANIFEST_NAME = "MANIFEST.sha256"
PARTIAL = ".fleet-partial"
HEX64 = re.compile(r"^[0-9a-f]{64}$")
HEX40 = re.compile(r"^[0-9a-f]{40}$")
CHUNK = 1 << 22


class Fail(Exception):
    """An error for the operator: printed as {"error": msg}, exit 2."""


# --- small helpers ------------------------------------------------------------------------------

def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def safe_rel(rel: str) -> str:
    """A manifest path must stay inside the model directory: no absolute paths, no '..'."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in rel:
        raise Fail(f"unsafe path {rel!r} in the manifest (absolute, empty or with '..')")
    if parts[0] == PARTIAL or rel == MANIFEST_NAME:
        raise Fail(f"path {rel!r} in the manifest collides with a name the fleet reserves")
    return rel


def write_json_atomic(path: str, data) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: str, default=None):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return default
    except ValueError:
        return default


def parse_sha256sum(text: str, where: str) -> dict:
    """sha256sum format ('<64 hex>  path' or '<64 hex> *path') into {path: sha256}."""
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = re.match(r"^([0-9a-fA-F]{64}) [ *](.+)$", line)
        if not m:
            raise Fail(f"{where} line {n} is not in sha256sum format: {line[:80]!r}")
        rel = m.group(2)
        rel = rel[2:] if rel.startswith("./") else rel
        out[safe_rel(rel)] = m.group(1).lower()
    if not out:
        raise Fail(f"{where} lists no files")
    return out


def selected(rel: str, include: list, exclude: list) -> bool:
    if include and not any(fnmatch.fnmatch(rel, p) for p in include):
        return False
    return not any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(os.path.basename(rel), p) for p in exclude)


class Progress:
    """A line '<done> <total> <rate> <text>' rewritten every few seconds; the controller's
    fleet_model_wait shows it (rsync's own progress lines are passed through the same file)."""

    def __init__(self, path: str | None, total: int, label: str):
        self.path, self.total, self.label = path, total, label
        self.done = 0
        self.kept = 0  # bytes an interrupted run left in .fleet-partial and this one resumed from
        self.in_flight = None  # optional callable: bytes of files still arriving (HF's .incomplete)
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        if path and total:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self.thread = threading.Thread(target=self._loop, daemon=True)
            self.thread.start()

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n

    def resume(self, n: int) -> None:
        with self.lock:
            self.done += n
            self.kept += n

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-3)
        done = self.done + (self.in_flight() if self.in_flight else 0)
        pct = 100.0 * done / self.total if self.total else 100.0
        return (f"{self.label}: {human(done)} of {human(self.total)} ({pct:.0f}%), "
                f"{human(done / elapsed)}/s, {elapsed:.0f} s")

    def _write(self) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(self.line() + "\n")

    def _loop(self) -> None:
        while not self.stop.wait(3):
            self._write()

    def close(self) -> None:
        if self.path and self.total:
            self.stop.set()
            self._write()


# --- hashing and the verified-file cache --------------------------------------------------------

def stat_key(st: os.stat_result) -> list:
    """What must not change for a verified file to stay verified without re-reading it."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def hash_file(path: str, want_git: bool, progress: Progress | None = None) -> dict:
    size = os.path.getsize(path)
    sha = hashlib.sha256()
    git = hashlib.sha1(f"blob {size}\0".encode()) if want_git else None
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            sha.update(chunk)
            if git is not None:
                git.update(chunk)
            if progress:
                progress.add(len(chunk))
    out = {"sha256": sha.hexdigest()}
    if git is not None:
        out["gitsha1"] = git.hexdigest()
    return out


def matches(entry: dict, got: dict) -> bool:
    if entry.get("sha256"):
        return got.get("sha256") == entry["sha256"]
    if entry.get("gitsha1"):
        return got.get("gitsha1") == entry["gitsha1"]
    return False


def expected_text(entry: dict) -> str:
    return f"sha256 {entry['sha256']}" if entry.get("sha256") else f"git sha1 {entry.get('gitsha1')}"


def got_text(entry: dict, got: dict) -> str:
    return f"sha256 {got.get('sha256')}" if entry.get("sha256") else f"git sha1 {got.get('gitsha1')}"


class Cache:
    """{relpath: {"key": stat_key, "sha256", "gitsha1"?}} for one directory, kept outside it."""

    def __init__(self, path: str | None):
        self.path = path
        self.data = (read_json(path, {}) or {}) if path else {}
        self.data = self.data if isinstance(self.data, dict) else {}

    def lookup(self, rel: str, st: os.stat_result) -> dict | None:
        entry = self.data.get(rel)
        return entry if entry and entry.get("key") == stat_key(st) else None

    def store(self, rel: str, st: os.stat_result, hashes: dict) -> None:
        self.data[rel] = dict(hashes, key=stat_key(st))

    def drop(self, rel: str) -> None:
        self.data.pop(rel, None)

    def save(self) -> None:
        if self.path:
            write_json_atomic(self.path, self.data)


def walk_files(root: str) -> list:
    """Relative paths of the files under root, without ours (.fleet-partial, MANIFEST.sha256)."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x != PARTIAL)
        for name in files:
            rel = os.path.relpath(os.path.join(d, name), root)
            if rel != MANIFEST_NAME:
                out.append(rel)
    return sorted(out)


def partial_bytes(root: str) -> int:
    total = 0
    for d, dirs, files in os.walk(root):
        if os.path.basename(d) == PARTIAL or f"/{PARTIAL}/" in f"{d}/":
            total += sum(os.path.getsize(os.path.join(d, f)) for f in files
                         if os.path.isfile(os.path.join(d, f)))
    return total


def free_bytes(path: str) -> tuple[int, str]:
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "/"
    st = os.statvfs(probe)
    return st.f_bavail * st.f_frsize, probe


# --- manifests ----------------------------------------------------------------------------------

def manifest_of_dir(root: str, cache: Cache, progress_path: str | None = None, origin: str = "",
                    use_own: bool = True) -> dict:
    """The directory's own MANIFEST.sha256 when present and use_own (sizes from the files), else
    every file hashed (cached by stat)."""
    if not os.path.isdir(root):
        raise Fail(f"model directory {root} does not exist")
    own = os.path.join(root, MANIFEST_NAME)
    names = walk_files(root)
    if not names:
        raise Fail(f"model directory {root} holds no files")
    if use_own and os.path.exists(own):
        with open(own, encoding="utf-8") as fh:
            hashes = parse_sha256sum(fh.read(), own)
        files = {}
        for rel, sha in hashes.items():
            p = os.path.join(root, rel)
            files[rel] = {"size": os.path.getsize(p) if os.path.isfile(p) else None, "sha256": sha, "gitsha1": None}
        return {"files": files, "origin": f"{MANIFEST_NAME} in {root}"}
    sizes = {rel: os.path.getsize(os.path.join(root, rel)) for rel in names}
    progress = Progress(progress_path, sum(sizes.values()), f"hashing {root}")
    files = {}
    try:
        for rel in names:
            p = os.path.join(root, rel)
            st = os.stat(p)
            hit = cache.lookup(rel, st)
            if hit:
                progress.add(st.st_size)
                got = hit
            else:
                got = hash_file(p, False, progress)
                cache.store(rel, st, got)
            files[rel] = {"size": st.st_size, "sha256": got["sha256"], "gitsha1": None}
    finally:
        progress.close()
        cache.save()
    return {"files": files, "origin": origin or f"hashed from {root}"}


def resolve_hf(spec: dict, secrets: dict) -> dict:
    if spec.get("offline"):
        raise Fail(f"HF_HUB_OFFLINE is set and no manifest of {spec['repo']}@{spec['revision']} was recorded on "
                   f"this node by an earlier run: nothing can be resolved offline")
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError as exc:
        raise Fail(f"huggingface_hub is not installed for {sys.executable}: {exc}") from exc
    api = HfApi(endpoint=spec["endpoint"], token=secrets.get("hf_token") or False)
    where = f"{spec['repo']}@{spec['revision']} on {spec['endpoint']}"
    try:
        entries = list(api.list_repo_tree(spec["repo"], revision=spec["revision"], recursive=True))
    except RevisionNotFoundError as exc:
        raise Fail(f"revision {spec['revision']} not found in {spec['repo']} on {spec['endpoint']}") from exc
    except GatedRepoError as exc:
        raise Fail(f"{where}: gated repository, the token (model_hf_token) has no access") from exc
    except RepositoryNotFoundError as exc:
        raise Fail(f"{where}: repository not found, or the token (model_hf_token) is missing or wrong") from exc
    except (HfHubHTTPError, EntryNotFoundError) as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise Fail(f"{where}: HTTP {status}: the token (model_hf_token) is missing or wrong") from exc
        raise Fail(f"{where}: {str(exc).splitlines()[0]}") from exc
    except OSError as exc:  # connection refused, DNS, TLS: requests/httpx errors are OSErrors
        raise Fail(f"{where}: source unreachable: {str(exc).splitlines()[0][:300]}") from exc
    except Exception as exc:  # httpx.ConnectError and friends are not OSErrors
        if type(exc).__name__ in ("ConnectError", "ConnectTimeout", "ReadTimeout", "RemoteProtocolError"):
            raise Fail(f"{where}: source unreachable: {str(exc).splitlines()[0][:300]}") from exc
        raise
    files = {}
    for e in entries:
        if type(e).__name__ != "RepoFile" or not selected(e.path, spec["include"], spec["exclude"]):
            continue
        lfs = getattr(e, "lfs", None)
        sha = getattr(lfs, "sha256", None) if lfs else None
        files[safe_rel(e.path)] = {"size": e.size, "sha256": sha, "gitsha1": None if sha else e.blob_id}
    if not files:
        raise Fail(f"{where}: no files (after model_include/model_exclude)")
    return {"files": files, "origin": f"Hugging Face {where}: LFS sha256 and git blob sha1 from the Hub"}


def s3_client(spec: dict, secrets: dict):
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise Fail(f"boto3 is not installed for {sys.executable}: {exc}") from exc
    kwargs = {"endpoint_url": spec.get("endpoint") or None, "region_name": spec.get("region") or None,
              "config": Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10,
                               read_timeout=60, s3={"addressing_style": spec.get("addressing") or "auto"})}
    if spec.get("ca_bundle"):
        kwargs["verify"] = spec["ca_bundle"]
    if secrets.get("s3_access_key_id"):
        kwargs["aws_access_key_id"] = secrets["s3_access_key_id"]
        kwargs["aws_secret_access_key"] = secrets.get("s3_secret_access_key")
        kwargs["aws_session_token"] = secrets.get("s3_session_token") or None
    return boto3.client("s3", **kwargs)


def s3_fail(spec: dict, exc: Exception, what: str) -> Fail:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
    where = f"s3://{spec['bucket']}/{spec['prefix']} ({spec.get('endpoint') or 'AWS'})"
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken",
                    "ExpiredToken"):
            return Fail(f"{where}: {what}: {code}: the credentials (model_s3_access_key_id / "
                        f"model_s3_secret_access_key) are wrong or lack access")
        if code in ("NoSuchBucket",):
            return Fail(f"{where}: bucket {spec['bucket']!r} does not exist")
        return Fail(f"{where}: {what}: {code}: {exc.response.get('Error', {}).get('Message', '')}")
    if isinstance(exc, NoCredentialsError):
        return Fail(f"{where}: no credentials: set model_s3_access_key_id and model_s3_secret_access_key (vault)")
    if isinstance(exc, EndpointConnectionError) or isinstance(exc, OSError):
        return Fail(f"{where}: source unreachable: {exc}")
    return Fail(f"{where}: {what}: {type(exc).__name__}: {exc}")


def resolve_s3(spec: dict, secrets: dict) -> dict:
    from botocore.exceptions import BotoCoreError, ClientError
    client = s3_client(spec, secrets)
    prefix = spec["prefix"].rstrip("/") + "/" if spec["prefix"] else ""
    sizes = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=spec["bucket"], Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):]
                if rel and not rel.endswith("/"):
                    sizes[rel] = obj["Size"]
        manifest_text = None
        if MANIFEST_NAME in sizes:
            manifest_text = client.get_object(Bucket=spec["bucket"], Key=prefix + MANIFEST_NAME)["Body"].read()
    except (ClientError, BotoCoreError, OSError) as exc:
        raise s3_fail(spec, exc, "listing") from exc
    where = f"s3://{spec['bucket']}/{prefix}"
    if not sizes:
        raise Fail(f"{where}: no objects under this prefix")
    if manifest_text is None:
        return {"files": {safe_rel(r): {"size": s, "sha256": None, "gitsha1": None} for r, s in sizes.items()
                          if selected(r, spec["include"], spec["exclude"])},
                "origin": f"{where} (no {MANIFEST_NAME}: no source hashes)"}
    hashes = parse_sha256sum(manifest_text.decode("utf-8", "replace"), f"{where}{MANIFEST_NAME}")
    missing = sorted(r for r in hashes if r not in sizes)
    if missing:
        raise Fail(f"{where}{MANIFEST_NAME} lists objects that are not in the bucket: {', '.join(missing[:5])}")
    return {"files": {r: {"size": sizes[r], "sha256": h, "gitsha1": None} for r, h in hashes.items()
                      if selected(r, spec["include"], spec["exclude"])},
            "origin": f"{where}{MANIFEST_NAME} (the source's own sha256 list)"}


def curl_base(spec: dict) -> list:
    argv = ["curl", "--silent", "--show-error", "--fail", "--location", "--proto", "=http,https",
            "--connect-timeout", "10", "--speed-limit", "1024", "--speed-time", "60"]
    if spec.get("ca_bundle"):
        argv += ["--cacert", spec["ca_bundle"]]
    return argv


def bound_to_us(argv: list) -> list:
    """argv run under util-linux's setpriv --pdeathsig: the child (curl, rsync) gets SIGTERM when
    the thread that started it dies, even by SIGKILL, so no transfer of a stopped run keeps
    writing into .fleet-partial beside the next run's (whose lock is free once we are gone)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv


def http_url(spec: dict, rel: str) -> str:
    from urllib.parse import quote
    return spec["url"].rstrip("/") + "/" + quote(rel)


def curl_error(spec: dict, proc: subprocess.CompletedProcess, what: str) -> Fail:
    msg = (proc.stderr or "").strip().splitlines()
    detail = msg[-1] if msg else f"curl exit {proc.returncode}"
    if proc.returncode in (6, 7, 28, 35, 52, 56):
        return Fail(f"{spec['url']}: source unreachable ({what}): {detail}")
    return Fail(f"{spec['url']}: {what}: {detail}")


def resolve_http(spec: dict, secrets: dict) -> dict:
    if shutil.which("curl") is None:
        raise Fail("curl is not installed (the model role installs it for http(s) sources)")
    url = http_url(spec, MANIFEST_NAME)
    proc = subprocess.run(curl_base(spec) + [url], capture_output=True, text=True, timeout=120)
    if proc.returncode == 22 and spec.get("pinned"):
        text = None
    elif proc.returncode != 0:
        if proc.returncode == 22:
            raise Fail(f"{url}: not found ({(proc.stderr or '').strip()}): an http(s) source needs a {MANIFEST_NAME} "
                       f"at its root (sha256sum format), or pin model_manifest in the inventory")
        raise curl_error(spec, proc, f"reading {MANIFEST_NAME}")
    else:
        text = proc.stdout
    names = parse_sha256sum(text, url) if text is not None else dict(spec["pinned"])
    files = {}
    for rel, sha in sorted(names.items()):
        if not selected(rel, spec["include"], spec["exclude"]):
            continue
        head = subprocess.run(curl_base(spec) + ["--head", http_url(spec, rel)], capture_output=True, text=True,
                              timeout=120)
        if head.returncode != 0:
            raise curl_error(spec, head, f"HEAD {rel}")
        lengths = re.findall(r"^content-length:\s*(\d+)", head.stdout, re.I | re.M)
        files[rel] = {"size": int(lengths[-1]) if lengths else None, "sha256": sha, "gitsha1": None}
    origin = f"{url} (the source's own sha256 list)" if text is not None else f"{spec['url']} (pinned manifest)"
    return {"files": files, "origin": origin}


def apply_pin(manifest: dict, pinned: dict) -> dict:
    """A manifest pinned in the inventory wins; where the source has hashes too they must agree."""
    if not pinned:
        return manifest
    files = {}
    for rel, sha in pinned.items():
        rel = safe_rel(rel)
        src = manifest["files"].get(rel)
        if src is None:
            raise Fail(f"the pinned manifest (model_manifest) lists {rel}, which the source does not have")
        if src.get("sha256") and src["sha256"] != sha:
            raise Fail(f"{rel}: the pinned manifest says sha256 {sha}, the source says {src['sha256']}")
        files[rel] = {"size": src.get("size"), "sha256": sha, "gitsha1": None}
    return {"files": files, "origin": "pinned in the inventory (model_manifest)"}


def resolve(spec: dict, secrets: dict) -> dict:
    scheme = spec["scheme"]
    if scheme == "hf":
        recorded = read_json(spec.get("record") or "", None)
        # A pinned revision never changes: its manifest, once recorded, is reused without the network.
        if recorded and recorded.get("source") == spec["source"] and recorded.get("files"):
            m = {"files": recorded["files"], "origin": recorded.get("origin", "")}
        else:
            m = resolve_hf(spec, secrets)
    elif scheme == "s3":
        m = resolve_s3(spec, secrets)
    elif scheme == "http":
        m = resolve_http(spec, secrets)
    else:
        raise Fail(f"resolve: no remote source of scheme {scheme!r}")
    m = apply_pin(m, spec.get("pinned") or {})
    m["source"] = spec["source"]
    return m


# --- verification -------------------------------------------------------------------------------

def verify(manifest: dict, dest: str, cache: Cache, progress_path: str | None, repair: bool) -> dict:
    """Classify dest's files: ok, missing, outdated (ours, verified against an older manifest),
    mismatched (not ours and different: error unless model_repair), extra (not in the manifest and
    not ours: error), stale (ours, no longer in the manifest: removed when the model is recorded)."""
    files = manifest["files"]
    report = {"ok": [], "missing": [], "outdated": [], "mismatched": [], "extra": [], "stale": [],
              "unhashed": []}
    to_hash = []
    present = set(walk_files(dest)) if os.path.isdir(dest) else set()
    for rel, entry in sorted(files.items()):
        p = os.path.join(dest, rel)
        if rel not in present:
            report["missing"].append(rel)
            continue
        st = os.stat(p)
        hit = cache.lookup(rel, st)
        if hit and (hit.get("gitsha1") or not entry.get("gitsha1") or entry.get("sha256")):
            if not (entry.get("sha256") or entry.get("gitsha1")):
                report["unhashed"].append(rel)
            elif matches(entry, hit):
                report["ok"].append(rel)
            else:
                report["outdated"].append(rel)
            continue
        to_hash.append((rel, st))
    progress = Progress(progress_path, sum(st.st_size for _, st in to_hash), f"verifying {dest}")
    try:
        for rel, st in to_hash:
            entry = files[rel]
            got = hash_file(os.path.join(dest, rel), bool(entry.get("gitsha1") and not entry.get("sha256")), progress)
            st2 = os.stat(os.path.join(dest, rel))
            if stat_key(st2) == stat_key(st):
                cache.store(rel, st2, got)
            if not (entry.get("sha256") or entry.get("gitsha1")):
                report["unhashed"].append(rel)
            elif matches(entry, got):
                report["ok"].append(rel)
            elif entry.get("size") is not None and st.st_size != entry["size"]:
                report["mismatched"].append({"file": rel, "expected": f"{entry['size']} bytes, {expected_text(entry)}",
                                             "got": f"{st.st_size} bytes, {got_text(entry, got)}"})
            else:
                report["mismatched"].append({"file": rel, "expected": expected_text(entry),
                                             "got": got_text(entry, got)})
    finally:
        progress.close()
    for rel in sorted(present - set(files)):
        p = os.path.join(dest, rel)
        if os.path.islink(p) or not os.path.isfile(p):
            report["extra"].append(rel)
        elif cache.lookup(rel, os.stat(p)):
            report["stale"].append(rel)
        else:
            report["extra"].append(rel)
    cache.save()
    need = 0
    todo = report["missing"] + report["outdated"] + ([m["file"] for m in report["mismatched"]] if repair else [])
    for rel in todo:
        need += files[rel].get("size") or 0
    need = max(need - partial_bytes(dest) if os.path.isdir(dest) else need, 0)
    free, probe = free_bytes(dest)
    report.update(bytes_needed=need, bytes_free=free, free_path=probe,
                  bytes_total=sum((e.get("size") or 0) for e in files.values()),
                  complete=not (report["missing"] or report["outdated"] or report["mismatched"] or report["extra"]
                                or report["unhashed"]))
    return report


def record(manifest: dict, dest: str, cache: Cache, record_path: str, report: dict, owner_mode: int = 0o644) -> None:
    """Everything verified: remove our stale files, write MANIFEST.sha256 (sha256 of every file,
    also of those the source only gave a git sha1 for) and the trusted manifest for later runs."""
    for rel in report["stale"]:
        p = os.path.join(dest, rel)
        if cache.lookup(rel, os.stat(p)):  # ours, verified against an earlier manifest
            os.unlink(p)
            cache.drop(rel)
    for rel in list(cache.data):
        if rel not in manifest["files"] and not os.path.exists(os.path.join(dest, rel)):
            cache.drop(rel)
    lines = []
    for rel in sorted(manifest["files"]):
        hit = cache.lookup(rel, os.stat(os.path.join(dest, rel)))
        if not hit:
            raise Fail(f"{rel} changed while it was being recorded; run again")
        lines.append(f"{hit['sha256']}  {rel}")
    text = "\n".join(lines) + "\n"
    target = os.path.join(dest, MANIFEST_NAME)
    old = open(target, encoding="utf-8").read() if os.path.exists(target) else None
    if old != text:
        tmp = f"{target}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, owner_mode)
        os.replace(tmp, target)
    cache.save()
    remove_partials(dest)
    rec = dict(manifest)
    if read_json(record_path, None) != rec:
        write_json_atomic(record_path, rec)
    report["manifest_changed"] = old != text
    report["manifest_sha256"] = hashlib.sha256(text.encode()).hexdigest()


def remove_partials(dest: str) -> None:
    """Our .fleet-partial directories, once the model is complete, unless a transfer still runs
    (it holds the lock)."""
    lock = os.path.join(dest, PARTIAL, ".lock")
    fh = open(lock, "a+") if os.path.exists(lock) else None
    try:
        if fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return
        for d, dirs, _ in os.walk(dest):
            if PARTIAL in dirs:
                shutil.rmtree(os.path.join(d, PARTIAL), ignore_errors=True)
            dirs[:] = [x for x in dirs if x != PARTIAL]
    finally:
        if fh:
            fh.close()


# --- moving bytes -------------------------------------------------------------------------------

class JobLock:
    """One transfer per model directory at a time: a second run (after the controller was
    interrupted, the first still going) waits for the first, up to its own deadline."""

    def __init__(self, dest: str, deadline: float):
        os.makedirs(dest, exist_ok=True)
        self.path = os.path.join(dest, PARTIAL, ".lock")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fh = open(self.path, "a+")
        while True:
            try:
                fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise Fail(f"another transfer into {dest} still holds {self.path}")
                time.sleep(2)
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(str(os.getpid()))
        self.fh.flush()

    def release(self) -> None:
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def place(dest: str, rel: str, tmp: str, entry: dict, cache: Cache, mode: int, uid: int, gid: int) -> None:
    """Check a downloaded file against its manifest entry, then rename it into place."""
    got = hash_file(tmp, bool(entry.get("gitsha1") and not entry.get("sha256")))
    if (entry.get("sha256") or entry.get("gitsha1")) and not matches(entry, got):
        os.unlink(tmp)  # ours, and wrong: the next try starts over
        raise Fail(f"{rel}: the source sent bytes that do not match its manifest: expected {expected_text(entry)}, "
                   f"got {got_text(entry, got)}")
    os.chmod(tmp, mode)
    if uid >= 0:
        os.chown(tmp, uid, gid)
    final = os.path.join(dest, rel)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    os.replace(tmp, final)
    cache.store(rel, os.stat(final), got)


def partial_path(dest: str, rel: str) -> str:
    return os.path.join(dest, PARTIAL, "fetch", rel)


def hf_in_flight(dest: str):
    """Bytes in huggingface_hub's .incomplete files (it resumes them itself)."""
    root = os.path.join(dest, PARTIAL, "hf", ".cache", "huggingface", "download")

    def count() -> int:
        total = 0
        for d, _, files in os.walk(root):
            for f in files:
                if f.endswith(".incomplete"):
                    try:
                        total += os.path.getsize(os.path.join(d, f))
                    except OSError:
                        pass
        return total
    return count


def fetch_hf(spec, secrets, dest, rel, progress):
    from huggingface_hub import hf_hub_download
    path = hf_hub_download(spec["repo"], rel, revision=spec["revision"], local_dir=os.path.join(dest, PARTIAL, "hf"),
                           endpoint=spec["endpoint"], token=secrets.get("hf_token") or False)
    progress.add(os.path.getsize(path))
    return path


def fetch_s3(spec, secrets, dest, rel, progress, client):
    """Ranged GETs append to the partial file: an interrupted download resumes where it stopped."""
    tmp = partial_path(dest, rel)
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    prefix = spec["prefix"].rstrip("/") + "/" if spec["prefix"] else ""
    have = os.path.getsize(tmp) if os.path.exists(tmp) else 0
    head = client.head_object(Bucket=spec["bucket"], Key=prefix + rel)
    size = head["ContentLength"]
    if have > size:
        os.unlink(tmp)
        have = 0
    progress.resume(have)
    if have < size:
        body = client.get_object(Bucket=spec["bucket"], Key=prefix + rel, Range=f"bytes={have}-")["Body"]
        with open(tmp, "ab") as fh:
            for chunk in iter(lambda: body.read(CHUNK), b""):
                fh.write(chunk)
                progress.add(len(chunk))
    return tmp


def fetch_http(spec, secrets, dest, rel, progress, size):
    """curl --continue-at -: an interrupted download resumes from the partial file's size. A
    partial that already holds `size` bytes (cut between its last byte and its check) is checked
    as it is: a range from its end is one the server cannot satisfy (HTTP 416)."""
    tmp = partial_path(dest, rel)
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    have = os.path.getsize(tmp) if os.path.exists(tmp) else 0
    if size is not None and have > size:
        os.unlink(tmp)  # ours, and longer than the file: start over
        have = 0
    progress.resume(have)
    if size is not None and have == size:
        return tmp
    proc = subprocess.Popen(bound_to_us(curl_base(spec) + ["--continue-at", "-", "--output", tmp, http_url(spec, rel)]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = have
    while proc.poll() is None:
        time.sleep(1)
        now = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        progress.add(now - last)
        last = now
    now = os.path.getsize(tmp) if os.path.exists(tmp) else 0
    progress.add(now - last)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise curl_error(spec, subprocess.CompletedProcess(proc.args, proc.returncode, "", err), f"GET {rel}")
    return tmp


def fetch(spec: dict, secrets: dict, manifest: dict, dest: str, cache: Cache, progress_path: str | None,
          mode: int, uid: int, gid: int, workers: int, report: dict) -> dict:
    todo = report["missing"] + report["outdated"] + [m["file"] for m in report["mismatched"]]
    files = manifest["files"]
    if spec.get("offline") and todo:
        raise Fail(f"HF_HUB_OFFLINE is set and {len(todo)} file(s) are not on this node yet "
                   f"({', '.join(todo[:3])}): nothing can be fetched offline")
    total = sum(files[r].get("size") or 0 for r in todo)
    progress = Progress(progress_path, total, f"fetching {len(todo)} file(s) from {spec['source']}")
    client = s3_client(spec, secrets) if spec["scheme"] == "s3" else None
    if spec["scheme"] == "hf":
        progress.in_flight = hf_in_flight(dest)
    errors = []

    def one(rel):
        try:
            if spec["scheme"] == "hf":
                tmp = fetch_hf(spec, secrets, dest, rel, progress)
            elif spec["scheme"] == "s3":
                tmp = fetch_s3(spec, secrets, dest, rel, progress, client)
            else:
                tmp = fetch_http(spec, secrets, dest, rel, progress, files[rel].get("size"))
            place(dest, rel, tmp, files[rel], cache, mode, uid, gid)
        except Fail as exc:
            errors.append(str(exc))
        except Exception as exc:  # a client's own error, named with the file
            if spec["scheme"] == "s3":
                errors.append(str(s3_fail(spec, exc, f"GET {rel}")))
            else:
                errors.append(f"{rel}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")

    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(one, todo))
    finally:
        progress.close()
        cache.save()
    if errors:
        raise Fail("; ".join(errors[:5]))
    return {"fetched": todo, "bytes": total, "bytes_kept": progress.kept}


RSYNC_RECEIVED = re.compile(r"^Total bytes received: ([\d,.]+)", re.M)
RSYNC_SENT = re.compile(r"^Total bytes sent: ([\d,.]+)", re.M)


def rsync_run(argv: list, progress_path: str | None, deadline: float, label: str, sent: bool = False) -> int:
    """Run rsync, its progress lines appended to the progress file; retried on a broken
    connection until the deadline (each retry resumes from .fleet-partial). Returns bytes received."""
    received = 0
    attempt = 0
    while True:
        attempt += 1
        out = open(progress_path, "a", encoding="utf-8") if progress_path else subprocess.DEVNULL
        if progress_path:
            out.write(f"{label}: attempt {attempt}\n")
            out.flush()
        stats_file = f"{progress_path or '/tmp/fleet-model'}.stats"
        with open(stats_file, "w") as stats:
            proc = subprocess.Popen(bound_to_us(argv + ["--stats"]), stdout=stats, stderr=subprocess.PIPE, text=True)
            tail = threading.Thread(target=_pump_progress, args=(stats_file, out, proc), daemon=True)
            tail.start()
            try:
                _, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)  # rsync keeps what it has in .fleet-partial
                proc.wait(timeout=60)
                raise Fail(f"{label}: not finished by its deadline; the next run resumes from what arrived")
            tail.join(timeout=5)
        with open(stats_file) as fh:
            m = (RSYNC_SENT if sent else RSYNC_RECEIVED).search(fh.read())
        if m:
            received += int(m.group(1).replace(",", "").split(".")[0])
        if progress_path:
            out.close()
        if proc.returncode == 0:
            return received
        # 10 socket, 12 protocol stream, 23/24 partial, 30 timeout, 35 daemon timeout, 255 ssh
        if proc.returncode in (10, 12, 23, 24, 30, 35, 255) and time.monotonic() + 15 < deadline:
            if progress_path:  # the reason shows in the Ansible output, and in a deadline failure
                with open(progress_path, "a", encoding="utf-8") as fh:
                    fh.write(f"{label}: rsync exit {proc.returncode} ({' '.join(err.strip().splitlines()[-1:])}); "
                             f"retrying\n")
            time.sleep(min(10 * attempt, 60))
            continue
        raise Fail(f"{label}: rsync exit {proc.returncode}: {' '.join(err.strip().splitlines()[-3:])}")


def _pump_progress(stats_file: str, out, proc) -> None:
    """rsync --info=progress2 rewrites one line with \\r: copy its latest state every few seconds."""
    if out is subprocess.DEVNULL:
        return
    while proc.poll() is None:
        time.sleep(3)
        try:
            with open(stats_file, "rb") as fh:
                fh.seek(max(os.path.getsize(stats_file) - 400, 0))
                last = fh.read().decode("utf-8", "replace").replace("\r", "\n").strip().splitlines()
        except OSError:
            continue
        if last:
            out.write(last[-1].strip() + "\n")
            out.flush()


def rsync_common(args) -> list:
    chown = [f"--chown={args.owner}:{args.group}"] if args.owner else []
    # Only the files still to come are listed (--files-from), each sent whatever its size and time
    # (--ignore-times: a same-size, same-time corrupt copy is repaired, by delta); unfinished files
    # wait in .fleet-partial (--partial-dir, --temp-dir), so a killed transfer leaves nothing half
    # written at a served path and the next one resumes from them.
    return ["rsync", "--recursive", "--times", "--ignore-times", "--partial", f"--partial-dir={PARTIAL}",
            f"--temp-dir={PARTIAL}", f"--chmod=D0755,F{args.mode}", "--info=progress2", "--no-inc-recursive",
            "--timeout=120", f"--exclude=/{MANIFEST_NAME}", *chown]


def todo_of(report: dict) -> list:
    return sorted(report["missing"] + report["outdated"] + [m["file"] for m in report["mismatched"]])


def files_from(dest: str, names: list) -> str:
    path = os.path.join(dest, PARTIAL, "files-from")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(names) + "\n")
    return path


def check_space(report: dict, dest: str, margin_mib: int) -> None:
    need = report["bytes_needed"] + margin_mib * 1024 * 1024
    if need > report["bytes_free"]:
        raise Fail(f"not enough disk space for the model at {dest}: {human(report['bytes_needed'])} still to arrive "
                   f"+ {margin_mib} MiB margin, {human(report['bytes_free'])} free on {report['free_path']}; "
                   f"nothing was copied")


def pull(args, names: list, dest: str, deadline: float) -> dict:
    ssh = ["ssh", "-i", args.ssh_key, "-p", str(args.ssh_port), "-o", "BatchMode=yes",
           "-o", f"UserKnownHostsFile={args.known_hosts}", "-o", "StrictHostKeyChecking=yes",
           "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
    argv = rsync_common(args) + ["-e", " ".join(ssh), f"--files-from={files_from(dest, names)}", f"{args.peer}:./",
                                 dest + "/"]
    received = rsync_run(argv, args.progress, deadline, f"pulling from {args.peer}")
    return {"bytes_received": received}


# --- commands -----------------------------------------------------------------------------------

def load_manifest(path: str) -> dict:
    m = read_json(path, None)
    if not m or not isinstance(m.get("files"), dict) or not m["files"]:
        raise Fail(f"manifest {path} is missing or empty")
    for rel in m["files"]:
        safe_rel(rel)
    return m


def ids(args) -> tuple[int, int, int]:
    import grp
    import pwd
    uid = pwd.getpwnam(args.owner).pw_uid if args.owner else -1
    gid = grp.getgrnam(args.group).gr_gid if args.group else -1
    return int(args.mode, 8), uid, gid


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["manifest-dir", "resolve", "verify", "fetch", "pull", "tofu", "local", "push"])
    ap.add_argument("dir", nargs="?")
    ap.add_argument("--spec")
    ap.add_argument("--secrets")
    ap.add_argument("--manifest")
    ap.add_argument("--dest")
    ap.add_argument("--cache")
    ap.add_argument("--record")
    ap.add_argument("--progress")
    ap.add_argument("--repair", action="store_true")
    ap.add_argument("--peer")
    ap.add_argument("--ssh-key")
    ap.add_argument("--ssh-port", type=int, default=22)
    ap.add_argument("--known-hosts")
    ap.add_argument("--owner", default="")
    ap.add_argument("--group", default="")
    ap.add_argument("--mode", default="0644")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--deadline", type=float, default=3600, help="seconds this command may take")
    ap.add_argument("--origin", default="")
    ap.add_argument("--margin-mib", type=int, default=1024)
    ap.add_argument("--pinned", default="", help="manifest-dir: model_manifest as JSON (wins; must agree)")
    ap.add_argument("--todo", help="push: JSON list of the files the seed lacks")
    ap.add_argument("--ssh-command", default="ssh")
    ap.add_argument("--rsync-path", default="rsync")
    args = ap.parse_args(argv)
    deadline = time.monotonic() + args.deadline
    try:
        out = run(args, deadline)
    except Fail as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    print(json.dumps(out, sort_keys=True))
    return 0


def read_secrets(path: str | None) -> dict:
    if not path:
        return {}
    data = read_json(path, {}) or {}
    return data if isinstance(data, dict) else {}


def run(args, deadline: float) -> dict:
    if args.progress:
        os.makedirs(os.path.dirname(args.progress), exist_ok=True)
        open(args.progress, "w").close()
    if args.command == "push":
        return push(args, deadline)
    if args.command == "manifest-dir":
        m = manifest_of_dir(args.dir, Cache(args.cache), args.progress, args.origin)
        m = apply_pin(m, json.loads(args.pinned) if args.pinned else {})
        m["source"] = args.dir
        return m
    if args.command == "resolve":
        return resolve(read_json(args.spec), read_secrets(args.secrets))
    if args.command == "tofu":
        m = manifest_of_dir(args.dest, Cache(args.cache), args.progress, args.origin, use_own=False)
        m["source"] = args.dest
        return m
    manifest = load_manifest(args.manifest)
    cache = Cache(args.cache)
    if args.command == "verify":
        report = verify(manifest, args.dest, cache, args.progress, args.repair)
        if args.record and report["complete"]:
            record(manifest, args.dest, cache, args.record, report)
            report["recorded"] = True
        return report
    mode, uid, gid = ids(args)
    lock = JobLock(args.dest, deadline)
    try:
        report = verify(manifest, args.dest, cache, args.progress, True)
        if report["complete"]:
            return {"fetched": [], "bytes": 0, "already_complete": True}
        check_space(report, args.dest, args.margin_mib)
        if args.command == "fetch":
            return fetch(read_json(args.spec), read_secrets(args.secrets), manifest, args.dest, cache, args.progress,
                         mode, uid, gid, args.workers, report)
        argv = rsync_common(args)
        if args.command == "local":  # node:/path source: the seed copies from its own directory
            argv += [f"--files-from={files_from(args.dest, todo_of(report))}", args.dir.rstrip("/") + "/",
                     args.dest + "/"]
            # a local rsync's client is its sender: the data is in "bytes sent" (received: the replies)
            return {"bytes_copied": rsync_run(argv, args.progress, deadline, f"copying from {args.dir}", sent=True)}
        if args.command == "pull":
            return pull(args, todo_of(report), args.dest, deadline)
    finally:
        lock.release()
    raise Fail(f"unknown command {args.command}")


def push(args, deadline: float) -> dict:
    """Controller directory -> the seed, over the controller's SSH connection to it: the file list
    is what the seed's check found missing or wrong (--todo)."""
    names = read_json(args.todo, [])
    if not names:
        return {"bytes_sent": 0}
    listfile = f"{args.todo}.list"
    with open(listfile, "w", encoding="utf-8") as fh:
        fh.write("\n".join(names) + "\n")
    argv = rsync_common(args) + ["-e", args.ssh_command, f"--rsync-path={args.rsync_path}", f"--files-from={listfile}",
                                 args.dir.rstrip("/") + "/", f"{args.peer}:{args.dest}/"]
    return {"bytes_sent": rsync_run(argv, args.progress, deadline, f"pushing to {args.peer}", sent=True)}


if __name__ == "__main__":
    sys.exit(main())
