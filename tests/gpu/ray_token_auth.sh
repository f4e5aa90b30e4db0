#!/usr/bin/env bash
# GPU proof of Ray token authentication through the REAL Ray executor (issue 15), one GPU:
# a Ray head started by fleet-ray-node with RAY_AUTH_MODE=token and the token in a root-only file
# (as the ray_cluster role runs it), fleet-serve --executor ray (the cuda engine's path) with the
# same token file and the engine key from a file, then:
#   1. the GCS refuses a client without the token and serves one with it;
#   2. the API serves with the engine key (plain and streamed), 401 without it;
#   3. the Ray worker that holds the model (RayWorkerWrapper) has RAY_AUTH_MODE and the token
#      file's path, but neither VLLM_API_KEY nor the token itself in its environment;
#   4. the exporter's Ray collector (ray_command + ray_token_file) counts the node;
#   5. the plugin recorded the shm segments the launch created (launches/<id>/shm/).
# Run from the repository root on the GPU machine, after the wheelhouse parts are in /tmp/stage:
#   tests/gpu/ray_token_auth.sh          (OUT=/tmp/out: summary on stdout, raw logs in a tarball)
# Not run by the helper that wrote it (no GPU here); the lead runs it with the other GPU proofs.
set -uo pipefail
OUT=${OUT:-/tmp/out}
LOGS=/tmp/gpu-logs/ray-token
mkdir -p "$OUT" "$LOGS"
. "$(dirname "$0")/env.sh"
export VLLM_FLEET_DEPLOYMENT=token-proof VLLM_FLEET_STATE_DIR=/tmp/fleet-state-token
MODEL=/tmp/model-token
SECRETS=/tmp/fleet-secrets-token   # stands for /etc/vllm-fleet/secrets/<deployment> (root, 0700)
HEAD=127.0.0.2
RAY_ADDR=$HEAD:6379
PORT=8021
LID=token-proof-$(date +%s)-abcdef
log() { printf '[%s] %s\n' "$(date +%T)" "$*"; }
fail=0
check() {  # $1 what, $2 command: PASS/FAIL line, counted
  if eval "$2" >> "$LOGS/checks.log" 2>&1; then log "PASS $1"; else log "FAIL $1"; fail=$((fail + 1)); fi
}

stop_group() { [ -f "/tmp/$1.pid" ] || return 0; kill -- -"$(cat /tmp/$1.pid)" 2>/dev/null; sleep 3; kill -9 -- -"$(cat /tmp/$1.pid)" 2>/dev/null; rm -f "/tmp/$1.pid"; true; }
finish() {
  stop_group token-serve; stop_group token-exporter; stop_group token-ray
  cp -r "$VLLM_FLEET_STATE_DIR" "$LOGS/state" 2>/dev/null
  find /tmp/ray-token -name 'gcs_server.out' -o -name 'raylet.out' 2>/dev/null | head -2 |
    while read -r f; do cp "$f" "$LOGS/"; done
  find "$LOGS" -type f -size +4M -exec truncate -s 4M {} \;
  tar -C /tmp/gpu-logs -czf "$OUT/ray-token-logs.tgz" ray-token
  log "raw logs: $OUT/ray-token-logs.tgz; $fail check(s) failed"
}
trap finish EXIT
trap 'exit 143' TERM INT

python3 -c 'import vllm, ray, vllm_fleet_exporter' 2>/dev/null || bash tests/gpu/ray_pp.sh setup
python3 -c 'import ray; print("ray", ray.__version__)' | tee "$LOGS/versions.txt"
if [ ! -f "$MODEL/config.json" ]; then
  python3 tools/make_tiny_llama.py "$MODEL" --hidden 1024 --layers 2 --device cuda > "$LOGS/model.log" 2>&1 ||
    { tail "$LOGS/model.log"; exit 1; }
