#!/usr/bin/env bash
# GPU proof of the vllm-fleet plugin (issue 4) on one host with 2 GPUs, vLLM 0.24 TP=2.
# Run from the repository root on the GPU machine, after the wheelhouse parts are in /tmp/stage:
#   tests/gpu/plugin_tp2.sh prep    install, make a ~1 B Llama, P2P gate, fabric check, probe bench
#   tests/gpu/plugin_tp2.sh serve   plugin vs no plugin (interleaved throughput), then serving
#                                   with peer access declared unavailable
#   tests/gpu/plugin_tp2.sh overhead  longer interleaved throughput runs: no plugin, plugin,
#                                   plugin with the probe off (where the overhead comes from);
#                                   ROUNDS=N (default 8); prints the probe events' own cost
# Everything lands in $OUT (a summary on stdout, raw logs in one tarball per phase).
set -uo pipefail
phase=${1:?prep|serve}
OUT=${OUT:-/tmp/out}
LOGS=/tmp/gpu-logs/$phase
mkdir -p "$OUT" "$LOGS"
. "$(dirname "$0")/env.sh"
export VLLM_FLEET_STATE_DIR=/tmp/fleet-state VLLM_FLEET_DEPLOYMENT=gpu-proof FLEET_NODE_NAME=gpu0
MODEL=/tmp/model
log() { printf '[%s] %s\n' "$(date +%T)" "$*"; }

archive() {
  cp -r "$VLLM_FLEET_STATE_DIR" "$LOGS/state" 2>/dev/null
  tar -C /tmp/gpu-logs -czf "$OUT/$phase-logs.tgz" "$phase"
  log "raw logs: $OUT/$phase-logs.tgz"
}
trap archive EXIT

# Start a vLLM API server in the background; $1 name, $2 port, rest: extra env (KEY=VAL).
start_server() {
  local name=$1 port=$2; shift 2
  env "$@" VLLM_FLEET_LAUNCH_ID="$name-$(date +%s)" setsid python3 -m vllm.entrypoints.openai.api_server \
    --model "$MODEL" --served-model-name tiny --tensor-parallel-size 2 --host 127.0.0.1 --port "$port" \
    --gpu-memory-utilization 0.25 --max-model-len 2048 --max-num-seqs 64 \
    > "$LOGS/$name.log" 2>&1 &
  echo $! > "/tmp/$name.pid"
}

# Wait for /health, failing as soon as the server process is gone; $1 name, $2 port, $3 timeout.
wait_healthy() {
  local name=$1 port=$2 deadline=$(( $(date +%s) + $3 ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    kill -0 "$(cat /tmp/$name.pid)" 2>/dev/null || { log "$name died:"; tail -30 "$LOGS/$name.log"; return 1; }
    python3 tests/gpu/http_check.py health "http://127.0.0.1:$port/health" && { log "$name healthy"; return 0; }
    sleep 2
  done
  log "$name not healthy after $3 s"; tail -30 "$LOGS/$name.log"; return 1
}

stop_server() { kill -- -"$(cat /tmp/$1.pid)" 2>/dev/null; sleep 3; kill -9 -- -"$(cat /tmp/$1.pid)" 2>/dev/null; true; }

chat() { python3 tests/gpu/http_check.py chat "$1" "$2"; }  # $1 port, $2 stream true|false

# Wheelhouse + our package (refreshed every call) and the model (made once per machine).
setup() {
  log "install wheelhouse + vllm_fleet"
  bash tests/gpu/install_wheelhouse.sh /tmp/stage 2>&1 | tail -1
  if [ ! -f "$MODEL/config.json" ]; then
    log "make a ~1 B random-weight Llama (hidden 4096, 4 layers)"
    python3 tools/make_tiny_llama.py "$MODEL" --hidden 4096 --layers 4 --device cuda > "$LOGS/model.log" 2>&1 \
      || { tail "$LOGS/model.log"; exit 1; }
    tail -1 "$LOGS/model.log"
  fi
}

case $phase in
prep)
  { nvidia-smi; nvidia-smi topo -m; } > "$LOGS/nvidia-smi.txt" 2>&1
  grep -A4 "GPU0" "$LOGS/nvidia-smi.txt" | tail -4
  setup
  log "P2P gate (real CUDA IPC probe)"
  python3 -m vllm_fleet.p2p_gate 2>&1 | tee "$LOGS/p2p-gate.txt" | tail -2
  log "fabric check, 2 GPUs, NCCL, 8 B .. 1 GiB"
  timeout 300 python3 -m vllm_fleet.fabric_check --nproc-per-node 2 --backend nccl --max-size 1G \
    --launch-id fabric-gpu --json-out "$LOGS/fabric-check.json" > "$LOGS/fabric-check.txt" 2>&1
  echo "fabric check rc=$?"; grep -v '^JSON' "$LOGS/fabric-check.txt" | tail -40
  log "probe vs reference loop on vLLM's TP group"
  timeout 300 python3 benchmarks/probe_vs_reference.py --world 2 --iters 50 --rounds 5 \
    --json "$LOGS/probe-vs-reference.json" > "$LOGS/probe-vs-reference.txt" 2>&1
  echo "probe bench rc=$?"; grep -E "size|^ +[0-9]|deviation" "$LOGS/probe-vs-reference.txt"
  ;;
serve)
  setup
  rm -rf "$VLLM_FLEET_STATE_DIR/p2p-cache"  # the workers' gate probes for real, not from prep's cache
  log "A: plugin on (default probe cadence); B: no plugin; same GPUs, same model"
  start_server with-plugin 8001 VLLM_PLUGINS=fleet
  start_server without-plugin 8002 VLLM_PLUGINS=
  wait_healthy with-plugin 8001 360 && wait_healthy without-plugin 8002 360 || exit 1
  grep -h "vllm-fleet" "$LOGS/with-plugin.log" | grep -E "p2p gate|hooks active|inactive" | sort -u | head -8
  echo "--- non-stream"; chat 8001 false | head -c 400; echo
  echo "--- stream"; chat 8001 true | head -5
  log "throughput, interleaved rounds"
  python3 benchmarks/serving_ab.py --endpoint without-plugin=http://127.0.0.1:8002/v1 \
    --endpoint with-plugin=http://127.0.0.1:8001/v1 --model tiny --rounds 6 --requests 128 \
    --concurrency 32 --max-tokens 128 --json "$LOGS/serving-ab.json" 2>&1 | tee "$LOGS/serving-ab.txt"
  python3 - <<'EOF'
