"""Client for SGLang's `/generate` (also served by `eaglepipe.server.serve`): one streamed request per generation.

Streaming gives the time of the first token, so decode speed excludes prefill the same way as the native
backend. Acceptance comes from the final event's `meta_info` (`completion_tokens`, `spec_verify_ct`) and,
where the server reports one, its accepted-drafts histogram.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Sequence

import aiohttp

from ..utils.cli import StageError
from .metrics import Sample

# SGLang renamed the histogram across versions; the first one present is used.
HISTOGRAM_KEYS = ("spec_accept_histogram", "spec_correct_drafts_histogram")


class GenerateError(StageError):
    """The server answered a /generate request with an error or a malformed body."""


async def _events(resp: aiohttp.ClientResponse) -> Any:
    """The JSON payloads of a server-sent-events body, up to `data: [DONE]`."""
    async for raw in resp.content:
        line = raw.decode("utf-8", errors="replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        try:
            yield json.loads(data)
        except json.JSONDecodeError as e:
            raise GenerateError(f"/generate streamed a non-JSON event: {data[:200]}") from e


def _histogram(meta: dict[str, Any]) -> list[int] | None:
    for key in HISTOGRAM_KEYS:
        hist = meta.get(key)
        if isinstance(hist, list) and all(isinstance(n, int) for n in hist):
            return list(hist)
    return None


class GenerateClient:
    """Async client of `<base_url>/generate`; use inside `async with`."""

    def __init__(self, base_url: str, timeout_s: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "GenerateClient":
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def generate(self, input_ids: Sequence[int], temperature: float, max_new_tokens: int,
                       prompt_index: int = 0, turn: int = 0) -> Sample:
        """Generate for one tokenised prompt (streamed) and return the measured Sample."""
        if self._session is None:
            raise RuntimeError("GenerateClient must be used inside `async with`")
        body = {"input_ids": list(input_ids), "stream": True,
                "sampling_params": {"temperature": temperature, "max_new_tokens": max_new_tokens}}
        first_at: float | None = None
        last: dict[str, Any] | None = None
        try:
            async with self._session.post(self.base_url + "/generate", json=body) as resp:
                if resp.status != 200:
                    raise GenerateError(f"HTTP {resp.status} from {self.base_url}/generate: "
                                        f"{(await resp.text())[:300]}")
                async for event in _events(resp):
                    if "error" in event:
                        raise GenerateError(f"{self.base_url}/generate failed mid-stream: {event['error']}")
                    if first_at is None and event.get("meta_info", {}).get("completion_tokens", 0) > 0:
                        first_at = time.perf_counter()
                    last = event
                end = time.perf_counter()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise GenerateError(f"{type(e).__name__} talking to {self.base_url}/generate: {e}") from e
        return self._sample(last, first_at, end, prompt_index, turn)

    def _sample(self, last: dict[str, Any] | None, first_at: float | None, end: float,
                prompt_index: int, turn: int) -> Sample:
        meta = (last or {}).get("meta_info")
        if not isinstance(meta, dict) or not isinstance(meta.get("completion_tokens"), int):
            raise GenerateError(f"{self.base_url}/generate ended without meta_info.completion_tokens: "
                                f"{str(last)[:300]}")
        text = last.get("text")  # type: ignore[union-attr]
        return Sample(prompt_index=prompt_index, turn=turn, text=text if isinstance(text, str) else "",
                      completion_tokens=meta["completion_tokens"],
                      verify_rounds=int(meta.get("spec_verify_ct") or 0),
                      decode_s=end - first_at if first_at is not None else 0.0,
                      accept_hist=_histogram(meta))

    async def wait_ready(self, timeout_s: float, poll_s: float = 0.5) -> None:
        """Block until GET /health answers 200 (StageError after `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                async with self._session.get(self.base_url + "/health",  # type: ignore[union-attr]
                                             timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(poll_s)
        raise StageError(f"no healthy server at {self.base_url}/health after {timeout_s:.0f}s")
