#!/usr/bin/env bash
# Puts back the regenerated conversations that benchmarks/gpu_collect.sh brought home (regen.part-*), so that a
# later run on another box trains on them without regenerating: the raw and normalized data are rebuilt by
# Snakemake (seconds), then results/<exp>/data/regen is unpacked and marked newer than every input of the
# regenerate rule, which Snakemake then leaves alone. params.yaml must select the same data as the run that
# made them (same sources, max_samples and seed).
# Usage (repo root): bash benchmarks/gpu_restore.sh DIR_WITH_REGEN_PARTS
set -eu
SRC=$1
EXP=$(awk '/^experiment:/ {print $2; exit}' params.yaml)
R=results/$EXP
ls "$SRC"/regen.part-* > /dev/null
snakemake --cores all "$R/data/chat"
rm -rf "$R/data/regen"
cat "$SRC"/regen.part-* | xz -dc | tar xf - -C "$R/data"
touch "$R/data/regen/.snakemake_timestamp" "$R/data/regen"
snakemake -n "$R/data/tokens" | grep -q "rule regenerate:" && { echo "Snakemake would still regenerate" >&2; exit 1; }
echo "restored $R/data/regen ($(ls "$R"/data/regen/shard-*.parquet | wc -l) shards)"
