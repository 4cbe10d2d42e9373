"""Every GPU benchmark script runs end to end on the tiny random Llama (`--smoke`, CPU) and writes its results row,
so a broken script is caught here and not on a GPU lease."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPTS = {
    "decode": ["--model"],
    "prefill": ["--model"],
    "prefix_reuse_check": ["--model"],
    "regen": ["--model"],
    "train": ["--model"],
    "spec_decode": ["--target", "--hf-prompts", "1"],
    "spec_decode_both_turns": ["--target", "--both-turns", "--no-hf"],
    "round_profile": ["--target"],
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_benchmark_script_smoke(tiny_llama_dir, tmp_path, name):
    flag, *extra = SCRIPTS[name]
    script = REPO / "benchmarks" / f"{name.removesuffix('_both_turns')}.py"
    results = tmp_path / "RESULTS.md"
    done = subprocess.run([sys.executable, str(script), flag, str(tiny_llama_dir), "--smoke", "--results",
                           str(results), *extra], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, done.stdout[-2000:]
    rows = [line for line in results.read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 1 and f"benchmarks/{script.name}" in rows[0]
