"""The bench stage: metrics, reports and plots, prompts, the /generate client against a real server, the sglang
dry run, and the stage end to end on the native engine."""
from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from eaglepipe.bench.client import GenerateClient
from eaglepipe.bench.engines import ServerEngine, round_histogram
from eaglepipe.bench.metrics import (
    PointResult,
    Sample,
    match_fraction,
    overall_metrics,
    position_acceptance,
    summarize,
    tau,
)
from eaglepipe.bench.plots import write_plots
from eaglepipe.bench.prompts import load_prompts, render_chat, turns_of
from eaglepipe.bench.report import summary_table, sweep_csv, write_outputs
from eaglepipe.bench.sweep import bracket_baseline, run_sweep
from eaglepipe.config import BenchCfg, PromptsCfg, SweepPoint
from eaglepipe.config.load import params_from_dict
from eaglepipe.utils.cli import StageError

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- helpers and fixtures
def sample(p: int, turn: int, tokens: list[int], rounds: int, decode_s: float, hist: list[int] | None = None,
           text: str | None = None) -> Sample:
    return Sample(prompt_index=p, turn=turn, text=text if text is not None else " ".join(map(str, tokens)),
                  completion_tokens=len(tokens), verify_rounds=rounds, decode_s=decode_s, token_ids=tokens,
                  accept_hist=hist)


def params_file(tmp: Path, bench: dict) -> Path:
    """The repo's params.yaml with the bench group replaced (validated like a stage would)."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["bench"] = {**data["bench"], **bench}
    data["device"] = "cpu"
    params_from_dict(data)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny_export(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real EAGLE-3 drafter for the tiny target (random layer weights, the target's embedding), exported by
    the export stage's writer into <dir>/sglang and <dir>/vllm."""
    from eaglepipe.export.checkpoint import read_checkpoint
    from eaglepipe.export.writer import ExportRequest, export_checkpoint
    from eaglepipe.models.build import new_drafter, save_drafter
    from eaglepipe.models.config import DrafterConfig
    from eaglepipe.target.info import describe_model

    root = tmp_path_factory.mktemp("tiny_export")
    info = describe_model(tiny_llama_dir)
    draft_vocab = 1024
    cfg = DrafterConfig.from_target(info, "eagle3", draft_vocab)
    weights = load_file(str(tiny_llama_dir / "model.safetensors"))
    embed = weights["model.embed_tokens.weight"]
    ids = torch.randperm(info["vocab_size"], generator=torch.Generator().manual_seed(0))[:draft_vocab].sort().values
    d2t = ids - torch.arange(draft_vocab)
    t2d = torch.zeros(info["vocab_size"], dtype=torch.bool)
    t2d[ids] = True
    ckpt = root / "ckpt"
    save_drafter(new_drafter(cfg, embed, weights.get("lm_head.weight", embed), d2t, t2d, seed=0), ckpt)
    save_file({"d2t": d2t, "t2d": t2d}, str(ckpt / "vocab.safetensors"))
    req = ExportRequest(dtype="float32", verifier_name=str(tiny_llama_dir), num_steps=3, topk=1, num_draft_tokens=4)
    summary = export_checkpoint(read_checkpoint(ckpt), tiny_llama_dir, root / "export", req)
    assert summary["validation"]["ok"], summary["validation"]["problems"]
    return root / "export"


# ---------------------------------------------------------------------------- metrics
def test_tau_and_position_acceptance_from_histogram() -> None:
    # 10 rounds: 2 accepted nothing, 3 accepted one draft, 5 accepted all three
    hist = [2, 3, 0, 5]
    rate, reach = position_acceptance(hist, 3)
    assert reach == pytest.approx([0.8, 0.5, 0.5])
    assert rate == pytest.approx([0.8, 5 / 8, 1.0])
    samples = [sample(0, 0, list(range(25)), 10, 1.0, hist)]
    assert tau(samples) == pytest.approx(2.5)
    assert tau([sample(0, 0, [1, 2], 0, 1.0)]) is None
    # a depth no round reached has rate 0, not a division error
    assert position_acceptance([4, 0, 0], 2) == ([0.0, 0.0], [0.0, 0.0])


