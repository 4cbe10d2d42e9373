"""Engine.abort: a waiting request leaves the queue, a running one (plain or speculative) frees its slot, and the
engine goes on serving (tiny random Llama on CPU; a random EAGLE-3 drafter exported by the real exporter)."""
from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path

import pytest

from eaglepipe.engine import Engine, SamplingParams, StreamDelta
from eaglepipe.engine.engine import RequestAbortedError

from test_export import export_to, make_checkpoint

MAX_MODEL_LEN = 1024
LONG = SamplingParams(max_new_tokens=MAX_MODEL_LEN - 8, ignore_eos=True)  # far longer than an abort takes


@pytest.fixture(scope="module")
def drafter_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("abort")
    ckpt = make_checkpoint(tiny_llama_dir, root / "ckpt", "eagle3", draft_vocab=256)
    export_to(tiny_llama_dir, ckpt, root / "export")
    return root / "export" / "sglang"


def submit_and_wait_for_a_token(engine: Engine, prompt: list[int]) -> tuple[Future, list[StreamDelta]]:
    """Submit a long request; return once it has streamed its first token (so it runs in a slot)."""
    deltas: list[StreamDelta] = []
    started = threading.Event()

    def on_delta(delta: StreamDelta) -> None:
        deltas.append(delta)
        started.set()

    fut = engine.submit(prompt, LONG, on_delta=on_delta)
    assert started.wait(120), "the request never produced a token"
    return fut, deltas


def assert_aborted(fut: Future, deltas: list[StreamDelta]) -> None:
    with pytest.raises(RequestAbortedError):
        fut.result(timeout=120)
    assert not any(d.finished for d in deltas)
    assert sum(len(d.token_ids) for d in deltas) < LONG.max_new_tokens


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_abort_frees_running_and_waiting_requests(tiny_llama_dir, drafter_dir, speculative):
    draft = drafter_dir if speculative else None
    with Engine(tiny_llama_dir, device="cpu", max_batch_size=1, max_model_len=MAX_MODEL_LEN, draft_dir=draft) as engine:
        running, deltas = submit_and_wait_for_a_token(engine, [1, 2, 3, 4])
        waiting = engine.submit([5, 6, 7], LONG)
        assert engine.request_counts() == {"running_requests": 1, "waiting_requests": 1}
        engine.abort(waiting)  # leaves the queue at once
        assert engine.request_counts()["waiting_requests"] == 0
        with pytest.raises(RequestAbortedError):
            waiting.result(timeout=0)
        engine.abort(running)
        assert_aborted(running, deltas)
        assert engine.request_counts() == {"running_requests": 0, "waiting_requests": 0}
        assert engine.stats.snapshot()["requests_finished"] == 0
        done = engine.submit([9, 10], SamplingParams(max_new_tokens=8, ignore_eos=True)).result(timeout=120)
        assert done.completion_tokens == 8
