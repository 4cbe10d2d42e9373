#!/usr/bin/env bash
# Every GPU figure of benchmarks/RESULTS.md in one unattended job on a single GPU box:
#   the token path's bit-identity check, the decode, train and regen benchmarks, then the pipeline's own stages (snakemake) on the params.yaml in
#   force, then the speculative-decoding benchmark on the drafter that run exported.
# Usage on your own GPU box (repo root, venv active, params.yaml composed, e.g. with
#   `python -m eaglepipe.compose experiment=smollm2_h100 device=cuda`):  bash benchmarks/gpu_run.sh
# On the lent offline box this repo's figures came from: `source benchmarks/device_setup.sh`, then
#   STORE=/root/store PIPELINE_SECONDS=720 setsid nohup bash benchmarks/gpu_run.sh &
# Each step runs under a time limit and a failure does not stop the next one; a step that fails on its
# default path is retried once on its conservative path (decode). Progress: $STORE/logs/steps.txt; done: $STORE/DONE.
set -u
STORE=${STORE:-logs/gpu_run}
LOGS=$STORE/logs
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 PYTHONPATH=src
EXP=$(awk '/^experiment:/ {print $2; exit}' params.yaml)
R=results/$EXP
T=$R/target

step() {  # step NAME SECONDS CMD...  -> returns the command's exit status
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "$(date +%T) start $name: $*" >> "$LOGS/steps.txt"
  timeout --signal=INT --kill-after=30 "$limit" "$@" >> "$LOGS/$name.log" 2>&1
  rc=$?
  echo "$(date +%T) end $name rc=$rc after $(( $(date +%s) - start ))s" >> "$LOGS/steps.txt"
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$LOGS/gpu.txt" 2>&1
step fetch_target 300 snakemake --cores all "$T"

step token_path_check 180 python3 benchmarks/token_path_check.py --model "$T"
step decode 180 python3 benchmarks/decode.py --model "$T" \
  || step decode_fallback 120 python3 benchmarks/decode.py --model "$T" --no-engine-compile --no-hf-compile
step train_bench 240 python3 benchmarks/train.py --model "$T"
step pipeline "${PIPELINE_SECONDS:-172800}" snakemake --cores all
step regen_bench 240 python3 benchmarks/regen.py --model "$T"
step spec_decode 180 python3 benchmarks/spec_decode.py --target "$T" --export "$R/export" \
  --prompts "${SPEC_PROMPTS:-8}" --max-new-tokens "${SPEC_TOKENS:-128}"
touch "$STORE/DONE"
