#!/usr/bin/env bash
# GPU proof of the Ray path (issue 8) on one machine with 2 GPUs, vLLM 0.24 + Ray 2.55.1:
# two Ray nodes on one machine as if they were two hosts, PP=2 through vLLM's Ray executor with
# NCCL forced onto its socket transport between the two "hosts", the plugin and the exporter on.
# Run from the repository root on the GPU machine, after the wheelhouse parts are in /tmp/stage:
#   tests/gpu/ray_pp.sh prep   install (+ exporter, + ansible-core from .whl if carried), gpu facts
#                              through the real fleet_gpu_facts module, ~1 B Llama, fabric env of
#                              both "hosts" (fabric_env.detect), fabric check across them over
#                              NCCL sockets, probe vs reference (issue 4)
#   tests/gpu/ray_pp.sh ray    Ray head + worker by fleet-ray-node, PP=2 by fleet-serve --executor
#                              ray, exporter, smoke, NCCL transport lines, TP=2 (mp) beside it,
#                              PP-over-sockets vs TP=2 throughput, metrics, kill a Ray worker and
#                              time the exporter's detection
#   tests/gpu/ray_pp.sh control  (optional) PP=2 again with the plugin's per-node env fix off
#                              (VLLM_FLEET_RAY_KEEP_NODE_ENV=0): which transport NCCL picks then
#   tests/gpu/ray_pp.sh setup    install + model + fabric env only (a fresh machine, before ray)
#   tests/gpu/ray_pp.sh cleanup  stop whatever an earlier phase of this script left running
#   tests/gpu/ray_pp.sh verdict  (1 GPU) install, model, TP=1 through the Ray executor with the
#                              exporter's replica verdict and HAProxy agent port on; under load,
#                              SIGSTOP the Ray worker that runs the model: time until the verdict
#                              says unhealthy and the agent says down, the reasons; SIGCONT: back
# On 4 GPUs (FLEET_GPUS_PER_NODE=2: two "hosts" of 2 GPUs each):
#   tests/gpu/ray_pp.sh prep4    install, model, fabric env, PP timing check (real NCCL works
#                                through the plugin), probe vs reference by medians (GPUs 0,1),
#                                fabric check across the two "hosts" with 2 GPUs each
#   tests/gpu/ray_pp.sh tp2pp2   Ray head + worker with 2 GPUs each, TP=2 x PP=2 by fleet-serve
#                                --executor ray, smoke, exporter, load, TP all-reduce and PP
#                                isend/irecv histograms, the plugin's own cost on the PP path
# The simulated hosts: node-a = 127.0.0.2 + GPU 0 (head), node-b = 127.0.0.3 + GPU 1 (worker),
# both on lo (with FLEET_GPUS_PER_NODE=2: GPUs 0,1 and 2,3); each has its own fabric.env
# (computed by fabric_env.detect, see fabric_env_sim.py) with a distinct NCCL_HOSTID, so NCCL
# treats them as two hosts and has to use NET/Socket between them.
# Everything lands in $OUT (summary on stdout, raw logs in one tarball per phase).
set -uo pipefail
phase=${1:?prep|setup|ray|control|cleanup|prep4|tp2pp2}
OUT=${OUT:-/tmp/out}
LOGS=/tmp/gpu-logs/ray-$phase
mkdir -p "$OUT" "$LOGS"
. "$(dirname "$0")/env.sh"
export VLLM_FLEET_DEPLOYMENT=ray-proof VLLM_FLEET_STATE_DIR=/tmp/fleet-state-ray
# Same-host GPUs must not find each other as one NVLink domain across the two "hosts".
export NCCL_MNNVL_ENABLE=0
MODEL=/tmp/model
SIM=/tmp/fleet-sim
STATE=/tmp/fleet-state-ray          # the PP=2 (Ray) engine's state root, both "nodes"
STATE_TP=/tmp/fleet-state-tp        # the TP=2 (mp) engine's
HEAD=127.0.0.2
RAY_ADDR=$HEAD:6379
GPN=${FLEET_GPUS_PER_NODE:-1}       # GPUs per simulated host; the engine's TP size
GPUS_A=$(seq -s, 0 $((GPN - 1)))    # node-a's GPUs, e.g. 0,1
GPUS_B=$(seq -s, "$GPN" $((2 * GPN - 1)))
log() { printf '[%s] %s\n' "$(date +%T)" "$*"; }

archive() {
  cp -r "$SIM" "$LOGS/fabric-sim" 2>/dev/null
  for d in "$STATE" "$STATE_TP"; do
    [ -d "$d" ] && mkdir -p "$LOGS/state" && cp -r "$d" "$LOGS/state/" 2>/dev/null
  done
  for n in a b; do  # Ray's own logs, small ones only
    find /tmp/ray-$n -name 'raylet.out' -o -name 'gcs_server.out' 2>/dev/null | head -2 |
      while read -r f; do cp "$f" "$LOGS/ray-$n-$(basename "$f")"; done
  done
  find "$LOGS" -type f -size +4M -exec truncate -s 4M {} \;
  tar -C /tmp/gpu-logs -czf "$OUT/ray-$phase-logs.tgz" "ray-$phase"
  log "raw logs: $OUT/ray-$phase-logs.tgz ($(du -h "$OUT/ray-$phase-logs.tgz" | cut -f1))"
}
trap archive EXIT
trap 'exit 143' TERM INT  # a timeout still leaves the raw logs

