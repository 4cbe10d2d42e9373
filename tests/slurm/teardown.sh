#!/usr/bin/env bash
# Stop the local test cluster started by setup.sh (only the daemons it started, by pid file)
# and remove its state directory. `--keep-state` stops the daemons but keeps the directory.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/env.sh"
D="$EAGLEPIPE_SLURM_DIR"

stop_pidfile() {
  local pidfile="$1" pid
  [ -f "$pidfile" ] || return 0
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$pidfile"
}

if [ -f "$GENERATED_CONF" ] && command -v scancel >/dev/null; then
  scancel --quiet --user "$(id -un)" 2>/dev/null || true
fi
stop_pidfile "$D/run/slurmd.pid"
stop_pidfile "$D/run/slurmctld.pid"
stop_pidfile "$D/munge/munged.pid"
if [ "${1:-}" != "--keep-state" ]; then
  for name in slurm.conf gres.conf; do
    # Remove only our own symlinks.
    if [ -L "$SLURM_ETC/$name" ] && [ "$(readlink "$SLURM_ETC/$name")" = "$D/etc/$name" ]; then
      rm -f "$SLURM_ETC/$name"
    fi
  done
  rm -rf "$D"
fi
