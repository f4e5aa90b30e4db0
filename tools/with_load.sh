#!/usr/bin/env bash
# Run a command under the standard background CPU load (issue 21: tests must pass on a busy
# machine): stress-ng keeps every core busy at normal priority for as long as the command runs,
# then is stopped. Used by `make test-* LOAD=1`; works around any command:
#   tools/with_load.sh make test-engine
#   FLEET_LOAD_CPUS=4 FLEET_LOAD_PERCENT=50 tools/with_load.sh .ci/run
# FLEET_LOAD_CPUS: CPU workers (default: every online core); FLEET_LOAD_PERCENT: busy share of
# each worker (default 100). Nested calls (make test LOAD=1 runs several tiers) add no second load.
set -euo pipefail
if [ $# -eq 0 ]; then
  echo "usage: $0 COMMAND [ARG...]" >&2
  exit 2
fi
if [ -n "${FLEET_LOAD_PID:-}" ] && kill -0 "$FLEET_LOAD_PID" 2>/dev/null; then
  exec "$@"  # already under load
fi
if ! command -v stress-ng >/dev/null; then
  echo "with_load: stress-ng is not installed (apt-get install stress-ng; tests/requirements-apt.txt lists it)" >&2
  exit 2
fi
cpus=${FLEET_LOAD_CPUS:-$(nproc)}
percent=${FLEET_LOAD_PERCENT:-100}
case "$cpus$percent" in
  *[!0-9]*) echo "with_load: FLEET_LOAD_CPUS='$cpus' and FLEET_LOAD_PERCENT='$percent' must be whole numbers" >&2
            exit 2 ;;
esac
# Its own process group, so that stopping it takes its workers too and nothing else.
setsid stress-ng --cpu "$cpus" --cpu-load "$percent" --cpu-method matrixprod --quiet &
load=$!
stop_load() { kill -TERM -- "-$load" 2>/dev/null || true; wait "$load" 2>/dev/null || true; }
trap stop_load EXIT
trap 'exit 130' INT TERM
echo "[with_load] stress-ng: $cpus CPU worker(s) at $percent % (process group $load) while: $*" >&2
started=$SECONDS
rc=0
FLEET_LOAD_PID=$load "$@" || rc=$?
echo "[with_load] '$*' exited $rc after $((SECONDS - started)) s under load" >&2
exit "$rc"
