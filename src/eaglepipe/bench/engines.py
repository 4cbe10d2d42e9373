"""The engine a bench measures (`bench.engine`): ours in process (native), SGLang launched per point, or a running
server (url).

Each has `serving(point)` (a context manager that makes `point` the active config; None = the non-speculative
baseline) and `generate(prompts, keys, temperature)` returning one Sample per prompt.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Iterator, Protocol, Sequence

from ..config import BenchCfg, EngineOptions, SweepPoint
from .client import GenerateClient
from .metrics import Sample

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (prompt index, turn)


class BenchEngine(Protocol):
    """What the sweep runner needs from the engine it measures."""

    has_baseline: bool

    def serving(self, point: SweepPoint | None) -> contextlib.AbstractContextManager[None]: ...

    def generate(self, prompts: Sequence[list[int]], keys: Sequence[Key], temperature: float) -> list[Sample]: ...


def spec_options(point: SweepPoint) -> dict[str, int]:
    """The engine's speculative config for a sweep point (SGLang semantics)."""
    return {"num_steps": point.num_steps, "topk": point.topk, "num_draft_tokens": point.num_draft_tokens}


def round_histogram(delta_sizes: Sequence[int], verify_rounds: int, depth: int) -> list[int] | None:
    """Accepted-drafts histogram from the token batches a speculative request streamed.

    Each verification round streams its accepted drafts plus the bonus token as one batch; a batch streamed
    before the first round (the prefill token) is skipped. Returns None when the batches do not line up
    with `verify_rounds`.
    """
    if verify_rounds == 0 or len(delta_sizes) < verify_rounds:
        return None
    hist = [0] * (depth + 1)
    for size in delta_sizes[len(delta_sizes) - verify_rounds:]:
        hist[min(max(size - 1, 0), depth)] += 1
    return hist


class NativeEngine:
    """Our Engine: one instance (one target load, one KV cache) reused by every point, with the fast paths of
    `cfg.engine_options`; `options` holds them resolved for the device (what ran)."""

    has_baseline = True

    def __init__(self, model_dir: Path, draft_dir: Path, cfg: BenchCfg, device: str, seed: int):
        from ..engine import Engine

        # no prefix reuse: the baseline must compute every prompt as the speculative points do, so that greedy
        # outputs can match token for token
        self.engine = Engine(model_dir, device=device, max_batch_size=cfg.batch_size, max_model_len=cfg.max_model_len,
                             options=cfg.engine_options, prefix_reuse=False)
        self.options: EngineOptions = self.engine.options
        self.tokenizer = self.engine.tokenizer
        self.draft_dir, self.cfg, self.seed = draft_dir, cfg, seed
        self.point: SweepPoint | None = None

    @contextlib.contextmanager
    def serving(self, point: SweepPoint | None) -> Iterator[None]:
        """Attach a speculative generator for `point` to the engine (none for the baseline)."""
        from ..speculative import SpeculativeGenerator

        self.point = point
        self.engine.speculator = None if point is None else \
            SpeculativeGenerator(self.engine.runner, self.draft_dir, spec_options(point))
        try:
            yield
        finally:
            self.engine.speculator, self.point = None, None

    def generate(self, prompts: Sequence[list[int]], keys: Sequence[Key], temperature: float) -> list[Sample]:
        """Run the prompts through the engine (up to batch_size at once), timing every streamed token batch."""
        from ..engine import SamplingParams

        lock = threading.Lock()
        times: list[list[float]] = [[] for _ in prompts]
        sizes: list[list[int]] = [[] for _ in prompts]

        def recorder(i: int):
            def on_delta(delta) -> None:
                with lock:
                    if delta.token_ids:
                        times[i].append(time.perf_counter())
                        sizes[i].append(len(delta.token_ids))
            return on_delta

        futures = []
        for i, (ids, (p, turn)) in enumerate(zip(prompts, keys)):
            params = SamplingParams(temperature=temperature, max_new_tokens=self.cfg.max_new_tokens,
                                    seed=None if temperature == 0 else self.seed * 1_000_003 + p * 101 + turn)
            futures.append(self.engine.submit(ids, params, on_delta=recorder(i)))
        samples = []
        for i, (fut, (p, turn)) in enumerate(zip(futures, keys)):
            res = fut.result()
            hist = None if self.point is None else \
                round_histogram(sizes[i], res.spec_verify_ct, self.point.num_steps)
            samples.append(Sample(prompt_index=p, turn=turn, text=res.text, completion_tokens=res.completion_tokens,
                                  verify_rounds=res.spec_verify_ct, decode_s=times[i][-1] - times[i][0],
                                  token_ids=list(res.token_ids), accept_hist=hist))
        return samples

    def close(self) -> None:
        """Stop the engine's worker."""
        self.engine.close()


class ServerEngine:
    """A /generate server: `url` (already running) or one launched per point (`sglang`, see launch.py)."""

    def __init__(self, url: str, cfg: BenchCfg, baseline_url: str | None = None, launcher=None):
        self.url, self.cfg, self.baseline_url, self.launcher = url, cfg, baseline_url, launcher
        self.has_baseline = launcher is not None or baseline_url is not None
        self.active_url = url

    @contextlib.contextmanager
    def serving(self, point: SweepPoint | None) -> Iterator[None]:
        """Launch the server for `point` (sglang) or pick the matching running server (url)."""
        if self.launcher is not None:
            with self.launcher(point) as url:
                self.active_url = url
                yield
            return
        self.active_url = self.url if point is not None else self.baseline_url
        asyncio.run(self._wait_ready())
        yield

    async def _wait_ready(self) -> None:
        async with GenerateClient(self.active_url, self.cfg.timeout_s) as client:
            await client.wait_ready(timeout_s=30.0)

    def generate(self, prompts: Sequence[list[int]], keys: Sequence[Key], temperature: float) -> list[Sample]:
        """Send the prompts with at most batch_size requests in flight."""
        return asyncio.run(self._generate(prompts, keys, temperature))

    async def _generate(self, prompts: Sequence[list[int]], keys: Sequence[Key], temperature: float) -> list[Sample]:
        gate = asyncio.Semaphore(self.cfg.batch_size)
        async with GenerateClient(self.active_url, self.cfg.timeout_s) as client:
            async def one(ids: list[int], key: Key) -> Sample:
                async with gate:
                    return await client.generate(ids, temperature, self.cfg.max_new_tokens, *key)

            return list(await asyncio.gather(*(one(ids, key) for ids, key in zip(prompts, keys))))

    def close(self) -> None:
        """Nothing to release: launched servers stop when their point ends."""
