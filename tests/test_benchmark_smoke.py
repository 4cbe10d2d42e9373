"""Every GPU benchmark script runs end to end on the tiny random Llama (`--smoke`, CPU) and writes its results row,
so a broken script is caught here and not on a GPU lease."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

SCRIPTS = {
    "decode": ["--model"],
    "prefill": ["--model"],
    "prefix_reuse_check": ["--model"],
    "regen": ["--model"],
    "train": ["--model"],
    "spec_decode": ["--target", "--hf-prompts", "1"],
    "spec_decode_both_turns": ["--target", "--both-turns", "--no-hf", "--row-name", "mtbench_quality"],
    "round_profile": ["--target"],
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_benchmark_script_smoke(tiny_llama_dir, tmp_path, name):
    flag, *extra = SCRIPTS[name]
    script = REPO / "benchmarks" / f"{name.removesuffix('_both_turns')}.py"
    results = tmp_path / "RESULTS.md"
    done = subprocess.run([sys.executable, str(script), flag, str(tiny_llama_dir), "--smoke", "--results",
                           str(results), *extra], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, done.stdout[-2000:]
    rows = [line for line in results.read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 1 and f"benchmarks/{script.name}" in rows[0]
    records = [json.loads(line) for line in results.with_name("results.jsonl").read_text().splitlines()]
    assert len(records) == 1 and f"benchmarks/{script.name}" in records[0]["command"]
    if "--row-name" in extra:  # the structured figures a final-quality row is read from
        assert records[0]["name"] == extra[extra.index("--row-name") + 1]
        points = records[0]["figures"]["points"]
        assert points and all(p["tau"] >= 1.0 and 0.0 <= p["output_match"] <= 1.0 for p in points.values())
        assert records[0]["baselines"]["engine_tok_s"] > 0


def test_a_results_row_joins_the_log_table_not_the_write_ups_after_it(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmarks_decode", REPO / "benchmarks" / "decode.py")
    decode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode)
    append_result_row = decode.append_result_row
    results = tmp_path / "RESULTS.md"
    append_result_row(results, "first", "cpu", "cmd", "r1", "b1")
    results.write_text(results.read_text() + "\n## A write-up\n\n| its | own table |\n|---|---|\n")
    append_result_row(results, "second", "cpu", "cmd", "r2", "b2")
    lines = results.read_text().splitlines()
    log = [i for i, line in enumerate(lines) if line.startswith("| 20")]
    assert [lines[i].split(" | ")[1] for i in log] == ["first", "second"] and log[1] == log[0] + 1
    assert lines[-2:] == ["| its | own table |", "|---|---|"]
    assert len(results.with_name("results.jsonl").read_text().splitlines()) == 2


def test_rows_appended_to_the_results_log_leave_the_commit_clean(tmp_path):
    """A row records the measured code's commit: the results log it was just appended to does not make it
    `+dirty`, a change to any other tracked file does."""
    spec = importlib.util.spec_from_file_location("benchmarks_decode", REPO / "benchmarks" / "decode.py")
    decode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "benchmarks").mkdir()
    for name in (*decode.RESULT_LOGS, "code.py"):
        (tmp_path / name).write_text("x\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "."], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "c"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    for name in decode.RESULT_LOGS:
        (tmp_path / name).write_text("x\nrow\n")
    assert decode.git_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("y\n")
    assert decode.git_commit(tmp_path) == head + "+dirty"


def test_a_git_archive_of_the_checkout_names_its_commit(tmp_path):
    """The GPU boxes get the tree as `git archive` output, without .git: its rows name the archived commit (the
    checkout's own .gitattributes and commit file, in a repository of their own)."""
    spec = importlib.util.spec_from_file_location("benchmarks_decode", REPO / "benchmarks" / "decode.py")
    decode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode)
    repo, tree = tmp_path / "repo", tmp_path / "tree"
    (repo / "benchmarks").mkdir(parents=True)
    tree.mkdir()
    for name in (".gitattributes", decode.ARCHIVE_COMMIT):
        (repo / name).write_text((REPO / name).read_text())
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "c"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                          text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=repo, capture_output=True, check=True).stdout
    subprocess.run(["tar", "x", "-C", str(tree)], input=archive, check=True)
    assert decode.git_commit(tree) == head
    assert decode.git_commit(repo / "benchmarks") == head  # the checkout itself answers through git
    (tree / decode.ARCHIVE_COMMIT).write_text((REPO / decode.ARCHIVE_COMMIT).read_text())  # as checked out
    assert decode.git_commit(tree) == "unknown"