setup() {
  log "install wheelhouse + vllm_fleet + exporter"
  bash tests/gpu/install_wheelhouse.sh /tmp/stage 2>&1 | tail -1
  rm -rf /tmp/site/vllm_fleet_exporter && cp -r exporter/vllm_fleet_exporter /tmp/site/
  python3 -c 'import prometheus_client, vllm_fleet_exporter; print("exporter ok, prometheus_client", prometheus_client.__version__ if hasattr(prometheus_client, "__version__") else "?")'
}

# ---------------------------------------------------------------- processes
# $1 name, $2 port, $3 timeout: wait for /health, failing as soon as the process is gone.
wait_healthy() {
  local name=$1 port=$2 deadline=$(( $(date +%s) + $3 ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    kill -0 "$(cat /tmp/$name.pid)" 2>/dev/null || { log "$name died:"; tail -n 40 "$LOGS/$name.log"; return 1; }
    python3 tests/gpu/http_check.py health "http://127.0.0.1:$port/health" && { log "$name healthy"; return 0; }
    sleep 2
  done
  log "$name not healthy after $3 s"; tail -n 40 "$LOGS/$name.log"; return 1
}
stop_group() { [ -f "/tmp/$1.pid" ] || return 0; kill -- -"$(cat /tmp/$1.pid)" 2>/dev/null; sleep 3; kill -9 -- -"$(cat /tmp/$1.pid)" 2>/dev/null; rm -f "/tmp/$1.pid"; true; }
# Only what this script started: the process groups of its pid files, and the vLLM processes
# its own launches registered (members/<pid>, checked against their start time, so a reused pid
# is never hit). Never processes by name: a machine may run other people's Ray and vLLM.
PIDFILES="ray-node-a ray-node-b pp2-ray pp2-nofix tp2-mp tp2pp2 tp1-ray exporter-9445 exporter-9446"
kill_leftovers() {
  for n in $PIDFILES; do
    [ -f "/tmp/$n.pid" ] && kill -9 -- -"$(cat "/tmp/$n.pid")" 2>/dev/null; rm -f "/tmp/$n.pid"
  done
  for root in "$STATE" "$STATE_TP"; do
    VLLM_FLEET_STATE_DIR=$root python3 -c 'from vllm_fleet import state; print(*state.read_members())' 2>/dev/null |
      xargs -r kill -9 2>/dev/null
  done
  sleep 2; true
}

# $1 node (node-a|node-b), $2 its GPUs (CUDA_VISIBLE_DEVICES, GPN of them): one Ray node, started
# by the image's entrypoint with that "host's" fabric.env (merged under the process env by
# fleet-ray-node itself).
start_ray_node() {
  local node=$1 gpu=$2 role=(--head --no-dashboard) ports=()
  if [ "$node" = node-b ]; then
    role=(--worker --head-address "$HEAD")
    # a second raylet on the same kernel needs its own ports (real hosts would use the defaults)
    ports=(--node-manager-port 6390 --object-manager-port 6391 --dashboard-agent-port 52375
           --dashboard-agent-grpc-port 52376 --runtime-env-agent-port 52377
           --metrics-export-port 8091 --min-worker-port 11002 --max-worker-port 11999)
  fi
  python3 -m vllm_fleet.entrypoints.ray_node "${role[@]}" --fabric-env "$SIM/$node/fabric.env" \
    --num-gpus "$GPN" --num-cpus 8 --temp-dir "/tmp/ray-${node#node-}" "${ports[@]}" --dry-run \
    > "$LOGS/ray-$node-command.json" 2>&1
  CUDA_VISIBLE_DEVICES=$gpu setsid python3 -m vllm_fleet.entrypoints.ray_node "${role[@]}" \
    --fabric-env "$SIM/$node/fabric.env" --num-gpus "$GPN" --num-cpus 8 \
    --temp-dir "/tmp/ray-${node#node-}" "${ports[@]}" > "$LOGS/ray-$node.log" 2>&1 &
  echo $! > "/tmp/ray-$node.pid"
}

wait_ray_nodes() {  # $1 count, $2 timeout
  local deadline=$(( $(date +%s) + $2 ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    n=$(python3 tests/gpu/ray_nodes_json.py "$RAY_ADDR" 2>/dev/null | python3 -c 'import json,sys; print(sum(1 for n in json.load(sys.stdin) if n["state"] == "ALIVE"))' 2>/dev/null)
    [ "${n:-0}" -ge "$1" ] && { log "ray: $n nodes alive"; return 0; }
    sleep 2
  done
  log "ray: only ${n:-0} nodes alive after $2 s"; tail -n 20 "$LOGS"/ray-node-*.log; return 1
}

# $1 name, $2 port, $3 launch id, rest: extra env. TP=GPN x PP=2 through the Ray executor, by
# fleet-serve with the head's fabric.env (what the API container on the head gets).
start_pp_ray() {
  local name=$1 port=$2 lid=$3; shift 3
  mkdir -p "$STATE/launches/$lid"
  env "$@" VLLM_PLUGINS=fleet NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET,ENV \
    NCCL_DEBUG_FILE="$STATE/launches/$lid/nccl-%h-%p.log" FLEET_NODE_NAME=node-a \
    setsid python3 -m vllm_fleet.entrypoints.serve --engine cuda --executor ray \
    --ray-address "$RAY_ADDR" --fabric-env "$SIM/node-a/fabric.env" --model "$MODEL" \
    --served-model-name tiny --tp "$GPN" --pp 2 --max-model-len 2048 --gpu-memory-utilization 0.3 \
    --host 127.0.0.1 --port "$port" --state-dir "$STATE" --launch-id "$lid" -- --max-num-seqs 64 \
    > "$LOGS/$name.log" 2>&1 &
  echo $! > "/tmp/$name.pid"
}

fabric_check_sockets() {  # $1 max size, $2 launch id, $3 JSON out, $4 timeout s
  # one fleet-fabric-check per "host", each with its fabric.env and GPUs; output per host in $LOGS
  local r node gpus rc0 rc1
  for r in 0 1; do
    node=node-$([ $r = 0 ] && echo a || echo b)
    gpus=$([ $r = 0 ] && echo "$GPUS_A" || echo "$GPUS_B")
    # shellcheck disable=SC2046
    env $(grep -v '^#' "$SIM/$node/fabric.env" | xargs) CUDA_VISIBLE_DEVICES="$gpus" NCCL_DEBUG=INFO \
      NCCL_DEBUG_SUBSYS=INIT,NET,ENV timeout "$4" python3 -m vllm_fleet.fabric_check --nnodes 2 \
      --node-rank $r --master-addr "$HEAD" --nproc-per-node "$GPN" --backend nccl --max-size "$1" \
      --launch-id "$2" --ifname lo --json-out "$3" > "$LOGS/fabric-check-$node.txt" 2>&1 &
    echo $! > /tmp/fabric-$r.pid
  done
  wait "$(cat /tmp/fabric-0.pid)"; rc0=$?; wait "$(cat /tmp/fabric-1.pid)"; rc1=$?
  echo "fabric check rc node-a=$rc0 node-b=$rc1"
}
nccl_lines() {  # $1 launch dir: which transport NCCL used between the ranks
  cat "$1"/nccl-*.log 2>/dev/null | grep -E "via (NET|P2P|SHM)|Using network|NCCL_HOSTID|NET/Socket : Using" |
    sed -E 's/^.*NCCL INFO //' | sort | uniq -c | sort -rn | head -20
}

# $1 port, $2 state dir, $3 engine port, rest: extra JSON config items. The exporter as the
# exporter role configures it on a head, plus what this machine needs (Ray without dashboard:
# ray_command; faster intervals for the detection timing).
start_exporter() {
  local port=$1 state=$2 eport=$3 name=exporter-$1 extra=${4:-}
  cat > "$LOGS/$name.json" <<EOF
{"listen": "127.0.0.1:$port", "host": "node-a", "state_dir": "$state",
 "fabric_file": "$SIM/node-a/fabric.json", "engine_url": "http://127.0.0.1:$eport",
 "health_interval_s": 2, "health_timeout_s": 2, "canary_interval_s": 5, "canary_timeout_s": 10,
 "canary_model": "tiny", "process_interval_s": 1, "nvml": "auto", "gpus_expected": $((2 * GPN))$extra}
EOF
  setsid python3 -m vllm_fleet_exporter --config "$LOGS/$name.json" > "$LOGS/$name.log" 2>&1 &
  echo $! > "/tmp/$name.pid"
}
scrape() { python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:$1/metrics', timeout=5).read().decode())"; }
key_metrics() {
  grep -E '^vllm_fleet_(engine_up|canary_(success|ttft_seconds|runs_total)|ray_(nodes|gpus)|processes|collective_(processes|stale_files|stuck_processes)|gpus |nvml|nccl_transport_in_use)' |
    grep -v '_created\|nccl_transport_in_use.* 0.0$'
}

# The workers' own files ($@: state roots): histograms, probe events and the PP timing's cost.
worker_files() {
  python3 - "$@" <<'EOF'
import glob, json, sys
for root in sys.argv[1:]:
    for f in sorted(glob.glob(f"{root}/launches/*/allreduce-*.json")):
        doc = json.load(open(f))
        ev = doc.get("probe_events")
        if ev:
            print(f"{doc['host']} rank {doc['rank']}: {ev['count']} probe events, mean "
                  f"{ev['sum_s'] / ev['count'] * 1e3:.3f} ms, max {ev['max_s'] * 1e3:.3f} ms on the step path")
        pp = doc.get("pp_timing")
        if pp:
            print(f"{doc['host']} rank {doc['rank']}: PP wrapper calls {pp['count']} ({pp['sampled']} "
                  f"sampled), mean {pp['sum_s'] / pp['count'] * 1e6:.1f} us, max {pp['max_s'] * 1e6:.1f} us "
                  f"on the step path; durations read {pp['durations']}, pending {pp['pending']}, "
                  f"off: {pp['off']}")
        for h in doc["histograms"]:
            if h["count"]:
                print(f"  {doc['host']} rank {doc['rank']} {h['group']} {h['scope']} {h['backend']:>9} "
                      f"{h['size_bytes']:>9} B {h['source']:>5} n={h['count']:>5} "
                      f"mean={h['sum_s'] / h['count'] * 1e6:9.1f} us")
EOF
}

case $phase in
# ======================================================================================== prep
prep)
  { nvidia-smi; nvidia-smi topo -m; } > "$LOGS/nvidia-smi.txt" 2>&1
  grep -A3 "GPU0" "$LOGS/nvidia-smi.txt" | tail -3
  setup
  log "gpu facts: the fleet_gpu_facts module against the real driver (issue 3's real path)"
  if ls .whl/ansible_core-*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ans .whl/ansible_core-*.whl
    . /etc/os-release
    drv=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
    dist=$(case "$ID" in ubuntu) echo Ubuntu;; debian) echo Debian;; *) echo "$ID";; esac)
    printf '{"ANSIBLE_MODULE_ARGS": {"host": "gpu0", "branch": "%s", "distribution": "%s", "kernel": "%s"}}\n' \
      "${drv%%.*}" "$dist" "$(uname -r)" > "$LOGS/gpu-facts-args.json"
    PYTHONPATH=/tmp/ans python3 ansible/plugins/modules/fleet_gpu_facts.py "$LOGS/gpu-facts-args.json" \
      > "$LOGS/gpu-facts.json" 2> "$LOGS/gpu-facts.err"
    echo "module rc=$? (distribution $PRETTY_NAME, driver $drv, kernel $(uname -r))"
    python3 - "$LOGS/gpu-facts.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))["decision"]
for k in ("state", "action", "gpu_count", "nvswitches", "fabric_manager", "loaded_version",
          "smi_state", "smi_version", "installed_version", "reboot_needed", "packages", "reason"):
    print(f"  {k}: {d.get(k)}")
print("  gpus:", ", ".join(f"{g['bus_id']} {g['device']}" for g in d["gpus"]))
EOF
  else
    echo "no .whl/ansible_core wheel carried: gpu facts skipped"
  fi
  if [ ! -f "$MODEL/config.json" ]; then
    log "make a ~1 B random-weight Llama (hidden 4096, 4 layers, PP=2 divides it)"
    python3 tools/make_tiny_llama.py "$MODEL" --hidden 4096 --layers 4 --pp 2 --device cuda \
      > "$LOGS/model.log" 2>&1 || { tail "$LOGS/model.log"; exit 1; }
    tail -1 "$LOGS/model.log"
  fi
  log "fabric env of both \"hosts\" (fabric_env.detect, as the fabric role computes it)"
  python3 tests/gpu/fabric_env_sim.py "$SIM" | tee "$LOGS/fabric-env.txt"
  log "fabric check across the two \"hosts\" over NCCL sockets, 8 B .. 1 GiB"
  fabric_check_sockets 1G fabric-sock "$LOGS/fabric-check-sockets.json" 400
  grep -v '^JSON\|NCCL INFO' "$LOGS/fabric-check-node-a.txt" | tail -20
  echo "--- NCCL transport between the two \"hosts\" (fabric check):"
  grep -hE "via (NET|P2P|SHM)|Using network|NCCL_HOSTID" "$LOGS"/fabric-check-node-*.txt |
    sed -E 's/^.*NCCL INFO //' | sort | uniq -c | sort -rn | head -8
  log "probe vs reference loop on vLLM's TP group (2 GPUs, NVLink)"
  timeout 300 python3 benchmarks/probe_vs_reference.py --world 2 --iters 50 --rounds 10 \
    --json "$LOGS/probe-vs-reference.json" > "$LOGS/probe-vs-reference.txt" 2>&1
  echo "probe bench rc=$?"; grep -E "size|^ +[0-9]|deviation" "$LOGS/probe-vs-reference.txt"
  ;;
# ======================================================================================== setup
setup)  # install + model + fabric env only (a fresh machine before `ray`)
  setup
  python3 -c 'import vllm, ray, vllm_fleet_exporter' || exit 1
  [ -f "$MODEL/config.json" ] || python3 tools/make_tiny_llama.py "$MODEL" --hidden 4096 --layers 4 \
    --pp 2 --device cuda > "$LOGS/model.log" 2>&1 || { tail "$LOGS/model.log"; exit 1; }
  python3 tests/gpu/fabric_env_sim.py "$SIM" > "$LOGS/fabric-env.txt" || exit 1
  log "setup done"
  ;;
