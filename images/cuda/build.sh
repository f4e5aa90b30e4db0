#!/usr/bin/env bash
# Build the production (CUDA) image from a staged, git-ignored build context.
#
#   images/cuda/build.sh [TAG]           default TAG: vllm-fleet:latest
#
# Environment:
#   VLLM_BASE_IMAGE   pinned vLLM image (default vllm/vllm-openai:v0.24.0; pin a digest in prod)
#   FLEET_BUILD_DIR   staging directory (default <repo>/build/image-cuda)
# Needs the base image locally or a registry to pull it from. Prints the image ID last.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
tag="${1:-vllm-fleet:latest}"
ctx="${FLEET_BUILD_DIR:-$repo/build/image-cuda}"
base="${VLLM_BASE_IMAGE:-vllm/vllm-openai:v0.24.0}"

[ -f "$repo/images/vllm_fleet/pyproject.toml" ] || { echo "build.sh: images/vllm_fleet/pyproject.toml missing" >&2; exit 2; }
mkdir -p "$ctx"
cmp -s "$here/Dockerfile" "$ctx/Dockerfile" || cp "$here/Dockerfile" "$ctx/Dockerfile"
"$repo/images/stage_vllm_fleet.sh" "$ctx"
start=$(date +%s)
docker build --build-arg "VLLM_BASE_IMAGE=$base" -t "$tag" "$ctx" >&2
echo "build.sh: built $tag in $(( $(date +%s) - start ))s" >&2
docker image inspect --format '{{.Id}}' "$tag"
