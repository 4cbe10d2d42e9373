"""Regeneration throughput (output tok/s): the regen client through `eaglepipe.server.serve` vs HF batched generate.

    python benchmarks/regen.py --model results/<exp>/target            # on a GPU; appends to RESULTS.md
    python benchmarks/regen.py --model <tiny HF dir> --smoke           # quick CPU check

The same ShareGPT first-turn prompts (chat template applied, prompts over --max-prompt-tokens skipped) go
through three paths, each producing exactly --max-new-tokens greedy tokens per prompt (EOS ignored, so the
work is equal):
  server   the regenerate stage's async client -> HTTP -> our server subprocess -> engine (what regen runs)
  engine   Engine.generate in-process (the same engine without HTTP: shows what the server path costs)
  hf       HF `generate`, left-padded batches of --hf-batch-size sorted by length
With --multi-turn N it also regenerates N whole conversations the way the regenerate stage does (mode `all`:
each assistant turn on top of the regenerated history, stopping at EOS) through a fresh server. For the server
paths it reports the engine's mean decode batch and time split (GET /stats), to show what the stage's
multi-turn prompts cost.
Prints one JSON line; appends a row to benchmarks/RESULTS.md unless --smoke (or with --results PATH).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from eaglepipe.data.json_stream import StreamReport, iter_json_array
from eaglepipe.data.sources import packaged_sharegpt_path
from eaglepipe.engine import Engine, SamplingParams
from eaglepipe.engine.stats import PHASES, derived
from eaglepipe.regen.client import ChatClient, Sampling
from eaglepipe.regen.conversation import ConversationRejected, TurnPolicy, plan_turns, regenerate_conversation
from eaglepipe.regen.launch import ServerProcess, format_command, free_port, native_command
from eaglepipe.target.info import load_hf_model, load_tokenizer, resolve_model_dir
from eaglepipe.utils.device import compute_dtype, pick_device
from eaglepipe.utils.engine_flags import add_engine_flags, options_from_args

from decode import append_result_row, engine_options_config, hardware_name, sync

REPO = Path(__file__).resolve().parents[1]


def sharegpt_prompts(path: Path, n: int, tokenizer: Any, max_prompt_tokens: int
                     ) -> tuple[list[list[dict[str, str]]], list[list[int]]]:
    """The first `n` ShareGPT conversations' opening human turns, as messages and as chat-template token ids."""
    messages, ids = [], []
    for record, _ in iter_json_array(path, StreamReport()):
        turns = record.get("conversations") or [] if isinstance(record, dict) else []
        first = turns[0] if turns and isinstance(turns[0], dict) else {}
        text = first.get("value")
        if first.get("from") not in ("human", "user") or not isinstance(text, str) or not text.strip():
            continue
        msgs = [{"role": "user", "content": text}]
        prompt = tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
        if len(prompt) > max_prompt_tokens:
            continue
        messages.append(msgs)
        ids.append(prompt)
        if len(ids) == n:
            break
    if len(ids) < n:
        raise SystemExit(f"only {len(ids)} usable prompts in {path} (asked for {n})")
    return messages, ids


