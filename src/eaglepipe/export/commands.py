"""Ready-to-run SGLang and vLLM launch lines for an exported drafter."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from ..families.base import DrafterFamily


def sglang_command(target: str, draft_dir: Path, family: DrafterFamily, num_steps: int, topk: int,
                   num_draft_tokens: int, dtype: str) -> str:
    """`python -m sglang.launch_server ...` serving `target` with the `family` drafter in `draft_dir`."""
    args = ["python", "-m", "sglang.launch_server", "--model-path", target,
            "--speculative-algorithm", family.sglang_algorithm, "--speculative-draft-model-path", str(draft_dir),
            *family.sglang_spec_args(draft_dir, num_steps, topk, num_draft_tokens), "--dtype", dtype]
    return shlex.join(args + family.sglang_extra_args(draft_dir))


def vllm_command(target: str, draft_dir: Path, family: DrafterFamily, num_steps: int, dtype: str) -> str:
    """`vllm serve ... --speculative-config '{...}'` for the `family` drafter in `draft_dir` (chain of num_steps)."""
    spec = family.vllm_speculative_config(draft_dir, num_steps)
    return shlex.join(["vllm", "serve", target, "--dtype", dtype, "--speculative-config", json.dumps(spec)])