fi
rm -rf "$SECRETS" "$VLLM_FLEET_STATE_DIR" /tmp/ray-token && install -d -m 0700 "$SECRETS"
python3 -c 'import secrets; print(secrets.token_urlsafe(36))' > "$SECRETS/ray-auth-token"
python3 -c 'import secrets; print(secrets.token_urlsafe(36))' > "$SECRETS/api-key"
chmod 0600 "$SECRETS"/*
printf 'FLEET_RAY_NODE_IP=%s\nVLLM_HOST_IP=%s\nNCCL_SOCKET_IFNAME=lo\nGLOO_SOCKET_IFNAME=lo\n' "$HEAD" "$HEAD" > "$LOGS/fabric.env"
TOKEN_ENV=(RAY_AUTH_MODE=token "RAY_AUTH_TOKEN_PATH=$SECRETS/ray-auth-token")

log "Ray head with token authentication (fleet-ray-node, as the ray_cluster role starts it)"
env "${TOKEN_ENV[@]}" CUDA_VISIBLE_DEVICES=0 setsid python3 -m vllm_fleet.entrypoints.ray_node --head \
  --no-dashboard --fabric-env "$LOGS/fabric.env" --num-gpus 1 --num-cpus 8 --temp-dir /tmp/ray-token \
  > "$LOGS/ray-head.log" 2>&1 &
echo $! > /tmp/token-ray.pid
deadline=$(( $(date +%s) + 120 ))
# Until the head's own node is ALIVE: the GCS answers (an empty list) before its raylet registers.
until env "${TOKEN_ENV[@]}" python3 tests/gpu/ray_nodes_json.py "$RAY_ADDR" > "$LOGS/ray-nodes.json" 2>/dev/null &&
      grep -q '"state": "ALIVE"' "$LOGS/ray-nodes.json"; do
  [ "$(date +%s)" -lt "$deadline" ] || { log "Ray head not up in 120 s"; tail -n 30 "$LOGS/ray-head.log"; exit 1; }
  sleep 2
done
check "GCS serves a client with the token (1 node ALIVE)" \
  "grep -q '\"state\": \"ALIVE\"' $LOGS/ray-nodes.json"
check "GCS refuses a client without the token" \
  "! env -u RAY_AUTH_MODE -u RAY_AUTH_TOKEN_PATH HOME=/tmp/no-home timeout 60 python3 tests/gpu/ray_nodes_json.py $RAY_ADDR"
check "GCS refuses a client with a wrong token" \
  "! env RAY_AUTH_MODE=token RAY_AUTH_TOKEN=not-the-token HOME=/tmp/no-home timeout 60 python3 tests/gpu/ray_nodes_json.py $RAY_ADDR"

log "fleet-serve --executor ray (TP=1), the engine key and the Ray token from files"
mkdir -p "$VLLM_FLEET_STATE_DIR/launches/$LID"
env "${TOKEN_ENV[@]}" VLLM_PLUGINS=fleet FLEET_NODE_NAME=node-a setsid python3 -m vllm_fleet.entrypoints.serve \
  --engine cuda --executor ray --ray-address "$RAY_ADDR" --fabric-env "$LOGS/fabric.env" --model "$MODEL" \
  --served-model-name tiny --tp 1 --pp 1 --max-model-len 1024 --gpu-memory-utilization 0.3 \
  --api-key-file "$SECRETS/api-key" --host 127.0.0.1 --port "$PORT" --state-dir "$VLLM_FLEET_STATE_DIR" \
  --launch-id "$LID" > "$LOGS/serve.log" 2>&1 &
echo $! > /tmp/token-serve.pid
deadline=$(( $(date +%s) + 600 ))
until python3 tests/gpu/http_check.py health "http://127.0.0.1:$PORT/health"; do
  kill -0 "$(cat /tmp/token-serve.pid)" 2>/dev/null || { log "fleet-serve died"; tail -n 40 "$LOGS/serve.log"; exit 1; }
  [ "$(date +%s)" -lt "$deadline" ] || { log "not healthy in 600 s"; tail -n 40 "$LOGS/serve.log"; exit 1; }
  sleep 3
done
chat() {  # $1 stream true|false, $2 key file ('' for no key): HTTP status
  python3 - "$PORT" "$1" "$2" <<'EOF'
import json, sys, urllib.error, urllib.request
port, stream, key_file = sys.argv[1], sys.argv[2] == "true", sys.argv[3]
key = open(key_file).read().strip() if key_file else ""
body = {"model": "tiny", "max_tokens": 8, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
try:
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                                       json.dumps(body).encode(), headers), timeout=60) as r:
        r.read()
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
EOF
}
check "chat with the engine key: 200 (plain)" "[ \"\$(chat false $SECRETS/api-key)\" = 200 ]"
check "chat with the engine key: 200 (streamed)" "[ \"\$(chat true $SECRETS/api-key)\" = 200 ]"
check "chat without a key: 401" "[ \"\$(chat false '')\" = 401 ]"

log "the Ray worker's environment (members of the launch; RayWorkerWrapper holds the model)"
python3 - "$VLLM_FLEET_STATE_DIR" "$SECRETS/ray-auth-token" > "$LOGS/worker-env.txt" 2>&1 <<'EOF'
import json, os, sys
from vllm_fleet import state
os.environ["VLLM_FLEET_STATE_DIR"] = sys.argv[1]
token = open(sys.argv[2]).read().strip()
found = 0
for pid in state.read_members():
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        env = dict(x.split("=", 1) for x in open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace").split("\0") if "=" in x)
    except OSError:
        continue
    if "RayWorkerWrapper" not in cmd and "ray::" not in cmd:
        continue
    found += 1
    bad = [k for k in ("VLLM_API_KEY", "RAY_AUTH_TOKEN") if k in env] + (["token value"] if token in "\0".join(env.values()) else [])
    print(pid, cmd[:60], "RAY_AUTH_MODE=" + env.get("RAY_AUTH_MODE", "-"), "BAD:" + ",".join(bad) if bad else "clean")
print("ray workers checked:", found)
EOF
cat "$LOGS/worker-env.txt"
check "Ray workers hold no API key and no token value, and run with token auth" \
  "grep -q 'ray workers checked: [1-9]' $LOGS/worker-env.txt && ! grep -q BAD: $LOGS/worker-env.txt && grep -q RAY_AUTH_MODE=token $LOGS/worker-env.txt"

log "the exporter's Ray collector with the token file"
cat > "$LOGS/exporter.json" <<EOF
{"listen": "127.0.0.1:9455", "host": "node-a", "state_dir": "$VLLM_FLEET_STATE_DIR",
 "ray_command": ["python3", "$PWD/tests/gpu/ray_nodes_json.py", "$RAY_ADDR"], "ray_interval_s": 2,
 "ray_token_file": "$SECRETS/ray-auth-token", "ray_expected_nodes": 1, "nvml": "off"}
EOF
setsid python3 -m vllm_fleet_exporter --config "$LOGS/exporter.json" > "$LOGS/exporter.log" 2>&1 &
echo $! > /tmp/token-exporter.pid
sleep 8
python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9455/metrics', timeout=5).read().decode())" \
  > "$LOGS/exporter-metrics.txt" 2>&1
grep -E '^vllm_fleet_ray_nodes|collector_success\{collector="ray"' "$LOGS/exporter-metrics.txt"
check "exporter: vllm_fleet_ray_nodes_alive 1 through the token" \
  "grep -qE '^vllm_fleet_ray_nodes_alive 1(\\.0)?$' $LOGS/exporter-metrics.txt"

ls "$VLLM_FLEET_STATE_DIR/launches/$LID/shm/" > "$LOGS/shm-records.txt" 2>&1
check "the launch recorded its shm segments" "[ -s $LOGS/shm-records.txt ]"
log "summary: $fail failed"
exit $(( fail > 0 ))
