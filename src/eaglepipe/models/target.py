"""The frozen target wrapped for drafter training: one forward gives the aux hidden states (captured with
forward hooks, pre-final-norm, HF hidden_states numbering) and the label logits at the requested positions."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from .target_graphs import TargetGraphs


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of an HF causal LM (model.model.layers)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find decoder layers on {type(model).__name__}")
    return layers


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool, True = attend: causal within each document of a packed row, a document starting where
    the positions restart at 0. A few tensor ops, where HF's own detection of packed rows builds the same mask
    through vmapped index functions on every forward."""
    doc = torch.cumsum(position_ids == 0, dim=1)
    t = position_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


class TargetWithAux(nn.Module):
    """Frozen target; `forward` returns (aux [B,T,n*H] low->high, final post-norm hidden [B,T,H]).

    h[0] is captured from the embedding output, h[i] (i >= 1) from the output of decoder layer i.
    Nothing else is kept: no `output_hidden_states`, no logits over the whole sequence.
    """

    def __init__(self, model: nn.Module, aux_layers: list[int]) -> None:
        super().__init__()
        n = len(decoder_layers(model))
        bad = [i for i in aux_layers if not 0 <= i <= n]
        if bad:
            raise ValueError(f"aux layers {bad} are outside h[0..{n}] of a {n}-layer target")
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.aux_layers = list(aux_layers)
        self.num_layers = n
        self.graphs: Optional[TargetGraphs] = None

    def use_cuda_graphs(self) -> None:
        """Replay the forward (on packed rows, the mask built from the positions) from a CUDA graph per input
        shape (`TargetGraphs`): one launch a step instead of a dozen per layer. sdpa and eager attention only:
        flash_attention_2 finds the documents' lengths on the host."""
        impl = getattr(self.model.config, "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"CUDA graphs of the target need sdpa or eager attention, not {impl}")
        self.graphs = TargetGraphs(self.packed_forward)

    def compile_layers(self) -> None:
        """torch.compile each decoder layer's forward: its norms, RoPE, activations and residual adds fuse into a
        few kernels and the host issues far fewer launches. The aux hooks stay outside the compiled code (they
        run in the module's call), and the layers share one compiled graph."""
        for layer in decoder_layers(self.model):
            layer.forward = torch.compile(layer.forward, dynamic=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The target's output embedding [V, H]."""
        return self.model.get_output_embeddings().weight

    @contextmanager
    def _capture(self, store: dict[int, torch.Tensor]) -> Iterator[None]:
        base = getattr(self.model, "model", self.model)
        handles = []
        for i in sorted(set(self.aux_layers)):
            module = base.embed_tokens if i == 0 else decoder_layers(self.model)[i - 1]

            def hook(_m, _inp, out, i=i):
                store[i] = out[0] if isinstance(out, (tuple, list)) else out
            handles.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed rows are supported: positions restart per document. Without an `attention_mask`, the sdpa and
        eager attentions get the block-diagonal causal one built from them (`packed_causal_mask`; HF takes a 4D
        mask as it is); flash_attention_2 reads the documents from the positions itself. After
        `use_cuda_graphs`, a forward without a mask is replayed from a graph."""
        if attention_mask is None and self.graphs is not None:
            return self.graphs(input_ids, position_ids)
        return self.packed_forward(input_ids, position_ids, attention_mask)

    @torch.no_grad()
    def packed_forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                       attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`, always run eagerly."""
        store: dict[int, torch.Tensor] = {}
        base = getattr(self.model, "model", self.model)
        if attention_mask is None and getattr(self.model.config, "_attn_implementation", "sdpa") in ("sdpa", "eager"):
            attention_mask = packed_causal_mask(position_ids)
        with self._capture(store):
            out = base(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                       use_cache=False)
        aux = torch.cat([store[i] for i in self.aux_layers], dim=-1)
        return aux, out.last_hidden_state

    @torch.no_grad()
    def label_logits(self, final_hidden: torch.Tensor, draft_ids: Optional[torch.Tensor],
                     chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the rows of `final_hidden` [N, H]: (logits over `draft_ids` columns (all columns when
        None) [N, V_d], argmax over the full target vocab [N]). Chunked so [N, V] never exists at once."""
        weight = self.lm_head_weight
        logits, argmax = [], []
        for start in range(0, final_hidden.shape[0], chunk):
            full = final_hidden[start:start + chunk].to(weight.dtype) @ weight.t()
            argmax.append(full.argmax(-1))
            logits.append(full if draft_ids is None else full.index_select(1, draft_ids))
        if not logits:
            cols = weight.shape[0] if draft_ids is None else draft_ids.numel()
            return final_hidden.new_zeros(0, cols), torch.zeros(0, dtype=torch.long, device=final_hidden.device)
        return torch.cat(logits), torch.cat(argmax)