def test_the_faster_baseline_run_is_the_reference() -> None:
    slow = PointResult(None, 0.0, [sample(0, 0, [1, 2, 3, 4, 5], 0, 8.0)], 9.0)
    fast = PointResult(None, 0.0, [sample(0, 0, [1, 2, 3, 4, 5], 0, 4.0)], 5.0)
    drifted = PointResult(None, 0.0, [sample(0, 0, [1, 2, 3, 4, 6], 0, 2.0)], 3.0)
    first_slow = bracket_baseline(slow, fast)
    assert first_slow.reference is fast and first_slow.record["reference"] == "after"
    assert first_slow.record["decode_tok_s"] == pytest.approx([0.5, 1.0])
    assert first_slow.record["spread"] == pytest.approx(1.0) and first_slow.record["repeat_match_fraction"] == 1.0
    assert bracket_baseline(fast, slow).reference is fast
    assert bracket_baseline(fast, drifted).record["repeat_match_fraction"] == 0.0


def test_round_histogram_skips_the_prefill_batch() -> None:
    # prefill token, then rounds streaming 1 (bonus only), 3 (2 drafts + bonus) and 4 (3 drafts + bonus)
    assert round_histogram([1, 1, 3, 4], 3, depth=3) == [1, 0, 1, 1]
    assert round_histogram([2, 4], 2, depth=3) == [0, 1, 0, 1]
    assert round_histogram([1, 1], 3, depth=3) is None
    assert round_histogram([1, 1], 0, depth=3) is None


def test_summarize_speedup_match_and_temperature() -> None:
    base = PointResult(None, 0.0, [sample(0, 0, [1, 2, 3, 4, 5], 0, 4.0), sample(0, 1, [6, 7, 8], 0, 2.0)], 7.0)
    same = PointResult(SweepPoint(3, 1, 4), 0.0,
                       [sample(0, 0, [1, 2, 3, 4, 5], 2, 1.0, [0, 0, 1, 1]),
                        sample(0, 1, [6, 7, 8], 1, 1.0, [0, 0, 1, 0])], 2.5)
    b = summarize(base, base)
    s = summarize(same, base)
    assert b.config == "baseline" and b.tau is None and b.speedup is None and b.outputs_match is None
    assert b.decode_tok_s == pytest.approx(6 / 6.0)
    assert s.name == "s3_k1_n4_t0.0" and s.tau == pytest.approx(8 / 3)
    assert s.decode_tok_s == pytest.approx(6 / 2.0) and s.speedup == pytest.approx(3.0)
    assert s.outputs_match is True and s.match_fraction == 1.0
    assert s.accept_rate == pytest.approx([1.0, 1.0, 1 / 3]) and s.extra["accept_hist"] == [0, 0, 2, 1]
    assert s.throughput_tok_s == pytest.approx(8 / 2.5)

    differs = PointResult(SweepPoint(3, 1, 4), 0.0,
                          [sample(0, 0, [1, 2, 3, 4, 9], 2, 1.0), sample(0, 1, [6, 7, 8], 1, 1.0)], 2.0)
    d = summarize(differs, base)
    assert d.outputs_match is False and d.match_fraction == 0.5 and d.accept_rate is None
    hot = summarize(PointResult(SweepPoint(3, 1, 4), 1.0, differs.samples, 2.0),
                    PointResult(None, 1.0, base.samples, 7.0))
    assert hot.outputs_match is None and hot.match_fraction == 0.5 and hot.speedup == pytest.approx(3.0)


def test_match_compares_text_when_token_ids_are_missing() -> None:
    a = [Sample(0, 0, "hello", 2, 0, 1.0), Sample(1, 0, "x", 2, 0, 1.0)]
    b = [Sample(0, 0, "hello", 2, 1, 1.0), Sample(1, 0, "y", 2, 1, 1.0)]
    assert match_fraction(b, a) == 0.5


