"""Drive conversations through a regeneration function into committed shards, with progress."""
from __future__ import annotations

import asyncio
import logging
import time
from itertools import islice
from typing import Any, Awaitable, Callable, Iterable, Iterator

from tqdm import tqdm

from .conversation import ConversationRejected
from .shards import ShardStore

log = logging.getLogger(__name__)

# conversation -> (row, completion tokens, turns of history dropped to fit the context)
ProcessFn = Callable[[dict[str, Any]], Awaitable[tuple[dict[str, Any], int, int]]]
LivenessFn = Callable[[], Awaitable[bool]]


class ServerGone(RuntimeError):
    """Requests failed on the transport and the server no longer answers: stop instead of rejecting everything."""


def chunked(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


class ShardRunner:
    """Runs `process` over every conversation of every uncommitted shard with bounded concurrency.

    `process(conv) -> (row, completion_tokens, trimmed_turns)` raises ConversationRejected for a conversation
    that goes to the rejects. When such a rejection comes from the transport and `liveness()`
    says the server is gone, the run stops with ServerGone; committed shards stay.
    """

    def __init__(self, store: ShardStore, process: ProcessFn, *, shard_size: int, concurrency: int,
                 liveness: LivenessFn | None = None):
        self.store = store
        self.process = process
        self.shard_size = shard_size
        self.concurrency = concurrency
        self.liveness = liveness
        self.tokens = 0
        self.finished = 0
        self._bar: tqdm | None = None
        self._start = 0.0

    async def run(self, conversations: Iterable[dict[str, Any]], total: int) -> dict[str, Any]:
        """Process all uncommitted shards; returns this run's counts and throughput."""
        sem = asyncio.Semaphore(self.concurrency)
        # enough open shards that one slow conversation holding its shard back does not starve the others
        open_shards = asyncio.Semaphore(2 + 4 * -(-self.concurrency // self.shard_size))
        start = time.monotonic()
        tasks: list[asyncio.Task] = []
        skipped = 0
        with tqdm(total=total, unit="conv", desc="regenerate", disable=None, smoothing=0.05) as bar:
            self._bar, self._start = bar, start
            try:
                for index, convs in enumerate(chunked(conversations, self.shard_size)):
                    if self.store.is_done(index):
                        skipped += len(convs)
                        bar.update(len(convs))
                        continue
                    await open_shards.acquire()
                    if any(t.done() and not t.cancelled() and t.exception() for t in tasks):
                        break
                    task = asyncio.create_task(self._shard(index, convs, sem))
                    task.add_done_callback(lambda _t: open_shards.release())
                    tasks.append(task)
                if tasks:
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        for t in tasks:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()
        elapsed = max(time.monotonic() - start, 1e-9)
        return {"run_conversations": self.finished, "run_completion_tokens": self.tokens,
                "run_seconds": round(elapsed, 3), "resumed_conversations": skipped,
                "conversations_per_s": round(self.finished / elapsed, 3),
                "output_tokens_per_s": round(self.tokens / elapsed, 2)}

    async def _shard(self, index: int, convs: list[dict[str, Any]], sem: asyncio.Semaphore) -> None:
        t0 = time.monotonic()
        outcomes = await asyncio.gather(*(self._one(c, sem) for c in convs))
        rows = [row for row, _, _, _ in outcomes if row is not None]
        rejects = [rej for _, rej, _, _ in outcomes if rej is not None]
        trims = [n for _, _, _, n in outcomes if n]
        counts = {"conversations": len(convs), "regenerated": len(rows), "rejected": len(rejects),
                  "completion_tokens": sum(tok for _, _, tok, _ in outcomes), "trimmed": len(trims),
                  "trimmed_turns": sum(trims), "seconds": round(time.monotonic() - t0, 3)}
        await asyncio.to_thread(self.store.commit, index, rows, rejects, counts)

    async def _one(self, conv: dict[str, Any], sem: asyncio.Semaphore
                   ) -> tuple[dict[str, Any] | None, dict[str, Any] | None, int, int]:
        async with sem:
            try:
                row, tokens, trimmed = await self.process(conv)
                outcome = (row, None, tokens, trimmed)
            except ConversationRejected as e:
                if e.transport and self.liveness is not None and not await self.liveness():
                    raise ServerGone(f"the server stopped answering ({e.reason})") from e
                outcome = (None, {"id": conv.get("id"), "source": conv.get("source"), "reason": e.reason,
                                  "category": e.category}, 0, 0)
        self.finished += 1
        self.tokens += outcome[2]
        elapsed = max(time.monotonic() - self._start, 1e-9)
        assert self._bar is not None
        self._bar.update(1)
        self._bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)
        return outcome
