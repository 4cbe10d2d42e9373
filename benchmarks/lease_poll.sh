#!/usr/bin/env bash
# Polls a benchmarks/lease_job.sh job: waits up to --wait seconds (default 0) for <--store>/DONE, prints its
# progress (the job's log, each arm's last lines and latest training history row, the GPU's memory and load), and
# packs its small results into <--out>/store.tar.xz: the logs, the rows the job appended to results.jsonl and
# RESULTS.md, and each arm's bench folder, training summary, history and sweep log (no weights). Every poll packs
# anew, so a box taken back between polls loses only what came after the last one.
# Usage (repo root of the call; $OUT is the folder the device tool brings back):
#   bash benchmarks/lease_poll.sh --store /root/store --wait 420 --out "$OUT"
set -u
STORE=/root/store WAIT=0 OUT=
OPTIONS=(store wait out)
source "$(dirname "$0")/flags.sh"
parse_flags "$@"
[ -n "$OUT" ] || { echo "lease_poll.sh: --out is required" >&2; exit 2; }
end=$((SECONDS + WAIT))
while [ ! -f "$STORE/DONE" ] && [ $SECONDS -lt $end ]; do sleep 10; done
date
cat "$STORE/logs/job.txt" 2>/dev/null
tail -3 "$STORE/job.out" 2>/dev/null
for arm in "$STORE"/family/*/ "$STORE"/arms/*/ "$STORE"/arms_h2h/*/; do
  [ -f "$arm/ablation.log" ] || continue
  echo "== $arm"
  tail -2 "$arm/ablation.log" | cut -c1-200
  # the training's latest history row: whether it learns (first-draft accuracy) and how fast
  history=$(ls -t "$arm"/results/*/.work/train/*/history.jsonl 2>/dev/null | head -1)
  [ -n "$history" ] && tail -1 "$history" | python3 -c 'import json, sys
r = json.loads(sys.stdin.read())
print(" ".join(f"{k} {round(r[k], 3) if isinstance(r[k], float) else r[k]}"
               for k in ("split", "step", "acc_0", "acc_1", "loss_0", "tokens_per_s") if k in r))'
done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
[ -f "$STORE/DONE" ] && echo DONE
cd "$STORE" || exit 1
small=$(find family arms arms_h2h \( -path '*/bench/*' -o -name history.jsonl -o -name summary.json \
          -o -name ablation.log -o -path '*/logs/*' \) -size -4M \( -name '*.json' -o -name '*.jsonl' \
          -o -name '*.csv' -o -name '*.md' -o -name '*.log' -o -name '*.txt' -o -name '*.png' \) 2>/dev/null)
tar -cJf "$OUT/store.tar.xz" $(ls -d logs job.out setup.log repo/benchmarks/results.jsonl \
  repo/benchmarks/RESULTS.md 2>/dev/null) $small
ls -la "$OUT"
