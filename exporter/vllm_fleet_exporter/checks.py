"""Network checks run by background jobs (not the plugin's all-reduce probe): engine /health, canary chat completion, Ray nodes.

Stdlib HTTP only (urllib) so the exporter's only dependency is prometheus-client.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional

USER_AGENT = "vllm-fleet-exporter"


@dataclasses.dataclass(frozen=True)
class HealthResult:
    up: bool
    status: int  # HTTP status, 0 when no response
    duration_s: float
    error: str = ""


def check_health(base_url: str, timeout_s: float) -> HealthResult:
    """GET {base_url}/health; up only on HTTP 200. Never raises."""
    url = base_url.rstrip("/") + "/health"
    t0 = time.perf_counter()
    try:
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            resp.read(4096)
            status = resp.status
        return HealthResult(status == 200, status, time.perf_counter() - t0)
    except urllib.error.HTTPError as exc:
        return HealthResult(False, exc.code, time.perf_counter() - t0, f"HTTP {exc.code}")
    except Exception as exc:  # connection refused, timeout, reset …
        return HealthResult(False, 0, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")


@dataclasses.dataclass(frozen=True)
class CanaryResult:
    success: bool
    ttft_s: Optional[float]  # time from sending the request to the first content token
    duration_s: float
    tokens: int  # streamed chunks that carried content
    model: str
    error: str = ""


def _headers(api_key: str) -> Dict[str, str]:
    h = {"User-Agent": USER_AGENT, "Content-Type": "application/json"}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    return h


def discover_model(base_url: str, api_key: str, timeout_s: float) -> str:
    req = urllib.request.Request(base_url.rstrip("/") + "/v1/models", headers=_headers(api_key))
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        data = json.loads(resp.read(1 << 20))
    models = data.get("data") or []
    if not models:
        raise RuntimeError("/v1/models lists no model")
    return str(models[0]["id"])


def run_canary(base_url: str, model: str, prompt: str, max_tokens: int, api_key: str,
               timeout_s: float) -> CanaryResult:
    """Streamed chat completion; success = HTTP 200, >= 1 content token, and a clean end."""
    t0 = time.perf_counter()
    deadline = t0 + timeout_s
    ttft = None
    tokens = 0
    try:
        if not model:
            model = discover_model(base_url, api_key, timeout_s)
        body = json.dumps({
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        }).encode()
        req = urllib.request.Request(base_url.rstrip("/") + "/v1/chat/completions", data=body,
                                     headers=_headers(api_key), method="POST")
        t0 = time.perf_counter()  # TTFT counts from the request, not from model discovery
        done = False
        with urllib.request.urlopen(req, timeout=max(0.1, deadline - t0)) as resp:
            while True:
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"canary exceeded {timeout_s} s")
                line = resp.readline()
                if not line:
                    break
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    raise RuntimeError(f"stream error: {chunk['error']}")
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("content") or delta.get("reasoning_content"):
                        tokens += 1
                        if ttft is None:
                            ttft = time.perf_counter() - t0
        dur = time.perf_counter() - t0
        if tokens == 0:
            return CanaryResult(False, None, dur, 0, model, "no content token streamed")
        if not done:
            return CanaryResult(False, ttft, dur, tokens, model, "stream ended without [DONE]")
        return CanaryResult(True, ttft, dur, tokens, model)
    except urllib.error.HTTPError as exc:
        return CanaryResult(False, ttft, time.perf_counter() - t0, tokens, model,
                            f"HTTP {exc.code}")
    except Exception as exc:
        return CanaryResult(False, ttft, time.perf_counter() - t0, tokens, model,
                            f"{type(exc).__name__}: {exc}")


@dataclasses.dataclass(frozen=True)
class RayState:
    nodes_alive: int
    nodes_dead: int
    gpus: float  # summed over alive nodes
    cpus: float


def parse_ray_nodes(data: Any) -> RayState:
    """Accepts `ray list nodes --format json` output (a list) or the dashboard's
    /api/v0/nodes reply ({"data": {"result": {"result": [...]}}})."""
    nodes: Any = data
    if isinstance(data, dict):
        if data.get("result") is False:
            raise RuntimeError(f"ray state API error: {data.get('msg')}")
        nodes = data.get("data", data)
        while isinstance(nodes, dict) and "result" in nodes:
            nodes = nodes["result"]
    if not isinstance(nodes, list):
        raise ValueError("unrecognised Ray node list")
    alive = dead = 0
    gpus = cpus = 0.0
    for node in nodes:
        state = str(node.get("state", "")).upper()
        if state == "ALIVE":
            alive += 1
            res = node.get("resources_total") or {}
            gpus += float(res.get("GPU", 0) or 0)
            cpus += float(res.get("CPU", 0) or 0)
        else:
            dead += 1
    return RayState(alive, dead, gpus, cpus)


def query_ray(url: str, command: List[str], timeout_s: float, token_file: str = "") -> RayState:
    """Ray's node list from the dashboard's state API (or a command). With a token file (Ray token
    authentication) the token goes as a bearer token; a command gets RAY_AUTH_MODE=token and the
    file's path, so the token never appears on a command line."""
    if command:
        env = None
        if token_file:
            env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_file)
            env.pop("RAY_AUTH_TOKEN", None)
        out = subprocess.run(command, capture_output=True, timeout=timeout_s, check=True,
                             stdin=subprocess.DEVNULL, env=env)
        return parse_ray_nodes(json.loads(out.stdout))
    headers = {"User-Agent": USER_AGENT}
    if token_file:
        with open(token_file, encoding="utf-8") as fh:  # re-read: rotation needs no restart
            headers["Authorization"] = "Bearer " + fh.readline().strip()
    req = urllib.request.Request(url.rstrip("/") + "/api/v0/nodes?limit=10000&detail=true",
                                 headers=headers)
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return parse_ray_nodes(json.loads(resp.read(16 << 20)))


def fetch_verdict(base_url: str, timeout_s: float) -> Dict[str, Any]:
    """GET {base_url}/verdict of another host's exporter: its JSON, also when it answers 503
    (an unhealthy host says why in the body). Raises when there is no JSON answer."""
    req = urllib.request.Request(base_url.rstrip("/") + "/verdict",
                                 headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            body = resp.read(1 << 20)
    except urllib.error.HTTPError as exc:
        if exc.code != 503:
            raise
        body = exc.read(1 << 20)
    data = json.loads(body)
    if not isinstance(data, dict) or "state" not in data:
        raise ValueError("not a verdict")
    return data
