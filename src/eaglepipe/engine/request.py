"""Per-request bookkeeping: generated tokens, stop conditions, incremental text for stop strings and streaming."""
from __future__ import annotations

import random
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from .sampling import SamplingParams


@dataclass
class GenerationResult:
    """A finished request. `prompt_tokens` and `completion_tokens` are counts; `spec_verify_ct` counts
    speculative verification forwards (0 without a drafter), as SGLang reports it in meta_info."""

    request_id: str
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    completion_tokens: int
    spec_verify_ct: int = 0


@dataclass
class StreamDelta:
    """What a streaming callback receives: newly generated tokens and text; `result` once finished."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    result: GenerationResult | None = None


StreamCallback = Callable[[StreamDelta], None]


@dataclass
class Request:
    """A submitted request, its future, and its decoding state while it runs."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    future: Future
    on_delta: StreamCallback | None = None
    rng: random.Random | None = None  # the host RNG of a sampled request (sampling.make_rng)
    slot: int = -1
    reused: int = 0  # leading prompt tokens whose K/V the slot already held (prefix reuse)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    spec_verify_ct: int = 0
    # incremental detokenisation (only when stop strings or streaming need text)
    decoded_text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    sent_tokens: int = 0  # tokens and characters already streamed
    sent_chars: int = 0


class RequestTracker:
    """Applies EOS / stop-token / stop-string / length rules to a request as tokens arrive."""

    def __init__(self, tokenizer, eos_token_ids: list[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.max_model_len = max_model_len

    def stop_ids(self, params: SamplingParams) -> set[int]:
        ids = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            ids.update(self.eos_token_ids)
        return ids

    def budget(self, req: Request) -> int:
        """How many tokens the request may still generate (max_new_tokens and max_model_len)."""
        limit = min(req.params.max_new_tokens, self.max_model_len - len(req.prompt))
        return limit - len(req.tokens)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _advance_text(self, req: Request) -> None:
        """Extend req.decoded_text with the text of the newest tokens, holding back incomplete UTF-8 characters."""
        prefix = self._decode(req.tokens[req.prefix_offset:req.read_offset])
        full = self._decode(req.tokens[req.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            req.decoded_text += full[len(prefix):]
            req.prefix_offset, req.read_offset = req.read_offset, len(req.tokens)

    def feed(self, req: Request, new_tokens: list[int]) -> bool:
        """Append tokens (stopping at the first finishing one); returns True when the request is finished."""
        stop_ids = self.stop_ids(req.params)
        wants_text = bool(req.params.stop) or req.on_delta is not None
        for tok in new_tokens:
            req.tokens.append(tok)
            if tok in stop_ids:
                req.finish_reason = "stop"
            elif self.budget(req) <= 0:
                req.finish_reason = "length"
            if wants_text:
                before = len(req.decoded_text)
                self._advance_text(req)
                if req.params.stop and self._find_stop(req.decoded_text, req.params.stop, before) >= 0:
                    req.finish_reason = "stop"
            if req.finish_reason:
                return True
        return False

    @staticmethod
    def _find_stop(text: str, stops: list[str], checked: int) -> int:
        start = max(0, checked - max(len(s) for s in stops) + 1)
        hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
        return min(hits) if hits else -1

    def final_text(self, req: Request) -> str:
        """The output text: special tokens skipped, cut before the first stop string."""
        text = self._decode(req.tokens)
        if req.params.stop:
            cut = self._find_stop(text, req.params.stop, 0)
            if cut >= 0:
                text = text[:cut]
        return text

    def result(self, req: Request) -> GenerationResult:
        """The GenerationResult of a finished request."""
        return GenerationResult(request_id=req.request_id, prompt_tokens=len(req.prompt), token_ids=list(req.tokens),
                                text=self.final_text(req), finish_reason=req.finish_reason or "length",
                                completion_tokens=len(req.tokens), spec_verify_ct=req.spec_verify_ct)

    def stream_delta(self, req: Request, result: GenerationResult | None) -> StreamDelta:
        """New tokens/text since the last delta; text that may start a stop string is held back until final."""
        if result is not None:
            text = result.text
        else:
            hold = max((len(s) for s in req.params.stop), default=1) - 1
            text = req.decoded_text[: max(len(req.decoded_text) - hold, req.sent_chars)]
        delta = StreamDelta(req.request_id, req.tokens[req.sent_tokens:], text[req.sent_chars:],
                            result is not None, result)
        req.sent_tokens, req.sent_chars = len(req.tokens), max(len(text), req.sent_chars)
        return delta
