#!/usr/bin/env bash
# Session 11: while the heavy rolling restart runs, time node1's Ray answers three ways, every 20 s.
out=${1:-/work/notes/s11-monitor}; mkdir -p $out
H=fleetlab-node1
while :; do
  ts=$(date +%T); load=$(cut -d' ' -f1 /proc/loadavg)
  t0=$(date +%s.%N)
  dash=$(timeout 60 docker exec $H python3 -c '
import json,urllib.request,sys
tok=open("/etc/vllm-fleet/exporter-ray-token").readline().strip()
r=urllib.request.Request("http://172.28.20.11:8265/api/v0/nodes?limit=100",headers={"Authorization":"Bearer "+tok})
d=json.load(urllib.request.urlopen(r,timeout=50))
print(sum(1 for n in d["data"]["result"]["result"] if n["state"]=="ALIVE"))' 2>&1 | tail -1 | cut -c1-120)
t1=$(date +%s.%N)
  gcs=$(timeout 60 docker exec -i $H docker exec -i fleetlab-ray python3 - 172.28.20.11:6379 5 '["172.28.20.11","172.28.20.12","172.28.20.13"]' < /work/main/roles/ray_cluster/files/ray_nodes_alive.py 2>&1 | python3 -c 'import sys,json
t=sys.stdin.read()
try: print(len(json.loads(t.strip().splitlines()[-1])))
except Exception: print(t.strip()[-120:].replace("\n"," | "))')
t2=$(date +%s.%N)
  started=$(docker exec $H docker inspect -f '{{.State.StartedAt}}' fleetlab-ray 2>/dev/null)
  printf '%s load=%s dash[%.1fs]=%s gcs[%.1fs]=%s ray_started=%s\n' "$ts" "$load" "$(echo "$t1-$t0"|bc)" "$dash" "$(echo "$t2-$t1"|bc)" "$gcs" "$started" >> $out/probes.txt
  sleep 20
done
