"""The OpenAI/SGLang-compatible server: schemas, streaming, errors, concurrency, overload (real server, tiny Llama)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest
import torch

from eaglepipe.regen.launch import ServerProcess, free_port, native_command

MAX_MODEL_LEN = 256


@contextlib.contextmanager
def running_server(model_dir: Path, log_dir: Path, *extra: str, port: int | None = None,
                   max_batch_size: int = 8, max_model_len: int = MAX_MODEL_LEN) -> Iterator[ServerProcess]:
    """`python -m eaglepipe.server.serve` on 127.0.0.1 (CPU), stopped at exit."""
    port = port or free_port()
    cmd = native_command(model_dir, port, max_batch_size=max_batch_size, max_model_len=max_model_len, device="cpu")
    server = ServerProcess(cmd + list(extra), f"http://127.0.0.1:{port}", log_dir / f"server-{port}.log")
    server.start()
    try:
        server.wait_healthy(180)
        yield server
    finally:
        server.stop()


def call(url: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    """POST JSON (or raw bytes) / GET; returns (status, parsed JSON body)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def sse_events(url: str, body: dict) -> list[Any]:
    """POST a streaming request; the parsed `data:` events, with "[DONE]" kept as a string."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        text = r.read().decode()
    events = [line[len("data: "):] for line in text.split("\n\n") if line.strip()]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def assert_error(status: int, body: Any, expected_status: int, *words: str) -> None:
    assert status == expected_status, body
    err = body["error"]
    assert set(err) >= {"message", "type", "code"} and err["code"] == expected_status
    for w in words:
        assert w in err["message"], err["message"]


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory) -> Iterator[str]:
    with running_server(tiny_llama_dir, tmp_path_factory.mktemp("server")) as srv:
        yield srv.base_url


@pytest.fixture(scope="module")
def tiny_hf(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


def hf_greedy_ids(tiny_hf, prompt_ids: list[int], n: int) -> list[int]:
    model, tok = tiny_hf
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, pad_token_id=tok.pad_token_id)
    ids = out[0, len(prompt_ids):].tolist()
    eos = model.generation_config.eos_token_id
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def chat_prompt_ids(tiny_hf, messages: list[dict]) -> list[int]:
    tok = tiny_hf[1]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def test_health_and_models(server):
    assert call(server + "/health") == (200, {"status": "ok"})
    status, body = call(server + "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert body["data"][0]["object"] == "model" and body["data"][0]["max_model_len"] == MAX_MODEL_LEN


def test_models_names_the_model_without_its_local_path(server, tiny_llama_dir):
    """GET /v1/models serves the model directory's name; the absolute path on the server's disk stays private."""
    status, body = call(server + "/v1/models")
    assert status == 200 and body["data"][0]["id"] == tiny_llama_dir.name
    assert str(tiny_llama_dir) not in json.dumps(body), body


def test_default_model_name_of_fetched_targets(tmp_path):
    """A fetch_target output is named by its configured hub id, or a local source's directory name."""
    from eaglepipe.server.serve import default_model_name

    hub, local = tmp_path / "hub" / "target", tmp_path / "local" / "target"
    for target, source, name in ((hub, "hub", "org/Model-1B"), (local, "local", "/data/models/my-llama")):
        target.mkdir(parents=True)
        (target / "target.json").write_text(json.dumps({"model_path": "model", "source": source,
                                                        "name_or_path": name}))
    assert default_model_name(str(hub)) == "org/Model-1B"
    assert default_model_name(str(local)) == "my-llama"


def test_stats_count_each_request_once(server):
    """GET /stats: the engine's counters move by exactly one request's prompt and answer."""
    status, before = call(server + "/stats")
    assert status == 200
    status, body = call(server + "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 5, "temperature": 0,
                                                          "ignore_eos": True})
    assert status == 200
    _, after = call(server + "/stats")
    prompt_tokens = body["usage"]["prompt_tokens"]
    e0, e1 = before["engine"], after["engine"]
    assert e1["requests_finished"] - e0["requests_finished"] == 1
    computed, reused = (e1[k] - e0[k] for k in ("prefill_tokens", "prefill_reused_tokens"))
    assert computed + reused == prompt_tokens and computed >= 1
    assert e1["decode_row_steps"] - e0["decode_row_steps"] == 4  # the first token comes from the prefill
    assert after["server"]["tokenize_tokens"] - before["server"]["tokenize_tokens"] == prompt_tokens
    shares = [e1[f"{p}_share"] for p in ("prefill", "decode", "host", "speculative", "idle")]
    assert abs(sum(shares) - 1) < 0.01 and e1["mean_decode_batch"] >= 1