# ======================================================================================== ray
ray)
  setup
  python3 -c 'import vllm, ray, vllm_fleet_exporter' || exit 1  # fail fast on a fresh machine
  kill_leftovers
  rm -rf "$STATE" "$STATE_TP" /tmp/ray-a /tmp/ray-b
  [ -f "$SIM/node-a/fabric.env" ] || python3 tests/gpu/fabric_env_sim.py "$SIM" > "$LOGS/fabric-env.txt"
  log "Ray head node-a (GPU 0, 127.0.0.2) and worker node-b (GPU 1, 127.0.0.3) by fleet-ray-node"
  start_ray_node node-a "$GPUS_A"
  sleep 8
  start_ray_node node-b "$GPUS_B"
  wait_ray_nodes 2 90 || exit 1
  python3 -c 'import json,sys; print(" ".join(json.load(open(sys.argv[1]))["argv"]))' "$LOGS/ray-node-b-command.json"
  for _ in $(seq 15); do  # the autoscaler's view lags the GCS by a few seconds
    ray status --address "$RAY_ADDR" > "$LOGS/ray-status.txt" 2>&1
    [ "$(grep -c '^ 1 node_' "$LOGS/ray-status.txt")" -ge 2 ] && break; sleep 2
  done
  sed -n 1,20p "$LOGS/ray-status.txt"
  python3 tests/gpu/ray_nodes_json.py "$RAY_ADDR" > "$LOGS/ray-nodes.json"

  LID=pp2-ray-$(date +%s)
  log "PP=2 through the Ray executor: fleet-serve --executor ray (launch $LID)"
  start_pp_ray pp2-ray 8011 "$LID"
  wait_healthy pp2-ray 8011 300 || exit 1
  grep -h "fleet-serve:" "$LOGS/pp2-ray.log" | head -1 | cut -c1-400
  grep -hE "vllm-fleet" "$LOGS/pp2-ray.log" | grep -E "Ray workers keep|hooks active|PP timing|p2p gate|inactive" | sed -E 's/^.*\[vllm-fleet/[vllm-fleet/' | sort -u | head -12
  grep -hE "Copying the following environment variables" "$LOGS/pp2-ray.log" | head -1 | cut -c1-600
  echo "--- NCCL transport between the two \"hosts\" (serving engine):"
  nccl_lines "$STATE/launches/$LID" | tee "$LOGS/pp2-nccl-transport.txt"
  echo "--- non-stream"; python3 tests/gpu/http_check.py chat 8011 false | head -c 400; echo
  echo "--- stream"; python3 tests/gpu/http_check.py chat 8011 true | head -4
  start_exporter 9445 "$STATE" 8011 ", \"ray_command\": [\"python3\", \"$PWD/tests/gpu/ray_nodes_json.py\", \"$RAY_ADDR\"], \"ray_interval_s\": 5, \"ray_expected_nodes\": 2, \"ray_expected_gpus\": 2, \"processes\": [{\"name\": \"engine\", \"pattern\": \"vllm\\\\.entrypoints\\\\.openai\\\\.api_server|fleet-serve\", \"expected\": 1}, {\"name\": \"raylet\", \"pattern\": \"/raylet( |$)\", \"expected\": 2}, {\"name\": \"ray_worker\", \"pattern\": \"ray::RayWorker\", \"expected\": 2}]"

  LID_TP=tp2-mp-$(date +%s)
  log "TP=2 on one node (mp executor, NVLink) beside it: fleet-serve --executor mp (launch $LID_TP)"
  env VLLM_PLUGINS=fleet setsid python3 -m vllm_fleet.entrypoints.serve --engine cuda --executor mp \
    --model "$MODEL" --served-model-name tiny --tp 2 --pp 1 --max-model-len 2048 \
    --gpu-memory-utilization 0.3 --host 127.0.0.1 --port 8012 --state-dir "$STATE_TP" \
    --launch-id "$LID_TP" -- --max-num-seqs 64 > "$LOGS/tp2-mp.log" 2>&1 &
  echo $! > /tmp/tp2-mp.pid
  wait_healthy tp2-mp 8012 240 || exit 1
  start_exporter 9446 "$STATE_TP" 8012
  log "throughput: PP=2 over NCCL sockets (Ray, 2 \"hosts\") vs TP=2 on one node, interleaved"
  python3 benchmarks/serving_ab.py --endpoint tp2-one-node=http://127.0.0.1:8012/v1 \
    --endpoint pp2-ray-sockets=http://127.0.0.1:8011/v1 --model tiny --rounds 6 --requests 256 \
    --concurrency 64 --max-tokens 128 --json "$LOGS/serving-pp-vs-tp.json" 2>&1 | tee "$LOGS/serving-pp-vs-tp.txt"
  sleep 6  # one more canary + flush of the workers' histogram files
  scrape 9445 > "$LOGS/metrics-pp2-ray.txt"; scrape 9446 > "$LOGS/metrics-tp2-mp.txt"
  echo "--- exporter (PP=2 Ray engine):"; key_metrics < "$LOGS/metrics-pp2-ray.txt"
  grep -E '^vllm_fleet_allreduce_latency_seconds_(count|sum)' "$LOGS/metrics-pp2-ray.txt" | head -12
  echo "--- exporter (TP=2 engine):"; grep -E '^vllm_fleet_(engine_up|canary_ttft_seconds)' "$LOGS/metrics-tp2-mp.txt"
  grep -E '^vllm_fleet_allreduce_latency_seconds_(count|sum)' "$LOGS/metrics-tp2-mp.txt" | head -14
  worker_files "$STATE" "$STATE_TP"
  stop_group exporter-9446; stop_group tp2-mp

  log "engine death: kill -9 one Ray worker of the serving engine (node-b's), exporter scraped every 0.5 s"
  victim=$(ls "$STATE/launches/$LID"/collective-node-b-*.json 2>/dev/null | head -1 | sed -E 's/.*-([0-9]+)\.json/\1/')
  echo "victim: pid ${victim:-?} ($(tr '\0' ' ' < /proc/${victim:-0}/cmdline 2>/dev/null | cut -c1-80))"
  python3 - "$LOGS/death-scrape.txt" <<'EOF' &
