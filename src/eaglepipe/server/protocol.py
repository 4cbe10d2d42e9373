"""Validation of OpenAI (/v1/chat/completions, /v1/completions) and SGLang (/generate) request bodies."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import bad_request

ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_STOP = 16
MAX_SEED = 2 ** 64 - 1
_MISSING = object()


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling options as the client asked for them (max_new_tokens None = up to the context limit)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None


@dataclass(frozen=True)
class ChatSpec:
    """A validated chat completion request."""

    messages: list[dict[str, str]]
    sampling: SamplingSpec
    stream: bool = False
    include_usage: bool = False


@dataclass(frozen=True)
class CompletionSpec:
    """A validated text completion request (one prompt: text or token ids)."""

    prompt: str | list[int]
    sampling: SamplingSpec
    stream: bool = False
    include_usage: bool = False


@dataclass(frozen=True)
class GenerateSpec:
    """A validated SGLang /generate request; `batched` when the client sent a list of prompts."""

    prompts: list[str | list[int]]
    sampling: SamplingSpec
    batched: bool
    stream: bool = False
    rids: list[str] | None = field(default=None)


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _field(body: dict, key: str, kind: type | tuple, default: Any = _MISSING, *, where: str = "") -> Any:
    """`body[key]` checked against `kind` (bools are not numbers); None counts as missing."""
    name = f"{where}{key}"
    value = body.get(key)
    if value is None:
        if default is _MISSING:
            raise bad_request(f"missing required field '{name}'", name)
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds:
        kinds = kinds + (int,)
    if isinstance(value, bool) and bool not in kinds:
        raise bad_request(f"'{name}' must be {_kind_name(kinds)}, got a boolean", name)
    if not isinstance(value, kinds):
        raise bad_request(f"'{name}' must be {_kind_name(kinds)}, got {type(value).__name__}", name)
    if float in kinds and isinstance(value, int):
        value = float(value)
    return value


def _kind_name(kinds: tuple) -> str:
    if float in kinds:
        return "a number"
    names = {bool: "a boolean", int: "an integer", str: "a string", list: "a list", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _stop_list(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise bad_request(f"'{name}' must be a non-empty string or a list of non-empty strings", name)
    if len(value) > MAX_STOP:
        raise bad_request(f"'{name}' may hold at most {MAX_STOP} strings", name)
    return tuple(value)


def _token_ids(value: Any, name: str, *, allow_empty: bool = False) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                              for t in value):
        raise bad_request(f"'{name}' must be a list of non-negative integers", name)
    if not value and not allow_empty:
        raise bad_request(f"'{name}' must not be empty", name)
    return value


def _sampling(body: dict, *, max_tokens_keys: tuple[str, ...], default_temperature: float,
              default_max_tokens: int | None, where: str = "") -> SamplingSpec:
    """Shared sampling fields with range checks."""
    temperature = _field(body, "temperature", float, default_temperature, where=where)
    if not 0.0 <= temperature <= 100.0:
        raise bad_request(f"'{where}temperature' must be in [0, 100], got {temperature}", f"{where}temperature")
    top_p = _field(body, "top_p", float, 1.0, where=where)
    if not 0.0 < top_p <= 1.0:
        raise bad_request(f"'{where}top_p' must be in (0, 1], got {top_p}", f"{where}top_p")
    top_k = _field(body, "top_k", int, 0, where=where)
    if top_k < -1:
        raise bad_request(f"'{where}top_k' must be >= -1 (-1 or 0: disabled), got {top_k}", f"{where}top_k")
    max_new = default_max_tokens
    for key in max_tokens_keys:
        if body.get(key) is not None:
            max_new = _field(body, key, int, where=where)
            if max_new < 1:
                raise bad_request(f"'{where}{key}' must be >= 1, got {max_new}", f"{where}{key}")
            break
    seed = _field(body, "seed", int, None, where=where)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise bad_request(f"'{where}seed' must be an integer in [0, 2**64 - 1] (the RNG's 64-bit seed), got "
                          f"{'a negative number' if seed < 0 else 'a larger number'}", f"{where}seed")
    stop_ids = tuple(_token_ids(body["stop_token_ids"], f"{where}stop_token_ids", allow_empty=True)) \
        if body.get("stop_token_ids") is not None else ()
    return SamplingSpec(temperature=temperature, top_p=top_p, top_k=max(top_k, 0), max_new_tokens=max_new,
                        stop=_stop_list(body.get("stop"), f"{where}stop"), stop_token_ids=stop_ids,
                        ignore_eos=_field(body, "ignore_eos", bool, False, where=where), seed=seed)


def _openai_common(body: dict) -> tuple[bool, bool]:
    """Checks shared by the OpenAI endpoints; returns (stream, include_usage)."""
    n = _field(body, "n", int, 1)
    if n != 1:
        raise bad_request(f"only n=1 is supported, got n={n}", "n")
    for unsupported in ("logprobs", "tools", "functions", "best_of"):
        if body.get(unsupported) and not (unsupported == "best_of" and body.get(unsupported) == 1):
            raise bad_request(f"'{unsupported}' is not supported by this server", unsupported)
    stream = _field(body, "stream", bool, False)
    options = _field(body, "stream_options", dict, {})
    include_usage = bool(options.get("include_usage", False))
    return stream, include_usage


def _message_content(msg: dict, i: int) -> str:
    content = msg.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{i}].content[{j}] must be a text part "
                                  "({\"type\": \"text\", \"text\": ...})", f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def parse_chat(body: dict) -> ChatSpec:
    """Validate a /v1/chat/completions body."""
    messages = _field(body, "messages", list)
    if not messages:
        raise bad_request("'messages' must not be empty", "messages")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise bad_request(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        role = msg.get("role")
        if role not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {list(ROLES)}, got {role!r}", f"messages[{i}].role")
        out.append({"role": role, "content": _message_content(msg, i)})
    stream, include_usage = _openai_common(body)
    sampling = _sampling(body, max_tokens_keys=("max_completion_tokens", "max_tokens"), default_temperature=1.0,
                         default_max_tokens=None)
    return ChatSpec(out, sampling, stream, include_usage)


def parse_completion(body: dict) -> CompletionSpec:
    """Validate a /v1/completions body (a single prompt)."""
    prompt = body.get("prompt")
    if prompt is None:
        raise bad_request("missing required field 'prompt'", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        prompt = _token_ids(prompt, "prompt")
    elif not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string, a list of token ids, or a one-element list of either", "prompt")
    stream, include_usage = _openai_common(body)
    if body.get("echo"):
        raise bad_request("'echo' is not supported by this server", "echo")
    sampling = _sampling(body, max_tokens_keys=("max_tokens",), default_temperature=1.0, default_max_tokens=16)
    return CompletionSpec(prompt, sampling, stream, include_usage)


def parse_generate(body: dict) -> GenerateSpec:
    """Validate an SGLang /generate body: exactly one of `text` / `input_ids`, each single or a batch."""
    has_text, has_ids = body.get("text") is not None, body.get("input_ids") is not None
    if has_text == has_ids:
        raise bad_request("exactly one of 'text' or 'input_ids' is required", "text")
    if has_text:
        text = body["text"]
        if isinstance(text, str):
            prompts, batched = [text], False
        elif isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            prompts, batched = list(text), True
        else:
            raise bad_request("'text' must be a string or a non-empty list of strings", "text")
    else:
        ids = body["input_ids"]
        if isinstance(ids, list) and ids and all(isinstance(x, list) for x in ids):
            prompts = [_token_ids(x, f"input_ids[{i}]") for i, x in enumerate(ids)]
            batched = True
        else:
            prompts, batched = [_token_ids(ids, "input_ids")], False
    params = _field(body, "sampling_params", dict, {})
    sampling = _sampling(params, max_tokens_keys=("max_new_tokens",), default_temperature=1.0,
                         default_max_tokens=128, where="sampling_params.")
    stream = _field(body, "stream", bool, False)
    if stream and batched:
        raise bad_request("streaming is supported for a single prompt only", "stream")
    rid = body.get("rid")
    rids = None
    if rid is not None:
        rids = [rid] if isinstance(rid, str) else rid
        if not isinstance(rids, list) or len(rids) != len(prompts) or not all(isinstance(r, str) for r in rids):
            raise bad_request("'rid' must be a string (or one string per prompt)", "rid")
    return GenerateSpec(prompts, sampling, batched, stream, rids)
