"""eaglepipe's native inference engine: our own Llama-family forward over a static KV cache.

Public API (docs/CONTRACTS.md, "Engine API"):
- `LlamaRunner` (engine.model): weights from HF safetensors, KV cache `[layers, slots, kv_heads, max_len, head_dim]`.
    * `prefill(prompts, slots, capture_layers=None, all_logits=False) -> PrefillOutput` starts fresh sequences,
      several prompts packed in one forward; commits every prompt token.
    * `forward(input_ids [B,S], slots, positions=None, tree_mask=None, capture_layers=None)
      -> (logits [B,S,V], aux_hidden [B,S,k*H] | None)` appends S *pending* tokens per sequence; a draft tree
      passes RoPE positions (committed length + depth) and a bool tree mask [B,S,S] (token i sees token j).
      `aux_hidden` concatenates h[i] for i in capture_layers (HF hidden_states indices, pre-final-norm).
    * `commit(slot, n | indices)` keeps the first n pending tokens, or the accepted path's indices (compacted
      to consecutive positions); the rest are rolled back. `truncate(slot, length)`, `release(slot)`,
      `decode(tokens, slots)` (one committed plain step), `lengths[slot]` (committed tokens).
    * Device-only forms for CUDA graphs (static shapes, no host sync): `tree_forward(...)` (a verify forward from
      device lengths and slots) and `compact(slots, lengths, keep)` (commit's K/V compaction, host lengths
      untouched). `check_capture_layers(layers)` validates h-indices.
- `Engine`: continuous batching, `generate(prompts, params)`, thread-safe `submit(...) -> Future`, streaming
  callbacks (`StreamDelta`), CUDA-graph decode on GPU. Errors: `PromptTooLongError` (ValueError, HTTP 400),
  `QueueFullError` (HTTP 503), `EngineClosedError`.
- `SamplingParams`, `GenerationResult`.
- `EngineOptions`: the fast paths (token path, decode CUDA graphs, prefill graphs, speculative round graphs), each
  null (on where it runs), true or false; `Engine(options=...)` and `LlamaRunner(options=...)` take it, and
  `runner.options` holds it resolved for the device. Every fast path is checked against the plain PyTorch path.

Speculative decoding hook: `Engine(draft_dir=...)` builds
`eaglepipe.speculative.SpeculativeGenerator(runner, draft_dir, spec)` and, for each request, calls
    `generate(prompt_ids: list[int], params: SamplingParams, slot: int, on_tokens) -> int`
which must prefill `prompt_ids` into `slot` of `runner`, decode, and pass every newly accepted batch of tokens to
`on_tokens(list[int]) -> bool`; when that returns True (EOS, stop string or length reached) it must stop. It returns
the number of verification forwards (`spec_verify_ct`). The engine owns stop rules, text and results.
"""
from ..config.schema import EngineOptions
from .engine import Engine, EngineClosedError, PromptTooLongError, QueueFullError
from .model import CacheFullError, LlamaRunner, PrefillOutput
from .options import resolve_options
from .request import GenerationResult, StreamDelta
from .sampling import SamplingParams
from .shapes import UnsupportedModelError

__all__ = ["CacheFullError", "Engine", "EngineClosedError", "EngineOptions", "GenerationResult", "LlamaRunner",
           "PrefillOutput", "PromptTooLongError", "QueueFullError", "SamplingParams", "StreamDelta",
           "UnsupportedModelError", "resolve_options"]
