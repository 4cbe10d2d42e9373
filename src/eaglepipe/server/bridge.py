"""The server's view of the engine: tokenisation, request limits, and engine futures as awaitables."""
from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import Future
from typing import Any, AsyncIterator, Sequence

from ..engine import (
    Engine,
    EngineClosedError,
    GenerationResult,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
    StreamDelta,
)
from .errors import ApiError, bad_request, overloaded
from .protocol import SamplingSpec


class EngineBridge:
    """Wraps an Engine for the aiohttp handlers (which run on one event loop)."""

    def __init__(self, engine: Engine, model_name: str, has_draft: bool = False):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.eos_token_ids = frozenset(engine.eos_token_ids)
        self.vocab_size = engine.runner.shapes.vocab_size
        self.model_name, self.has_draft = model_name, has_draft
        self.started = int(time.time())
        self._closed = False
        self.tokenize_calls, self.tokenize_tokens, self.tokenize_seconds = 0, 0, 0.0
        self.requests_aborted = 0

    def healthy(self) -> bool:
        """True until the bridge is closed."""
        return not self._closed

    def close(self) -> None:
        """Stop the engine (running requests fail)."""
        self._closed = True
        self.engine.close()

    # ---------------------------------------------------------------- prompts
    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the messages rendered with the model's chat template plus the generation prompt."""
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja raises its own errors for message orders a template rejects
            raise bad_request(f"the model's chat template rejected these messages: {e}", "messages") from None
        return self.encode(text)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` (special tokens in the text are parsed as such)."""
        start = time.perf_counter()
        ids = list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        self.tokenize_calls += 1
        self.tokenize_tokens += len(ids)
        self.tokenize_seconds += time.perf_counter() - start
        return ids

    def stats(self) -> dict[str, Any]:
        """The engine's counters (`EngineStats.snapshot`) and request counts, the server's own tokenisation time,
        which runs on the event loop (it releases the GIL, but no other request is handled meanwhile), and how many
        requests were aborted because their client went away."""
        return {"engine": {**self.engine.stats.snapshot(), **self.engine.request_counts()},
                "server": {"tokenize_calls": self.tokenize_calls, "tokenize_tokens": self.tokenize_tokens,
                           "tokenize_seconds": round(self.tokenize_seconds, 3),
                           "requests_aborted": self.requests_aborted,
                           "uptime_seconds": round(time.time() - self.started, 1)}}

    def check_ids(self, ids: Sequence[int]) -> list[int]:
        """Client-given token ids, checked against the vocabulary."""
        bad = next((t for t in ids if t >= self.vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is out of range; the vocabulary has {self.vocab_size} ids", "input_ids")
        return list(ids)

    def sampling_params(self, spec: SamplingSpec, prompt_len: int) -> SamplingParams:
        """Engine params; max_new_tokens is capped by the room left in max_model_len (400 if there is none)."""
        if prompt_len == 0:
            raise bad_request("the prompt is empty")
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ApiError(400, f"the prompt has {prompt_len} tokens, but this server's max_model_len is "
                                f"{self.max_model_len} (prompt plus at least one generated token)",
                           param="messages")
        max_new = room if spec.max_new_tokens is None else min(spec.max_new_tokens, room)
        return SamplingParams(temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k,
                              max_new_tokens=max_new, stop=list(spec.stop),
                              stop_token_ids=list(spec.stop_token_ids) or None, ignore_eos=spec.ignore_eos,
                              seed=spec.seed)

    # ---------------------------------------------------------------- generation
    def _submit(self, prompt_ids: list[int], params: SamplingParams, on_delta: Any = None) -> Future:
        if self._closed:
            raise ApiError(503, "the server is shutting down", type="server_error")
        try:
            return self.engine.submit(prompt_ids, params, on_delta=on_delta)
        except QueueFullError as e:
            raise overloaded(f"server overloaded: {e}") from None
        except EngineClosedError as e:
            raise ApiError(503, str(e), type="server_error") from None
        except PromptTooLongError as e:
            raise ApiError(400, str(e), param="messages") from None
        except ValueError as e:
            raise bad_request(str(e)) from None

    def _finish(self, result: GenerationResult) -> GenerationResult:
        """Without a drafter every generated token took one target forward (SGLang reports it that way)."""
        if self.has_draft:
            return result
        return dataclasses.replace(result, spec_verify_ct=result.completion_tokens)

    def abort(self, fut: Future) -> None:
        """Stop the engine request behind `fut` unless it already finished (its client went away)."""
        if fut.done() and not fut.cancelled():
            return
        self.requests_aborted += 1
        self.engine.abort(fut)

    async def _await(self, fut: Future) -> GenerationResult:
        try:
            return self._finish(await asyncio.wrap_future(fut))
        except asyncio.CancelledError:  # aiohttp cancels the handler when its client disconnects
            self.abort(fut)
            raise
        except EngineClosedError as e:
            raise ApiError(503, str(e), type="server_error") from None
        except Exception as e:  # the engine failed this request's step
            raise ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error") from None

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        """One request to completion."""
        return await self._await(self._submit(prompt_ids, params))

    async def generate_many(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[GenerationResult]:
        """Several requests (one HTTP batch); all are admitted or none is (503)."""
        futures: list[Future] = []
        try:
            for p, sp in zip(prompts, params):
                futures.append(self._submit(p, sp))
        except ApiError:
            for f in futures:
                f.cancel()
            raise
        return list(await asyncio.gather(*(self._await(f) for f in futures)))

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[StreamDelta]:
        """Admit the request now (raising ApiError at once), then iterate its StreamDeltas; the last has `result`."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamDelta | None] = asyncio.Queue()

        def on_delta(delta: StreamDelta) -> None:  # runs on the engine thread, before the future resolves
            loop.call_soon_threadsafe(queue.put_nowait, delta)

        fut = self._submit(prompt_ids, params, on_delta)
        fut.add_done_callback(lambda _f: loop.call_soon_threadsafe(queue.put_nowait, None))

        async def deltas() -> AsyncIterator[StreamDelta]:
            complete = False
            try:
                while (delta := await queue.get()) is not None:
                    if delta.finished and delta.result is not None:
                        complete = True
                        yield dataclasses.replace(delta, result=self._finish(delta.result))
                        return
                    yield delta
                await self._await(fut)  # the engine ended the request without a final delta: raise its error
                raise ApiError(500, "generation ended without a result", type="server_error")
            finally:
                if not complete:  # closed early: the client went away or a write to it failed
                    self.abort(fut)
        return deltas()