import glob, json
for f in sorted(glob.glob("/tmp/fleet-state/launches/with-plugin-*/allreduce-*.json")):
    doc = json.load(open(f))
    for h in doc["histograms"]:
        if h["count"]:
            print(f"rank {doc['rank']} {h['group']} {h['backend']:>9} {h['size_bytes']:>9} B "
                  f"{h['source']:>5} n={h['count']:>4} mean={h['sum_s'] / h['count'] * 1e6:8.1f} us")
EOF
  stop_server with-plugin; stop_server without-plugin
  log "C: peer access declared unavailable (VLLM_FLEET_P2P=unavailable)"
  start_server p2p-declared-off 8003 VLLM_PLUGINS=fleet VLLM_FLEET_P2P=unavailable VLLM_FLEET_PROBE_EVERY_STEPS=5
  wait_healthy p2p-declared-off 8003 360 || exit 1
  grep -h "p2p gate" "$LOGS/p2p-declared-off.log" | sort -u | head -3
  for i in 1 2 3 4; do chat 8003 false > "$LOGS/p2p-declared-off-chat-$i.json" || echo "chat $i FAILED"; done
  head -c 300 "$LOGS/p2p-declared-off-chat-4.json"; echo
  python3 - <<'EOF'
import glob, json
backends = set()
for f in glob.glob("/tmp/fleet-state/launches/p2p-declared-off-*/allreduce-*.json"):
    backends |= {h["backend"] for h in json.load(open(f))["histograms"] if h["count"]}
print("backends seen with P2P declared unavailable:", sorted(backends) or "none yet")
EOF
  stop_server p2p-declared-off
  ;;
overhead)
  setup
  # One after another: engines profiling GPU memory at the same time misjudge what is free.
  start_server without-plugin 8002 VLLM_PLUGINS=
  wait_healthy without-plugin 8002 300 || exit 1
  start_server with-plugin 8001 VLLM_PLUGINS=fleet
  wait_healthy with-plugin 8001 300 || exit 1
  start_server plugin-probe-off 8004 VLLM_PLUGINS=fleet VLLM_FLEET_PROBE_EVERY_STEPS=0
  wait_healthy plugin-probe-off 8004 300 || exit 1
  python3 benchmarks/serving_ab.py --endpoint without-plugin=http://127.0.0.1:8002/v1 \
    --endpoint with-plugin=http://127.0.0.1:8001/v1 --endpoint plugin-probe-off=http://127.0.0.1:8004/v1 \
    --model tiny --rounds "${ROUNDS:-8}" --requests 512 --concurrency 64 --max-tokens 128 \
    --json "$LOGS/serving-overhead.json" 2>&1 | tee "$LOGS/serving-overhead.txt"
  sleep 3  # the workers' flusher writes the last probe events
  python3 - <<'EOF'
import glob, json
for f in sorted(glob.glob("/tmp/fleet-state/launches/with-plugin-*/allreduce-*.json")):
    doc = json.load(open(f))
    ev = doc.get("probe_events")
    if ev:  # CPU time each probe event took on the step path (issue 4: the probe's cost)
        print(f"rank {doc['rank']} ({f.split('/')[-2]}): {ev['count']} probe events, mean "
              f"{ev['sum_s'] / ev['count'] * 1e3:.3f} ms, max {ev['max_s'] * 1e3:.3f} ms")
    for h in doc["histograms"]:
        if h["count"] and h["source"] == "probe":
            print(f"  rank {doc['rank']} {h['backend']:>9} {h['size_bytes']:>9} B n={h['count']:>4} "
                  f"mean={h['sum_s'] / h['count'] * 1e6:8.1f} us")
EOF
  for s in without-plugin with-plugin plugin-probe-off; do stop_server "$s"; done
  ;;
esac