def test_train_benchmark_on_a_runs_rows_with_the_profiler(tiny_llama_dir, tmp_path):
    """--samples feeds the tokenize stage's rows in place of synthetic ones; --profile writes the op tables; the
    row's figures and config go to results.jsonl."""
    from eaglepipe.data.tokens_io import write_token_shards

    rng = np.random.default_rng(0)
    lengths = rng.integers(40, 200, 24)
    write_token_shards(tmp_path / "tokens", "train", [
        {"id": f"r{i}", "input_ids": rng.integers(0, 1000, n).astype(np.int32),
         "loss_mask": (np.arange(n) >= n // 2).astype(np.int8)} for i, n in enumerate(lengths)])
    profile = tmp_path / "profile.txt"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train.py"), "--model", str(tiny_llama_dir),
                           "--smoke", "--samples", str(tmp_path / "tokens"), "--profile", str(profile),
                           "--metrics-every", "2", "--results", str(tmp_path / "RESULTS.md")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert row["samples"] == str(tmp_path / "tokens") and row["profiled"] is True and row["metrics_every"] == 2
    record = json.loads((tmp_path / "results.jsonl").read_text())
    assert record["name"] == "train" and record["figures"] == row and record["config"]["metrics_every"] == 2
    text = profile.read_text()
    assert "### by CPU time" in text and "aten::" in text


def test_train_ops_counts_a_steps_ops_eager_and_compiled(tmp_path):
    """benchmarks/train_ops.py counts the host's ops of a drafter training step both ways and writes its row;
    train.compile (the step's pre-attention work and the layer's o_proj + MLP compiled) issues fewer."""
    results = tmp_path / "RESULTS.md"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_ops.py"), "--ttt-steps", "2",
                           "--draft-vocab", "512", "--results", str(results)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert 0 < figures["compiled_ops"] < figures["eager_ops"]
    assert 0 < figures["compiled_ops_without_metrics"] < figures["compiled_ops"]
    record = json.loads(results.with_name("results.jsonl").read_text())
    assert record["name"] == "train_ops" and record["figures"]["eager_ops"] == figures["eager_ops"]


def test_train_loop_benchmark_times_the_stages_own_loop_with_host_and_op_profiles(tiny_llama_dir, tmp_path):
    """benchmarks/train_loop.py runs the train stage's Trainer on a run's folders with the params' recipe: warm-up,
    timed steps (their history rows and garbage-collector time), a cProfile and profiler tables of more steps; its
    row goes to results.jsonl and the run's folders keep no checkpoint of it."""
    import yaml

    from eaglepipe.config import Config, to_dict
    from eaglepipe.data.tokens_io import write_token_shards
    from eaglepipe.data.vocab import build_vocab_maps, save_vocab

    rng = np.random.default_rng(0)
    run = tmp_path / "results" / "exp"
    samples = []
    for i, n in enumerate(rng.integers(40, 120, 40)):
        samples.append({"id": f"r{i}", "input_ids": rng.integers(0, 1000, n).astype(np.int32),
                        "loss_mask": (np.arange(n) >= n // 2).astype(np.int8)})
    write_token_shards(run / "data" / "tokens", "train", samples)
    freq = torch.zeros(49152, dtype=torch.long)
    for s in samples:
        freq.index_add_(0, torch.from_numpy(s["input_ids"].astype(np.int64)), torch.ones(len(s["input_ids"]),
                                                                                          dtype=torch.long))
    save_vocab(run / "vocab", *build_vocab_maps(freq, 256), freq)
    shutil.copytree(tiny_llama_dir, run / "target")
    params = to_dict(Config())
    params["device"], params["data"]["seq_length"], params["vocab"]["draft_vocab_size"] = "cpu", 256, 256
    params["train"].update(max_steps=12, micro_batch_size=2, ttt_steps=2, log_every=2, metrics_every=2,
                           eval_every=100, save_every=100, loss="lk_alpha")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cprofile, profile, results = tmp_path / "host.txt", tmp_path / "ops.txt", tmp_path / "RESULTS.md"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_loop.py"), "--params",
                           str(tmp_path / "params.yaml"), "--run", str(run), "--warmup", "2", "--steps", "4",
                           "--profile-steps", "2", "--cprofile", str(cprofile), "--profile", str(profile),
                           "--results", str(results)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "results.jsonl").read_text())
    figures = record["figures"]
    assert record["name"] == "train_loop" and figures["loss"] == "lk_alpha" and figures["metrics_every"] == 2
    assert figures["seconds_per_step"] > 0 and len(figures["history_step_seconds"]) == 2
    assert figures["gc_seconds_per_step"] >= 0 and figures["gpu_busy_seconds_per_step"] is None
    host = cprofile.read_text()
    assert "(_forward)" in host and "### by cumulative" in host and "save_checkpoint" not in host  # saved after
    assert "### by CPU time" in profile.read_text()
    assert not (run / ".work").exists() and not (run / "train").exists()
    too_many = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_loop.py"), "--params",
                               str(tmp_path / "params.yaml"), "--run", str(run), "--warmup", "10", "--steps", "4",
                               "--results", str(results)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert too_many.returncode != 0 and "fewer than the 14 asked for" in too_many.stderr
