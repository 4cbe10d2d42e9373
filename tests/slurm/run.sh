#!/usr/bin/env bash
# One command for the SLURM test: start the local cluster (installing slurm-wlm/munge if needed),
# run tests/slurm/test_slurm.py, stop the cluster. Extra arguments go to pytest.
# Keep the cluster running afterwards with KEEP_CLUSTER=1.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"

start=$(date +%s)
bash "$HERE/setup.sh"
if [ "${KEEP_CLUSTER:-0}" != 1 ]; then
  trap 'bash "$HERE/teardown.sh"' EXIT
fi
cd "$REPO"
rc=0
"$PY" -m pytest -m slurm -s -q -p no:cacheprovider tests/slurm/test_slurm.py "$@" || rc=$?
echo "[slurm test] total wall time (cluster setup + both pipeline runs + checks): $(( $(date +%s) - start )) s"
exit $rc
