"""Ready-to-run SGLang and vLLM launch lines for an exported drafter."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from .layout import EAGLE3_ALGOS, TOKEN_MAP_FILE


def sglang_command(target: str, draft_dir: Path, algorithm: str, num_steps: int, topk: int,
                   num_draft_tokens: int, dtype: str) -> str:
    """`python -m sglang.launch_server ...` serving `target` with the drafter in `draft_dir`."""
    args = ["python", "-m", "sglang.launch_server", "--model-path", target,
            "--speculative-algorithm", "EAGLE3" if algorithm in EAGLE3_ALGOS else "EAGLE",
            "--speculative-draft-model-path", str(draft_dir),
            "--speculative-num-steps", str(num_steps), "--speculative-eagle-topk", str(topk),
            "--speculative-num-draft-tokens", str(num_draft_tokens), "--dtype", dtype]
    if algorithm not in EAGLE3_ALGOS and (draft_dir / TOKEN_MAP_FILE).exists():
        args += ["--speculative-token-map", str(draft_dir / TOKEN_MAP_FILE)]
    return shlex.join(args)


def vllm_command(target: str, draft_dir: Path, num_steps: int, dtype: str) -> str:
    """`vllm serve ... --speculative-config '{...}'` for the speculators-format export (chain of num_steps)."""
    spec = {"method": "eagle3", "model": str(draft_dir), "num_speculative_tokens": num_steps,
            "draft_tensor_parallel_size": 1}
    return shlex.join(["vllm", "serve", target, "--dtype", dtype, "--speculative-config", json.dumps(spec)])