import re, sys, time, urllib.request
keys = re.compile(r'^vllm_fleet_(engine_up|canary_success|processes\{process="ray_worker"\}|'
                  r'collective_processes|collective_stale_files|ray_nodes_alive) ')
end = time.time() + 40
with open(sys.argv[1], "w") as out:
    while time.time() < end:
        t = time.time()
        try:
            text = urllib.request.urlopen("http://127.0.0.1:9445/metrics", timeout=2).read().decode()
            vals = " ".join(f"{l.split()[0]}={l.split()[1]}" for l in text.splitlines() if keys.match(l))
        except Exception as exc:
            vals = f"scrape failed: {exc}"
        out.write(f"{t:.3f} {vals}\n"); out.flush()
        time.sleep(max(0, 0.5 - (time.time() - t)))
EOF
  scraper=$!
  sleep 5
  t_kill=$(date +%s.%N); kill -9 "$victim" && echo "killed $victim at $t_kill"
  echo "$t_kill $victim" > "$LOGS/death-kill.txt"
  wait $scraper
  python3 - "$LOGS/death-scrape.txt" "$t_kill" <<'EOF'
import sys
t_kill = float(sys.argv[2])
rows = []
for line in open(sys.argv[1]):
    t, *kv = line.split()
    rows.append((float(t), dict(x.rsplit("=", 1) for x in kv if "=" in x)))
