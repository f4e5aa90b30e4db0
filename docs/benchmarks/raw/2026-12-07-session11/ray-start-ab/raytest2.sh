#!/bin/bash
python3 -c 'import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1",6380)); s.listen(); time.sleep(300)' &
sleep 1
start=$(date +%s)
timeout 250 python3 -m vllm_fleet.entrypoints.ray_start start --block --head --port=6379 --node-ip-address=127.0.0.1 --include-dashboard=false \
  --node-manager-port=6380 --dashboard-agent-listen-port=52365 --dashboard-agent-grpc-port=52366 --metrics-export-port=8090 \
  --runtime-env-agent-port=52367 --num-cpus=1 --temp-dir=/tmp/ray > /tmp/start.log 2>&1
echo "rc=$? after $(( $(date +%s) - start ))s"
grep -h "exited while\|RayProcessExited\|timed out\|Error\|error" /tmp/start.log | cut -c1-300 | head -8
tail -3 /tmp/ray/session_latest/logs/raylet.out | cut -c1-250
