#!/bin/bash
# $1 = wrapper|plain ; runs ray start --head in a CPU-starved container, reports the raylet's fate
mode=$1
if [ "$mode" = wrapper ]; then cmd="python3 -m vllm_fleet.entrypoints.ray_start"; else cmd="ray"; fi
timeout 240 $cmd start --head --port=6379 --node-ip-address=127.0.0.1 --dashboard-port=8265 --include-dashboard=false \
  --dashboard-agent-listen-port=52365 --dashboard-agent-grpc-port=52366 --metrics-export-port=8090 \
  --runtime-env-agent-port=52367 --num-cpus=1 --temp-dir=/tmp/ray > /tmp/start.log 2>&1
echo "ray start rc=$?"
grep -h "Ray runtime started\|timed out during\|RayProcessExited\|exited while" /tmp/start.log | cut -c1-250 | head -3
grep -h "Timed out waiting for file" /tmp/ray/session_latest/logs/raylet.out | cut -c1-200 | head -2
grep -o "dashboard_agent_listen_port=[0-9]*" /proc/*/cmdline 2>/dev/null | head -1
ls /tmp/ray/session_latest/ | grep -i port | head
for p in /proc/[0-9]*; do c=$(tr '\0' ' ' < $p/cmdline 2>/dev/null); case "$c" in *raylet/raylet*) echo "$c" | grep -o "dashboard_agent_listen_port=[0-9]*" || echo "raylet without the flag";; esac; done
grep -h "Timed out waiting\|Check failed" /tmp/ray/session_latest/logs/raylet.out | cut -c1-220 | head -2
