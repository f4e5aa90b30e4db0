#!/usr/bin/env bash
# Pack the controller's inventory sources for the healer, one numbered directory each (0/, 1/...):
#   pack_inventory.sh OUT.tar SECRETS_DIR SOURCE...
# A source file travels with its neighbouring group_vars/ and host_vars/; a source directory
# travels whole except the controller's secrets directory when it lies inside (the default,
# <inventory_dir>/fleet-secrets): the healer gets its own deployment's generated secrets only
# (healer role, main.yml), never other deployments' keys or the balancer's TLS key.
# Reproducible (sorted names, fixed mtime and owner): an unchanged inventory copies nothing.
set -euo pipefail
out=$1 secrets=$(realpath -m "$2"); shift 2
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
chmod 0755 "$work"   # the archive's top entry: the healer user reads the unpacked inventory
i=0
for src in "$@"; do
  d="$work/$i"; mkdir -p "$d"
  if [ -d "$src" ]; then
    rel=$(realpath -m --relative-to="$src" "$secrets")
    case "$rel" in
      .) echo "fleet_secrets_dir ($secrets) is the inventory directory $src itself: give the secrets a directory of their own" >&2; exit 2 ;;
      ..|../*) skip=() ;;
      *) skip=(--exclude="./$rel") ;;
    esac
    tar -C "$src" "${skip[@]}" -cf - . | tar -C "$d" -xf -
  else
    cp -a "$src" "$d/"
    for v in group_vars host_vars; do
      if [ -d "$(dirname "$src")/$v" ]; then cp -a "$(dirname "$src")/$v" "$d/"; fi
    done
  fi
  i=$((i + 1))
done
tar -C "$work" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$out" .
