"""Offline mode: cache the target's features and labels once (hidden_states stage), then train from it.

Layout of `hidden/`: `manifest.json` and `<split>-NNNNN.safetensors` shards. Per sample j of a shard:
`feat.j` (the drafter family's `target_features` [L, F]: EAGLE-3's aux hidden states [L, n*H], EAGLE-1's
post-norm last hidden state [L, H]), `argmax.j` (full-vocab target argmax at the sample's supervised positions
[n]) and either `logits.j` (over the family's label columns: EAGLE-3's draft vocab [n, V_d], EAGLE-1's whole
vocab [n, V]) or, with train.offline_topk = k > 0, `topv.j`/`topi.j` ([n, k] values and column ids). The work happens in
results/<exp>/.work/hidden_states/<fingerprint>/ (resumable per shard) and is then published.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..config import Config, fingerprint
from ..families.base import DrafterFamily
from ..families.registry import family_named
from ..models.target import TargetWithAux
from ..utils.atomic import atomic_dir, atomic_write_json
from ..utils.device import compute_dtype, pick_device
from .batches import Batch, collate, to_device
from .objective import Labels

log = logging.getLogger(__name__)
SHARD_SAMPLES = 64


def _shard_name(split: str, i: int) -> str:
    return f"{split}-{i:05d}.safetensors"


def estimate_bytes(samples: list[dict], feat_dim: int, label_cols: int, topk: int, elem: int) -> int:
    """Disk bytes the cache of `samples` needs."""
    tokens = sum(len(s["input_ids"]) for s in samples)
    sup = sum(int(s["loss_mask"].sum()) for s in samples)
    per_label = topk * (elem + 8) if topk else label_cols * elem
    return tokens * feat_dim * elem + sup * (per_label + 8)


def build_cache(cfg: Config, target_dir: Path, tokens_dir: Path, vocab_dir: Path, out: Path) -> None:
    """Run the target over the train and val splits and write the cache (see module doc)."""
    from ..data.tokens_io import read_tokens
    from ..data.vocab import load_vocab
    from .setup import check_config_against_target, load_target_model, target_info

    tc = cfg.train
    info = target_info(target_dir)
    d2t, t2d = load_vocab(vocab_dir)
    check_config_against_target(cfg, info, len(d2t), len(t2d))
    family = family_named(tc.algorithm)
    aux_layers = family.target_layers(cfg.target.aux_layers, info)
    splits = {s: read_tokens(tokens_dir, s) for s in ("train", "val")}
    device = pick_device(cfg.device)
    dtype = compute_dtype(device)
    elem = torch.finfo(dtype).bits // 8
    label_ids = family.label_ids(d2t)
    label_cols = int(info["vocab_size"]) if label_ids is None else len(label_ids)
    feat_dim = len(aux_layers) * int(info["hidden_size"])
    manifest = {"mode": "offline", "algorithm_family": family.name, "aux_layers": aux_layers,
                "topk": tc.offline_topk, "label_cols": label_cols, "dtype": str(dtype).replace("torch.", ""),
                "splits": {s: len(v) for s, v in splits.items()}, "shard_samples": SHARD_SAMPLES,
                "d2t_sha": fingerprint(d2t.tolist())}
    work = out.resolve().parent / ".work" / "hidden_states" / fingerprint(
        {**manifest, "target": str(target_dir.resolve()), "tokens": str(tokens_dir.resolve()),
         "seq_length": cfg.data.seq_length})
    work.mkdir(parents=True, exist_ok=True)
    need = sum(estimate_bytes(v, feat_dim, label_cols, tc.offline_topk, elem) for v in splits.values())
    done = sum(f.stat().st_size for f in work.glob("*.safetensors"))
    free = shutil.disk_usage(work).free
    log.info("offline cache: about %.2f GB (%.2f GB already written), %.2f GB free at %s",
             need / 1e9, done / 1e9, free / 1e9, work)
    print(f"[hidden_states] disk estimate: {need / 1e9:.3f} GB for {sum(manifest['splits'].values())} samples; "
          f"{free / 1e9:.1f} GB free", flush=True)
    if need - done > free:
        raise OSError(f"the offline cache needs about {(need - done) / 1e9:.1f} GB but only {free / 1e9:.1f} GB "
                      f"are free at {work}; free space, reduce data, set train.offline_topk, or use train.mode=online")
    model = load_target_model(target_dir, device, dtype, tc.attn_impl)
    target = TargetWithAux(model, aux_layers)
    label_ids = None if label_ids is None else label_ids.to(device)
    total = sum(-(-len(v) // SHARD_SAMPLES) for v in splits.values())
    bar = tqdm(total=total, desc="hidden_states", disable=None)
    for split, samples in splits.items():
        for i in range(0, len(samples), SHARD_SAMPLES):
            path = work / _shard_name(split, i // SHARD_SAMPLES)
            if not path.exists():
                _write_shard(path, samples[i:i + SHARD_SAMPLES], target, label_ids, family, tc.offline_topk,
                             tc.micro_batch_size, device)
            bar.update(1)
    bar.close()
    with atomic_dir(out) as tmp:
        for f in sorted(work.glob("*.safetensors")):
            _link_or_copy(f, tmp / f.name)
        atomic_write_json(tmp / "manifest.json", manifest)


def _write_shard(path: Path, samples: list[dict], target: TargetWithAux, label_ids: Optional[torch.Tensor],
                 family: DrafterFamily, topk: int, micro: int, device: torch.device) -> None:
    from .features import online_features

    tensors: dict[str, torch.Tensor] = {}
    for start in range(0, len(samples), micro):
        group = samples[start:start + micro]
        batch = collate([[s] for s in group], ttt_steps=1).to(device)
        feats, labels = online_features(target, batch, family, label_ids)
        t = batch.input_ids.shape[1]
        row_of_label = batch.label_pos // t
        for b, s in enumerate(group):
            j = start + b
            sel = (row_of_label == b).nonzero()[:, 0]
            tensors[f"feat.{j}"] = feats[b, :len(s["input_ids"])].contiguous().cpu()
            tensors[f"argmax.{j}"] = labels.argmax[sel].cpu()
            lg = labels.logits[sel]
            if topk:
                v, ix = lg.topk(min(topk, lg.shape[-1]), dim=-1)
                tensors[f"topv.{j}"], tensors[f"topi.{j}"] = v.contiguous().cpu(), ix.contiguous().cpu()
            else:
                tensors[f"logits.{j}"] = lg.contiguous().cpu()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class OfflineCache:
    """Reads the cache for training; `features(batch)` mirrors `online_features`."""

    def __init__(self, hidden_dir: Path, samples: dict[str, list[dict]], family: DrafterFamily,
                 aux_layers: list[int]) -> None:
        self.dir = hidden_dir
        self.family = family
        self.manifest: dict[str, Any] = json.loads((hidden_dir / "manifest.json").read_text())
        m = self.manifest
        if m.get("mode") != "offline":
            raise ValueError(f"{hidden_dir} is not an offline cache (mode={m.get('mode')})")
        if m["algorithm_family"] != family.name or m["aux_layers"] != list(aux_layers):
            raise ValueError(f"{hidden_dir} was cached for {m['algorithm_family']} with aux layers {m['aux_layers']}; "
                             "rerun the hidden_states stage for this config")
        for split, rows in samples.items():
            if m["splits"].get(split) != len(rows):
                raise ValueError(f"{hidden_dir} holds {m['splits'].get(split)} {split} samples, the tokens "
                                 f"{len(rows)}: rerun the hidden_states stage")
        self.where = {}
        for split, rows in samples.items():
            for i, s in enumerate(rows):
                self.where[(split, s["id"])] = (hidden_dir / _shard_name(split, i // m["shard_samples"]),
                                                i % m["shard_samples"])
        self._open: dict[Path, Any] = {}

    def _get(self, path: Path, key: str) -> torch.Tensor:
        if path not in self._open:
            self._open = {path: safe_open(str(path), framework="pt")}
        return self._open[path].get_tensor(key)

    def features(self, batch: Batch, split: str, device: torch.device) -> tuple[torch.Tensor, Labels]:
        """Cached features laid out like `batch` (packed rows; its CPU copy, so that reading its layout needs no
        device sync) and labels in `batch.label_pos` order, on `device`."""
        b, t = batch.input_ids.shape
        feats, logits, argmax = None, [], []
        ids = iter(batch.sample_ids)
        doc_ids = batch.doc_ids.cpu()
        for r in range(b):
            docs = doc_ids[r]
            n_docs = int(docs.max()) + 1 if (docs >= 0).any() else 0
            start = 0
            for _ in range(n_docs):
                path, j = self.where[(split, next(ids))]
                f = self._get(path, f"feat.{j}")
                if feats is None:
                    feats = torch.zeros(b, t, f.shape[-1], dtype=f.dtype, pin_memory=device.type == "cuda")
                feats[r, start:start + f.shape[0]] = f
                start += f.shape[0]
                argmax.append(self._get(path, f"argmax.{j}"))
                logits.append(self._labels(path, j))
        feats = to_device(feats, device)
        return feats, Labels(logits=to_device(torch.cat(logits), device), argmax=to_device(torch.cat(argmax), device),
                             features=self.family.regression_targets(feats, to_device(batch.label_pos, device)))

    def _labels(self, path: Path, j: int) -> torch.Tensor:
        if not self.manifest["topk"]:
            return self._get(path, f"logits.{j}")
        v, ix = self._get(path, f"topv.{j}"), self._get(path, f"topi.{j}")
        full = torch.full((v.shape[0], self.manifest["label_cols"]), float("-inf"), dtype=v.dtype)
        return full.scatter_(1, ix, v)