def test_chat_completion_matches_hf_greedy(server, tiny_hf):
    status, body = call(server + "/v1/chat/completions",
                        {"model": "anything", "messages": MESSAGES, "max_tokens": 12, "temperature": 0})
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    prompt = chat_prompt_ids(tiny_hf, MESSAGES)
    expected = hf_greedy_ids(tiny_hf, prompt, 12)
    assert choice["message"]["content"] == tiny_hf[1].decode(expected, skip_special_tokens=True)
    assert choice["finish_reason"] == ("length" if len(expected) == 12 else "stop")
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(expected),
                             "total_tokens": len(prompt) + len(expected)}
    # max_completion_tokens is the newer name of max_tokens
    status, again = call(server + "/v1/chat/completions",
                         {"messages": MESSAGES, "max_completion_tokens": 12, "temperature": 0.0})
    assert again["choices"][0]["message"]["content"] == choice["message"]["content"]


def test_chat_streaming_equals_non_streaming(server):
    req = {"messages": MESSAGES, "max_tokens": 10, "temperature": 0}
    _, full = call(server + "/v1/chat/completions", req)
    events = sse_events(server + "/v1/chat/completions",
                        {**req, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == full["choices"][0]["message"]["content"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == full["choices"][0]["finish_reason"] and all(f is None for f in finishes[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]


def test_generate_schema_single_batch_and_ids(server, tiny_hf):
    sp = {"max_new_tokens": 6, "temperature": 0}
    status, one = call(server + "/generate", {"text": "The sky is", "sampling_params": sp})
    assert status == 200, one
    meta = one["meta_info"]
    ids = tiny_hf[1]("The sky is")["input_ids"]
    assert one["output_ids"] == hf_greedy_ids(tiny_hf, ids, 6)
    assert one["text"] == tiny_hf[1].decode(one["output_ids"], skip_special_tokens=True)
    assert meta["prompt_tokens"] == len(ids) and meta["completion_tokens"] == len(one["output_ids"])
    assert meta["spec_verify_ct"] == meta["completion_tokens"]  # no drafter: one verify forward per token
    if meta["completion_tokens"] == 6:
        assert meta["finish_reason"] == {"type": "length", "length": 6}
    else:
        assert meta["finish_reason"]["type"] == "stop"
    status, batch = call(server + "/generate", {"text": ["Hello there", "The sky is"], "sampling_params": sp})
    assert status == 200 and isinstance(batch, list) and len(batch) == 2
    assert batch[1]["output_ids"] == one["output_ids"] and batch[1]["text"] == one["text"]
    status, by_ids = call(server + "/generate", {"input_ids": ids, "sampling_params": sp})
    assert by_ids["output_ids"] == one["output_ids"]
    status, by_ids_batch = call(server + "/generate", {"input_ids": [ids, ids[:2]], "sampling_params": sp})
    assert [b["output_ids"] for b in by_ids_batch][0] == one["output_ids"]


def test_generate_stop_string_and_streaming(server):
    sp = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    _, full = call(server + "/generate", {"text": "Once upon a time", "sampling_params": sp})
    assert full["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
    stop = full["text"][len(full["text"]) // 2:][:3]
    assert stop.strip(), full["text"]
    _, stopped = call(server + "/generate", {"text": "Once upon a time", "sampling_params": {**sp, "stop": [stop]}})
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert stopped["text"] == full["text"][:full["text"].index(stop)]
    events = sse_events(server + "/generate", {"text": "Once upon a time", "sampling_params": sp, "stream": True})
    assert events[-1] == "[DONE]"
    texts = [e["text"] for e in events[:-1]]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))  # cumulative, like SGLang
    assert texts[-1] == full["text"] and events[-2]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-2])


def test_completions_endpoint(server):
    status, body = call(server + "/v1/completions", {"prompt": "Hello", "max_tokens": 5, "temperature": 0})
    assert status == 200 and body["object"] == "text_completion"
    _, gen = call(server + "/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 5, "temperature": 0}})
    assert body["choices"][0]["text"] == gen["text"]
    assert body["usage"]["completion_tokens"] == gen["meta_info"]["completion_tokens"]
    events = sse_events(server + "/v1/completions", {"prompt": "Hello", "max_tokens": 5, "temperature": 0,
                                                      "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == gen["text"]


def test_sampling_with_seed_is_reproducible(server):
    req = {"messages": MESSAGES, "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 1234}
    first = call(server + "/v1/chat/completions", req)[1]["choices"][0]["message"]["content"]
    second = call(server + "/v1/chat/completions", req)[1]["choices"][0]["message"]["content"]
    assert first == second
    largest = {**req, "seed": 2 ** 64 - 1}  # the top of the accepted range
    answers = [call(server + "/v1/chat/completions", largest) for _ in range(2)]
    assert [status for status, _ in answers] == [200, 200], answers
    assert answers[0][1]["choices"][0]["message"] == answers[1][1]["choices"][0]["message"]


@pytest.mark.parametrize("path, body, raw, words", [
    ("/v1/chat/completions", None, b"{not json", ["not valid JSON"]),
    ("/v1/chat/completions", None, b"[1, 2]", ["JSON object"]),
    ("/v1/chat/completions", {"max_tokens": 4}, None, ["messages"]),
    ("/v1/chat/completions", {"messages": []}, None, ["messages"]),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, None, ["role"]),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": "ten"}, None, ["max_tokens", "integer"]),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 0}, None, ["max_tokens"]),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": "hot"}, None, ["temperature"]),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_p": 0}, None, ["top_p"]),
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 2}, None, ["n=1"]),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream": "yes"}, None, ["stream"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 400}]}, None, ["max_model_len"]),
    ("/v1/completions", {"max_tokens": 3}, None, ["prompt"]),
    ("/generate", {"sampling_params": {}}, None, ["text", "input_ids"]),
    ("/generate", {"text": "a", "input_ids": [1]}, None, ["exactly one"]),
    ("/generate", {"input_ids": [1, 10 ** 9]}, None, ["out of range"]),
    ("/generate", {"input_ids": list(range(5, 5 + MAX_MODEL_LEN))}, None, ["max_model_len"]),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": -1}}, None, ["max_new_tokens"]),
    ("/generate", {"text": "a", "sampling_params": "greedy"}, None, ["sampling_params"]),
    ("/v1/chat/completions", {"messages": MESSAGES, "seed": 2 ** 64}, None, ["'seed'", "[0, 2**64 - 1]"]),
    ("/v1/completions", {"prompt": "a", "seed": 10 ** 30, "temperature": 0}, None, ["'seed'", "[0, 2**64 - 1]"]),
    ("/generate", {"text": "a", "sampling_params": {"seed": -2 ** 63 - 1}}, None,
     ["'sampling_params.seed'", "negative"]),
    ("/generate", {"text": "a", "sampling_params": {"seed": -1}}, None, ["'sampling_params.seed'", "negative"]),
    ("/generate", {"text": "a", "sampling_params": {"seed": 1.5}}, None, ["'sampling_params.seed'", "integer"]),
])
def test_bad_requests_get_clear_4xx(server, path, body, raw, words):
    status, err = call(server + path, body, raw)
    assert_error(status, err, 400, *words)


def test_unknown_route_and_server_survives_errors(server):
    status, err = call(server + "/v2/nothing", {})
    assert_error(status, err, 404)
    status, ok = call(server + "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "temperature": 0})
    assert status == 200 and ok["usage"]["completion_tokens"] >= 1


def test_concurrent_clients_get_their_own_answers(server):
    prompts = [[{"role": "user", "content": f"Tell me about number {i}."}] for i in range(12)]
    sequential = [call(server + "/v1/chat/completions", {"messages": m, "max_tokens": 8, "temperature": 0})[1]
                  for m in prompts]

    async def fire() -> list[Any]:
        async with aiohttp.ClientSession() as session:
            async def one(m: list[dict]) -> Any:
                async with session.post(server + "/v1/chat/completions",
                                        json={"messages": m, "max_tokens": 8, "temperature": 0}) as r:
                    assert r.status == 200
                    return await r.json()
            bad = session.post(server + "/v1/chat/completions", data=b"{oops")
            results = await asyncio.gather(*(one(m) for m in prompts), bad)
            bad_resp = results[-1]
            assert bad_resp.status == 400
            bad_resp.release()
            return results[:-1]

    concurrent = asyncio.run(fire())
    assert [c["choices"][0]["message"]["content"] for c in concurrent] == \
        [s["choices"][0]["message"]["content"] for s in sequential]


def test_overload_gets_503_and_server_keeps_serving(tiny_llama_dir, tmp_path):
    with running_server(tiny_llama_dir, tmp_path, "--max-queue", "1", max_batch_size=1) as srv:
        async def flood() -> list[tuple[int, Any]]:
            async with aiohttp.ClientSession() as session:
                async def one(i: int) -> tuple[int, Any]:
                    body = {"text": f"Story {i}:", "sampling_params": {"max_new_tokens": 200, "ignore_eos": True,
                                                                       "temperature": 0}}
                    async with session.post(srv.base_url + "/generate", json=body) as r:
                        return r.status, await r.json()
                return await asyncio.gather(*(one(i) for i in range(10)))

        results = asyncio.run(flood())
        statuses = sorted(s for s, _ in results)
        assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
        for status, body in results:
            if status == 503:
                assert_error(status, body, 503, "overloaded")
            else:
                assert body["meta_info"]["completion_tokens"] == 200
        assert call(srv.base_url + "/health")[0] == 200
        status, ok = call(srv.base_url + "/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 2}})
        assert status == 200 and srv.alive()


def test_smollm2_answers_through_the_chat_template(smollm2_dir, tmp_path):
    with running_server(smollm2_dir, tmp_path, max_batch_size=2) as srv:
        status, body = call(srv.base_url + "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16, "temperature": 0})
    assert status == 200, body
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


def test_speculative_flags_need_a_drafter_and_all_three_values(tiny_llama_dir):
    proc = subprocess.run([sys.executable, "-m", "eaglepipe.server.serve", "--model", str(tiny_llama_dir),
                           "--speculative-num-steps", "3"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert proc.returncode == 2 and "--draft and all three" in proc.stderr
