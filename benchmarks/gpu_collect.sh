#!/usr/bin/env bash
# Packs what benchmarks/gpu_run.sh has produced so far into DEST (at most 8 files of < 16 MiB):
#   results.tgz (RESULTS.md, logs, stats, metrics, plots, sweep tables, export configs) and the exported
#   SGLang drafter weights in 15 MiB parts (drafter.part-aa, ...; `cat drafter.part-* > model.safetensors`), and the
#   regenerated conversations (regen.part-aa, ...; `cat regen.part-* | tar xJ` gives regen/), so that a later lease
#   can train on them (or warm-start from the drafter with train.init_from) without regenerating
#   (`bash benchmarks/gpu_restore.sh DIR` puts the conversations back where Snakemake leaves them alone).
#   --no-regen skips the conversations (a lease that restored them already has them here); --store is the job's
#   (default logs/gpu_run).
# Usage: bash benchmarks/gpu_collect.sh DEST [--store DIR] [--no-regen]   (run from the job's repo copy)
set -u
STORE=logs/gpu_run NO_REGEN=
OPTIONS=(store)
SWITCHES=(no-regen)
source "$(dirname "$0")/flags.sh"
parse_flags "$@"
[ ${#ARGS[@]} -eq 1 ] || { echo "usage: bash benchmarks/gpu_collect.sh DEST [--store DIR] [--no-regen]" >&2; exit 2; }
DEST=${ARGS[0]}
EXP=$(awk '/^experiment:/ {print $2; exit}' params.yaml)
R=results/$EXP
mkdir -p "$DEST"
{
  echo benchmarks/RESULTS.md
  echo params.yaml
  [ -d "$STORE/logs" ] && find "$STORE/logs" -type f
  [ -d "logs/$EXP" ] && find "logs/$EXP" -type f
  [ -d "$R" ] && find "$R" -type f \( -name '*.json' -o -name '*.csv' -o -name '*.md' -o -name '*.png' \
    -o -name '*.txt' -o -name '*.tsv' -o -name '*.jsonl' -o -name 'LATEST' -o -name 'BEST' \) \
    -not -path '*/data/*/shard*' -not -name 'rejects.jsonl' -size -4M
} 2>/dev/null | tar czf "$DEST/results.tgz" -T - 2>/dev/null
weights=$R/export/sglang/model.safetensors
if [ -f "$weights" ]; then
  split -b 15M "$weights" "$DEST/drafter.part-"
fi
if [ -d "$R/data/regen" ] && [ -z "$NO_REGEN" ]; then
  tar cf - -C "$R/data" regen | xz -T0 -6 | split -b 15M - "$DEST/regen.part-"
fi
ls -la "$DEST"
