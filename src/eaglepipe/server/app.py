"""The aiohttp application: /health, /stats, /v1/models, /v1/chat/completions, /v1/completions, /generate."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from aiohttp import web

from .bridge import EngineBridge
from .errors import ApiError
from .protocol import (
    ChatSpec,
    CompletionSpec,
    GenerateSpec,
    SamplingSpec,
    parse_chat,
    parse_completion,
    parse_generate,
    parse_json,
)

log = logging.getLogger("eaglepipe.server")
BRIDGE = web.AppKey("bridge", EngineBridge)
MAX_BODY_BYTES = 64 * 1024 * 1024


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """ApiError → its JSON body; unknown paths/methods and crashes → JSON errors too."""
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return ApiError(e.status, e.reason or "error", type="invalid_request_error").response()
    except asyncio.CancelledError:  # aiohttp cancels the handler of a client that disconnected
        _log_disconnect(request)
        raise
    except ConnectionResetError:  # a write to a client that disconnected
        _log_disconnect(request)
        return web.Response(status=499, reason="Client Closed Request")  # unsent: aiohttp drops it quietly
    except Exception as e:  # a bug must not take the server down; the client gets a 500
        log.exception("internal error on %s", request.path)
        return ApiError(500, f"internal server error: {type(e).__name__}: {e}", type="server_error").response()


def _log_disconnect(request: web.Request) -> None:
    """One line (no traceback) for a connection that closed before its response was complete; the bridge has
    aborted the engine request by then."""
    log.info("%s %s from %s: the connection closed before the response was complete; request aborted",
             request.method, request.path, request.remote)


async def _json_body(request: web.Request) -> dict[str, Any]:
    return parse_json(await request.read())


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def health(request: web.Request) -> web.Response:
    """200 while the engine loop runs, else 503."""
    if request.app[BRIDGE].healthy():
        return web.json_response({"status": "ok"})
    raise ApiError(503, "engine is not running", type="server_error")


async def stats(request: web.Request) -> web.Response:
    """Where the engine's time went (prefill, decode, host bookkeeping, idle), its mean decode batch, and the
    server's tokenisation time: JSON counters since start."""
    return web.json_response(request.app[BRIDGE].stats())


async def models(request: web.Request) -> web.Response:
    """The one served model, OpenAI style."""
    bridge = request.app[BRIDGE]
    return web.json_response({"object": "list", "data": [
        {"id": bridge.model_name, "object": "model", "created": bridge.started, "owned_by": "eaglepipe",
         "root": bridge.model_name, "max_model_len": bridge.max_model_len}]})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions (non-streaming or SSE)."""
    bridge = request.app[BRIDGE]
    spec: ChatSpec = parse_chat(await _json_body(request))
    prompt_ids = bridge.render_chat(spec.messages)
    params = bridge.sampling_params(spec.sampling, len(prompt_ids))
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not spec.stream:
        result = await bridge.generate(prompt_ids, params)
        return web.json_response({
            "id": rid, "object": "chat.completion", "created": created, "model": bridge.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": _usage(result.prompt_tokens, result.completion_tokens),
            "meta_info": {"spec_verify_ct": result.spec_verify_ct}})

    def chunk(delta: dict, finish: str | None) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": bridge.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    deltas = bridge.stream(prompt_ids, params)

    async def events() -> AsyncIterator[dict]:
        yield chunk({"role": "assistant", "content": ""}, None)
        async for d in deltas:
            if d.result is None:
                if d.text:
                    yield chunk({"content": d.text}, None)
                continue
            yield chunk({"content": d.text} if d.text else {}, d.result.finish_reason)
            if spec.include_usage:
                yield {"id": rid, "object": "chat.completion.chunk", "created": created, "model": bridge.model_name,
                       "choices": [], "usage": _usage(d.result.prompt_tokens, d.result.completion_tokens)}

    return await _sse(request, events())


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions (one prompt: text or token ids)."""
    bridge = request.app[BRIDGE]
    spec: CompletionSpec = parse_completion(await _json_body(request))
    prompt_ids = bridge.encode(spec.prompt) if isinstance(spec.prompt, str) else bridge.check_ids(spec.prompt)
    params = bridge.sampling_params(spec.sampling, len(prompt_ids))
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def body(text: str, finish: str | None) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": bridge.model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

    if not spec.stream:
        result = await bridge.generate(prompt_ids, params)
        return web.json_response({**body(result.text, result.finish_reason),
                                  "usage": _usage(result.prompt_tokens, result.completion_tokens)})

    deltas = bridge.stream(prompt_ids, params)

    async def events() -> AsyncIterator[dict]:
        async for d in deltas:
            if d.result is None:
                if d.text:
                    yield body(d.text, None)
                continue
            yield body(d.text, d.result.finish_reason)
            if spec.include_usage:
                yield {**body("", None), "choices": [],
                       "usage": _usage(d.result.prompt_tokens, d.result.completion_tokens)}

    return await _sse(request, events())