before = [v for t, v in rows if t < t_kill]
base = before[-1] if before else {}
print("before the kill:", " ".join(f"{k.replace('vllm_fleet_', '')}={v}" for k, v in sorted(base.items())))
for key in sorted(base):
    for t, v in rows:
        if t >= t_kill and key in v and v[key] != base[key]:
            print(f"  {key.replace('vllm_fleet_', ''):45s} {base[key]} -> {v[key]} after {t - t_kill:5.1f} s")
            break
    else:
        print(f"  {key.replace('vllm_fleet_', ''):45s} unchanged for {rows[-1][0] - t_kill:.0f} s")
EOF
  tail -3 "$LOGS/death-scrape.txt" | cut -c1-300
  grep -hE "RayActorError|ActorDiedError|died|EngineDeadError|RayChannel" "$LOGS/pp2-ray.log" | head -5 | cut -c1-300
  ray status --address "$RAY_ADDR" > "$LOGS/ray-status-after-kill.txt" 2>&1
  stop_group exporter-9445; stop_group pp2-ray; stop_group ray-node-b; stop_group ray-node-a
  ;;
# ======================================================================================== cleanup
cleanup)
  kill_leftovers
  ;;
# ======================================================================================== control
control)
  setup
  kill_leftovers
  rm -rf "$STATE" /tmp/ray-a /tmp/ray-b
  [ -f "$SIM/node-a/fabric.env" ] || python3 tests/gpu/fabric_env_sim.py "$SIM" > "$LOGS/fabric-env.txt"
  start_ray_node node-a "$GPUS_A"; sleep 8; start_ray_node node-b "$GPUS_B"
  wait_ray_nodes 2 90 || exit 1
  LID=pp2-ray-nofix-$(date +%s)
  log "PP=2 through Ray with the per-node env fix OFF: the driver's NCCL_* reach node-b's worker"
  start_pp_ray pp2-nofix 8013 "$LID" VLLM_FLEET_RAY_KEEP_NODE_ENV=0
  wait_healthy pp2-nofix 8013 300 || exit 1
  python3 tests/gpu/http_check.py chat 8013 false | head -c 200; echo
  echo "--- NCCL transport with the driver's NCCL_HOSTID copied to both workers:"
  nccl_lines "$STATE/launches/$LID" | tee "$LOGS/pp2-nofix-nccl-transport.txt"
  stop_group pp2-nofix; stop_group ray-node-b; stop_group ray-node-a
  ;;
