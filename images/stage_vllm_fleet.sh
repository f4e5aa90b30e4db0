#!/usr/bin/env bash
# Copy the vllm_fleet package source (no caches, builds or tests) into an image build context:
#   images/stage_vllm_fleet.sh CONTEXT_DIR      -> CONTEXT_DIR/vllm_fleet
# Shared by images/cpu/build.sh and images/cuda/build.sh so both images carry the same package.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
ctx="${1:?usage: stage_vllm_fleet.sh CONTEXT_DIR}"
rm -rf "$ctx/vllm_fleet"
mkdir -p "$ctx/vllm_fleet"
tar -C "$repo/images/vllm_fleet" --exclude='__pycache__' --exclude='*.pyc' --exclude='*.egg-info' \
    --exclude='build' --exclude='dist' --exclude='tests' -cf - . | tar -C "$ctx/vllm_fleet" -xf -
