#!/usr/bin/env bash
# What the image's compiled bytecode saves each process that a relaunch starts (images/cpu/
# Dockerfile compiles every module of /opt/venv once, at build time). Each try is a fresh
# container of IMAGE, as every Ray node, serving rank and fabric check is: it imports what that
# process imports (vLLM's API server, Ray's CLI, torch.distributed) and prints the import's wall
# and CPU seconds. "shipped" uses the image as built; "no bytecode" makes Python ignore and not
# write the image's .pyc files (PYTHONPYCACHEPREFIX on an empty directory, PYTHONDONTWRITEBYTECODE),
# as the image was before. Tries alternate between the two so a busy machine loads both alike.
#   benchmarks/import_bytecode.sh [IMAGE] [TRIES]    default: vllm-fleet:lab 3
# Prints one line per try and a table (median CPU seconds, ratio); changes nothing.
set -euo pipefail
image=${1:-vllm-fleet:lab}
tries=${2:-3}
docker image inspect "$image" --format 'image {{.RepoTags}} id {{.Id}} size {{.Size}} bytes'
probe='import resource, sys, time
t = time.time()
__import__(sys.argv[1])
u = resource.getrusage(resource.RUSAGE_SELF)
print(f"{time.time() - t:.2f} {u.ru_utime + u.ru_stime:.2f}")'
declare -A cpu
modules=("vllm.entrypoints.openai.api_server" "ray.scripts.scripts" "torch.distributed")
for i in $(seq "$tries"); do
  for mod in "${modules[@]}"; do
    for variant in shipped no-bytecode; do
      env=()
      [ "$variant" = no-bytecode ] && env=(-e PYTHONPYCACHEPREFIX=/tmp/no-pycache -e PYTHONDONTWRITEBYTECODE=1)
      read -r wall secs < <(timeout 600 docker run --rm --network=none "${env[@]}" --entrypoint python3 \
                              "$image" -c "$probe" "$mod")
      echo "try $i  $mod  $variant: wall ${wall}s  cpu ${secs}s  (load $(cut -d' ' -f1 /proc/loadavg))"
      cpu["$mod $variant"]+="$secs "
    done
  done
done
median() { tr ' ' '\n' | sed '/^$/d' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
printf '\n%-36s %14s %16s %8s\n' "import (fresh container)" "shipped cpu s" "no-bytecode cpu s" "ratio"
for mod in "${modules[@]}"; do
  a=$(echo "${cpu["$mod shipped"]}" | median); b=$(echo "${cpu["$mod no-bytecode"]}" | median)
  printf '%-36s %14.2f %16.2f %7.2fx\n' "$mod" "$a" "$b" "$(awk -v a="$a" -v b="$b" 'BEGIN {print b / a}')"
done
