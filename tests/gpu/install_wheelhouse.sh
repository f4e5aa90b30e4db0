#!/usr/bin/env bash
# On the GPU machine: join the wheelhouse parts staged in STAGE (default /tmp/stage), install the
# wheels into /tmp/site without touching the machine's own torch, and install our vllm_fleet
# package there too (so vLLM finds the plugin through its entry point).
# The parts are made here by build_wheelhouse (vllm 0.24 + ray 2.55.1 for python 3.12) and sent
# one per device call into /tmp/stage.
set -euo pipefail
stage=${1:-/tmp/stage}
repo=$(cd "$(dirname "$0")/../.." && pwd)
if [ ! -f /tmp/site/.fleet-installed ]; then
  ( cd "$stage" && cat part?? > wh.tar && tar -xf wh.tar && rm wh.tar )
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$stage"/wh/*.whl
  touch /tmp/site/.fleet-installed
fi
# Our package from source, with a dist-info so vLLM finds the plugin's entry point (no build
# backend needed on the GPU host).
rm -rf /tmp/site/vllm_fleet /tmp/site/vllm_fleet-*.dist-info
cp -r "$repo/images/vllm_fleet/src/vllm_fleet" /tmp/site/
mkdir -p /tmp/site/vllm_fleet-0.1.0.dist-info
printf 'Metadata-Version: 2.1\nName: vllm-fleet\nVersion: 0.1.0\n' > /tmp/site/vllm_fleet-0.1.0.dist-info/METADATA
printf '[vllm.general_plugins]\nfleet = vllm_fleet.plugin:register\n' > /tmp/site/vllm_fleet-0.1.0.dist-info/entry_points.txt
PYTHONPATH=/tmp/site python3 -c 'import vllm, ray, vllm_fleet; print("vllm", vllm.__version__, "ray", ray.__version__)'
