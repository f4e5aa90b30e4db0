#!/usr/bin/env bash
# Session 11: heavy rolling restart (3 clients, no think time) with the GCS-based Ray wait, probes of Ray's answers.
set -uo pipefail
cd /work/main
. .venv/bin/activate; export ANSIBLE_CONFIG=$PWD/ansible.cfg
out=/work/notes/s11-rr; rm -rf $out; mkdir -p $out
/work/notes/s11-monitor.sh $out & mon=$!
start=$(date +%s)
python -m pytest -p no:cacheprovider -rA -m day2 tests/lab/test_rolling_restart.py -k "heavy" > $out/rr-heavy.log 2>&1
echo "rr-heavy rc=$? at $(( $(date +%s) - start ))s" >> $out/summary.txt
kill $mon; sleep 1; pkill -f "s11-monitor.sh $out" 
cp build/day2/rolling-restart-heavy* $out/ 2>/dev/null
docker exec fleetlab-node1 sh -c 'cd /var/lib/vllm-fleet/ray/session_latest/logs && tar czf - dashboard*.log gcs_server.out raylet.out dashboard_agent*.log 2>/dev/null' > $out/node1-ray-logs.tgz