def _rows():
    base0 = PointResult(None, 0.0, [sample(0, 0, list(range(9)), 0, 8.0)], 9.0)
    chain = PointResult(SweepPoint(3, 1, 4), 0.0, [sample(0, 0, list(range(9)), 3, 2.0, [0, 1, 1, 1])], 3.0)
    tree = PointResult(SweepPoint(5, 4, 8), 0.0, [sample(0, 0, list(range(9)), 2, 4.0, [0, 0, 0, 1, 1, 0])], 5.0)
    base1 = PointResult(None, 1.0, [sample(0, 0, list(range(9)), 0, 8.0)], 9.0)
    chain1 = PointResult(SweepPoint(3, 1, 4), 1.0, [sample(0, 0, list(range(9)), 6, 4.0, [3, 2, 1, 0])], 5.0)
    tree1 = PointResult(SweepPoint(5, 4, 8), 1.0, [sample(0, 0, list(range(7)), 5, 4.0, [4, 1, 0, 0, 0, 0])], 5.0)
    return [summarize(base0, base0), summarize(chain, base0), summarize(tree, base0),
            summarize(base1, base1), summarize(chain1, base1), summarize(tree1, base1)]


def test_multi_turn_points_report_tau_per_turn_in_the_table_and_csv() -> None:
    """Turn 1 accepts 2 drafts a round, turn 2 none: τ 3.0 and 1.0 by turn, 1.5 over both."""
    toks = list(range(9))
    base = PointResult(None, 0.0, [sample(0, 0, toks, 0, 8.0), sample(0, 1, toks, 0, 8.0)], 16.0)
    chain = PointResult(SweepPoint(3, 1, 4), 0.0, [sample(0, 0, toks, 3, 2.0, [0, 0, 3, 0]),
                                                    sample(0, 1, toks, 9, 8.0, [9, 0, 0, 0])], 10.0)
    rows = [summarize(base, base), summarize(chain, base)]
    assert rows[0].tau_by_turn is None and rows[1].tau_by_turn == [pytest.approx(3.0), pytest.approx(1.0)]
    lines = summary_table(rows).splitlines()
    assert lines[0] == "| config | T | τ | τ by turn | accept@1..4 | decode tok/s | speedup | match |"
    assert lines[2].startswith("| baseline | 0 | - | - |")
    assert lines[3].startswith("| s3_k1_n4 | 0 | 1.50 | 3.00 / 1.00 |")
    parsed = list(csv.DictReader(io.StringIO(sweep_csv(rows))))
    assert parsed[0]["tau_turn_1"] == "" and float(parsed[1]["tau_turn_2"]) == pytest.approx(1.0)


def test_overall_metrics_pick_the_best_configs_at_the_lowest_temperature() -> None:
    m = overall_metrics(_rows())
    assert m["temperature"] == 0.0
    assert m["best_tau"] == pytest.approx(4.5) and m["best_tau_config"] == "s5_k4_n8"
    assert m["best_speedup"] == pytest.approx(4.0) and m["best_speedup_config"] == "s3_k1_n4"
    assert m["baseline_tok_s"] == pytest.approx(1.0) and m["all_outputs_match"] is True
    assert m["num_points"] == 4
    assert m["by_temperature"]["1.0"]["best_tau_config"] == "s3_k1_n4"
    assert m["by_temperature"]["1.0"]["best_speedup"] == pytest.approx(2.0)