# ======================================================================================== prep4
prep4)  # 4 GPUs, FLEET_GPUS_PER_NODE=2
  [ "$GPN" -ge 2 ] || { echo "prep4 needs FLEET_GPUS_PER_NODE=2 (4 GPUs)"; exit 1; }
  { nvidia-smi; nvidia-smi topo -m; } > "$LOGS/nvidia-smi.txt" 2>&1
  grep -A5 "GPU0" "$LOGS/nvidia-smi.txt" | tail -5
  setup
  python3 -c 'import vllm, ray, vllm_fleet_exporter' || exit 1
  if [ ! -f "$MODEL/config.json" ]; then
    log "make a ~1 B random-weight Llama (hidden 4096, 4 layers, PP=2 divides it)"
    python3 tools/make_tiny_llama.py "$MODEL" --hidden 4096 --layers 4 --pp 2 --device cuda \
      > "$LOGS/model.log" 2>&1 || { tail "$LOGS/model.log"; exit 1; }
    tail -1 "$LOGS/model.log"
  fi
  python3 tests/gpu/fabric_env_sim.py "$SIM" | tee "$LOGS/fabric-env.txt"
  log "PP timing check: real ProcessGroupNCCL isend/irecv works through the plugin (GPUs $GPUS_B)"
  CUDA_VISIBLE_DEVICES=$GPUS_B timeout 180 python3 tests/gpu/pp_timing_check.py --iters 200 --mib 4 \
    > "$LOGS/pp-timing-check.txt" 2> "$LOGS/pp-timing-check.err"
  echo "pp timing check rc=$?"; cat "$LOGS/pp-timing-check.txt"
  grep -v '^\[{' "$LOGS/pp-timing-check.err" | tail -5
  log "probe vs reference on vLLM's TP group (GPUs $GPUS_A, NVLink), per-call medians"
  CUDA_VISIBLE_DEVICES=$GPUS_A timeout 300 python3 tests/gpu/probe_ref_median.py --world 2 --iters 50 \
    --rounds 40 --json "$LOGS/probe-ref-median.json" > "$LOGS/probe-ref-median.txt" 2>&1
  echo "probe median bench rc=$?"
  grep -vE "^(INFO|WARNING|DEBUG)|^\(|^\[" "$LOGS/probe-ref-median.txt" | tail -14
  log "fabric check across the two \"hosts\", $GPN GPUs each, NCCL sockets between them, 8 B .. 256 MiB"
  fabric_check_sockets 256M fabric-sock4 "$LOGS/fabric-check-sockets-4.json" 240
  grep -v '^JSON\|NCCL INFO' "$LOGS/fabric-check-node-a.txt" | tail -22
  echo "--- NCCL transports (fabric check, both \"hosts\"):"
  grep -hE "via (NET|P2P|SHM)|Using network" "$LOGS"/fabric-check-node-*.txt |
    sed -E 's/^.*NCCL INFO //; s/Channel [0-9]+\/[0-9]+ : //' | sort | uniq -c | sort -rn | head -12
  ;;
