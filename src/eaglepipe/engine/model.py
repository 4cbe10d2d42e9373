"""`LlamaRunner`: our own Llama-family forward pass over a preallocated KV cache.

The cache has one row ("slot") per concurrent sequence: `k_cache[layer, slot, kv_head, position, head_dim]`.
`lengths[slot]` counts the committed tokens of that slot. A forward pass appends *pending* tokens after the
committed ones; `commit` keeps some of them (compacting their K/V to consecutive positions) and drops the rest,
which is how a verified draft tree is rolled back to its accepted path.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config.schema import EngineOptions
from ..target.info import resolve_model_dir
from ..utils.device import compute_dtype, pick_device
from .options import resolve_options
from .prefill_graphs import PrefillGraphs
from .shapes import ModelShapes, read_model_shapes, rope_tables
from .token_path import MAX_ROWS, TokenPath, verify_rows
from .weights import LayerWeights, load_weights

AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# Prefill attention backends: not cuDNN, which builds an execution plan for every new sequence length (55 ms
# per new prompt length on an H200, measured with benchmarks/prefill.py). Prefill lengths rarely repeat (the
# regenerate stage's multi-turn histories almost never do), and flash attention has no per-shape cost.
PREFILL_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class CacheFullError(ValueError):
    """A sequence would grow past the runner's `max_len`."""