# ---------------------------------------------------------------------------- reports and plots
def test_csv_readme_and_json_outputs(tmp_path: Path) -> None:
    rows = _rows()
    parsed = list(csv.DictReader(io.StringIO(sweep_csv(rows))))
    assert [r["name"] for r in parsed] == ["baseline_t0.0", "s3_k1_n4_t0.0", "s5_k4_n8_t0.0",
                                           "baseline_t1.0", "s3_k1_n4_t1.0", "s5_k4_n8_t1.0"]
    assert parsed[0]["tau"] == "" and parsed[0]["outputs_match"] == "n/a"
    assert float(parsed[1]["tau"]) == pytest.approx(3.0) and parsed[1]["outputs_match"] == "true"
    assert parsed[4]["outputs_match"] == "n/a"
    assert "accept_rate_5" in parsed[0] and parsed[1]["accept_rate_5"] == ""
    assert float(parsed[2]["accept_rate_4"]) == pytest.approx(0.5)

    table = summary_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0] == "| config | T | τ | accept@1..4 | decode tok/s | speedup | match |"
    assert lines[1] == "|---|---|---|---|---|---|---|"
    assert lines[2] == "| baseline | 0 | - | - | 1.0 | 1.00x | - |"
    assert lines[3] == "| s3_k1_n4 | 0 | 3.00 | 1.00 / 0.67 / 0.50 | 4.0 | 4.00x | yes |"
    assert lines[4] == "| s5_k4_n8 | 0 | 4.50 | 1.00 / 1.00 / 1.00 / 0.50 | 2.0 | 2.00x | yes |"
    assert lines[6] == "| s3_k1_n4 | 1 | 1.50 | 0.50 / 0.33 / 0.00 | 2.0 | 2.00x | n/a |"

    metrics = overall_metrics(rows)
    write_outputs(tmp_path, rows, metrics, "python -m sglang.launch_server --x", "context line")
    assert sorted(p.name for p in (tmp_path / "points").iterdir())[0] == "baseline_t0.0.json"
    point = json.loads((tmp_path / "points" / "s3_k1_n4_t0.0.json").read_text())
    assert point["tau"] == pytest.approx(3.0) and point["extra"]["accept_hist"] == [0, 1, 1, 1]
    assert json.loads((tmp_path / "metrics.json").read_text())["best_speedup_config"] == "s3_k1_n4"
    readme = (tmp_path / "README.md").read_text()
    assert "context line" in readme and table in readme and "τ (acceptance length)" in readme
    assert "python -m sglang.launch_server --x" in readme
    assert (tmp_path / "best_command.txt").read_text() == "python -m sglang.launch_server --x\n"


def test_plots_are_pngs_and_temperature_plot_needs_both_temperatures(tmp_path: Path) -> None:
    rows = _rows()
    paths = write_plots(rows, tmp_path / "both")
    assert sorted(p.name for p in paths) == ["acceptance.png", "speedup.png", "tau.png", "temperature.png"]
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    greedy_only = [r for r in rows if r.temperature == 0.0]
    assert sorted(p.name for p in write_plots(greedy_only, tmp_path / "greedy")) == \
        ["acceptance.png", "speedup.png", "tau.png"]


# ---------------------------------------------------------------------------- prompts
def test_mtbench_prompts_have_two_turns() -> None:
    all_q = load_prompts(PromptsCfg())
    assert len(all_q) == 80 and all(len(t) == 2 for t in all_q)
    assert load_prompts(PromptsCfg(num_prompts=3, multi_turn=False)) == [q[:1] for q in all_q[:3]]


def test_local_prompt_files_in_every_supported_shape(tmp_path: Path) -> None:
    rows = [{"q": "Only one turn"},
            {"q": ["First", "Second"]},
            {"q": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]},
            {"q": [{"from": "human", "value": "ShareGPT style"}, {"from": "gpt", "value": "ok"}]}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    expected = [["Only one turn"], ["First", "Second"], ["Hi", "Bye"], ["ShareGPT style"]]
    assert load_prompts(PromptsCfg(source="local", path=str(jsonl), field="q")) == expected
    data_dir = tmp_path / "ds"
    (data_dir / "data").mkdir(parents=True)
    pq.write_table(pa.table({"q": ["a", "b", "c"]}), data_dir / "data" / "train-00000.parquet")
    pq.write_table(pa.table({"q": ["test only"]}), data_dir / "data" / "test-00000.parquet")
    assert load_prompts(PromptsCfg(source="local", path=str(data_dir), field="q", num_prompts=2)) == [["a"], ["b"]]
    assert load_prompts(PromptsCfg(source="local", path=str(data_dir), field="q", split="test")) == [["test only"]]


