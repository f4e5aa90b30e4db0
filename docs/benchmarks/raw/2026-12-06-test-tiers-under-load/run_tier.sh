#!/bin/bash
# run_tier.sh TIER N: make test-TIER LOAD=1 with durations, load-average samples every 30 s
tier=$1; n=$2; out=/tmp/ci-busy/runs/$tier-$n; mkdir -p $out
cd /work/wt/ci-busy
( while true; do echo "$(date -u +%FT%TZ) $(cat /proc/loadavg)"; sleep 30; done ) > $out/loadavg.txt &
sampler=$!
start=$(date +%s); commit=$(git rev-parse --short HEAD)
make test-$tier LOAD=1 PYTEST_ADDOPTS="--durations=25 -p no:cacheprovider" > $out/pytest.log 2>&1
rc=$?
end=$(date +%s)
kill $sampler
echo "tier=$tier run=$n rc=$rc wall_s=$((end-start)) started=$(date -u -d @$start +%FT%TZ) commit_at_start=$commit" > $out/summary.txt