@dataclass
class PrefillOutput:
    """Result of `LlamaRunner.prefill`: next-token logits per prompt, and optional extras per prompt."""

    last_logits: torch.Tensor  # [num_prompts, vocab]
    logits: list[torch.Tensor] | None  # per prompt [len, vocab], when all_logits=True
    aux_hidden: list[torch.Tensor] | None  # per prompt [len, len(capture_layers) * hidden]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32; a fused kernel on GPU, HF's exact op order on CPU. Without a weight, the
    normalised x in x's dtype (for a caller that applies its gains itself)."""
    if x.is_cuda:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if weight is None else weight * normed


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on [..., heads, head_dim] with cos/sin broadcast over heads (rotate-half form)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlamaRunner:
    """A Llama/Mistral/Qwen2/Qwen3 decoder loaded from HF safetensors, with a static KV cache.

    `max_slots` sequences of up to `max_len` tokens each. bf16 on GPU and fp32 on CPU unless `dtype` is given.
    `options` (resolved for the device into `self.options`) picks the fast paths: `token_path` runs decode steps
    and verify forwards of up to MAX_ROWS tokens through the row-invariant Triton kernels (`self.token_path`),
    `prefill_graphs` prefills a lone prompt from a CUDA graph per padded length (`self.prefill_graphs`).
    """

    def __init__(self, model_dir: str | Path, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, max_slots: int = 8, max_len: int = 2048,
                 options: EngineOptions | None = None):
        self.model_dir = resolve_model_dir(model_dir)
        self.shapes: ModelShapes = read_model_shapes(self.model_dir)
        self.device = torch.device(device) if device is not None else pick_device("auto")
        self.options = resolve_options(options, self.device)
        self.dtype = dtype or compute_dtype(self.device)
        if max_slots < 1 or max_len < 2:
            raise ValueError(f"max_slots must be >= 1 and max_len >= 2 (got {max_slots}, {max_len})")
        self.max_slots, self.max_len = max_slots, max_len
        self.weights = load_weights(self.model_dir, self.shapes, self.device, self.dtype)
        cos, sin = rope_tables(self.shapes, max_len, self.device)
        self.cos, self.sin = cos.to(self.dtype), sin.to(self.dtype)
        s = self.shapes
        shape = (s.num_layers, max_slots, s.num_kv_heads, max_len, s.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.lengths: list[int] = [0] * max_slots
        self.scale = s.head_dim ** -0.5
        self._cols = torch.arange(max_len, device=self.device)
        self._slot_ids = torch.arange(max_slots, device=self.device)
        self.token_path = TokenPath(s, self.weights, self.cos, self.sin, self.k_cache, self.v_cache) \
            if self.options.token_path else None
        self._self_only = torch.zeros(max_slots, 1, dtype=torch.long, device=self.device)  # pending index 0
        self._one_each = torch.ones(max_slots, dtype=torch.long, device=self.device)
        self.prefill_graphs = PrefillGraphs(self.padded_prefill, max_len, self.device) \
            if self.options.prefill_graphs else None

    # ------------------------------------------------------------------ core
    def _attention_block(self, i: int, w: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         write_slots: torch.Tensor, write_pos: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        s = self.shapes
        b, t = x.shape[:2]
        qkv = F.linear(rms_norm(x, w.input_norm, s.rms_norm_eps), w.qkv, w.qkv_bias)
        if s.qk_norm:
            q, k, v = qkv.split([s.q_size, s.kv_size, s.kv_size], dim=-1)
            q = apply_rope(rms_norm(q.view(b, t, s.num_heads, s.head_dim), w.q_norm, s.rms_norm_eps), cos, sin)
            k = apply_rope(rms_norm(k.view(b, t, s.num_kv_heads, s.head_dim), w.k_norm, s.rms_norm_eps), cos, sin)
        else:
            qk = apply_rope(qkv[..., : s.q_size + s.kv_size].view(b, t, s.num_heads + s.num_kv_heads, s.head_dim),
                            cos, sin)
            q, k = qk[:, :, : s.num_heads], qk[:, :, s.num_heads:]
            v = qkv[..., s.q_size + s.kv_size:]
        v = v.view(b, t, s.num_kv_heads, s.head_dim)
        self.k_cache[i][write_slots, :, write_pos] = k
        self.v_cache[i][write_slots, :, write_pos] = v
        return x + F.linear(attend(i, q, k, v), w.o, w.o_bias)

    def _mlp_block(self, w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(rms_norm(x, w.post_norm, self.shapes.rms_norm_eps), w.gate_up, w.gate_up_bias).chunk(2, -1)
        return x + F.linear(F.silu(gate) * up, w.down, w.down_bias)

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor, write_slots: torch.Tensor,
             write_pos: torch.Tensor, attend: AttendFn, capture: Sequence[int]) -> tuple[torch.Tensor, dict]:
        """Embed, run every layer (writing K/V to the cache), final norm. Returns (normed hidden, captured h[i])."""
        x = F.embedding(input_ids, self.weights.embed)
        cos, sin = self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)
        captured = {0: x} if 0 in capture else {}
        for i, w in enumerate(self.weights.layers):
            x = self._attention_block(i, w, x, cos, sin, write_slots, write_pos, attend)
            x = self._mlp_block(w, x)
            if i + 1 in capture:
                captured[i + 1] = x
        return rms_norm(x, self.weights.norm, self.shapes.rms_norm_eps), captured

    def _cached_attention(self, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
        """Attention of q [B,S,Hq,D] over cache views [B,KVH,L,D] with an additive mask [B,S,L].

        Query heads are grouped per KV head so the cache is never copied or repeated (GQA).
        """
        b, t, hq, d = q.shape
        kvh, length = k_all.shape[1], k_all.shape[2]
        g = hq // kvh
        qg = q.reshape(b, t, kvh, g, d).permute(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)
        scores = torch.matmul(qg, k_all.transpose(-1, -2)) * self.scale
        scores = scores.view(b, kvh, g, t, length) + mask.view(b, 1, 1, t, length)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs.view(b, kvh, g * t, length), v_all)
        return out.view(b, kvh, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, hq * d)

    def check_capture_layers(self, capture_layers: Sequence[int] | None) -> list[int]:
        """The capture layers as a list, each an h-index of this model (ValueError otherwise)."""
        layers = list(capture_layers or [])
        bad = [i for i in layers if not 0 <= i <= self.shapes.num_layers]
        if bad:
            raise ValueError(f"capture_layers {bad} out of range: h-indices go from 0 to {self.shapes.num_layers}")
        return layers

    @staticmethod
    def _gather_aux(captured: dict, layers: list[int]) -> torch.Tensor | None:
        return torch.cat([captured[i] for i in layers], dim=-1) if layers else None

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], slots: Sequence[int],
                capture_layers: Sequence[int] | None = None, all_logits: bool = False,
                reused: Sequence[int] | None = None) -> PrefillOutput:
        """Start sequences: run several prompts packed into one forward (each attends causally to itself).

        Every prompt token is committed to its slot. A lone prompt of up to 1,024 tokens with nothing reused and no
        `all_logits` goes through `prefill_graphs` when the runner has them. `reused[i]` (default 0) leading
        tokens of prompt i are already in slot i's cache, left there by an earlier sequence with the same prefix:
        only the rest of the prompt is computed, attending to them. Anything else the slot held is discarded.
        `capture_layers` and `all_logits` return values for the computed tokens, so they need nothing reused.
        """
        if len(prompts) != len(slots) or not prompts:
            raise ValueError("prefill needs one slot per prompt and at least one prompt")
        if len(set(slots)) != len(slots) or not all(0 <= s < self.max_slots for s in slots):
            raise ValueError(f"slots must be distinct and in [0, {self.max_slots}): {list(slots)}")
        sizes = [len(p) for p in prompts]
        if min(sizes) < 1:
            raise ValueError("cannot prefill an empty prompt")
        if max(sizes) > self.max_len:
            raise CacheFullError(f"a prompt of {max(sizes)} tokens does not fit max_len={self.max_len}")
        skip = [0] * len(prompts) if reused is None else [int(n) for n in reused]
        if len(skip) != len(prompts) or any(not 0 <= n < size for n, size in zip(skip, sizes)):
            raise ValueError("reused[i] must be in [0, len(prompts[i])): at least one token is computed")
        layers = self.check_capture_layers(capture_layers)
        if any(skip) and (layers or all_logits):
            raise ValueError("capture_layers and all_logits need every prompt token computed (reused all 0)")
        if self.prefill_graphs is not None and len(prompts) == 1 and not skip[0] and not all_logits \
                and self.prefill_graphs.fits(sizes[0]):
            last_logits, aux = self.prefill_graphs.prefill(prompts[0], slots[0], layers)
            self.lengths[slots[0]] = sizes[0]
            return PrefillOutput(last_logits, None, [aux] if aux is not None else None)
        dev = self.device
        lens = [size - n for size, n in zip(sizes, skip)]  # computed tokens per prompt
        lens_t = torch.tensor(lens, device=dev)
        ids = torch.tensor([t for p, n in zip(prompts, skip) for t in p[n:]], dtype=torch.long, device=dev)[None]
        seq = torch.repeat_interleave(torch.arange(len(prompts), device=dev), lens_t)
        pack_starts = torch.cumsum(lens_t, 0) - lens_t
        pos = torch.arange(ids.shape[1], device=dev) - pack_starts[seq] + torch.tensor(skip, device=dev)[seq]
        write_slots = torch.tensor(list(slots), device=dev)[seq]
        spans = [(a, a + n) for a, n in zip(itertools.accumulate([0] + lens[:-1]), lens)]
        group = self.shapes.num_heads // self.shapes.num_kv_heads
        masks = [self._after_reused_mask(n, m, group) if n else None for n, m in zip(skip, lens)]

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # each packed prompt attends causally to itself alone: O(sum of L^2) work in a fused (flash) kernel,
            # where one masked call over the whole pack would cost O((sum of L)^2) and build the dense mask
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
            outs = [F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                                   scale=self.scale, enable_gqa=True) if not n
                    else self._attend_after_reused(i, q[:, :, a:b], slot, mask)
                    for (a, b), slot, n, mask in zip(spans, slots, skip, masks)]
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
            return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

        with sdpa_kernel(PREFILL_SDPA_BACKENDS):
            hidden, captured = self._run(ids, pos[None], write_slots[None], pos[None], attend, layers)
        for s, size in zip(slots, sizes):
            self.lengths[s] = size
        last = torch.cumsum(lens_t, 0) - 1
        last_logits = F.linear(hidden[0, last], self.weights.lm_head)
        every = list(F.linear(hidden[0], self.weights.lm_head).split(lens)) if all_logits else None
        aux = self._gather_aux(captured, layers)
        return PrefillOutput(last_logits, every, list(aux[0].split(lens)) if aux is not None else None)

    def padded_prefill(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, last: torch.Tensor,
                       layers: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`PrefillGraphs`' body: one prompt padded past its end, ids/positions/slots [1, n] (static buffers, so
        that a CUDA graph can replay it), causal attention over itself. Writes the K/V of all n positions; nothing is
        committed. Returns (the logits at index `last` [1] as [1, V], the captured layers [n, len * H] or None)."""
        n = ids.shape[1]

        def attend(_: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
            return out.transpose(1, 2).reshape(1, n, -1)

        with sdpa_kernel(PREFILL_SDPA_BACKENDS):
            hidden, captured = self._run(ids, positions, slots, positions, attend, layers)
        logits = F.linear(hidden[0].index_select(0, last), self.weights.lm_head)
        aux = self._gather_aux(captured, layers)
        return logits, aux[0] if aux is not None else None

    def _after_reused_mask(self, reused: int, new: int, group: int) -> torch.Tensor:
        """bool [group * new, reused + new]: new token j sees cache positions 0..reused + j, once per query head of
        a KV head (the row order of `_attend_after_reused`'s grouped queries)."""
        causal = torch.ones(new, reused + new, dtype=torch.bool, device=self.device).tril(diagonal=reused)
        return causal.repeat(group, 1)

    def _attend_after_reused(self, layer: int, q: torch.Tensor, slot: int, mask: torch.Tensor) -> torch.Tensor:
        """q [1, Hq, n, D] of the tokens after a slot's reused ones (their K/V already written) over the slot's
        first `mask.shape[1]` cache positions. The query heads of each KV head are stacked along the sequence, so
        the slot's cache is read in place (no repeated K/V) by one masked fused call."""
        _, hq, n, d = q.shape
        kvh = self.shapes.num_kv_heads
        total = mask.shape[1]
        grouped = q.reshape(1, kvh, (hq // kvh) * n, d)
        k = self.k_cache[layer, slot, :, :total][None]
        v = self.v_cache[layer, slot, :, :total][None]
        out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=self.scale)
        return out.reshape(1, hq, n, d)

    def _pending_mask(self, b: int, t: int, tree_mask: torch.Tensor | None) -> torch.Tensor:
        """bool [B,S,S]: new token i may see new token j (default causal), validated."""
        if tree_mask is None:
            return torch.ones(t, t, dtype=torch.bool, device=self.device).tril().expand(b, t, t)
        tree = tree_mask.to(device=self.device, dtype=torch.bool)
        if tree.dim() == 2:
            tree = tree.expand(b, t, t)
        if tree.shape != (b, t, t):
            raise ValueError(f"tree_mask must be [{b}, {t}, {t}] or [{t}, {t}], got {list(tree_mask.shape)}")
        if not bool(tree.diagonal(dim1=-2, dim2=-1).all()):
            raise ValueError("tree_mask must let every new token attend to itself (its diagonal must be True)")
        return tree

    def _additive_mask(self, lengths: torch.Tensor, pending_mask: torch.Tensor, ctx: int) -> torch.Tensor:
        """Additive mask [B,S,ctx]: the committed prefix is visible; among new tokens, `pending_mask`."""
        b, t = pending_mask.shape[:2]
        rel = self._cols[:ctx][None, :] - lengths[:, None]
        in_new = (rel >= 0) & (rel < t)
        seen = pending_mask.gather(2, rel.clamp(0, t - 1)[:, None, :].expand(b, t, ctx)) & in_new[:, None, :]
        allowed = (rel < 0)[:, None, :] | seen
        return torch.zeros(b, t, ctx, dtype=self.dtype, device=self.device).masked_fill_(~allowed, float("-inf"))

    def tree_forward(self, ids: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                     pending_mask: torch.Tensor, slots: torch.Tensor, ctx: int, capture: Sequence[int] = (),
                     span: slice | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append S pending tokens to each of B sequences from device state only (no host sync, static shapes
        for a given (B, S, ctx), so it can be captured in a CUDA graph). Nothing is committed.

        ids/positions [B,S]; lengths [B] committed lengths; pending_mask bool [B,S,S] (token i sees pending
        token j, itself included); slots [B] cache rows (`span`: the same rows as a slice, read as views);
        ctx >= max(lengths) + S bounds the attended positions. Returns (logits [B,S,V], aux [B,S,*] or None):
        fp32 logits from the token path (B*S <= MAX_ROWS with one), the runner's dtype otherwise.
        """
        b, t = ids.shape
        write_pos = lengths[:, None] + self._cols[:t][None, :]
        if self.token_path is not None and b * t <= MAX_ROWS:
            logits, aux = self.token_path.run(*verify_rows(ids, positions, slots, write_pos, lengths, pending_mask),
                                              ctx, capture)
            return logits.view(b, t, -1), (aux.view(b, t, -1) if aux is not None else None)
        mask = self._additive_mask(lengths, pending_mask, ctx)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if span is not None:
                k_all, v_all = self.k_cache[i, span, :, :ctx], self.v_cache[i, span, :, :ctx]
            else:
                k_all, v_all = self.k_cache[i, slots, :, :ctx], self.v_cache[i, slots, :, :ctx]
            return self._cached_attention(q, k_all, v_all, mask)

        hidden, captured = self._run(ids, positions, slots[:, None].expand(b, t), write_pos, attend, capture)
        return F.linear(hidden, self.weights.lm_head), self._gather_aux(captured, capture)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor | Sequence[Sequence[int]], slots: Sequence[int],
                positions: torch.Tensor | None = None, tree_mask: torch.Tensor | None = None,
                capture_layers: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append S pending tokens to each of the B sequences in `slots`; nothing is committed.

        input_ids [B,S]; positions [B,S] RoPE positions (default: consecutive after the committed length; a
        draft tree passes committed length + depth); tree_mask bool [B,S,S] or [S,S]: new token i may attend to
        new token j (default causal). Every new token also sees its sequence's committed prefix.
        Returns (logits [B,S,V], aux_hidden [B,S,len(capture_layers)*H] or None).
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        if ids.dim() != 2 or ids.shape[0] != len(slots):
            raise ValueError(f"input_ids must be [len(slots), S], got {list(ids.shape)} for {len(slots)} slots")
        b, t = ids.shape
        if len(set(slots)) != len(slots) or not all(0 <= s < self.max_slots for s in slots):
            raise ValueError(f"slots must be distinct and in [0, {self.max_slots}): {list(slots)}")
        lens = [self.lengths[s] for s in slots]
        if max(lens) + t > self.max_len:
            raise CacheFullError(f"appending {t} tokens would exceed max_len={self.max_len}")
        layers = self.check_capture_layers(capture_layers)
        lens_t = torch.tensor(lens, device=self.device)
        pos = (lens_t[:, None] + self._cols[:t][None, :] if positions is None
               else torch.as_tensor(positions, device=self.device).long())
        if pos.shape != (b, t):
            raise ValueError(f"positions must be [{b}, {t}], got {list(pos.shape)}")
        slot_list = list(slots)
        span = slice(slot_list[0], slot_list[0] + b) if slot_list == list(range(slot_list[0], slot_list[0] + b)) \
            else None
        return self.tree_forward(ids, pos, lens_t, self._pending_mask(b, t, tree_mask),
                                 torch.tensor(slot_list, device=self.device), max(lens) + t, layers, span)

    def decode_logits(self, tokens: torch.Tensor, lens: torch.Tensor, ctx: int) -> torch.Tensor:
        """Static-shape decode step for CUDA graphs: row r is slot r, token at position lens[r].

        tokens/lens are device tensors [b]; attention spans the first `ctx` cache positions. Returns logits [b,V]
        (fp32 on the token path). Does not touch `lengths` (the caller keeps them in sync).
        Larger batches than the token path takes keep cuBLAS GEMMs but, with the token path's kernels at hand,
        attend with its chunked kernel, which reads each row's own length instead of the whole `ctx` bucket.
        """
        b = tokens.shape[0]
        slots, pending, count = self._slot_ids[:b], self._self_only[:b], self._one_each[:b]
        if self.token_path is not None and b <= MAX_ROWS:
            return self.token_path.run(tokens, lens, slots, lens, lens, pending, count, ctx)[0]
        write_pos = lens[:, None]
        if self.token_path is not None:
            attention = self.token_path.k.virtual_attention

            def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return attention(q[:, 0], self.k_cache[i], self.v_cache[i], slots, lens, pending, count, ctx,
                                 self.scale)[:, None]
        else:
            mask = torch.zeros(b, 1, ctx, dtype=self.dtype, device=self.device).masked_fill_(
                self._cols[:ctx][None, None, :] > lens[:, None, None], float("-inf"))

            def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return self._cached_attention(q, self.k_cache[i, :b, :, :ctx], self.v_cache[i, :b, :, :ctx], mask)

        hidden, _ = self._run(tokens[:, None], write_pos, self._slot_ids[:b, None], write_pos, attend, [])
        return F.linear(hidden[:, 0], self.weights.lm_head)

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int] | torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        """One plain decode step for several sequences (each at its own length); commits the token. [B,V]."""
        ids = torch.as_tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)
        logits, _ = self.forward(ids, slots)
        for s in slots:
            self.lengths[s] += 1
        return logits[:, 0]

    def commit(self, slot: int, accepted: int | Sequence[int]) -> None:
        """Keep some pending tokens of the last forward on `slot`: the first `n`, or the given indices (ascending).

        Kept tokens get consecutive cache positions after the committed prefix; the others are discarded.
        """
        base = self.lengths[slot]
        if isinstance(accepted, int):
            keep = accepted
        else:
            idx = list(accepted)
            if idx != sorted(set(idx)) or (idx and idx[0] < 0):
                raise ValueError(f"accepted indices must be ascending and distinct: {idx}")
            keep = len(idx)
            if base + (idx[-1] + 1 if idx else 0) > self.max_len:
                raise ValueError(f"accepted indices {idx} point past the cache end")
            if idx != list(range(keep)):
                self.compact(torch.tensor([slot], device=self.device), torch.tensor([base], device=self.device),
                             torch.tensor([idx], device=self.device))
        self.lengths[slot] = min(base + keep, self.max_len)

    def compact(self, slots: torch.Tensor, lengths: torch.Tensor, keep: torch.Tensor) -> None:
        """Move the K/V of the pending tokens to keep (pending indices `keep` [B, W], ascending; a row with fewer
        repeats its last) to consecutive positions after each row's committed length `lengths` [B], in cache rows
        `slots` [B]. Device tensors only, static shapes, no host sync (capturable in a CUDA graph); the host
        lengths do not move (`commit` moves them). One kernel launch per (row, layer) on the token path."""
        if self.token_path is not None:
            self.token_path.compact(slots, lengths, keep)
            return
        b, w = keep.shape
        src = lengths[:, None] + keep
        dst = lengths[:, None] + self._cols[:w]
        rows = slots[:, None].expand(b, w)
        for cache in (self.k_cache, self.v_cache):
            cache[:, rows, :, dst] = cache[:, rows, :, src]

    def truncate(self, slot: int, length: int) -> None:
        """Roll a sequence back to its first `length` committed tokens."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot truncate slot {slot} of length {self.lengths[slot]} to {length}")
        self.lengths[slot] = length

    def release(self, slot: int) -> None:
        """Free a slot (its cache content becomes garbage)."""
        self.lengths[slot] = 0

    def copy_positions(self, slots: Sequence[int], count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the K/V at the first `count` positions of `slots`, for `restore_positions`."""
        idx = torch.tensor(list(slots), device=self.device)
        return self.k_cache[:, idx, :, :count], self.v_cache[:, idx, :, :count]

    def restore_positions(self, slots: Sequence[int], saved: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Put back K/V that `copy_positions` took from the same slots."""
        idx = torch.tensor(list(slots), device=self.device)
        count = saved[0].shape[3]
        self.k_cache[:, idx, :, :count] = saved[0]
        self.v_cache[:, idx, :, :count] = saved[1]
