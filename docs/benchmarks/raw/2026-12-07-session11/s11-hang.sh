#!/usr/bin/env bash
# Session 11: freeze-stage and stop-worker with the engine-scope heal (3 clients, no think time).
set -uo pipefail
cd /work/main
. .venv/bin/activate; export ANSIBLE_CONFIG=$PWD/ansible.cfg
out=/work/notes/s11-hang; rm -rf $out; mkdir -p $out
( while :; do echo "$(date +%T) $(cut -d' ' -f1-3 /proc/loadavg)" >> $out/loadavg.txt; sleep 30; done ) &
sampler=$!
start=$(date +%s)
python -m pytest -p no:cacheprovider -rA --durations=0 -m day2 tests/lab/test_hang.py -k "freeze-stage or stop-worker" > $out/hang.log 2>&1
echo "hang rc=$? at $(( $(date +%s) - start ))s" >> $out/summary.txt
for m in freeze-stage stop-worker; do cp -r build/day2/hang-$m $out/ 2>/dev/null; done
kill $sampler