def _finish_reason(result: Any, bridge: EngineBridge, spec: SamplingSpec) -> dict[str, Any]:
    """SGLang's finish_reason object: {"type": "length", "length": n} or {"type": "stop", "matched": ...}."""
    if result.finish_reason == "length":
        return {"type": "length", "length": result.completion_tokens}
    last = result.token_ids[-1] if result.token_ids else None
    if last is not None and (last in bridge.eos_token_ids or last in spec.stop_token_ids):
        return {"type": "stop", "matched": int(last)}
    text = bridge.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    matched = next((s for s in spec.stop if s in text), None)
    return {"type": "stop", "matched": matched}


def _generate_body(result: Any, bridge: EngineBridge, spec: SamplingSpec, rid: str, started: float
                   ) -> dict[str, Any]:
    return {"text": result.text, "output_ids": list(result.token_ids),
            "meta_info": {"id": rid, "finish_reason": _finish_reason(result, bridge, spec),
                          "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                          "cached_tokens": 0, "spec_verify_ct": result.spec_verify_ct,
                          "e2e_latency": round(time.monotonic() - started, 6)}}


async def generate(request: web.Request) -> web.StreamResponse:
    """POST /generate in SGLang's schema (single or batch, optional streaming of a single prompt)."""
    bridge = request.app[BRIDGE]
    spec: GenerateSpec = parse_generate(await _json_body(request))
    prompts = [bridge.encode(p, add_special_tokens=True) if isinstance(p, str) else bridge.check_ids(p)
               for p in spec.prompts]
    params = [bridge.sampling_params(spec.sampling, len(p)) for p in prompts]
    rids = spec.rids or [uuid.uuid4().hex for _ in prompts]
    started = time.monotonic()
    if not spec.stream:
        results = await bridge.generate_many(prompts, params)
        bodies = [_generate_body(r, bridge, spec.sampling, rid, started) for r, rid in zip(results, rids)]
        return web.json_response(bodies if spec.batched else bodies[0])

    deltas = bridge.stream(prompts[0], params[0])

    async def events() -> AsyncIterator[dict]:
        text, ids = "", []
        async for d in deltas:
            text, ids = text + d.text, ids + list(d.token_ids)
            if d.result is not None:
                yield _generate_body(d.result, bridge, spec.sampling, rids[0], started)
            elif d.text:
                yield {"text": text, "output_ids": ids,
                       "meta_info": {"id": rids[0], "finish_reason": None, "prompt_tokens": len(prompts[0]),
                                     "completion_tokens": len(ids)}}

    return await _sse(request, events())


async def _sse(request: web.Request, events: AsyncIterator[dict]) -> web.StreamResponse:
    """Server-sent events: one `data: {json}` per event, then `data: [DONE]`.

    Validation and admission errors raised before the first event still give a JSON 4xx/503. Closing `events`
    early (the client went away, a write failed) aborts its engine request.
    """
    iterator = events.__aiter__()
    try:
        first = await iterator.__anext__()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            await resp.write(b"data: " + json.dumps(first).encode() + b"\n\n")
            async for event in iterator:
                await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        except ApiError as e:  # e.g. the engine failed mid-stream: report it in-band, as OpenAI does
            await resp.write(b"data: " + json.dumps(e.body()).encode() + b"\n\n")
    finally:
        await iterator.aclose()
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def create_app(bridge: EngineBridge) -> web.Application:
    """The server application around an EngineBridge (the bridge is started/stopped with the app)."""
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES)
    app[BRIDGE] = bridge
    app.router.add_get("/health", health)
    app.router.add_get("/stats", stats)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/generate", generate)

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(bridge.close)

    app.cleanup_ctx.append(lifecycle)
    return app