def test_bad_prompt_sources_fail_clearly(tmp_path: Path) -> None:
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"q": "fine"}\n{"other": 1}\n')
    with pytest.raises(StageError, match="record 1 has no field 'q'"):
        load_prompts(PromptsCfg(source="local", path=str(jsonl), field="q"))
    with pytest.raises(StageError, match="does not exist"):
        load_prompts(PromptsCfg(source="local", path=str(tmp_path / "missing.jsonl"), field="q"))
    jsonl.write_text('{"q": "fine"}\nnot json\n')
    with pytest.raises(StageError, match=r"p.jsonl:2 is not valid JSON"):
        load_prompts(PromptsCfg(source="local", path=str(jsonl), field="q"))
    with pytest.raises(StageError, match="no non-empty user turn"):
        turns_of([{"role": "assistant", "content": "x"}], "r")
    with pytest.raises(StageError, match="must be a string"):
        turns_of(3, "r")
    with pytest.raises(Exception, match="bench.prompts.path is required"):
        BenchCfg(prompts=PromptsCfg(source="local")).check()


def test_render_chat_ends_with_the_generation_prompt(tiny_llama_dir: Path) -> None:
    from eaglepipe.target.info import load_tokenizer

    tok = load_tokenizer(tiny_llama_dir)
    ids = render_chat(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                            {"role": "user", "content": "Bye"}])
    text = tok.decode(ids)
    assert text.endswith("<|im_start|>assistant\n") and text.count("<|im_start|>user") == 2 and "Hello" in text


# ---------------------------------------------------------------------------- sglang dry run
def test_sglang_dry_run_prints_one_launch_per_point(tiny_llama_dir: Path, tiny_export: Path, tmp_path: Path) -> None:
    params = params_file(tmp_path, {"engine": "sglang", "sglang": {"dry_run": True, "port": 31234,
                                                                    "extra_args": ["--attention-backend", "fa3"]}})
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "eaglepipe.stages.bench", "--params", str(params),
                           "--target", str(tiny_llama_dir), "--export", str(tiny_export), "--out", str(out)],
                          cwd=REPO, env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and not out.exists()
    draft = str((tiny_export / "sglang").resolve())
    for line in lines:
        assert line.startswith(f"python3 -m sglang.launch_server --model-path {tiny_llama_dir}")
        assert "--port 31234" in line and line.endswith("--attention-backend fa3") and "--dtype bfloat16" in line
    assert "--speculative" not in lines[0]
    assert (f"--speculative-algorithm EAGLE3 --speculative-draft-model-path {draft} --speculative-num-steps 3 "
            "--speculative-eagle-topk 1 --speculative-num-draft-tokens 4") in lines[1]
    assert "--speculative-num-steps 5 --speculative-eagle-topk 4 --speculative-num-draft-tokens 8" in lines[2]


