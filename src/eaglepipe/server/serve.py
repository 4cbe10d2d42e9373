"""`python -m eaglepipe.server.serve --model PATH [--draft PATH]`: OpenAI/SGLang-compatible server on the native
engine."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from aiohttp import web

from ..utils.engine_flags import add_engine_flags, options_from_args
from .limits import raise_open_file_limit


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="HF model dir or fetch_target output dir")
    p.add_argument("--draft", default=None, help="exported drafter dir (export/sglang) for speculative decoding")
    p.add_argument("--speculative-num-steps", type=int, default=None, help="draft depth (SGLang semantics)")
    p.add_argument("--speculative-eagle-topk", type=int, default=None, help="branching per draft step")
    p.add_argument("--speculative-num-draft-tokens", type=int, default=None,
                   help="tokens verified per round, root included")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, local only)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together (KV cache slots)")
    p.add_argument("--max-model-len", type=int, default=2048, help="prompt + generated tokens per request")
    p.add_argument("--max-queue", type=int, default=4096, help="waiting requests before answering 503")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="recompute every prompt (default: a prompt that continues a finished sequence reuses its K/V)")
    p.add_argument("--served-model-name", default=None,
                   help="model id in /v1/models (default: a fetched target's name_or_path, else the model "
                        "directory's name; never a local path)")
    add_engine_flags(p)
    return p.parse_args(argv)


def speculative_config(args: argparse.Namespace) -> dict[str, int] | None:
    """The engine's spec dict from the SGLang-named flags (None: the engine's default 3/1/4)."""
    given = {"num_steps": args.speculative_num_steps, "topk": args.speculative_eagle_topk,
             "num_draft_tokens": args.speculative_num_draft_tokens}
    if all(v is None for v in given.values()):
        return None
    if any(v is None for v in given.values()) or args.draft is None:
        raise ValueError("give --draft and all three of --speculative-num-steps, --speculative-eagle-topk and "
                         "--speculative-num-draft-tokens (or none of the three)")
    return given


def default_model_name(model: str) -> str:
    """The id /v1/models shows without --served-model-name: a fetch_target output's configured name (a hub id, or
    a local source's directory name), else the model directory's name. Clients never see a local path."""
    from ..target.info import read_target_info

    path = Path(model).expanduser().resolve()
    if (path / "target.json").exists():
        info = read_target_info(path)
        return Path(info["name_or_path"]).name if info["source"] == "local" else info["name_or_path"]
    return path.name


def build_app(args: argparse.Namespace) -> web.Application:
    """Load the engine and wrap it in the aiohttp application."""
    from ..engine import Engine
    from ..target.info import resolve_model_dir
    from ..utils.device import pick_device
    from .app import create_app
    from .bridge import EngineBridge

    model_dir = resolve_model_dir(args.model)
    engine = Engine(model_dir, device=pick_device(args.device), max_batch_size=args.max_batch_size,
                    max_model_len=args.max_model_len, options=options_from_args(args), draft_dir=args.draft,
                    spec=speculative_config(args), max_queue=args.max_queue, prefix_reuse=not args.no_prefix_reuse)
    bridge = EngineBridge(engine, model_name=args.served_model_name or default_model_name(args.model),
                          has_draft=args.draft is not None)
    return create_app(bridge)


def main(argv: Sequence[str] | None = None) -> None:
    """Serve until SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="[serve] %(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    args = parse_args(argv)
    log = logging.getLogger("eaglepipe.server.serve")
    raise_open_file_limit()
    try:
        app = build_app(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"[serve] error: {e}", file=sys.stderr)
        raise SystemExit(2)
    from .app import BRIDGE
    log.info("serving %s on http://%s:%d (max_batch_size=%d, max_model_len=%d; %s)", Path(args.model), args.host,
             args.port, args.max_batch_size, args.max_model_len, app[BRIDGE].engine.options)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None,
                backlog=4096, shutdown_timeout=5.0, handler_cancellation=True)


if __name__ == "__main__":
    main()
