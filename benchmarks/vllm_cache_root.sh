#!/usr/bin/env bash
# What does keeping vLLM's model-info cache (VLLM_CACHE_ROOT/modelinfos) across launches save, as
# the vllm_serve role does? Starts the OpenAI server ROUNDS times in each of two ways, alternating,
# and prints the seconds to /health and to vLLM's "Resolved architecture" line, side by side:
#   cold       an empty VLLM_CACHE_ROOT (a new container without the role's mount)
#   modelinfo  a new, empty VLLM_CACHE_ROOT holding only the modelinfos/ of an earlier start (the
#              role's mount): the rest of the cache (compile artifacts) is not kept
#   benchmarks/vllm_cache_root.sh MODEL_DIR [ENGINE_VENV=/opt/vllm-cpu] [OUT_DIR=build/vllm-cache-root] [ROUNDS=2]
# Logs: OUT_DIR/<way>-<round>.log (vLLM's own messages); figures: OUT_DIR/result.txt.
# Run it on an idle machine, or under tools/with_load.sh for the busy figure (same script).
set -uo pipefail
model=$(cd "${1:?model directory}" && pwd); venv=${2:-/opt/vllm-cpu}; out=${3:-build/vllm-cache-root}; rounds=${4:-2}
mkdir -p "$out"; out=$(cd "$out" && pwd); rm -rf "$out"/root-* "$out"/modelinfos "$out"/*.log
port=18777

start() {  # way round -> "<s to /health> <s to Resolved architecture>"
  local way=$1 round=$2 root="$out/root-$1-$2" log="$out/$1-$2.log"
  mkdir -p "$root"
  [ "$way" = modelinfo ] && cp -r "$out/modelinfos" "$root/modelinfos"
  local t0; t0=$(date +%s.%N)
  VLLM_CACHE_ROOT="$root" VLLM_CPU_KVCACHE_SPACE=1 "$venv/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$model" --host 127.0.0.1 --port $port --max-model-len 512 > "$log" 2>&1 &
  local pid=$! deadline=$(( $(date +%s) + 900 )) resolved=""
  until curl -sf http://127.0.0.1:$port/health >/dev/null; do
    [ -z "$resolved" ] && grep -q "Resolved architecture" "$log" && resolved=$(echo "$(date +%s.%N) - $t0" | bc)
    sleep 0.5
    if ! kill -0 $pid 2>/dev/null || [ "$(date +%s)" -ge $deadline ]; then
      echo "$way-$round: no /health within 900 s (see $log)" >&2; kill $pid 2>/dev/null; wait $pid 2>/dev/null
      return 1
    fi
  done
  local up; up=$(echo "$(date +%s.%N) - $t0" | bc)
  [ -z "$resolved" ] && resolved=$up
  kill $pid 2>/dev/null; wait $pid 2>/dev/null
  # the first cold start fills the cache the modelinfo starts copy
  [ -d "$out/modelinfos" ] || cp -r "$root/modelinfos" "$out/modelinfos"
  printf '%.1f %.1f\n' "$up" "$resolved"
}

{
  echo "# $(date -u +%FT%TZ) $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); vllm $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))' 2>/dev/null)"
  echo "round way        to_health_s to_resolved_architecture_s"
  declare -A sum
  for round in $(seq 1 "$rounds"); do
    for way in cold modelinfo; do
      if r=$(start $way "$round"); then
        set -- $r; printf '%-5s %-10s %11s %26s\n' "$round" "$way" "$1" "$2"
        sum[$way]=$(echo "${sum[$way]:-0} + $1" | bc)
      else
        echo "$round $way failed"; exit 1
      fi
    done
  done
  c=$(echo "scale=1; ${sum[cold]} / $rounds" | bc); m=$(echo "scale=1; ${sum[modelinfo]} / $rounds" | bc)
  echo "mean to /health: cold $c s, modelinfo $m s, saved $(echo "$c - $m" | bc) s per start ($(echo "scale=2; $m / $c" | bc) x)"
  echo "kept cache: $(du -sh "$out/modelinfos" | cut -f1) in $(ls "$out/modelinfos" | wc -l) file(s); a full cache root after one start: $(du -sh "$out/root-cold-1" | cut -f1)"
} | tee "$out/result.txt"
