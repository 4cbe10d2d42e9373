"""Clients that go away mid-request: their generation stops, their slots free up, and the server logs one line for
each (a real server on 127.0.0.1, real sockets and aiohttp clients, a tiny Llama)."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import aiohttp
import pytest
from aiohttp import web

from eaglepipe.regen.launch import ServerProcess, free_port
from eaglepipe.server.serve import build_app, parse_args

from test_server import call, running_server

SLOTS = 4
MAX_MODEL_LEN = 1024  # every request below may run ~1000 tokens: far longer than a client takes to hang up
DISCONNECT_LINE = "the connection closed before the response was complete"


@pytest.fixture(scope="module")
def srv(tiny_llama_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    with running_server(tiny_llama_dir, tmp_path_factory.mktemp("disconnect"), "--served-model-name", "tiny-chat",
                       max_batch_size=SLOTS, max_model_len=MAX_MODEL_LEN) as server:
        yield server


def poll(check: Callable[[], Any], what: str, attempts: int = 600) -> Any:
    """`check()` until it returns something truthy (0.1 s apart); fails with `what` and its last value."""
    value = None
    for _ in range(attempts):
        value = check()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"{what} never happened; last seen: {value}")


def engine_stats(url: str) -> dict[str, Any]:
    status, stats = call(url + "/stats")
    assert status == 200, stats
    return stats


def wait_idle(url: str) -> dict[str, Any]:
    """The /stats snapshot once no request runs or waits in the engine."""
    def idle() -> dict[str, Any] | None:
        stats = engine_stats(url)
        engine = stats["engine"]
        return stats if engine["running_requests"] == engine["waiting_requests"] == 0 else None
    return poll(idle, "the engine emptying (no running or waiting request)")


def http_post(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


async def open_raw(url: str, path: str, body: dict) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw socket that has sent one POST request."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(http_post(path, body))
    await writer.drain()
    return reader, writer


async def hang_up(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


async def chat_stream_then_hang_up(url: str, i: int) -> None:
    """Raw socket: a streaming chat request, closed after its first SSE event."""
    body = {"messages": [{"role": "user", "content": f"Tell me a long story about {i}."}], "stream": True,
            "ignore_eos": True, "temperature": 0}
    reader, writer = await open_raw(url, "/v1/chat/completions", body)
    await reader.readuntil(b"data: ")
    await hang_up(writer)


async def completion_stream_then_hang_up(session: aiohttp.ClientSession, url: str, i: int) -> None:
    """aiohttp client: a streaming completion, its connection closed after the first chunk."""
    body = {"prompt": f"Count to a thousand, {i}:", "stream": True, "max_tokens": MAX_MODEL_LEN, "ignore_eos": True}
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")
        resp.close()


async def disconnect_clients(url: str, before: dict[str, Any], streaming_chats: int, streaming_completions: int,
                             waiting_generates: int) -> int:
    """Clients that leave mid-request: non-streaming /generate calls closed once the engine runs them, then
    streaming clients closed after their first event. Returns how many requests were abandoned."""
    running_before = before["engine"]["running_requests"]
    generates = [await open_raw(url, "/generate", {"text": f"Story {i}:", "sampling_params": {
        "max_new_tokens": MAX_MODEL_LEN, "ignore_eos": True, "temperature": 0}}) for i in range(waiting_generates)]
    poll(lambda: engine_stats(url)["engine"]["running_requests"] >= running_before + waiting_generates,
         f"{waiting_generates} /generate requests running")
    for _, writer in generates:
        await hang_up(writer)
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(chat_stream_then_hang_up(url, i) for i in range(streaming_chats)),
                             *(completion_stream_then_hang_up(session, url, i) for i in range(streaming_completions)))
    return streaming_chats + streaming_completions + waiting_generates


def test_disconnected_clients_free_their_slots(srv):
    """Twice as many abandoned requests as slots, streaming and not: none runs on to its token budget, the engine
    empties, and a new request is answered in full."""
    before = wait_idle(srv.base_url)
    gone = asyncio.run(disconnect_clients(srv.base_url, before, streaming_chats=2 * SLOTS,
                                          streaming_completions=2, waiting_generates=2))
    after = wait_idle(srv.base_url)
    assert after["engine"]["requests_finished"] == before["engine"]["requests_finished"], \
        "requests of clients that went away ran on to their end"
    assert after["server"]["requests_aborted"] - before["server"]["requests_aborted"] == gone
    status, body = call(srv.base_url + "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "ignore_eos": True, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] == 8, body
    final = wait_idle(srv.base_url)
    assert final["engine"]["requests_finished"] == before["engine"]["requests_finished"] + 1


def test_a_disconnect_logs_one_line_without_a_traceback(srv):
    """Each client that leaves gets one INFO line in the server log, and no traceback is written."""
    log_path = Path(srv.log_path)
    start = log_path.stat().st_size
    before = wait_idle(srv.base_url)
    gone = asyncio.run(disconnect_clients(srv.base_url, before, streaming_chats=3, streaming_completions=1,
                                          waiting_generates=1))
    wait_idle(srv.base_url)

    def new_log() -> str:
        with open(log_path, "rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace")
    poll(lambda: new_log().count(DISCONNECT_LINE) >= gone, f"{gone} disconnect lines in {log_path}")
    text = new_log()
    assert "Traceback" not in text and "ERROR" not in text, text
    assert text.count(DISCONNECT_LINE) == gone, text


def test_served_model_name_option(srv):
    """--served-model-name is the id GET /v1/models lists."""
    status, body = call(srv.base_url + "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["tiny-chat"], body


def test_a_failed_stream_write_aborts_the_request(tiny_llama_dir, caplog):
    """Without handler cancellation (aiohttp's default, so the handler learns of the disconnect only when its next
    SSE write fails), the request is aborted too, with one log line and no traceback."""
    caplog.set_level(logging.INFO)
    app = build_app(parse_args(["--model", str(tiny_llama_dir), "--device", "cpu", "--max-batch-size", str(SLOTS),
                                "--max-model-len", str(MAX_MODEL_LEN)]))

    async def scenario() -> tuple[dict, dict, int]:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as session:
                async def stats() -> dict:
                    async with session.get(url + "/stats") as resp:
                        return await resp.json()

                async def wait_idle_async() -> dict:
                    for _ in range(600):
                        snapshot = await stats()
                        if snapshot["engine"]["running_requests"] == snapshot["engine"]["waiting_requests"] == 0:
                            return snapshot
                        await asyncio.sleep(0.1)
                    pytest.fail(f"the engine never emptied: {snapshot['engine']}")

                before = await stats()
                gone = 2 * SLOTS
                await asyncio.gather(*(chat_stream_then_hang_up(url, i) for i in range(gone)))
                return before, await wait_idle_async(), gone
        finally:
            await runner.cleanup()

    before, after, gone = asyncio.run(scenario())
    assert after["engine"]["requests_finished"] == before["engine"]["requests_finished"], \
        "requests of clients that went away ran on to their end"
    assert after["server"]["requests_aborted"] - before["server"]["requests_aborted"] == gone
    lines = [r for r in caplog.records if DISCONNECT_LINE in r.getMessage()]
    assert len(lines) == gone and all(r.exc_info is None for r in lines), caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
