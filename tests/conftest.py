"""Shared fixtures: the packaged SmolLM2 as an HF directory and tiny random Llamas built from configs."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("EAGLEPIPE_TEST_CACHE", Path.home() / ".cache" / "eaglepipe-tests"))


def _cached_dir(key: str, build) -> Path:
    """Build an expensive test directory once per machine, atomically, keyed by `key`."""
    final = CACHE / key
    if (final / ".done").exists():
        return final
    tmp = CACHE / f".{key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    (tmp / ".done").write_text("ok")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct de-quantised from the packaged GGUF (fp32 HF directory)."""
    from eaglepipe.target.packaged import convert_gguf_to_hf, packaged_gguf_path

    gguf = packaged_gguf_path()
    digest = hashlib.sha256(f"{gguf.stat().st_size}-v1".encode()).hexdigest()[:12]
    return _cached_dir(f"smollm2-{digest}", lambda d: convert_gguf_to_hf(gguf, d))


@pytest.fixture(scope="session")
def tiny_llama_dir(smollm2_dir: Path) -> Path:
    """A 6-layer random Llama (hidden 64) with SmolLM2's tokenizer and ChatML template."""
    from eaglepipe.target.tiny import make_tiny_llama

    return _cached_dir("tiny-llama-v1", lambda d: make_tiny_llama(d, smollm2_dir))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny ops: as fast as two alone, and far faster on a busy machine
    (two OpenMP threads contending make each small op up to 100x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