def test_stage_rejects_an_export_without_a_drafter(tiny_llama_dir: Path, tmp_path: Path) -> None:
    params = params_file(tmp_path, {})
    proc = subprocess.run([sys.executable, "-m", "eaglepipe.stages.bench", "--params", str(params),
                           "--target", str(tiny_llama_dir), "--export", str(tmp_path / "nothing"),
                           "--out", str(tmp_path / "bench")],
                          cwd=REPO, env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and f"{tmp_path / 'nothing' / 'sglang' / 'config.json'} not found" in proc.stderr
    assert not (tmp_path / "bench").exists()


# ---------------------------------------------------------------------------- /generate client, real servers
def start_server(model: Path, log: Path, draft: Path | None = None):
    """`python -m eaglepipe.server.serve` on a free 127.0.0.1 port (context manager yielding the URL)."""
    from eaglepipe.regen.launch import ServerProcess, free_port

    port = free_port()
    cmd = [sys.executable, "-m", "eaglepipe.server.serve", "--model", str(model), "--port", str(port),
           "--device", "cpu", "--max-batch-size", "2"]
    if draft is not None:
        cmd += ["--draft", str(draft)]
    return ServerProcess(cmd, f"http://127.0.0.1:{port}", log)


def test_generate_client_streams_and_reads_meta_info(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from eaglepipe.target.info import load_tokenizer

    tok = load_tokenizer(tiny_llama_dir)
    ids = render_chat(tok, [{"role": "user", "content": "Name three colours."}])
    with start_server(tiny_llama_dir, tmp_path / "plain.log") as server:
        server.wait_healthy(120)

        async def go():
            async with GenerateClient(server.base_url) as client:
                greedy = await client.generate(ids, 0.0, 12, prompt_index=4, turn=1)
                again = await client.generate(ids, 0.0, 12)
                with pytest.raises(StageError, match="HTTP 400"):
                    await client.generate([], 0.0, 12)
                return greedy, again

        greedy, again = asyncio.run(go())
    assert (greedy.prompt_index, greedy.turn) == (4, 1)
    # without a drafter the server counts one verification per token, as SGLang does (τ = 1)
    assert greedy.completion_tokens == 12 and greedy.verify_rounds == 12 and greedy.decode_s > 0
    assert greedy.text == again.text and greedy.text.strip()
    assert greedy.accept_hist is None and greedy.token_ids is None


def test_client_reports_a_dead_server_clearly() -> None:
    from eaglepipe.regen.launch import free_port

    async def go():
        async with GenerateClient(f"http://127.0.0.1:{free_port()}", timeout_s=10) as client:
            await client.generate([1, 2, 3], 0.0, 4)

    with pytest.raises(StageError, match="talking to http://127.0.0.1"):
        asyncio.run(go())


def test_url_engine_against_real_servers_with_and_without_a_drafter(tiny_llama_dir: Path, tiny_export: Path,
                                                                     tmp_path: Path) -> None:
    from eaglepipe.target.info import load_tokenizer

    prompts = load_prompts(PromptsCfg(num_prompts=2))
    cfg = BenchCfg(engine="url", sweep=[SweepPoint(3, 1, 4)], max_new_tokens=10, batch_size=2, warmup_prompts=1,
                   baseline_runs=1)
    with start_server(tiny_llama_dir, tmp_path / "plain.log") as plain, \
            start_server(tiny_llama_dir, tmp_path / "spec.log", draft=tiny_export / "sglang") as spec:
        plain.wait_healthy(120)
        spec.wait_healthy(120)
        cfg.url, cfg.baseline_url = spec.base_url, plain.base_url
        rows = run_sweep(ServerEngine(cfg.url, cfg, baseline_url=cfg.baseline_url), load_tokenizer(tiny_llama_dir),
                         prompts, cfg)
    base, point = rows  # one baseline run: nothing about a second one is recorded
    assert base.config == "baseline" and point.config == "s3_k1_n4" and point.num_samples == 4
    assert "baseline_runs" not in base.extra
    # greedy speculative decoding is lossless: the same text for both turns of both prompts
    assert point.outputs_match is True and point.match_fraction == 1.0
    assert 0 < point.verify_rounds < point.completion_tokens and point.tau == pytest.approx(
        point.completion_tokens / point.verify_rounds)
    assert point.speedup is not None and point.speedup > 0


def test_url_engine_without_a_baseline_reports_no_speedup(tiny_llama_dir: Path, tiny_export: Path,
                                                           tmp_path: Path) -> None:
    from eaglepipe.target.info import load_tokenizer

    cfg = BenchCfg(engine="url", sweep=[SweepPoint(3, 1, 4)], max_new_tokens=6, warmup_prompts=0,
                   prompts=PromptsCfg(num_prompts=1, multi_turn=False))
    with start_server(tiny_llama_dir, tmp_path / "spec.log", draft=tiny_export / "sglang") as spec:
        spec.wait_healthy(120)
        rows = run_sweep(ServerEngine(spec.base_url, cfg), load_tokenizer(tiny_llama_dir),
                         load_prompts(cfg.prompts), cfg)
    (point,) = rows
    assert point.tau is not None and point.speedup is None and point.outputs_match is None
    assert overall_metrics(rows)["best_speedup"] is None


# ---------------------------------------------------------------------------- the stage end to end
def run_bench_stage(params: Path, target: Path, export: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eaglepipe.stages.bench", "--params", str(params),
                           "--target", str(target), "--export", str(export), "--out", str(out)],
                          cwd=REPO, env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=1200)


def check_bench_outputs(out: Path, names: list[str]) -> dict:
    """The declared outputs exist and agree with each other; returns metrics.json."""
    assert sorted(p.stem for p in (out / "points").iterdir()) == sorted(names)
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert sorted(r["name"] for r in rows) == sorted(names)
    metrics = json.loads((out / "metrics.json").read_text())
    for r in rows:
        point = json.loads((out / "points" / f"{r['name']}.json").read_text())
        assert point["completion_tokens"] == int(r["completion_tokens"]) > 0
        if point["config"] != "baseline":
            assert len(point["accept_rate"]) == point["num_steps"]
            assert float(r["tau"]) == pytest.approx(point["completion_tokens"] / point["verify_rounds"], rel=1e-6)
            assert 1.0 <= point["tau"] <= point["num_steps"] + 1 + 1e-9
    assert {p.name for p in (out / "plots").iterdir()} >= {"tau.png", "speedup.png", "acceptance.png"}
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in (out / "plots").iterdir())
    best = (out / "best_command.txt").read_text()
    assert best.startswith("python -m sglang.launch_server --model-path ")
    assert "--speculative-algorithm EAGLE3 --speculative-draft-model-path " in best
    steps, topk, ndt = (int(x[1:]) for x in (metrics["best_speedup_config"] or metrics["best_tau_config"]).split("_"))
    assert (f"--speculative-num-steps {steps} --speculative-eagle-topk {topk} "
            f"--speculative-num-draft-tokens {ndt}") in best
    readme = (out / "README.md").read_text()
    assert "| config | T | τ |" in readme and best.strip() in readme
    return metrics


