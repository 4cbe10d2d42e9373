"""`Engine`: continuous-batching generation on top of `LlamaRunner`, blocking or from other threads."""
from __future__ import annotations

import bisect
import collections
import itertools
import json
import logging
import random
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from ..config.schema import EngineOptions
from ..target.info import load_tokenizer
from .model import LlamaRunner
from .prefix_cache import SlotPrefixCache
from .request import GenerationResult, Request, RequestTracker, StreamCallback
from .sampling import SamplingParams, make_rng, sample_rows
from .stats import EngineStats, Stopwatch

log = logging.getLogger(__name__)


class PromptTooLongError(ValueError):
    """The prompt leaves no room to generate within max_model_len (a server maps this to HTTP 400)."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting (a server maps this to HTTP 503)."""


class EngineClosedError(RuntimeError):
    """The engine was closed before the request could finish."""


class RequestAbortedError(RuntimeError):
    """The request was stopped by `Engine.abort` before it finished."""


def read_eos_token_ids(model_dir: Path, tokenizer: Any) -> list[int]:
    """EOS ids as HF generate uses them: generation_config.json, else config.json, else the tokenizer's."""
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.exists():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def prefill_groups(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Consecutive runs of prompt indices packed into one prefill forward each, at most `max_tokens` tokens per
    run (a longer prompt runs alone)."""
    groups: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if not groups or used + n > max_tokens:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups


class Engine:
    """Generation with continuous batching: waiting requests join free cache slots as others finish.

    `generate()` blocks; `submit()` is thread-safe and returns a Future, with optional streaming callbacks
    (called on the engine's worker thread). `options` picks the fast paths (`EngineOptions`; the default: each
    where it runs): the token path's Triton kernels, decode steps replayed from CUDA graphs, CUDA-graph prefills
    and speculative rounds. With `draft_dir`, requests are decoded speculatively by
    `eaglepipe.speculative.SpeculativeGenerator` (see the package docstring for that interface).
    `prefix_reuse`: a finished sequence's K/V stay in its slot until the slot is needed, and a request whose prompt
    continues it (the next turn of a conversation) prefills only the new tokens (`SlotPrefixCache`). The reused
    K/V were computed by decode steps instead of a prefill: in bf16 a later token can differ from a full
    recompute's. Not while a speculator is attached (attaching or detaching one empties the cache).
    """

    def __init__(self, model_dir: str | Path, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, max_batch_size: int = 32, max_model_len: int = 2048,
                 options: EngineOptions | None = None, draft_dir: str | Path | None = None,
                 spec: dict | None = None, max_queue: int = 1024, max_prefill_tokens: int = 4096,
                 decode_chunk: int = 16, prefix_reuse: bool = True):
        self.runner = LlamaRunner(model_dir, device=device, dtype=dtype, max_slots=max_batch_size,
                                  max_len=max_model_len, options=options)
        self.options = self.runner.options  # resolved for the device: what runs
        self.device = self.runner.device
        self.max_batch_size, self.max_model_len = max_batch_size, max_model_len
        self.max_queue, self.max_prefill_tokens, self.decode_chunk = max_queue, max_prefill_tokens, decode_chunk
        self.tokenizer = load_tokenizer(self.runner.model_dir)
        self.eos_token_ids = read_eos_token_ids(self.runner.model_dir, self.tokenizer)
        self.tracker = RequestTracker(self.tokenizer, self.eos_token_ids, max_model_len)
        self.stats = EngineStats()
        self.graphs = None
        if self.options.cuda_graphs:
            from .graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self.runner, max_batch_size, ring_size=decode_chunk)
        self.prefix_cache = SlotPrefixCache() if prefix_reuse else None
        self._speculator = None
        if draft_dir is not None:
            from ..speculative import SpeculativeGenerator

            self.speculator = SpeculativeGenerator(self.runner, draft_dir, spec)
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: dict[int, Request] = {}
        self._aborting: set[Future] = set()  # futures of running requests to stop before the next step
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def speculator(self) -> Any:
        """The attached `SpeculativeGenerator`, or None for plain decoding."""
        return self._speculator

    @speculator.setter
    def speculator(self, value: Any) -> None:
        self._speculator = value
        if self.prefix_cache is not None:  # speculative requests overwrite slots behind the cache's back
            self.prefix_cache.clear()

    def _reuse_cache(self) -> SlotPrefixCache | None:
        return self.prefix_cache if self._speculator is None else None

    # ------------------------------------------------------------------ submission
    def _validate(self, prompt_ids: Sequence[int]) -> list[int]:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.runner.shapes.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt) >= self.max_model_len:
            raise PromptTooLongError(f"the prompt has {len(prompt)} tokens; max_model_len is {self.max_model_len} "
                                     "and at least one token must be generated")
        return prompt

    def _enqueue(self, prompt_ids: Sequence[int], params: SamplingParams | None, on_delta: StreamCallback | None,
                 request_id: str | None, bounded: bool) -> Future:
        params = params or SamplingParams()
        prompt = self._validate(prompt_ids)
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            if bounded and len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later")
            rid = request_id or f"req-{next(self._ids)}"
            self._waiting.append(Request(rid, prompt, params, fut, on_delta, make_rng(params)))
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, name="eaglepipe-engine", daemon=True)
                self._thread.start()
            self._cond.notify()
        return fut

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
               on_delta: StreamCallback | None = None, request_id: str | None = None) -> Future:
        """Queue one request from any thread; the Future resolves to a GenerationResult.

        Raises PromptTooLongError / ValueError for bad prompts and QueueFullError when `max_queue` requests wait.
        `on_delta(StreamDelta)` is called on the worker thread as tokens arrive (and once with the result).
        """
        return self._enqueue(prompt_ids, params, on_delta, request_id, bounded=True)

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 progress: bool = False) -> list[GenerationResult]:
        """Generate for every prompt (token id lists), in input order; blocks until all are done."""
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        for p in prompts:
            self._validate(p)
        futures = [self._enqueue(p, sp, None, None, bounded=False) for p, sp in zip(prompts, per_prompt)]
        with tqdm(total=len(futures), desc="generate", unit="req", disable=None if progress else True) as bar:
            for f in futures:
                f.add_done_callback(lambda _: bar.update(1))
            return [f.result() for f in futures]

    def abort(self, future: Future) -> None:
        """Stop the request behind `future` (from `submit`), from any thread: a waiting request leaves the queue,
        a running one frees its slot before the engine's next step. Its future fails with RequestAbortedError
        (unless it finished or was cancelled first)."""
        error = RequestAbortedError("the request was aborted")
        with self._cond:
            waiting = next((r for r in self._waiting if r.future is future), None)
            if waiting is not None:
                self._waiting.remove(waiting)
                if not future.done():
                    future.set_exception(error)
            elif not future.done():
                self._aborting.add(future)
                self._cond.notify()

    def request_counts(self) -> dict[str, int]:
        """How many requests hold a slot (`running_requests`) and how many wait for one (`waiting_requests`)."""
        with self._cond:
            return {"running_requests": len(self._active), "waiting_requests": len(self._waiting)}

    def close(self) -> None:
        """Stop the worker; waiting and running requests fail with EngineClosedError."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ worker
    def _worker(self) -> None:
        while True:
            with self._cond:
                idle = Stopwatch()
                while not self._closed and not self._waiting and not self._active:
                    self._cond.wait()
                self.stats.add(idle_seconds=idle.lap())
                if self._closed:
                    self._fail_all(EngineClosedError("the engine was closed"))
                    return
                self._drop_aborted()
                admitted = self._admit()
            try:
                if self.speculator is not None:
                    self._run_speculative(admitted)
                    continue
                if admitted:
                    self._prefill(admitted)
                if self._active:
                    self._decode()
            except Exception as e:  # a failed step fails its requests, never the worker
                log.exception("engine step failed")
                for req in admitted + list(self._active.values()):
                    if not req.future.done():
                        req.future.set_exception(e)
                    self._release(req)

    def _fail_all(self, error: Exception) -> None:
        for req in list(self._waiting) + list(self._active.values()):
            if not req.future.done():
                req.future.set_exception(error)
        self._waiting.clear()
        self._active.clear()

    def _drop_aborted(self) -> None:
        """Free the slots of running requests that `abort` asked to stop (called with the lock held)."""
        for req in [r for r in self._active.values() if r.future in self._aborting]:
            self._release(req)
            req.future.set_exception(RequestAbortedError(f"request {req.request_id} was aborted"))
        self._aborting.clear()

    def _abort_requested(self, req: Request) -> bool:
        with self._cond:
            return req.future in self._aborting

    def _admit(self) -> list[Request]:
        """Move waiting requests into every free slot. Filling all of them keeps the batch full under a steady
        stream of short requests; `_prefill` bounds each forward by `max_prefill_tokens`.

        A request whose prompt continues a cached finished sequence takes that slot and reuses its K/V; any
        other takes the lowest empty slot, else the slot cached longest ago."""
        capacity = 1 if self.speculator is not None else self.max_batch_size
        cache = self._reuse_cache()
        empty = [s for s in range(capacity) if s not in self._active and (cache is None or s not in cache)]
        admitted = []
        while self._waiting:
            req = self._waiting[0]
            hit = cache.match(req.prompt) if cache is not None else None
            if hit is not None:
                slot, reused = hit.slot, min(hit.length, len(req.prompt) - 1)
            elif empty:
                slot, reused = empty.pop(0), 0
            elif cache is not None and len(cache):
                slot, reused = cache.oldest(), 0
            else:
                break
            self._waiting.popleft()
            if cache is not None:
                cache.drop(slot)
            if not req.future.set_running_or_notify_cancel():
                bisect.insort(empty, slot)
                continue
            req.slot, req.reused = slot, reused
            self._active[req.slot] = req
            admitted.append(req)
        return admitted

    def _release(self, req: Request, finished: bool = False) -> None:
        """Free the request's slot; a finished request's K/V stay there for `prefix_cache` (every token it fed:
        the prompt and all generated tokens but the last)."""
        if self._active.get(req.slot) is req:
            del self._active[req.slot]
            self.runner.release(req.slot)
            cache = self._reuse_cache()
            if finished and cache is not None:
                cache.put(req.slot, req.prompt + req.tokens[:-1])

    def _emit(self, req: Request, finished: bool) -> None:
        """Stream new tokens; on finish, resolve the future and free the slot."""
        result = self.tracker.result(req) if finished else None
        if req.on_delta is not None and (finished or len(req.tokens) > req.sent_tokens):
            try:
                req.on_delta(self.tracker.stream_delta(req, result))
            except Exception:
                log.exception("streaming callback of %s failed", req.request_id)
        if finished:
            self._release(req, finished=True)
            self.stats.add(requests_finished=1)
            if not req.future.done():
                req.future.set_result(result)

    def _feed(self, req: Request, tokens: list[int]) -> None:
        self._emit(req, self.tracker.feed(req, tokens))

    def _prefill(self, admitted: list[Request]) -> None:
        for group in prefill_groups([len(r.prompt) - r.reused for r in admitted], self.max_prefill_tokens):
            reqs = [admitted[i] for i in group]
            watch = Stopwatch()
            out = self.runner.prefill([r.prompt for r in reqs], [r.slot for r in reqs], reused=[r.reused for r in reqs])
            first = sample_rows(out.last_logits, [r.params for r in reqs], [r.rng for r in reqs]).tolist()
            reused = sum(r.reused for r in reqs)
            self.stats.add(prefill_forwards=1, prefill_tokens=sum(len(r.prompt) for r in reqs) - reused,
                           prefill_reused_tokens=reused, prefill_seconds=watch.lap())
            for req, tok in zip(reqs, first):
                self._feed(req, [tok])
            self.stats.add(host_seconds=watch.lap())

    def _decode(self) -> None:
        """Decode the running requests for a few steps (one CUDA-graph replay per step on GPU)."""
        reqs = sorted(self._active.values(), key=lambda r: r.slot)
        lengths = self.runner.lengths
        room = min(self.max_model_len - lengths[r.slot] for r in reqs)
        steps = max(1, min(self.decode_chunk, max(self.tracker.budget(r) for r in reqs), room))
        watch = Stopwatch()
        if self.graphs is not None and self.graphs.fits(reqs[-1].slot + 1, max(lengths[r.slot] for r in reqs) + steps):
            new = self._decode_graphs(reqs, steps)
        else:  # eager (CPU): one step at a time, so finished rows free their slot at once
            new = self._decode_eager(reqs)
        done = len(new[0])
        self.stats.add(decode_steps=done, decode_row_steps=done * len(reqs), decode_seconds=watch.lap())
        for req, toks in zip(reqs, new):
            self._feed(req, toks)
        self.stats.add(host_seconds=watch.lap())

    def _decode_eager(self, reqs: list[Request]) -> list[list[int]]:
        logits = self.runner.decode([r.tokens[-1] for r in reqs], [r.slot for r in reqs])
        new = sample_rows(logits, [r.params for r in reqs], [r.rng for r in reqs]).tolist()
        return [[tok] for tok in new]

    def _decode_graphs(self, reqs: list[Request], steps: int) -> list[list[int]]:
        """Decode every active row `steps` times in one graph per step. The graph also runs the idle slots among
        its rows, from position 0: the K/V that cached slots hold there are saved first and put back after."""
        rows = reqs[-1].slot + 1
        cache = self._reuse_cache()
        shielded = [] if cache is None else [s for s in range(self.graphs.batch_for(rows))
                                             if s not in self._active and s in cache]
        saved = self.runner.copy_positions(shielded, steps) if shielded else None
        tokens, lens = [0] * rows, [0] * rows
        params = [SamplingParams()] * rows
        rngs: list[random.Random | None] = [None] * rows
        for r in reqs:
            tokens[r.slot], lens[r.slot] = r.tokens[-1], self.runner.lengths[r.slot]
            params[r.slot], rngs[r.slot] = r.params, r.rng
        def sample(logits: torch.Tensor, n: int) -> torch.Tensor:
            return sample_rows(logits, params[:n], rngs[:n])

        ring = self.graphs.run(tokens, lens, steps, None if all(p.greedy for p in params) else sample)
        if saved is not None:
            self.runner.restore_positions(shielded, saved)
        for r in reqs:
            self.runner.lengths[r.slot] += steps
        return [[ring[j][r.slot] for j in range(steps)] for r in reqs]

    def _run_speculative(self, admitted: list[Request]) -> None:
        """Hand each admitted request to the speculative generator (one at a time)."""
        watch = Stopwatch()
        for req in admitted:
            def on_tokens(tokens: list[int], req: Request = req) -> bool:
                finished = self.tracker.feed(req, tokens)
                if not finished:
                    self._emit(req, False)
                return finished or self._abort_requested(req)

            req.spec_verify_ct = self.speculator.generate(req.prompt, req.params, req.slot, on_tokens)
            if req.finish_reason is None and self._abort_requested(req):
                continue  # the next `_drop_aborted` frees its slot and fails its future
            if req.finish_reason is None:
                req.finish_reason = "length"
            self._emit(req, True)
        self.stats.add(speculative_seconds=watch.lap())
