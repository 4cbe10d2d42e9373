#!/usr/bin/env bash
# Head-to-head with the seed peer, NeMo AutoModel 0.7.0's EAGLE-3 recipe, on one GPU, one system after the other:
# the same target (SmolLM2-135M-Instruct), the same rows with their original answers, seq 2048, TTT 7, draft vocab
# 32,000, lr 1e-4, one epoch (experiment h2h_nemo). Both drafters then go through eaglepipe's bench stage
# (bench.drafter points it at the peer's), and benchmarks/peer_h2h.py writes the `peer_nemo_h2h` row.
#
# The peer runs through the kit in shared/peers/nemo-automodel (its gpu_run.sh, run_eagle3.py, pack and unpack
# scripts), used as a tool: KIT names a copy of that folder, NEMO_WHEELS the wheels its README lists.
# Usage (repo root, venv or the box's python active, params composable):
#   KIT=.peer/kit NEMO_WHEELS=.peer/gpu_wheels ROWS=.peer/data/sharegpt_6000.jsonl VAL=.peer/data/sharegpt_val200.jsonl \
#     GGUF=<packaged SmolLM2 GGUF> STORE=/root/store bash benchmarks/peer_nemo.sh
# STEPS (default: all) picks steps: compose target ours nemo bench_ours bench_nemo report. OURS_OVERRIDES (space
# separated) adds compose overrides on eaglepipe's side, e.g. the compile switches a throughput profile picked.
# Progress: $STORE/logs/steps.txt; each step's output: $STORE/logs/<step>.log.
set -u
STEPS=${STEPS:-all}
STORE=${STORE:-logs/peer_nemo}
LOGS=$STORE/logs
NP=${NP:-/tmp/nemo_peer}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 PYTHONPATH=src
EXP=h2h_nemo
R=results/$EXP
ROWS_ABS=$(realpath "$ROWS")

source "$(dirname "$0")/step.sh"

read -ra EXTRA <<< "${OURS_OVERRIDES:-}"
COMPOSE=(python3 -m eaglepipe.compose "experiment=$EXP" "data.sources=[{name: peer_rows, kind: local, path: $ROWS_ABS}]"
         "${EXTRA[@]}")

nemo_layout() {  # the folder layout the kit's gpu_run.sh expects, under $NP
  mkdir -p "$NP"/{gpu_wheels,gguf,data,scripts,configs}
  cp "$KIT"/*.py "$KIT"/*.sh "$NP/scripts/" && cp "$KIT"/smollm2_eagle3.yaml "$NP/configs/"
  cp "$NEMO_WHEELS"/*.whl "$NP/gpu_wheels/" && cp "$GGUF" "$NP/gguf/"
  cp "$ROWS" "$NP/data/sharegpt_peer.jsonl" && cp "$VAL" "$NP/data/sharegpt_val200.jsonl"
  # the kit's gpu_run.sh decompresses data/*.jsonl.xz that have no .jsonl beside them: give it the compressed rows
  for f in "$ROWS" "$VAL"; do [ -f "$f.xz" ] || xz -1 -k -f "$f"; done
  cp "$ROWS.xz" "$NP/data/sharegpt_peer.jsonl.xz" && cp "$VAL.xz" "$NP/data/sharegpt_val200.jsonl.xz"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$LOGS/gpu.txt" 2>&1
step compose 120 "${COMPOSE[@]}"
step target 600 snakemake --cores all "$R/target"
# eaglepipe's data stages use no GPU: they run beside the peer's training.
step prep 1800 snakemake --cores 4 "$R/vocab" &
prep=$!
# The peer alone on the GPU. Its wheels go to its own site dir (it needs transformers 5.18); ours stay.
case " $STEPS " in *" all "*|*" nemo "*) nemo_layout >> "$LOGS/nemo.log" 2>&1 ;; esac
# The kit's config file says seq 512 and micro-batch 1; the comparison runs the peer at seq 2048 with the
# micro-batch its README measured (4).
step nemo 3600 env DATA=peer NP="$NP" OUT="$STORE/nemo_ret" \
  EXTRA="--recipe_args.seq_length=2048 --recipe_args.micro_batch_size=${NEMO_MBS:-4}" bash "$NP/scripts/gpu_run.sh"
wait $prep
step ours 3600 snakemake --cores all "$R/export"
step bench_ours 1800 snakemake --cores all
# The peer's drafter as the kit brings it back, once raw (its config says num_hidden_layers 30, which the
# validator must refuse) and once rewritten for SGLang by the kit's unpack step.
MODEL=$(python3 -c "from eaglepipe.target.info import resolve_model_dir as r; print(r('$R/target'))" 2>/dev/null)
step unpack_raw 300 python3 "$KIT/unpack_returned_draft.py" "$STORE/nemo_ret/draft" "$MODEL" "$STORE/nemo_raw"
step validate_raw 120 python3 -m eaglepipe.export.validate --external "$STORE/nemo_raw" --target "$R/target"
step unpack 300 python3 "$KIT/unpack_returned_draft.py" "$STORE/nemo_ret/draft" "$MODEL" "$STORE/nemo_sglang" --sglang
step validate 120 python3 -m eaglepipe.export.validate --external "$STORE/nemo_sglang" --target "$R/target"
step compose_nemo 120 "${COMPOSE[@]}" "bench.drafter=$(realpath -m "$STORE/nemo_sglang")" --out "$STORE/params_nemo.yaml"
step bench_nemo 1800 python3 -m eaglepipe.stages.bench --params "$STORE/params_nemo.yaml" --target "$R/target" \
  --export "$R/export" --out "$R/bench_nemo"
step report 120 python3 benchmarks/peer_h2h.py --experiment "$EXP" --nemo-stats "$NP/out_peer/peer_stats.json" \
  --nemo-bench "$R/bench_nemo" --nemo-log "$STORE/nemo_ret/train.log" --command "bash benchmarks/peer_nemo.sh"
touch "$STORE/DONE"
