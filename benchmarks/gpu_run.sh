#!/usr/bin/env bash
# Every GPU figure of benchmarks/RESULTS.md in one unattended job on a single GPU box, most wanted first:
#   the token path's bit-identity check, the prefill and prefix-reuse checks, the decode and regen benchmarks,
#   the pipeline's own stages (snakemake) on the params.yaml in force, the speculative-decoding benchmark on the
#   drafter that run exported, the round profile and the training-vs-serving replay check on it, the training
#   benchmark, and last HF's compiled decode baseline (slow to compile).
# Usage on your own GPU box (repo root, venv active, params.yaml composed, e.g. with
#   `python -m eaglepipe.compose experiment=smollm2_h100 device=cuda`):  bash benchmarks/gpu_run.sh
# On the lent offline box this repo's figures came from: `source benchmarks/device_setup.sh`, then
#   setsid nohup bash benchmarks/gpu_run.sh --store /root/store --pipeline-seconds 720 &
# Each step runs under a time limit and a failure does not stop the next one. A step that fails on a fast path
# is retried once without it: a crash in the Triton token path turns it off for every later step, a failed prefill
# benchmark turns the CUDA-graph prefill off, and a failed speculative step (or sweep point) is retried on the
# PyTorch path (eager rounds, no token path). A fast path is turned off by the scripts' flags (--token-path off ...,
# ENGINE_FLAGS) and, for the pipeline's stages, in params.yaml (regen/bench.engine_options), so every result row and
# the bench's metrics.json record what ran.
# --steps (default: all) picks steps by name, e.g. --steps "fetch_target prefill pipeline spec_decode";
# --spec-prompts, --spec-tokens and --spec-sweep ("steps,topk,draft_tokens ...") set the speculative-decoding
# benchmark's prompts and points; --round-sweep sets round_profile's points (where each speculative round's time
# goes); --train-bench-args adds arguments to the training benchmark (e.g. "--shapes smollm2 --ttt-steps 4
# --compile"); --pipeline-seconds limits the pipeline step (default 48 h); --store (default logs/gpu_run) holds the
# logs. Progress: <store>/logs/steps.txt; done: <store>/DONE.
set -u
STEPS=all STORE=logs/gpu_run PIPELINE_SECONDS=172800 SPEC_PROMPTS=8 SPEC_TOKENS=128 SPEC_SWEEP= ROUND_SWEEP=
TRAIN_BENCH_ARGS=
OPTIONS=(steps store pipeline-seconds spec-prompts spec-tokens spec-sweep round-sweep train-bench-args)
source "$(dirname "$0")/flags.sh"
parse_flags "$@"
LOGS=$STORE/logs
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 PYTHONPATH=src
EXP=$(awk '/^experiment:/ {print $2; exit}' params.yaml)
R=results/$EXP
T=$R/target
ENGINE_FLAGS=()

set_options() {  # set_options SECTIONS OPTION VALUE: params.yaml's <section>.engine_options.OPTION for each section
  python3 - "$@" <<'EOF'
import sys
import yaml
sections, option, value = sys.argv[1].split(","), sys.argv[2], sys.argv[3] == "true"
params = yaml.safe_load(open("params.yaml"))
for section in sections:
    params[section]["engine_options"][option] = value
open("params.yaml", "w").write(yaml.safe_dump(params, sort_keys=False))
EOF
}

fast_path_off() {  # fast_path_off OPTION: off for every later step, benchmark scripts and pipeline stages alike
  ENGINE_FLAGS+=("--${1//_/-}" off)
  set_options regen,bench "$1" false
  echo "$1 off for the rest of the job" >> "$LOGS/steps.txt"
}

source "$(dirname "$0")/step.sh"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$LOGS/gpu.txt" 2>&1
step fetch_target 300 snakemake --cores all "$T"

step token_path_check 240 python3 benchmarks/token_path_check.py --model "$T"
rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 2 ]; then  # 2: ran, but some bits differ (recorded); anything else: it broke
  fast_path_off token_path
fi
step prefill 150 python3 benchmarks/prefill.py --model "$T" "${ENGINE_FLAGS[@]}" || fast_path_off prefill_graphs
step prefix_reuse 180 python3 benchmarks/prefix_reuse_check.py --model "$T" "${ENGINE_FLAGS[@]}"
step decode 240 python3 benchmarks/decode.py --model "$T" --hf-prompts 2 --no-hf-compile "${ENGINE_FLAGS[@]}"
step regen_bench 420 python3 benchmarks/regen.py --model "$T" --max-batch-size 768 --concurrency 4096 --hf-prompts 512 \
  --multi-turn 1000 --max-model-len 4096 "${ENGINE_FLAGS[@]}"
step pipeline "$PIPELINE_SECONDS" snakemake --cores all --rerun-incomplete "$R/export"
step pipeline_bench 420 snakemake --cores all --rerun-incomplete \
  || { set_options bench graph_rounds false && set_options bench token_path false \
       && step pipeline_bench_eager 420 snakemake --cores all --rerun-incomplete; }
spec=(python3 benchmarks/spec_decode.py --target "$T" --export "$R/export" --prompts "$SPEC_PROMPTS"
      --max-new-tokens "$SPEC_TOKENS" ${SPEC_SWEEP:+--sweep "$SPEC_SWEEP"} "${ENGINE_FLAGS[@]}")
{ step spec_decode 300 "${spec[@]}" && ! grep -q '"error"' "$LOGS/spec_decode.log"; } \
  || step spec_decode_eager 300 "${spec[@]}" --graph-rounds off --token-path off
step round_profile 300 python3 benchmarks/round_profile.py --target "$T" --export "$R/export" \
  --out "$LOGS/round_profile.jsonl" ${ROUND_SWEEP:+--sweep "$ROUND_SWEEP"} "${ENGINE_FLAGS[@]}"
step replay_check 300 python3 benchmarks/replay_check.py --target "$T" --export "$R/export" --tokens "$R/data/tokens" \
  --prompts "$SPEC_PROMPTS" --max-new-tokens "$SPEC_TOKENS" "${ENGINE_FLAGS[@]}"
step train_bench 240 python3 benchmarks/train.py --model "$T" $TRAIN_BENCH_ARGS
step decode_hf_compile 300 python3 benchmarks/decode.py --model "$T" --prompts 2 "${ENGINE_FLAGS[@]}"
touch "$STORE/DONE"