def test_bench_stage_end_to_end_native_tiny(tiny_llama_dir: Path, tiny_export: Path, tmp_path: Path) -> None:
    """The native engine with two fast paths forced on (on CPU: their static bodies run eagerly): every output
    matches, and metrics.json records the paths that ran."""
    params = params_file(tmp_path, {"prompts": {"source": "mtbench", "num_prompts": 2, "multi_turn": True},
                                    "sweep": [{"num_steps": 3, "topk": 1, "num_draft_tokens": 4},
                                              {"num_steps": 2, "topk": 2, "num_draft_tokens": 4}],
                                    "temperatures": [0.0, 1.0], "max_new_tokens": 10, "baseline_runs": 2,
                                    "engine_options": {"prefill_graphs": True, "graph_rounds": True}})
    out = tmp_path / "results" / "bench"
    proc = run_bench_stage(params, tiny_llama_dir, tiny_export, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [f"{c}_t{t}" for t in ("0.0", "1.0") for c in ("baseline", "s3_k1_n4", "s2_k2_n4")]
    metrics = check_bench_outputs(out, names)
    assert metrics["all_outputs_match"] is True and metrics["temperature"] == 0.0
    assert metrics["best_tau_config"] in ("s3_k1_n4", "s2_k2_n4") and metrics["baseline_tok_s"] > 0
    runs = metrics["baseline_runs"]  # the greedy baseline ran twice, the same outputs both times
    assert len(runs["decode_tok_s"]) == 2 and runs["repeat_match_fraction"] == 1.0
    assert metrics["baseline_tok_s"] == pytest.approx(max(runs["decode_tok_s"]))
    draft = str((tiny_export / "sglang").resolve())
    assert metrics["drafter"] == {"path": draft, "source": "--export", "warnings": []}
    assert metrics["engine"] == "native"
    assert metrics["engine_options"] == {"token_path": False, "cuda_graphs": False, "prefill_graphs": True,
                                         "graph_rounds": True}
    readme = (out / "README.md").read_text()
    assert f"drafter `{draft}` (from the export stage)" in readme
    assert "native engine on cpu (fast paths: prefill_graphs, graph_rounds)" in readme
    assert (out / "plots" / "temperature.png").exists()
    rows = {r["name"]: r for r in csv.DictReader((out / "sweep.csv").open())}
    assert rows["s3_k1_n4_t1.0"]["outputs_match"] == "n/a" and rows["s3_k1_n4_t0.0"]["outputs_match"] == "true"
    assert "Best SGLang command:" in proc.stdout and "| s3_k1_n4 | 0 |" in proc.stdout
    # each point saw 2 prompts x 2 turns; turn 2 was rendered on top of the point's own first answer
    point = json.loads((out / "points" / "s2_k2_n4_t0.0.json").read_text())
    assert sorted((s["prompt"], s["turn"]) for s in point["extra"]["samples"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.slow
def test_bench_stage_end_to_end_on_the_embedded_default(tmp_path: Path) -> None:
    """The embedded default (packaged SmolLM2, ShareGPT, MT-bench) through every real stage, scaled down so the
    drafter trains for a few steps, then the bench stage with its two default sweep points."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["device"] = "cpu"
    data["data"]["max_samples"] = 24
    data["data"]["seq_length"] = 256
    data["regen"]["backend"] = "none"
    data["train"].update({"max_steps": 8, "micro_batch_size": 2, "eval_every": 8, "save_every": 8, "log_every": 4})
    data["export"]["dtype"] = "float32"
    data["bench"].update({"prompts": {**data["bench"]["prompts"], "num_prompts": 2}, "max_new_tokens": 24})
    params_from_dict(data)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    r = tmp_path / "results"
    steps = [
        ("fetch_target", "--out", r / "target"),
        ("download", "--out", r / "data/raw"),
        ("normalize", "--raw", r / "data/raw", "--out", r / "data/chat"),
        ("regenerate", "--target", r / "target", "--chat", r / "data/chat", "--out", r / "data/regen"),
        ("tokenize", "--target", r / "target", "--chat", r / "data/regen", "--out", r / "data/tokens"),
        ("vocab", "--tokens", r / "data/tokens", "--out", r / "vocab"),
        ("hidden_states", "--target", r / "target", "--tokens", r / "data/tokens", "--vocab", r / "vocab",
         "--out", r / "hidden"),
        ("train", "--target", r / "target", "--tokens", r / "data/tokens", "--vocab", r / "vocab",
         "--hidden", r / "hidden", "--out", r / "train"),
        ("export", "--target", r / "target", "--train", r / "train", "--out", r / "export"),
    ]
    for stage, *args in steps:
        proc = subprocess.run([sys.executable, "-m", f"eaglepipe.stages.{stage}", "--params", str(params),
                               *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=1800,
                              env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin",
                                   "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, f"{stage} failed:\n{proc.stderr[-3000:]}"
    out = r / "bench"
    proc = run_bench_stage(params, r / "target", r / "export", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = check_bench_outputs(out, ["baseline_t0.0", "s3_k1_n4_t0.0", "s5_k4_n8_t0.0"])
    # greedy speculative decoding of the real model is lossless for both configs, over both MT-bench turns
    assert metrics["all_outputs_match"] is True
    for name in ("s3_k1_n4_t0.0", "s5_k4_n8_t0.0"):
        point = json.loads((out / "points" / f"{name}.json").read_text())
        assert point["num_samples"] == 4 and point["match_fraction"] == 1.0
    assert "Best SGLang command:" in proc.stdout