def sharegpt_conversations(path: Path, n: int) -> list[list[dict[str, str]]]:
    """The first `n` ShareGPT conversations that have an assistant turn to regenerate, as role messages."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    out = []
    for record, _ in iter_json_array(path, StreamReport()):
        turns = record.get("conversations") or [] if isinstance(record, dict) else []
        msgs = [{"role": roles[t["from"]], "content": t["value"]} for t in turns
                if isinstance(t, dict) and t.get("from") in roles and isinstance(t.get("value"), str)]
        try:
            plan_turns(msgs, TurnPolicy("all"))
        except ConversationRejected:
            continue
        out.append(msgs)
        if len(out) == n:
            break
    return out


async def client_run(url: str, messages: list[list[dict[str, str]]], sampling: Sampling, concurrency: int
                     ) -> tuple[float, int]:
    """(seconds, completion tokens) for all requests through the regen ChatClient with bounded concurrency."""
    sem = asyncio.Semaphore(concurrency)
    async with ChatClient(url, concurrency=concurrency, timeout_s=3600, max_retries=2, backoff_s=0.5) as client:
        await client.served_model()
        bar = tqdm(total=len(messages), desc="server", unit="req", disable=None)

        async def one(msgs: list[dict[str, str]]) -> int:
            async with sem:
                answer = await client.chat(msgs, sampling)
            bar.update(1)
            return answer.completion_tokens

        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(m) for m in messages))
        seconds = time.perf_counter() - start
        bar.close()
    return seconds, sum(tokens)


@contextlib.contextmanager
def warm_server(model_dir: Path, args: argparse.Namespace, warm: list[list[dict[str, str]]],
                log_dir: Path) -> Iterator[tuple[ServerProcess, list[str]]]:
    """`eaglepipe.server.serve` on a free port, healthy and warmed up with short answers to `warm`."""
    port = free_port()
    cmd = native_command(model_dir, port, max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
                         device=args.device, engine_options=options_from_args(args))
    with ServerProcess(cmd, f"http://127.0.0.1:{port}", log_dir / "regen-bench-server.log") as server:
        server.wait_healthy(900)
        asyncio.run(client_run(server.base_url, warm[:args.max_batch_size], Sampling(0.0, 1.0, 8, True),
                               args.concurrency))
        yield server, cmd


def bench_server(model_dir: Path, args: argparse.Namespace, messages: list[list[dict[str, str]]],
                 log_dir: Path) -> dict[str, Any]:
    """Time the regen client over every prompt through a warm `eaglepipe.server.serve`."""
    with warm_server(model_dir, args, messages, log_dir) as (server, cmd):
        sampling = Sampling(temperature=args.temperature, max_new_tokens=args.max_new_tokens, ignore_eos=True)
        before = asyncio.run(server_stats(server.base_url))
        seconds, tokens = asyncio.run(client_run(server.base_url, messages, sampling, args.concurrency))
        after = asyncio.run(server_stats(server.base_url))
    return {"server_tok_s": round(tokens / seconds, 1), "server_seconds": round(seconds, 2),
            "server_completion_tokens": tokens, "server_command": format_command(cmd),
            **time_split(before, after, "server")}


def bench_multiturn(model_dir: Path, args: argparse.Namespace, conversations: list[list[dict[str, str]]],
                    log_dir: Path) -> dict[str, Any]:
    """The regenerate stage's own workload: every assistant turn of each conversation, in order, on top of the
    regenerated history (mode `all`, at --temperature, stopping at EOS), through the stage's client code."""
    policy = TurnPolicy("all")
    sampling = Sampling(temperature=args.temperature, max_new_tokens=args.max_new_tokens)

    async def run_all(url: str) -> tuple[float, int, int]:
        sem = asyncio.Semaphore(args.concurrency)
        async with ChatClient(url, concurrency=args.concurrency, timeout_s=3600, max_retries=2) as client:
            async def one(i: int, msgs: list[dict[str, str]]) -> tuple[int, int]:
                async with sem:
                    conv = {"id": f"c{i}", "source": "sharegpt", "messages": msgs}
                    try:
                        row, tokens = await regenerate_conversation(conv, client, policy, sampling)
                    except ConversationRejected:
                        return 0, 0
                return tokens, sum(m["role"] == "assistant" for m in row["messages"])

            start = time.perf_counter()
            done = await asyncio.gather(*(one(i, m) for i, m in enumerate(conversations)))
            return time.perf_counter() - start, sum(t for t, _ in done), sum(n for _, n in done)

    warm = [[m for m in c if m["role"] != "assistant"][:1] for c in conversations]
    with warm_server(model_dir, args, warm, log_dir) as (server, _):
        before = asyncio.run(server_stats(server.base_url))
        seconds, tokens, turns = asyncio.run(run_all(server.base_url))
        after = asyncio.run(server_stats(server.base_url))
    return {"multiturn_tok_s": round(tokens / seconds, 1), "multiturn_seconds": round(seconds, 2),
            "multiturn_conversations": len(conversations), "multiturn_turns": turns,
            "multiturn_completion_tokens": tokens, **time_split(before, after, "multiturn")}


async def server_stats(url: str) -> dict[str, Any]:
    """The server's GET /stats."""
    async with ChatClient(url, max_retries=2) as client:
        return await client.server_stats()