# ======================================================================================== tp2pp2
tp2pp2)  # 4 GPUs, FLEET_GPUS_PER_NODE=2: TP=2 x PP=2 through the Ray executor across 2 "hosts"
  [ "$GPN" -ge 2 ] || { echo "tp2pp2 needs FLEET_GPUS_PER_NODE=2 (4 GPUs)"; exit 1; }
  setup
  python3 -c 'import vllm, ray, vllm_fleet_exporter' || exit 1
  [ -f "$MODEL/config.json" ] || { echo "no model: run prep4 first"; exit 1; }
  kill_leftovers
  rm -rf "$STATE" /tmp/ray-a /tmp/ray-b
  [ -f "$SIM/node-a/fabric.env" ] || python3 tests/gpu/fabric_env_sim.py "$SIM" > "$LOGS/fabric-env.txt"
  log "Ray head node-a (GPUs $GPUS_A, $HEAD) and worker node-b (GPUs $GPUS_B, 127.0.0.3) by fleet-ray-node"
  start_ray_node node-a "$GPUS_A"
  sleep 8
  start_ray_node node-b "$GPUS_B"
  wait_ray_nodes 2 90 || exit 1
  for _ in $(seq 15); do
    ray status --address "$RAY_ADDR" > "$LOGS/ray-status.txt" 2>&1
    [ "$(grep -c '^ 1 node_' "$LOGS/ray-status.txt")" -ge 2 ] && break; sleep 2
  done
  sed -n 1,20p "$LOGS/ray-status.txt"
  python3 tests/gpu/ray_nodes_json.py "$RAY_ADDR" > "$LOGS/ray-nodes.json"
  python3 - "$LOGS/ray-nodes.json" <<'EOF'
import json, sys
for n in json.load(open(sys.argv[1])):
    res = n.get("resources_total") or {}
    print(f"  node {n.get('node_ip') or n.get('node_manager_address')}: {n['state']}, GPU {res.get('GPU')}, CPU {res.get('CPU')}")
EOF

  LID=tp2pp2-ray-$(date +%s)
  log "TP=$GPN x PP=2 through the Ray executor: fleet-serve --executor ray (launch $LID)"
  start_pp_ray tp2pp2 8011 "$LID"
  wait_healthy tp2pp2 8011 420 || exit 1
  grep -h "fleet-serve:" "$LOGS/tp2pp2.log" | head -1 | cut -c1-400
  grep -hE "vllm-fleet" "$LOGS/tp2pp2.log" | grep -E "Ray workers keep|hooks active|PP timing|p2p gate|inactive" |
    sed -E 's/^.*\[vllm-fleet/[vllm-fleet/; s/pid [0-9]+/pid N/' | sort | uniq -c | cut -c1-400 | head -16
  echo "--- NCCL transports (serving engine, all communicators):"
  cat "$STATE/launches/$LID"/nccl-*.log 2>/dev/null | grep -E "via (NET|P2P|SHM)|Using network|NCCL_HOSTID" |
    sed -E 's/^.*NCCL INFO //; s/Channel [0-9]+\/[0-9]+ : //' | sort | uniq -c | sort -rn |
    tee "$LOGS/tp2pp2-nccl-transport.txt" | head -16
  echo "--- non-stream"; python3 tests/gpu/http_check.py chat 8011 false | head -c 400; echo
  echo "--- stream"; python3 tests/gpu/http_check.py chat 8011 true | head -4
  start_exporter 9445 "$STATE" 8011 ", \"ray_command\": [\"python3\", \"$PWD/tests/gpu/ray_nodes_json.py\", \"$RAY_ADDR\"], \"ray_interval_s\": 5, \"ray_expected_nodes\": 2, \"ray_expected_gpus\": $((2 * GPN)), \"processes\": [{\"name\": \"engine\", \"pattern\": \"vllm\\\\.entrypoints\\\\.openai\\\\.api_server|fleet-serve\", \"expected\": 1}, {\"name\": \"raylet\", \"pattern\": \"/raylet( |$)\", \"expected\": 2}, {\"name\": \"ray_worker\", \"pattern\": \"ray::RayWorker\", \"expected\": $((2 * GPN))}]"
  log "load: 4 rounds x 512 chat completions of 128 tokens, concurrency 64"
  timeout 300 python3 benchmarks/serving_ab.py --endpoint tp2pp2-ray=http://127.0.0.1:8011/v1 \
    --model tiny --rounds 4 --requests 512 --concurrency 64 --max-tokens 128 \
    --json "$LOGS/serving-tp2pp2.json" 2>&1 | tee "$LOGS/serving-tp2pp2.txt"
  sleep 7  # one more canary + flush of the workers' histogram files
  scrape 9445 > "$LOGS/metrics-tp2pp2-ray.txt"
  echo "--- exporter (TP=$GPN x PP=2 Ray engine):"; key_metrics < "$LOGS/metrics-tp2pp2-ray.txt"
  grep -E '^vllm_fleet_(p2p_gate_info|nccl_transport_connections)' "$LOGS/metrics-tp2pp2-ray.txt" | cut -c1-300
  grep -E '^vllm_fleet_allreduce_latency_seconds_(count|sum)' "$LOGS/metrics-tp2pp2-ray.txt" | head -40
  echo "--- the workers' own files:"
  worker_files "$STATE"
  stop_group exporter-9445; stop_group tp2pp2; stop_group ray-node-b; stop_group ray-node-a
  ;;
