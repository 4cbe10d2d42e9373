"""Async OpenAI-compatible chat client with bounded retries and exponential backoff."""
from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..server.limits import raise_open_file_limit

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class RequestFailed(RuntimeError):
    """A chat request that failed for good (after retries, or at once for a non-retryable 4xx).

    `transport` is True when the last failure was a connection error or timeout, i.e. the
    server may be gone rather than the request being bad.
    """

    def __init__(self, message: str, *, status: int | None = None, transport: bool = False):
        super().__init__(message)
        self.status = status
        self.transport = transport


@dataclass(frozen=True)
class ChatAnswer:
    """One assistant answer and its token counts."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Sampling:
    """The sampling parameters sent with every request."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    # generate exactly max_new_tokens (an SGLang/vLLM extension; benchmarks use it for equal work)
    ignore_eos: bool = False


def backoff_delay(attempt: int, base_s: float, cap_s: float = 30.0) -> float:
    """Exponential backoff with full jitter in [delay/2, delay] for retry number `attempt` (0-based)."""
    delay = min(cap_s, base_s * (2 ** attempt))
    return delay * (0.5 + 0.5 * random.random())


class ChatClient:
    """Talks to `<base_url>/v1/chat/completions`; use as an async context manager."""

    def __init__(self, base_url: str, *, concurrency: int = 8, timeout_s: float = 600.0, max_retries: int = 4,
                 backoff_s: float = 1.0, model: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.model = model
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "ChatClient":
        raise_open_file_limit()
        connector = aiohttp.TCPConnector(limit=self.concurrency + 4, force_close=False)
        self._session = aiohttp.ClientSession(connector=connector,
                                              timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ChatClient must be used inside `async with`")
        return self._session

    async def is_alive(self) -> bool:
        """True when the server answers GET /v1/models (or /health) right now."""
        for path in ("/health", "/v1/models"):
            try:
                async with self.session.get(self.base_url + path, timeout=aiohttp.ClientTimeout(total=10)) as r:
                    if r.status == 200:
                        return True
            except (aiohttp.ClientError, asyncio.TimeoutError):
                continue
        return False

    async def served_model(self) -> str:
        """The first model id listed by GET /v1/models (remembered for later requests)."""
        if self.model:
            return self.model
        data = await self._request_json("GET", "/v1/models", None)
        models = data.get("data") if isinstance(data, dict) else None
        if not models or not isinstance(models[0], dict) or "id" not in models[0]:
            raise RequestFailed(f"{self.base_url}/v1/models returned no model id: {str(data)[:200]}")
        self.model = str(models[0]["id"])
        return self.model

    async def server_stats(self) -> dict[str, Any]:
        """GET /stats of an eaglepipe server (engine time split and mean decode batch)."""
        data = await self._request_json("GET", "/stats", None)
        if not isinstance(data, dict):
            raise RequestFailed(f"{self.base_url}/stats returned {str(data)[:200]}")
        return data

    async def chat(self, messages: list[dict[str, str]], sampling: Sampling, seed: int | None = None) -> ChatAnswer:
        """One non-streaming chat completion, retried on 408/429/5xx, connection errors and timeouts."""
        body: dict[str, Any] = {"model": await self.served_model(), "messages": messages,
                                "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                                "top_p": sampling.top_p, "n": 1, "stream": False}
        if seed is not None:
            body["seed"] = seed
        if sampling.ignore_eos:
            body["ignore_eos"] = True
        data = await self._request_json("POST", "/v1/chat/completions", body)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"]
            usage = data.get("usage") or {}
            return ChatAnswer(text=text if isinstance(text, str) else "",
                              finish_reason=choice.get("finish_reason"),
                              prompt_tokens=int(usage.get("prompt_tokens") or 0),
                              completion_tokens=int(usage.get("completion_tokens") or 0))
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise RequestFailed(f"malformed chat completion response ({e!r}): {str(data)[:300]}") from e

    async def _request_json(self, method: str, path: str, body: dict | None) -> Any:
        last: RequestFailed | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(backoff_delay(attempt - 1, self.backoff_s))
            try:
                async with self.session.request(method, self.base_url + path, json=body) as resp:
                    text = await resp.text()
                    if resp.status == 200:
                        try:
                            return await resp.json(content_type=None)
                        except ValueError as e:
                            raise RequestFailed(f"non-JSON response from {path}: {text[:200]}") from e
                    last = RequestFailed(f"HTTP {resp.status} from {path}: {_error_message(text)}",
                                         status=resp.status)
                    if resp.status not in RETRY_STATUSES:
                        raise last
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as e:
                last = RequestFailed(f"{type(e).__name__} talking to {self.base_url}{path}: {e}", transport=True)
        assert last is not None
        raise RequestFailed(f"{last} (gave up after {self.max_retries + 1} attempts)",
                            status=last.status, transport=last.transport)


def _error_message(text: str) -> str:
    """The `error.message` of an OpenAI-style error body, or the body's start."""
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    except (ValueError, AttributeError):
        pass
    return text[:300]