def time_split(before: dict[str, Any], after: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Between two /stats snapshots: the engine's mean decode batch, each phase's share of its worker time
    (`eaglepipe.engine.stats.derived` of the counters' difference), and the server's tokenisation seconds."""
    e0, e1 = before["engine"], after["engine"]
    counters = ("decode_steps", "decode_row_steps", "prefill_tokens", "prefill_reused_tokens")
    delta = {k: e1[k] - e0[k] for k in counters}
    delta.update({f"{p}_seconds": e1[f"{p}_seconds"] - e0[f"{p}_seconds"] for p in PHASES})
    figures = derived(delta)
    return {f"{prefix}_mean_decode_batch": figures["mean_decode_batch"],
            f"{prefix}_prefill_tokens": delta["prefill_tokens"],
            f"{prefix}_prefill_reused_tokens": delta["prefill_reused_tokens"],
            **{f"{prefix}_{p}_share": figures[f"{p}_share"] for p in PHASES},
            f"{prefix}_tokenize_seconds": round(after["server"]["tokenize_seconds"]
                                                - before["server"]["tokenize_seconds"], 2)}


def bench_engine(model_dir: Path, device: torch.device, args: argparse.Namespace, prompts: list[list[int]]
                 ) -> dict[str, Any]:
    """Engine.generate over every prompt in-process (no HTTP)."""
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, ignore_eos=True)
    with Engine(model_dir, device=device, max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
                options=options_from_args(args)) as engine:
        engine.generate(prompts[:args.max_batch_size], SamplingParams(max_new_tokens=8, ignore_eos=True))
        sync(device)
        start = time.perf_counter()
        results = engine.generate(prompts, params, progress=True)
        sync(device)
        seconds = time.perf_counter() - start
    tokens = sum(r.completion_tokens for r in results)
    return {"engine_tok_s": round(tokens / seconds, 1), "engine_seconds": round(seconds, 2)}


def bench_hf(model_dir: Path, device: torch.device, args: argparse.Namespace, prompts: list[list[int]],
             pad_id: int) -> dict[str, Any]:
    """HF generate in left-padded batches (sorted by length to limit padding), exactly max_new_tokens each."""
    model = load_hf_model(model_dir, device, compute_dtype(device))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[i:i + args.hf_batch_size] for i in range(0, len(order), args.hf_batch_size)]

    def run(batch: list[int], new_tokens: int) -> int:
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        out = model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id)
        return (out.shape[1] - width) * len(batch)

    run(batches[0][:8], 8)  # warm-up
    sync(device)
    start = time.perf_counter()
    tokens = sum(run(b, args.max_new_tokens) for b in tqdm(batches, desc="hf", unit="batch", disable=None))
    sync(device)
    seconds = time.perf_counter() - start
    return {"hf_tok_s": round(tokens / seconds, 1), "hf_seconds": round(seconds, 2)}


def evenly_spaced(items: list, count: int | None) -> list:
    """`count` items spread evenly over `items` (all of them when count is None or not smaller)."""
    if count is None or count >= len(items):
        return items
    return [items[i * len(items) // count] for i in range(count)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model dir or fetch_target output dir")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--sharegpt", type=Path, default=None, help="ShareGPT JSON (default: the packaged one)")
    ap.add_argument("--max-prompt-tokens", type=int, default=1024, help="skip longer prompts")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sample the server's and engine's answers (regen.temperature); HF generate stays greedy, "
                         "so --skip hf goes with it")
    ap.add_argument("--max-batch-size", type=int, default=256, help="engine KV slots")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--concurrency", type=int, default=1024, help="requests in flight from the client")
    ap.add_argument("--hf-batch-size", type=int, default=256)
    ap.add_argument("--hf-prompts", type=int, default=None,
                    help="run HF on an evenly spaced subset of this many prompts (its tok/s; the slow baseline)")
    ap.add_argument("--multi-turn", type=int, default=0, metavar="N",
                    help="also regenerate N whole ShareGPT conversations as the stage does (mode all), with the "
                         "server's time split")
    ap.add_argument("--skip", nargs="*", default=[], choices=["server", "engine", "hf"], help="paths to leave out")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run: 12 prompts, 8 tokens, batch 4")
    ap.add_argument("--results", type=Path, default=None,
                    help="RESULTS.md to append to (default benchmarks/RESULTS.md; --smoke writes only if given)")
    add_engine_flags(ap)
    args = ap.parse_args(argv)
    if args.smoke:
        args.device, args.prompts, args.max_new_tokens = "cpu", 12, 8
        args.max_batch_size, args.concurrency, args.hf_batch_size, args.max_model_len = 4, 8, 4, 1024
        args.max_prompt_tokens = 256
    if args.temperature and "hf" not in args.skip:
        raise SystemExit("--temperature samples the server and engine paths only: add --skip hf")
    if args.max_prompt_tokens + args.max_new_tokens > args.max_model_len:
        raise SystemExit("--max-prompt-tokens + --max-new-tokens must fit in --max-model-len")
    device = pick_device(args.device)
    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    messages, prompts = sharegpt_prompts(args.sharegpt or packaged_sharegpt_path(), args.prompts, tokenizer,
                                         args.max_prompt_tokens)
    record: dict[str, Any] = {
        "bench": "regen", "model": str(args.model), "device": hardware_name(device),
        "dtype": str(compute_dtype(device)), "prompts": len(prompts),
        "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1), "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature, "max_batch_size": args.max_batch_size, "concurrency": args.concurrency,
        "hf_batch_size": args.hf_batch_size,
        "engine_options": engine_options_config(options_from_args(args), device)}
    if "server" not in args.skip:
        with tempfile.TemporaryDirectory(prefix="regen-bench-") as log_dir:
            record.update(bench_server(model_dir, args, messages, Path(log_dir)))
    if args.multi_turn:
        conversations = sharegpt_conversations(args.sharegpt or packaged_sharegpt_path(), args.multi_turn)
        with tempfile.TemporaryDirectory(prefix="regen-bench-") as log_dir:
            record.update(bench_multiturn(model_dir, args, conversations, Path(log_dir)))
    if "engine" not in args.skip:
        record.update(bench_engine(model_dir, device, args, prompts))
    if "hf" not in args.skip:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        subset = evenly_spaced(prompts, args.hf_prompts)
        record["hf_prompts"] = len(subset)
        record.update(bench_hf(model_dir, device, args, subset, pad))
    if "server_tok_s" in record and "hf_tok_s" in record:
        record["server_speedup_vs_hf"] = round(record["server_tok_s"] / record["hf_tok_s"], 2)
    if "server_tok_s" in record and "engine_tok_s" in record:
        record["server_fraction_of_engine"] = round(record["server_tok_s"] / record["engine_tok_s"], 3)
    print(json.dumps(record), flush=True)

    results = args.results if args.results is not None else (None if args.smoke else REPO / "benchmarks" / "RESULTS.md")
    if results is not None and "server_tok_s" in record:
        command = "python benchmarks/regen.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        decoding = f"at temperature {args.temperature}" if args.temperature else "greedy"
        result = (f"regen client -> server -> engine {record['server_tok_s']} output tok/s, {len(prompts)} ShareGPT "
                  f"prompts x {args.max_new_tokens} tokens {decoding}, {record['dtype']}, batch {args.max_batch_size}, "
                  f"concurrency {args.concurrency}; mean decode batch {record['server_mean_decode_batch']}")
        if "multiturn_tok_s" in record:
            result += (f"; stage workload (mode all, {record['multiturn_conversations']} conversations, "
                       f"{record['multiturn_turns']} turns) {record['multiturn_tok_s']} tok/s, mean decode batch "
                       f"{record['multiturn_mean_decode_batch']}, prefill share {record['multiturn_prefill_share']}")
        baselines = "; ".join(part for part in (
            f"engine in-process {record['engine_tok_s']} tok/s" if "engine_tok_s" in record else "",
            f"HF batched generate (batch {args.hf_batch_size}, {record['hf_prompts']} of the prompts) "
            f"{record['hf_tok_s']} tok/s"
            if "hf_tok_s" in record else "") if part)
        append_result_row(results, "regen throughput", record["device"], command, result, baselines or "none",
                          config={"engine_options": record["engine_options"], "temperature": args.temperature})
    return record


if __name__ == "__main__":
    main()
