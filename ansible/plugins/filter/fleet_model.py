# -*- coding: utf-8 -*-
"""Filters of the model role: parse fleet_model_source, plan the node-to-node fan-out.

parse_source() is also what the validate stage (fleet_validate_inventory) calls, so a bad source
is rejected before any host is contacted, with the same words the role would use.
"""
from __future__ import annotations

import math
import re
from urllib.parse import urlsplit

try:
    from ansible.errors import AnsibleFilterError
except ImportError:  # pragma: no cover - the pure functions are importable without Ansible
    AnsibleFilterError = ValueError

HF_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
SCHEMES = ("(empty: already on every node)", "/controller/dir", "node:/dir/on/the/seed",
           "hf://org/name@<40-hex commit>", "s3://bucket/prefix", "http(s)://mirror/path")


class SourceError(ValueError):
    pass


def parse_source(source) -> dict:
    """fleet_model_source -> {"scheme": none|controller|node|hf|s3|http, ...}; SourceError says why not."""
    source = "" if source is None else str(source).strip()
    if not source:
        return {"scheme": "none", "source": ""}
    if source.startswith("/"):
        _check_path(source, "a controller directory")
        return {"scheme": "controller", "source": source, "path": source.rstrip("/") or "/"}
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", source)
    scheme = m.group(1).lower() if m else ""
    if scheme == "node":
        path = source[len("node:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path.startswith("/"):
            raise SourceError("node: needs an absolute path on the seed node, e.g. node:/mnt/models/llama-70b")
        _check_path(path, "a node path")
        return {"scheme": "node", "source": source, "path": path.rstrip("/")}
    if scheme == "hf":
        rest = source[len("hf://"):] if source.startswith("hf://") else None
        if rest is None:
            raise SourceError("write Hugging Face sources as hf://org/name@<commit>")
        repo, sep, revision = rest.partition("@")
        repo = repo.strip("/")
        if not HF_REPO_RE.match(repo) or ".." in repo:
            raise SourceError(f"{repo!r} is not a Hugging Face repo id such as Qwen/Qwen2.5-32B-Instruct")
        if not sep or not revision:
            raise SourceError("the revision is missing: pin the commit, e.g. hf://org/name@<40-hex commit> "
                              "(a branch moves; the manifest must not)")
        if not COMMIT_RE.match(revision):
            raise SourceError(f"revision {revision!r} is not a 40-hex commit id: branches and tags move, pin the "
                              f"commit they point at")
        return {"scheme": "hf", "source": source, "repo": repo, "revision": revision}
    if scheme == "s3":
        parts = urlsplit(source)
        bucket, prefix = parts.netloc, parts.path.strip("/")
        if not bucket:
            raise SourceError("the bucket is missing: write s3://bucket/prefix (the endpoint goes in "
                              "model_s3_endpoint_url)")
        if not BUCKET_RE.match(bucket) or ".." in bucket:
            raise SourceError(f"{bucket!r} is not an S3 bucket name (3-63 lower-case letters, digits, '.', '-')")
        if parts.query or parts.fragment or ".." in prefix.split("/"):
            raise SourceError("the prefix must be a plain path without '..', '?' or '#'")
        return {"scheme": "s3", "source": source, "bucket": bucket, "prefix": prefix}
    if scheme in ("http", "https"):
        parts = urlsplit(source)
        if not parts.hostname:
            raise SourceError("the URL has no host")
        if parts.username or parts.password:
            raise SourceError("credentials do not belong in the URL (they would end up in logs)")
        if parts.query or parts.fragment:
            raise SourceError("the URL must name the tree's root directory, without '?' or '#'")
        return {"scheme": "http", "source": source, "url": source.rstrip("/") + "/"}
    if not scheme:
        raise SourceError(f"{source!r} is neither an absolute path on the controller nor a known scheme; use one "
                          f"of: {', '.join(SCHEMES)}")
    raise SourceError(f"unknown scheme {scheme + ':'!r}; use one of: {', '.join(SCHEMES)}")


def _check_path(path: str, what: str) -> None:
    if ".." in path.split("/") or "\n" in path:
        raise SourceError(f"{what} must be an absolute path without '..'")


def check_manifest(pinned) -> str:
    """model_manifest: {relative path: sha256}; '' when fine, else why not."""
    if pinned in (None, "", {}):
        return ""
    if not isinstance(pinned, dict):
        return "must be a mapping of relative file path to sha256 (YAML, e.g. in group_vars)"
    for rel, sha in pinned.items():
        rel = str(rel)
        if rel.startswith("/") or ".." in rel.split("/") or not rel:
            return f"path {rel!r} must be relative, without '..'"
        if not re.match(r"^[0-9a-f]{64}$", str(sha)):
            return f"{rel}: {sha!r} is not a 64-hex sha256"
    return ""


def fleet_model_source(source) -> dict:
    try:
        return parse_source(source)
    except SourceError as exc:
        raise AnsibleFilterError(f"fleet_model_source={source!r}: {exc}") from exc


def fleet_model_fanout(receivers, seed) -> list:
    """Rounds of (receiver, sender) pairs, doubling: after round r the seed and 2**(r+1)-1 receivers
    hold the model, so every pair carries it once and N nodes take ceil(log2(N+1)) rounds."""
    have = [seed]
    todo = [r for r in receivers if r != seed]
    rounds = []
    while todo:
        pairs = []
        for sender in list(have):
            if not todo:
                break
            receiver = todo.pop(0)
            pairs.append({"receiver": receiver, "sender": sender})
        have += [p["receiver"] for p in pairs]
        rounds.append(pairs)
    return rounds


def fleet_model_deadline(size_bytes, min_rate_mib_s, base_s=300) -> int:
    """Seconds a transfer or a hash of size_bytes may take at the slowest acceptable rate."""
    rate = max(float(min_rate_mib_s), 0.1) * 1024 * 1024
    return int(base_s + math.ceil(float(size_bytes or 0) / rate))


class FilterModule:
    def filters(self):
        return {"fleet_model_source": fleet_model_source, "fleet_model_fanout": fleet_model_fanout,
                "fleet_model_deadline": fleet_model_deadline}
