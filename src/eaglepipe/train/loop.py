"""The training loop: AdamW + warmup/cosine, grad accumulation and clipping, bf16 autocast on GPU, DDP,
periodic validation (simulated tau), atomic checkpoints with LATEST/BEST, resume, and publication."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..config import Config, fingerprint, to_dict
from ..families.registry import family_of
from ..models.target import TargetWithAux
from ..utils.atomic import atomic_write_json, remove_stale_temps
from ..utils.device import pick_device
from .batches import Batch, pack_rows
from .checkpoint import (
    checkpoint_name,
    commit_checkpoint,
    load_checkpoint,
    publish,
    read_pointer,
    resolve_checkpoint,
    save_checkpoint,
)
from .features import online_features
from .flops import attention_pairs, measure_matmul_peak, target_flops
from .module import TTTModule, objective_of
from .objective import Objective, metric_keys, summarize
from .offline import OfflineCache
from .report import History, LogWindow, publish_metrics
from .schedule import warmup_cosine
from .schedule_data import DataSchedule
from .setup import (
    check_config_against_target,
    check_drafter_depth,
    initial_drafter,
    load_target_model,
    target_info,
)

log = logging.getLogger(__name__)


@dataclass
class Paths:
    """Stage inputs and outputs."""

    target: Path
    tokens: Path
    vocab: Path
    hidden: Path
    out: Path


def work_dir(cfg: Config, paths: Paths) -> Path:
    """results/<exp>/.work/train/<fingerprint>/ : resumable state that DVC/Snakemake do not delete."""
    key = {"train": {k: v for k, v in to_dict(cfg.train).items()
                     if k not in ("resume", "log_every", "metrics_every", "eval_every", "save_every",
                                  "keep_checkpoints", "compile_loss", "compile_target",
                                  "target_graphs", "seed")},
           "seed": cfg.training_seed(), "seq_length": cfg.data.seq_length, "aux": cfg.target.aux_layers,
           "inputs": [str(p.resolve()) for p in (paths.target, paths.tokens, paths.vocab)],
           "stamps": [_stamp(p) for p in (paths.tokens, paths.vocab)]}
    return paths.out.resolve().parent / ".work" / "train" / fingerprint(key)


def _stamp(d: Path) -> list:
    return sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in d.iterdir() if f.is_file())


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """One training run (one process of a possibly distributed job)."""

    def __init__(self, cfg: Config, paths: Paths, work: Optional[Path] = None) -> None:
        from ..data.tokens_io import read_tokens
        from ..data.vocab import load_vocab

        self.cfg, self.paths, tc = cfg, paths, cfg.train
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = pick_device(cfg.device)
        if self.world > 1:
            self._init_distributed()
        self.is_main = self.rank == 0
        bf16 = tc.precision == "bf16" or (tc.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        seed_everything(cfg.training_seed())
        self.info = target_info(paths.target)
        d2t, t2d = load_vocab(paths.vocab)
        check_config_against_target(cfg, self.info, len(d2t), len(t2d))
        check_drafter_depth(cfg)
        self.train_samples = read_tokens(paths.tokens, "train")
        self.val_samples = read_tokens(paths.tokens, "val")
        if not self.train_samples:
            raise ValueError(f"{paths.tokens} holds no training samples")
        too_long = [s["id"] for s in self.train_samples if len(s["input_ids"]) > cfg.data.seq_length]
        if too_long:
            raise ValueError(f"{len(too_long)} samples are longer than data.seq_length (first: {too_long[0]})")
        self.mode = tc.mode
        offline = tc.mode == "offline"  # offline: the target only lends its embedding and lm_head (on CPU)
        model = load_target_model(paths.target, torch.device("cpu") if offline else self.device,
                                  torch.float32 if offline or not bf16 else torch.bfloat16, tc.attn_impl)
        self.drafter = initial_drafter(cfg, self.info, model, d2t, t2d, tc.init_from, paths.target).to(self.device)
        self.family = family_of(self.drafter.config)
        self.kind = objective_of(self.drafter)
        label_ids = self.family.label_ids(d2t)
        self.label_ids = None if label_ids is None else label_ids.to(self.device)
        if tc.compile and self.device.type == "cuda":
            self.drafter.compile_layers(dynamic=False if self.kind.fixed_shapes else None)
        self.cache: Optional[OfflineCache] = None
        if offline:
            self.cache = OfflineCache(paths.hidden, {"train": self.train_samples, "val": self.val_samples},
                                      self.family, self.drafter.config.aux_layers)
            del model
        else:
            self.target = TargetWithAux(model, self.drafter.config.aux_layers)
            if tc.parallel == "fsdp" and self.world > 1:
                from .distributed import shard_target
                shard_target(self.target.model)
            elif self.device.type == "cuda":
                if tc.compile_target:
                    self.target.compile_layers()
                if tc.target_graphs:
                    self.target.use_cuda_graphs()
        self.objective = Objective.from_train(tc)
        self.steps = self.kind.steps(self.objective)  # per-step metric groups
        self.module: torch.nn.Module = TTTModule(self.drafter, self.objective)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.module = DistributedDataParallel(self.module, device_ids=[self.device.index]
                                                  if self.device.type == "cuda" else None)
        params = [p for p in self.drafter.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.95),
                                           fused=self.device.type == "cuda")
        self.data = DataSchedule([len(s["input_ids"]) for s in self.train_samples], cfg.data.seq_length,
                                 tc.pack, tc.micro_batch_size, tc.grad_accum, self.world, cfg.training_seed())
        self.total_steps = self.data.total_steps(tc.epochs, tc.max_steps)
        self.scheduler = warmup_cosine(self.optimizer, self.total_steps, tc.warmup_ratio, tc.min_lr_ratio)
        self.work = work or work_dir(cfg, paths)
        self.step = 0
        self.best: Optional[dict[str, Any]] = None  # {"name", "replay_tau"} of the best validated checkpoint
        self.window = LogWindow()
        self._resume()
        self.history = History(self.work / "history.jsonl", self.step, writer=self.is_main)
        # forked: the measurement's random matrices must not move the RNG state that training continues from
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self.peak = measure_matmul_peak(self.device, torch.bfloat16 if bf16 else torch.float32)

    def _init_distributed(self) -> None:
        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)

    def _resume(self) -> None:
        """Continue from the configured checkpoint: its weights, optimizer, RNG, log window and BEST decision."""
        if self.is_main:  # a kill mid-write leaves temp files; only the main rank writes here
            for d in (self.work, self.work / "checkpoints"):
                if d.is_dir():
                    remove_stale_temps(d)
        path = resolve_checkpoint(self.work, self.cfg.train.resume) if self.cfg.train.resume else None
        if path is None:
            return
        state, windows = load_checkpoint(path, self.drafter, self.optimizer, self.scheduler)
        self.step = int(state["step"])
        self.best = state["best"]
        self.window.load_state_dict(windows[self.rank], self.device)
        if self.is_main:  # redo the pointers and pruning that a kill may have cut short
            commit_checkpoint(self.work, path.name, state, self.cfg.train.keep_checkpoints)
        log.info("resumed from %s at step %d", path.name, self.step)

    # ---- one micro-batch -------------------------------------------------------------------------------
    def _attention(self, batch: Batch):
        use_flex = self.cfg.train.ttt_attention == "flex" or (
            self.cfg.train.ttt_attention == "auto" and self.device.type == "cuda")
        return self.kind.attention(batch, self.objective, self.drafter.config.num_attention_heads, use_flex)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def features(self, batch: Batch, split: str = "train", host: Optional[Batch] = None):
        """Drafter inputs and labels for one micro-batch (online: the target runs here; offline: the cache, which
        reads the layout of `host`, the micro-batch's CPU copy, so that it needs no device sync)."""
        if self.cache is not None:
            return self.cache.features(batch if host is None else host, split, self.device)
        return online_features(self.target, batch, self.family, self.label_ids)

    def _micro(self, rows: list[list[int]], samples: list[dict], step: Optional[int] = None) -> Batch:
        """The micro-batch of sample `rows`; the optimizer `step` seeds what the objective draws at random for
        training (None: validation draws nothing). The seed is the step's alone, so that an objective
        that draws per row from it and the row's samples draws alike however ranks and micro-batches split the
        global batch."""
        seed = None if step is None else \
            int(np.random.SeedSequence([self.cfg.training_seed(), step]).generate_state(1)[0])
        return self.kind.collate([[samples[i] for i in row] for row in rows], self.objective,
                                 self.cfg.data.seq_length if self.cfg.train.pack else None, seed)

    def _forward(self, batch: Batch, host: Batch, denominators: list[float], metrics: bool = True):
        feats, labels = self.features(batch, host=host)
        with self._autocast():
            return self.module(batch, feats, labels, self._attention(batch), denominators, metrics=metrics)

    # ---- the loop --------------------------------------------------------------------------------------
    def train(self, stop_after: Optional[int] = None,
              on_step: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
        """Run to the end (or to optimizer step `stop_after`, for tests of resume); returns the summary.
        `on_step(step)` runs after each optimizer step, before that step's history row, validation and checkpoint
        (benchmarks time and profile exact windows of steps with it)."""
        tc = self.cfg.train
        end = self.total_steps if stop_after is None else min(stop_after, self.total_steps)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=None if self.is_main else True)
        grad_norm = torch.zeros(())
        t0 = start = time.perf_counter()
        start_step, run_tokens = self.step, 0
        timed_from = self.step  # the step the current history window's seconds count from
        if self.device.type == "cuda":  # the peak of training itself, not of the matmul-peak measurement
            torch.cuda.reset_peak_memory_stats(self.device)
        while self.step < end:
            micro = self.data.step_batches(self.step)
            batches = [self._micro(rows, self.train_samples, self.step) for rows in micro]
            denominators = [float(sum(c)) for c in zip(*(b.supervised_counts() for b in batches))]
            mine = batches[self.rank * tc.grad_accum:(self.rank + 1) * tc.grad_accum]
            done = self.step + 1
            metrics = done % tc.metrics_every == 0 or done % tc.log_every == 0 or done == end
            for i, cpu_batch in enumerate(mine):
                batch = cpu_batch.to(self.device)
                sync = contextlib.nullcontext() if (self.world == 1 or i == len(mine) - 1) else self.module.no_sync()
                with sync:
                    loss, s = self._forward(batch, cpu_batch, denominators, metrics)
                    (loss * self.world).backward()
                self.window.add(s, cpu_batch.num_tokens, self._flops(cpu_batch))
                run_tokens += cpu_batch.num_tokens
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.drafter.parameters() if p.requires_grad],
                                                       tc.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            bar.update(1)
            if on_step is not None:
                on_step(self.step)
            if self.step % tc.log_every == 0 or self.step == end:
                row = self._log_train(grad_norm, time.perf_counter() - t0, self.step - timed_from)
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc0=f"{row['acc_0']:.3f}",
                                tok_s=f"{row['tokens_per_s']:.0f}")
                self.window, t0, timed_from = LogWindow(), time.perf_counter(), self.step
            val = self._evaluate() if self.val_samples and (
                self.step % tc.eval_every == 0 or self.step == self.total_steps) else None
            if self.step % tc.save_every == 0 or self.step == end or val is not None:
                self._save(val)
        bar.close()
        if self.step >= self.total_steps:
            return self._finish(self._throughput(self.step - start_step, run_tokens, time.perf_counter() - start))
        return {"step": self.step}

    def _throughput(self, steps: int, tokens: int, seconds: float) -> dict[str, Any]:
        """This process's training speed since it started (or resumed): steps, real tokens on all ranks, wall
        seconds (evaluation and checkpoints included), tokens/s and the peak GPU memory of this rank."""
        total = float(self._reduce({"_tokens": torch.tensor(float(tokens))})["_tokens"])
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        return {"steps": steps, "tokens": int(total), "seconds": seconds, "tokens_per_s": total / max(seconds, 1e-9),
                "peak_gpu_mem_gib": peak}

    def _flops(self, b: Batch) -> float:
        return target_flops(self.info, b.num_tokens, attention_pairs(b), int(b.label_pos.numel())) + \
            self.kind.flops(self.drafter.config, b, self.objective)

    def _reduce(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum metric sums over ranks (a rank without batches contributes zeros)."""
        keys = sorted(set(metric_keys(self.steps)) | set(sums))
        vec = torch.stack([torch.as_tensor(sums.get(k, 0.0), dtype=torch.float64).to(self.device) for k in keys])
        if self.world > 1:
            dist.all_reduce(vec)
        return dict(zip(keys, vec.cpu()))

    def _log_train(self, grad_norm: torch.Tensor, seconds: float, steps: int) -> dict:
        """The history row of the window: its metrics, throughput, and seconds per optimizer step over the `steps`
        this process ran in `seconds` (the checkpoint saves and evaluations between them included)."""
        w = self.window
        totals = self._reduce({**w.sums, "_tokens": torch.tensor(float(w.tokens)), "_flops": torch.tensor(w.flops)})
        row = summarize(totals, self.steps, self.kind.decay(self.objective))
        tok = float(totals["_tokens"])
        row.update(step=self.step, split="train", grad_norm=float(grad_norm), lr=self.scheduler.get_last_lr()[0],
                   tokens_per_s=tok / max(seconds, 1e-9), step_seconds=seconds / max(steps, 1),
                   mfu=float(totals["_flops"]) / max(seconds, 1e-9) / (self.peak * self.world))
        if self.is_main:
            self.history.add(row)
        return row

    @torch.no_grad()
    def _evaluate(self) -> dict:
        """Validation metrics over the whole val split (shared across ranks)."""
        tc = self.cfg.train
        self.module.eval()
        rows = pack_rows([len(s["input_ids"]) for s in self.val_samples], range(len(self.val_samples)),
                         self.cfg.data.seq_length, tc.pack)
        groups = [rows[i:i + tc.micro_batch_size] for i in range(0, len(rows), tc.micro_batch_size)]
        sums: dict[str, torch.Tensor] = {}
        mine = groups[self.rank::self.world]
        if tc.parallel == "fsdp" and self.world > 1 and groups:
            # a sharded target's forward is collective: every rank runs as many as the busiest one
            for g in groups[:1] * (-(-len(groups) // self.world) - len(mine)):
                host = self._micro(g, self.val_samples)
                self.features(host.to(self.device), "val", host)
        for g in mine:
            host = self._micro(g, self.val_samples)
            batch = host.to(self.device)
            feats, labels = self.features(batch, "val", host)
            with self._autocast():
                _, s = TTTModule.forward(self._plain_module(), batch, feats, labels, self._attention(batch),
                                         [1.0] * self.steps)
            for k, v in s.items():
                sums[k] = sums.get(k, 0) + v
        self.module.train()
        row = summarize(self._reduce(sums), self.steps, self.kind.decay(self.objective))
        row.update(step=self.step, split="val")
        if self.is_main:
            self.history.add(row)
        return row

    def _plain_module(self) -> TTTModule:
        return self.module.module if hasattr(self.module, "module") else self.module

    def _save(self, val: Optional[dict[str, Any]]) -> None:
        """Checkpoint this step with its BEST decision: this checkpoint when its validation `val` beats the best
        so far on the replayed-rounds tau (what a serving engine measures; sim_tau reads high)."""
        epoch, _ = self.data.locate(self.step - 1)
        name = checkpoint_name(epoch, self.step)
        if val is not None and (self.best is None or val["replay_tau"] > self.best["replay_tau"]):
            self.best = {"name": name, "replay_tau": val["replay_tau"]}
        windows = [self.window.state_dict()]  # each rank's, since the next history row reduces them all
        if self.world > 1:
            windows = [None] * self.world
            dist.all_gather_object(windows, self.window.state_dict())
        if not self.is_main:
            return
        state = {"step": self.step, "epoch": epoch, "data_position": self.data.locate(self.step),
                 "val_replay_tau": None if val is None else val["replay_tau"], "best": self.best,
                 "config_fingerprint": self.work.name}
        save_checkpoint(self.work, name, self.drafter, self.optimizer, self.scheduler, state, windows,
                        self.cfg.train.keep_checkpoints)

    def _finish(self, throughput: dict[str, Any]) -> dict[str, Any]:
        latest = read_pointer(self.work, "LATEST")
        summary = {"steps": self.step, "latest": latest, "best": self.best["name"] if self.best else latest,
                   "best_replay_tau": self.best["replay_tau"] if self.best else None,
                   "algorithm": self.drafter.config.algorithm, "mode": self.mode, "work_dir": str(self.work)}
        last = {r["split"]: r for r in self.history.rows}
        summary["final"] = last
        summary["this_run"] = throughput
        if self.is_main:
            self.paths.out.mkdir(parents=True, exist_ok=True)
            publish(self.work, self.paths.out)
            publish_metrics(self.history.rows, self.paths.out, self.steps)
            atomic_write_json(self.paths.out / "summary.json", summary)
        if self.world > 1:
            dist.barrier()
        return summary
