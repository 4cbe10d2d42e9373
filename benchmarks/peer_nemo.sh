#!/usr/bin/env bash
# Head-to-head with the seed peer, NeMo AutoModel 0.7.0's EAGLE-3 recipe, on one GPU, one system after the other:
# the same target (SmolLM2-135M-Instruct), the same rows with their original answers, seq 2048, TTT 7, draft vocab
# 32,000, lr 1e-4, one epoch (experiment h2h_nemo). Both drafters then go through eaglepipe's bench stage
# (bench.drafter points it at the peer's), and benchmarks/peer_h2h.py writes the `peer_nemo_h2h` row.
#
# The peer runs through the kit in shared/peers/nemo-automodel (its gpu_run.sh, run_eagle3.py, pack and unpack
# scripts), used as a tool: --kit names a copy of that folder, --nemo-wheels the wheels its README lists.
# Usage (repo root, venv or the box's python active, params composable):
#   bash benchmarks/peer_nemo.sh --kit .peer/kit --nemo-wheels .peer/gpu_wheels \
#     --rows .peer/data/sharegpt_6000.jsonl --val .peer/data/sharegpt_val200.jsonl \
#     --gguf <packaged SmolLM2 GGUF> --store /root/store
# --steps (default: all) picks steps: compose target ours nemo bench_ours bench_nemo report. --ours-overrides (space
# separated) adds compose overrides on eaglepipe's side, e.g. the compile switches a throughput profile picked;
# --nemo-mbs sets the peer's micro-batch (default 4), --np the folder the peer's kit runs in (default
# /tmp/nemo_peer). Progress: <store>/logs/steps.txt; each step's output: <store>/logs/<step>.log.
set -u
STEPS=all STORE=logs/peer_nemo NP=/tmp/nemo_peer OURS_OVERRIDES= NEMO_MBS=4 KIT= NEMO_WHEELS= ROWS= VAL= GGUF=
OPTIONS=(kit nemo-wheels rows val gguf store steps ours-overrides nemo-mbs np)
source "$(dirname "$0")/flags.sh"
parse_flags "$@"
for required in KIT NEMO_WHEELS ROWS VAL GGUF; do
  [ -n "${!required}" ] || { echo "peer_nemo.sh: --$(tr 'A-Z_' 'a-z-' <<< "$required") is required" >&2; exit 2; }
done
LOGS=$STORE/logs
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 PYTHONPATH=src
EXP=h2h_nemo
R=results/$EXP
ROWS_ABS=$(realpath "$ROWS")

source "$(dirname "$0")/step.sh"

read -ra EXTRA <<< "$OURS_OVERRIDES"
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
  EXTRA="--recipe_args.seq_length=2048 --recipe_args.micro_batch_size=$NEMO_MBS" bash "$NP/scripts/gpu_run.sh"
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