# ======================================================================================== verdict
verdict)  # 1 GPU: the replica verdict on the real CUDA path (issue 14)
  setup
  if [ ! -f "$MODEL/config.json" ]; then
    log "make a ~1 B random-weight Llama (hidden 4096, 4 layers)"
    python3 tools/make_tiny_llama.py "$MODEL" --hidden 4096 --layers 4 --pp 2 --device cuda \
      > "$LOGS/model.log" 2>&1 || { tail "$LOGS/model.log"; exit 1; }
  fi
  python3 tests/gpu/fabric_env_sim.py "$SIM" > "$LOGS/fabric-env.txt"
  kill_leftovers
  start_ray_node node-a 0
  wait_ray_nodes 1 180 || exit 1
  LID=verdict-ray-$(date +%s)
  mkdir -p "$STATE/launches/$LID"
  log "TP=1 through the Ray executor: fleet-serve --executor ray (launch $LID)"
  env VLLM_PLUGINS=fleet FLEET_NODE_NAME=node-a setsid python3 -m vllm_fleet.entrypoints.serve \
    --engine cuda --executor ray --ray-address "$RAY_ADDR" --fabric-env "$SIM/node-a/fabric.env" \
    --model "$MODEL" --served-model-name tiny --tp 1 --pp 1 --max-model-len 2048 \
    --gpu-memory-utilization 0.3 --host 127.0.0.1 --port 8011 --state-dir "$STATE" --launch-id "$LID" \
    -- --max-num-seqs 64 > "$LOGS/tp1-ray.log" 2>&1 &
  echo $! > /tmp/tp1-ray.pid
  wait_healthy tp1-ray 8011 420 || exit 1
  start_exporter 9445 "$STATE" 8011 ", \"verdict_enabled\": true, \"expect_engine\": true, \"deployment\": \"ray-proof\", \"agent_listen\": \"127.0.0.1:9446\", \"canary_interval_s\": 30"
  v() { python3 -c 'import json,sys,urllib.request,urllib.error
try: r = urllib.request.urlopen("http://127.0.0.1:9445/verdict", timeout=3).read()
except urllib.error.HTTPError as e: r = e.read()
d = json.loads(r); print(d["state"], "|", "; ".join(p["reason"] + ": " + p["detail"] for p in d["problems"]))' 2>/dev/null; }
  agent() { python3 -c 'import socket; s = socket.create_connection(("127.0.0.1", 9446), 3); print(s.recv(512).decode().strip())' 2>/dev/null; }
  deadline=$(( $(date +%s) + 180 ))
  until v | grep -q '^healthy'; do [ "$(date +%s)" -lt "$deadline" ] || { log "never healthy: $(v)"; exit 1; }; sleep 1; done
  log "verdict: $(v); agent: $(agent)"
  echo "--- members registered by the launch's processes (pid, start ticks):"
  ls "$STATE/launches/$LID/members" | head; ls "$STATE/launches/$LID" | grep -c collective- | sed 's/^/collective files: /'
  timeout 600 python3 benchmarks/serving_ab.py --endpoint tp1-ray=http://127.0.0.1:8011/v1 \
    --model tiny --rounds 100 --requests 64 --concurrency 8 --max-tokens 64 > "$LOGS/load.txt" 2>&1 &
  loadpid=$!
  sleep 15
  worker=$(VLLM_FLEET_STATE_DIR=$STATE python3 -c 'from vllm_fleet import state
import json, os, sys
for pid in state.read_members():
    cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    if "RayWorkerWrapper" in cmd or "ray::" in cmd: print(pid); break')
  log "SIGSTOP of the Ray worker that runs the model: pid $worker ($(tr '\0' ' ' < /proc/$worker/cmdline | cut -c1-80))"
  since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
  t0=$(date +%s.%N); kill -STOP "$worker"
  while ! v | grep -q '^unhealthy'; do sleep 0.2; [ "$(since "$t0" | cut -d. -f1)" -ge 60 ] && break; done
  log "verdict after $(since "$t0") s: $(v)"
  while ! agent | grep -q '^down'; do sleep 0.2; [ "$(since "$t0" | cut -d. -f1)" -ge 60 ] && break; done
  log "agent after $(since "$t0") s: $(agent)"
  scrape 9445 | grep -E '^vllm_fleet_(replica_state|replica_problem|host_problem|host_healthy)' | grep -v ' 0.0$' \
    | tee "$LOGS/verdict-metrics-stopped.txt"
  sleep 5; kill -CONT "$worker"; t2=$(date +%s.%N)
  while ! v | grep -q '^healthy'; do sleep 0.5; [ "$(since "$t2" | cut -d. -f1)" -ge 120 ] && break; done
  log "after SIGCONT: $(v) in $(since "$t2") s; agent: $(agent)"
  kill "$loadpid" 2>/dev/null; wait "$loadpid" 2>/dev/null
  tail -3 "$LOGS/load.txt"
  stop_group exporter-9445; stop_group tp1-ray; stop_group ray-node-a
  ;;
esac
