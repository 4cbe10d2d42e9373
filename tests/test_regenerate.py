"""The regenerate stage: backends, turn policy, resume after SIGKILL, server restarts, refusal to mix outputs."""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import yaml

from eaglepipe.data.chat_io import read_conversations, write_conversations
from eaglepipe.regen.conversation import ConversationRejected, TurnPolicy, plan_turns
from eaglepipe.regen.launch import ServerProcess, free_port, native_command

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers
def make_chat(chat_dir: Path, n: int) -> list[dict[str, Any]]:
    """n conversations (some multi-turn with a system prompt) plus one without an answer."""
    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                {"role": "assistant", "content": f"It is {2 * i}."}]
        if i % 3 == 0:
            msgs = [{"role": "system", "content": "Be brief."}] + msgs + [
                {"role": "user", "content": "And times two?"}, {"role": "assistant", "content": f"{4 * i}"}]
        rows.append({"id": f"t:{i}", "source": "t", "messages": msgs})
    rows.insert(n // 2, {"id": "t:unanswered", "source": "t", "messages": [{"role": "user", "content": "hello?"}]})
    write_conversations(chat_dir / "chat.parquet", rows)
    return rows


def write_params(path: Path, **regen: Any) -> Path:
    """The repo's params.yaml on CPU with `regen` overrides (nested dicts merged)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["device"] = "cpu"
    for key, value in regen.items():
        if isinstance(value, dict):
            params["regen"][key].update(value)
        else:
            params["regen"][key] = value
    path.write_text(yaml.safe_dump(params))
    return path


def stage_cmd(params: Path, target: Path, chat: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "eaglepipe.stages.regenerate", "--params", str(params), "--target", str(target),
            "--chat", str(chat), "--out", str(out)]


def stage_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src")}


def run_stage(params: Path, target: Path, chat: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(stage_cmd(params, target, chat, out), cwd=REPO, env=stage_env(), capture_output=True,
                          text=True, timeout=600)


def start_stage(params: Path, target: Path, chat: Path, out: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(stage_cmd(params, target, chat, out), cwd=REPO, env=stage_env(), stdout=f,
                                stderr=subprocess.STDOUT)


def committed(out: Path) -> int:
    """Committed shards in the experiment's regenerate work dirs."""
    return len(list((out.parent.parent / ".work" / "regenerate").glob("*/shard-*.parquet")))


def wait_for(cond, proc: subprocess.Popen | None = None, timeout: float = 300.0) -> bool:
    """Poll `cond` until true; False if `proc` exits first. (A safety net, not a timed assertion.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError("condition not reached")


def kill_at_random_points(params: Path, target: Path, chat: Path, out: Path, log: Path, rng: random.Random,
                          attempts: int) -> int:
    """Start the stage `attempts` times and SIGKILL each run: the first at a random moment (possibly before any
    shard), later ones just after one or two more shards were committed. Returns how many runs were killed."""
    kills = 0
    for attempt in range(attempts):
        proc = start_stage(params, target, chat, out, log)
        if attempt == 0:
            time.sleep(rng.uniform(0.1, 1.0))
        else:
            target_shards = committed(out) + rng.randint(1, 2)
            wait_for(lambda: committed(out) >= target_shards, proc)
            time.sleep(rng.uniform(0.0, 0.1))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    return kills


def published(out: Path) -> tuple[list[dict], list[dict]]:
    rows = list(read_conversations(out))
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    return rows, rejects


def assert_complete_and_ordered(out: Path, chat_rows: list[dict]) -> None:
    rows, rejects = published(out)
    ids = [r["id"] for r in rows] + [r["id"] for r in rejects]
    assert sorted(ids) == sorted(c["id"] for c in chat_rows) and len(set(ids)) == len(ids)
    order = {c["id"]: i for i, c in enumerate(chat_rows)}
    assert [order[r["id"]] for r in rows] == sorted(order[r["id"]] for r in rows)
    assert not list(out.parent.glob(f".{out.name}.*"))


@contextlib.contextmanager
def running_server(model_dir: Path, log_dir: Path, port: int | None = None) -> Iterator[ServerProcess]:
    port = port or free_port()
    cmd = native_command(model_dir, port, max_batch_size=8, max_model_len=512, device="cpu")
    server = ServerProcess(cmd, f"http://127.0.0.1:{port}", log_dir / f"server-{port}-{time.monotonic_ns()}.log")
    server.start()
    try:
        server.wait_healthy(180)
        yield server
    finally:
        server.stop()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def hf_greedy_text(model_dir: Path, messages: list[dict], n: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def url_server(tiny_llama_dir, tmp_path_factory) -> Iterator[str]:
    with running_server(tiny_llama_dir, tmp_path_factory.mktemp("url-server")) as srv:
        yield srv.base_url


# ----------------------------------------------------------------------------- turn policy (pure)
def test_plan_turns_modes_and_system_policy():
    msgs = [{"role": "assistant", "content": "greeting"}, {"role": "system", "content": "S"},
            {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
            {"role": "user", "content": "dangling"}]
    work, turns = plan_turns(msgs, TurnPolicy("all"))
    assert [m["content"] for m in work] == ["S", "q1", "a1", "q2", "a2"] and turns == [2, 4]
    assert plan_turns(msgs, TurnPolicy("last"))[1] == [4]
    dropped, turns = plan_turns(msgs, TurnPolicy("all", "drop"))
    assert [m["role"] for m in dropped] == ["user", "assistant", "user", "assistant"] and turns == [1, 3]
    no_sys = [m for m in msgs if m["role"] != "system"]
    added, _ = plan_turns(no_sys, TurnPolicy("last", "default", "Be kind."))
    assert added[0] == {"role": "system", "content": "Be kind."}
    assert plan_turns(msgs, TurnPolicy("last", "default", "Be kind."))[0][0]["content"] == "S"
    with pytest.raises(ConversationRejected, match="no assistant turn"):
        plan_turns([{"role": "user", "content": "q"}], TurnPolicy())
    with pytest.raises(ConversationRejected, match="no user turn"):
        plan_turns([{"role": "assistant", "content": "a"}], TurnPolicy())


# ----------------------------------------------------------------------------- backends


def test_native_server_command_carries_prefix_reuse(tmp_path):
    """regen.prefix_reuse: false reaches the server as --no-prefix-reuse, which the server's parser accepts."""
    from eaglepipe.config import load_params
    from eaglepipe.regen.backends import launch_command
    from eaglepipe.server.serve import parse_args

    for reuse in (True, False):
        cfg = load_params(write_params(tmp_path / f"p{reuse}.yaml", backend="native", prefix_reuse=reuse))
        cmd = launch_command(cfg.regen, tmp_path, "cpu", 30001)
        assert ("--no-prefix-reuse" in cmd) is not reuse
        assert parse_args(cmd[cmd.index("eaglepipe.server.serve") + 1:]).no_prefix_reuse is not reuse

def test_none_backend_copies_conversations_unchanged(tiny_llama_dir, tmp_path):
    chat_rows = make_chat(tmp_path / "chat", 9)
    out = tmp_path / "exp" / "data" / "regen"
    res = run_stage(write_params(tmp_path / "p.yaml", backend="none", shard_size=4), tiny_llama_dir,
                    tmp_path / "chat", out)
    assert res.returncode == 0, res.stderr
    rows, rejects = published(out)
    assert rows == chat_rows and rejects == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "none" and manifest["counts"]["regenerated"] == len(chat_rows)
    assert sorted(p.name for p in out.glob("*.parquet")) == ["shard-00000.parquet", "shard-00001.parquet",
                                                             "shard-00002.parquet"]


def test_native_backend_end_to_end_with_sigkill_leaves_no_server(tiny_llama_dir, tmp_path):
    chat_rows = make_chat(tmp_path / "chat", 30)
    params = write_params(tmp_path / "p.yaml", backend="native", mode="last", max_new_tokens=8, shard_size=3,
                          concurrency=2, max_model_len=512)
    out = tmp_path / "exp" / "data" / "regen"
    proc = start_stage(params, tiny_llama_dir, tmp_path / "chat", out, tmp_path / "stage.log")
    if wait_for(lambda: committed(out) >= 2, proc):
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    server_log = next((out.parent.parent / ".work" / "regenerate").glob("*/native-server.log"))
    port = int(server_log.read_text().split("--port ")[1].split()[0])
    wait_for(lambda: not port_open(port), timeout=60)  # the orphaned server exits with its parent

    res = run_stage(params, tiny_llama_dir, tmp_path / "chat", out)
    assert res.returncode == 0, res.stderr
    assert_complete_and_ordered(out, chat_rows)
    rows, rejects = published(out)
    assert [r["id"] for r in rejects] == ["t:unanswered"] and "no assistant turn" in rejects[0]["reason"]
    by_id = {c["id"]: c for c in chat_rows}
    for row in rows:
        original = by_id[row["id"]]["messages"]
        assert row["messages"][:-1] == original[:len(row["messages"]) - 1]  # earlier turns kept as they were
        assert row["messages"][-1]["role"] == "assistant" and row["messages"][-1]["content"].strip()
    for row in rows[:3]:
        assert row["messages"][-1]["content"] == hf_greedy_text(tiny_llama_dir, row["messages"][:-1], 8)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["backend"] == "native" and "eaglepipe.server.serve" in stats["server_command"]
    assert stats["resumed_conversations"] > 0 and stats["regenerated"] == len(rows)
    assert stats["output_tokens_per_s"] > 0
    assert "backend: native" in res.stderr and "eaglepipe.server.serve" in res.stderr and "output tok/s" in res.stderr
    engine = stats["server_stats"]["engine"]  # the resumed run's own server: its requests only
    assert 0 < engine["requests_finished"] <= stats["run_conversations"]
    tokenized = stats["server_stats"]["server"]["tokenize_tokens"]
    assert tokenized == engine["prefill_tokens"] + engine["prefill_reused_tokens"]
    assert "mean decode batch" in res.stderr


def test_sglang_dry_run_prints_the_exact_command(tiny_llama_dir, tmp_path):
    make_chat(tmp_path / "chat", 2)
    params = write_params(tmp_path / "p.yaml", backend="sglang",
                          sglang={"dry_run": True, "dp_size": 2, "tp_size": 1, "port": 30123,
                                  "mem_fraction_static": 0.8, "extra_args": ["--dtype", "bfloat16"]})
    out = tmp_path / "exp" / "data" / "regen"
    res = run_stage(params, tiny_llama_dir, tmp_path / "chat", out)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (f"python3 -m sglang.launch_server --model-path {tiny_llama_dir} --dp-size 2 "
                                  "--tp-size 1 --port 30123 --mem-fraction-static 0.8 --host 127.0.0.1 "
                                  "--dtype bfloat16")
    assert "SGLang command" in res.stderr and not out.exists()


def test_sglang_launch_failure_is_a_clear_error(tiny_llama_dir, tmp_path):
    make_chat(tmp_path / "chat", 2)
    params = write_params(tmp_path / "p.yaml", backend="sglang", sglang={"python": str(tmp_path / "no-python")})
    res = run_stage(params, tiny_llama_dir, tmp_path / "chat", tmp_path / "exp" / "data" / "regen")
    assert res.returncode == 2 and "cannot start the server" in res.stderr and "no-python" in res.stderr


def test_native_server_that_dies_reports_its_log(tmp_path):
    make_chat(tmp_path / "chat", 2)
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    res = run_stage(write_params(tmp_path / "p.yaml", backend="native"), broken, tmp_path / "chat",
                    tmp_path / "exp" / "data" / "regen")
    assert res.returncode == 2
    assert "server exited with code" in res.stderr and "native-server.log" in res.stderr


def test_empty_answers_are_rejected_with_reason(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    silent = tmp_path / "silent-model"  # a real model whose lm_head always prefers a special token
    shutil.copytree(tiny_llama_dir, silent)
    weights = load_file(silent / "model.safetensors")
    weights["lm_head.weight"] = torch.zeros_like(weights["lm_head.weight"])
    save_file(weights, silent / "model.safetensors", metadata={"format": "pt"})
    make_chat(tmp_path / "chat", 3)
    out = tmp_path / "exp" / "data" / "regen"
    res = run_stage(write_params(tmp_path / "p.yaml", backend="native", max_new_tokens=4), silent,
                    tmp_path / "chat", out)
    assert res.returncode == 2 and "every conversation was rejected" in res.stderr
    assert "empty answer from the model" in res.stderr and not out.exists()
    metas = [json.loads(p.read_text()) for p in (tmp_path / "exp" / ".work").rglob("shard-*.meta.json")]
    reasons = [r["reason"] for m in metas for r in m["rejects"]]
    assert len(reasons) == 4 and sum("empty answer" in r for r in reasons) == 3


# ----------------------------------------------------------------------------- resume and failures
def test_sigkill_at_random_points_then_resume_is_exact(url_server, tiny_llama_dir, tmp_path):
    # 24 shards: enough that five interrupted attempts, each past at most two more shards, never finish the run.
    chat_rows = make_chat(tmp_path / "chat", 96)
    params = write_params(tmp_path / "p.yaml", backend="url", url=url_server, mode="all", max_new_tokens=8,
                          shard_size=4, concurrency=2)
    reference = tmp_path / "ref" / "data" / "regen"
    res = run_stage(params, tiny_llama_dir, tmp_path / "chat", reference)
    assert res.returncode == 0, res.stderr

    out = tmp_path / "exp" / "data" / "regen"
    kills = kill_at_random_points(params, tiny_llama_dir, tmp_path / "chat", out, tmp_path / "stage.log",
                                  random.Random(1234), attempts=5)
    assert kills >= 3
    res = run_stage(params, tiny_llama_dir, tmp_path / "chat", out)
    assert res.returncode == 0, res.stderr
    assert_complete_and_ordered(out, chat_rows)
    assert published(out) == published(reference)
    work = next((out.parent.parent / ".work" / "regenerate").iterdir())
    assert not list(work.glob(".*.tmp"))


def test_server_killed_mid_run_and_restarted(tiny_llama_dir, tmp_path):
    chat_rows = make_chat(tmp_path / "chat", 40)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    params = write_params(tmp_path / "p.yaml", backend="url", url=url, mode="all", max_new_tokens=8, shard_size=4,
                          concurrency=2, max_retries=10, retry_backoff_s=0.2)
    out = tmp_path / "exp" / "data" / "regen"
    reference = tmp_path / "ref" / "data" / "regen"
    with running_server(tiny_llama_dir, tmp_path, port) as first:
        assert run_stage(params, tiny_llama_dir, tmp_path / "chat", reference).returncode == 0
        proc = start_stage(params, tiny_llama_dir, tmp_path / "chat", out, tmp_path / "stage.log")
        assert wait_for(lambda: committed(out) >= 2, proc)
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
    with running_server(tiny_llama_dir, tmp_path, port):
        assert proc.wait(timeout=300) == 0, (tmp_path / "stage.log").read_text()
    assert_complete_and_ordered(out, chat_rows)
    rows, rejects = published(out)
    ref_rows, ref_rejects = published(reference)
    assert rows == [r for r in ref_rows if r["id"] in {x["id"] for x in rows}]
    assert {r["id"] for r in rejects} - {r["id"] for r in ref_rejects} == \
        {c["id"] for c in chat_rows} - {r["id"] for r in rows} - {r["id"] for r in ref_rejects}


def test_stage_stops_when_the_server_is_gone(tiny_llama_dir, tmp_path):
    make_chat(tmp_path / "chat", 40)
    port = free_port()
    params = write_params(tmp_path / "p.yaml", backend="url", url=f"http://127.0.0.1:{port}", mode="all",
                          max_new_tokens=8, shard_size=4, concurrency=2, max_retries=1, retry_backoff_s=0.1)
    out = tmp_path / "exp" / "data" / "regen"
    with running_server(tiny_llama_dir, tmp_path, port) as srv:
        proc = start_stage(params, tiny_llama_dir, tmp_path / "chat", out, tmp_path / "stage.log")
        assert wait_for(lambda: committed(out) >= 1, proc)
        os.killpg(srv.proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=300) == 2
    log = (tmp_path / "stage.log").read_text()
    assert "stopped answering" in log and "rerun to resume" in log and not out.exists()
    work = next((out.parent.parent / ".work" / "regenerate").iterdir())
    for meta in work.glob("shard-*.meta.json"):  # nothing committed as rejected because the server was down
        assert json.loads(meta.read_text())["rejected"] <= 1


def test_changed_parameters_never_mix(url_server, tiny_llama_dir, tmp_path):
    make_chat(tmp_path / "chat", 40)
    chat, out = tmp_path / "chat", tmp_path / "exp" / "data" / "regen"
    base = dict(backend="url", url=url_server, mode="all", max_new_tokens=8, shard_size=4, concurrency=2)
    proc = start_stage(write_params(tmp_path / "a.yaml", **base), tiny_llama_dir, chat, out, tmp_path / "a.log")
    if wait_for(lambda: committed(out) >= 1, proc):
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    (first_work,) = (out.parent.parent / ".work" / "regenerate").iterdir()
    before = {p.name: p.stat().st_mtime_ns for p in first_work.glob("shard-*.parquet")}

    res = run_stage(write_params(tmp_path / "b.yaml", **{**base, "shard_size": 5}), tiny_llama_dir, chat, out)
    assert res.returncode == 2
    assert "refusing to resume" in res.stderr and "shard_size: was 4, now 5" in res.stderr

    res = run_stage(write_params(tmp_path / "c.yaml", **{**base, "max_new_tokens": 3}), tiny_llama_dir, chat, out)
    assert res.returncode == 0, res.stderr
    assert len(list((out.parent.parent / ".work" / "regenerate").iterdir())) == 2  # its own work dir
    assert json.loads((out / "manifest.json").read_text())["params"]["max_new_tokens"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in first_work.glob("shard-*.parquet")} == before

    manifest = json.loads((first_work / "manifest.json").read_text())
    manifest["source_hash"] = "0" * 64
    (first_work / "manifest.json").write_text(json.dumps(manifest))
    res = run_stage(write_params(tmp_path / "a.yaml", **base), tiny_llama_dir, chat, out)
    assert res.returncode == 2 and "refusing to resume" in res.stderr and "source_hash" in res.stderr


def test_context_overflow_truncates_later_turns_and_rejects_first(url_server, tiny_llama_dir, tmp_path):
    long = "word " * 700  # beyond the test server's max_model_len of 512
    rows = [{"id": "c:late", "source": "c", "messages": [
                {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": long}, {"role": "assistant", "content": "ok"}]},
            {"id": "c:early", "source": "c", "messages": [
                {"role": "user", "content": long}, {"role": "assistant", "content": "ok"}]}]
    write_conversations(tmp_path / "chat" / "chat.parquet", rows)
    out = tmp_path / "exp" / "data" / "regen"
    res = run_stage(write_params(tmp_path / "p.yaml", backend="url", url=url_server, mode="all", max_new_tokens=4),
                    tiny_llama_dir, tmp_path / "chat", out)
    assert res.returncode == 0, res.stderr
    kept, rejects = published(out)
    assert [r["id"] for r in kept] == ["c:late"] and [m["role"] for m in kept[0]["messages"]] == ["user", "assistant"]
    assert kept[0]["messages"][1]["content"] != "hello"
    assert [r["id"] for r in rejects] == ["c:early"] and "max_model_len" in rejects[0]["reason"]


# ----------------------------------------------------------------------------- fitting the history
def long_history_chat(chat_dir: Path) -> list[dict[str, Any]]:
    """One short conversation, one whose history outgrows 256 tokens, one whose last question alone does."""
    def words(tag: str, n: int) -> str:
        return " ".join(f"{tag}{i}" for i in range(n))
    long = [{"role": "system", "content": "Be brief."}]
    for k in range(4):
        long += [{"role": "user", "content": words(f"q{k}x", 40)},
                 {"role": "assistant", "content": words(f"a{k}y", 20)}]
    long += [{"role": "user", "content": "And finally?"}, {"role": "assistant", "content": "Done."}]
    rows = [{"id": "f:short", "source": "f", "messages": [{"role": "user", "content": "Hi?"},
                                                           {"role": "assistant", "content": "Hello."}]},
            {"id": "f:long", "source": "f", "messages": long},
            {"id": "f:hopeless", "source": "f", "messages": [
                {"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"},
                {"role": "user", "content": words("z", 300)}, {"role": "assistant", "content": "no"}]}]
    write_conversations(chat_dir / "chat.parquet", rows)
    return rows


def test_history_fit_drops_the_fewest_oldest_exchanges(tiny_llama_dir, tmp_path):
    from eaglepipe.regen.fit import HistoryFit, prompt_counter
    from eaglepipe.target.info import load_tokenizer

    rows = long_history_chat(tmp_path)
    count = prompt_counter(load_tokenizer(tiny_llama_dir))
    fit = HistoryFit(TurnPolicy("last"), 248, count)
    short = rows[0]["messages"]
    assert fit(short) == (short, 0)
    msgs, dropped = fit(rows[1]["messages"])
    original = rows[1]["messages"]
    assert dropped > 0 and dropped % 2 == 0 and msgs == original[:1] + original[1 + dropped:]
    assert count(msgs[:-1]) <= 248 < count(original[:1] + original[dropped - 1:-1])  # one exchange more is too long
    with pytest.raises(ConversationRejected, match="the last user turn alone needs") as err:
        fit(rows[2]["messages"])
    assert err.value.category == "prompt too long"


def test_native_last_mode_trims_histories_and_counts_what_it_drops(tiny_llama_dir, tmp_path):
    from eaglepipe.regen.fit import prompt_counter
    from eaglepipe.target.info import load_tokenizer

    chat_rows = long_history_chat(tmp_path / "chat")
    params = write_params(tmp_path / "p.yaml", backend="native", mode="last", max_new_tokens=8, max_model_len=512,
                          trim_history_to=256, concurrency=2)
    out = tmp_path / "exp" / "data" / "regen"
    res = run_stage(params, tiny_llama_dir, tmp_path / "chat", out)
    assert res.returncode == 0, res.stderr
    rows, rejects = published(out)
    assert [r["id"] for r in rows] == ["f:short", "f:long"]
    long, original = rows[1]["messages"], chat_rows[1]["messages"]
    assert long[0] == original[0] and long[1:-1] == original[len(original) - len(long) + 1:-1]
    assert len(long) < len(original) and prompt_counter(load_tokenizer(tiny_llama_dir))(long[:-1]) <= 248
    assert long[-1]["content"] == hf_greedy_text(tiny_llama_dir, long[:-1], 8)
    assert [(r["id"], r["category"]) for r in rejects] == [("f:hopeless", "prompt too long")]
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["rows_in"], stats["rows_out"], stats["dropped"]) == (3, 2, {"prompt too long": 1})
    assert stats["trimmed"] == 1 and stats["trimmed_turns"] == len(original) - len(long)
    assert stats["changed"] == {"trimmed to fit the context": 1}
    assert "2 of 3 conversations regenerated, dropped 1 (1 x prompt too long" in res.stderr
    assert "1 histories trimmed to fit the context" in res.stderr


def test_rerun_with_every_shard_done_keeps_the_server_command(tiny_llama_dir, tmp_path):
    make_chat(tmp_path / "chat", 4)
    params = write_params(tmp_path / "p.yaml", backend="native", max_new_tokens=4, shard_size=2, concurrency=2)
    out = tmp_path / "exp" / "data" / "regen"
    assert run_stage(params, tiny_llama_dir, tmp_path / "chat", out).returncode == 0
    command = json.loads((out / "manifest.json").read_text())["backend_command"]
    assert "eaglepipe.server.serve" in command

    res = run_stage(params, tiny_llama_dir, tmp_path / "chat", out)
    assert res.returncode == 0, res.stderr
    assert "starting native server" not in res.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["run_conversations"] == 0 and stats["server_command"] == command
    assert json.loads((out / "manifest.json").read_text())["backend_command"] == command


# ----------------------------------------------------------------------------- several samples per prompt
def sample_index(row_id: str) -> int:
    return int(row_id.rsplit("#s", 1)[1]) if "#s" in row_id else 0


def answers(row: dict) -> tuple[str, ...]:
    return tuple(m["content"] for m in row["messages"] if m["role"] == "assistant")


def test_config_refuses_several_samples_without_sampling(tmp_path):
    from eaglepipe.compose import compose_dict
    from eaglepipe.config import ConfigError, load_params

    with pytest.raises(ConfigError, match="samples_per_prompt is 3, but regen.temperature is 0"):
        load_params(write_params(tmp_path / "greedy.yaml", samples_per_prompt=3, temperature=0.0))
    with pytest.raises(ConfigError, match="samples_per_prompt is 3, but regen.temperature is 0"):
        compose_dict(["regen.samples_per_prompt=3"])
    with pytest.raises(ConfigError, match="backend none keeps the dataset's answers"):
        load_params(write_params(tmp_path / "none.yaml", backend="none", samples_per_prompt=2, temperature=0.8))
    with pytest.raises(ConfigError, match="samples_per_prompt must be >= 1"):
        load_params(write_params(tmp_path / "zero.yaml", samples_per_prompt=0))
    assert load_params(write_params(tmp_path / "ok.yaml", samples_per_prompt=3, temperature=0.8)) \
        .regen.samples_per_prompt == 3


def test_split_by_source_keeps_the_samples_of_a_conversation_together():
    import numpy as np

    from eaglepipe.data.sample_ids import sample_id, source_id
    from eaglepipe.data.tokenize import split_by_source, split_train_val

    ids = [sample_id(f"c:{i}", k) for i in range(40) for k in range(3)] + ["odd#s2", "odd#s2#s1"]
    is_val = split_by_source(ids, 0.2, seed=5)
    val = {source_id(i) for i, v in zip(ids, is_val) if v}
    train = {source_id(i) for i, v in zip(ids, is_val) if not v}
    assert not val & train and len(val) == round(0.2 * 41)
    assert np.array_equal(split_by_source(ids, 0.2, seed=5), is_val)
    plain = [f"c:{i}" for i in range(40)]  # one row per conversation: the split it always was
    assert np.array_equal(split_by_source(plain, 0.2, seed=5), split_train_val(40, 0.2, seed=5))


def test_sampled_answers_per_prompt_are_distinct_reproducible_and_resume_exactly(url_server, tiny_llama_dir,
                                                                                   tmp_path):
    from eaglepipe.data.sample_ids import sample_id, source_id
    from eaglepipe.data.tokens_io import read_tokens

    chat_rows = make_chat(tmp_path / "chat", 12)
    chat = tmp_path / "chat"
    base = dict(backend="url", url=url_server, mode="all", max_new_tokens=8, shard_size=4, concurrency=2,
                temperature=0.8)
    params = write_params(tmp_path / "p3.yaml", **base, samples_per_prompt=3)
    reference = tmp_path / "ref" / "data" / "regen"
    res = run_stage(params, tiny_llama_dir, chat, reference)
    assert res.returncode == 0, res.stderr
    rows, rejects = published(reference)
    answered = [c for c in chat_rows if c["id"] != "t:unanswered"]
    assert [r["id"] for r in rows] == [sample_id(c["id"], k) for c in answered for k in range(3)]
    assert [r["id"] for r in rejects] == [sample_id("t:unanswered", k) for k in range(3)]
    for i, conv in enumerate(answered):
        samples = rows[3 * i:3 * i + 3]
        for s in samples:  # the same questions, each sample with its own answers
            assert [m for m in s["messages"] if m["role"] != "assistant"] == \
                [m for m in conv["messages"] if m["role"] != "assistant"]
        assert len({answers(s) for s in samples}) == 3
        assert len({answers(s)[-1] for s in samples}) == 3
    stats = json.loads((reference / "stats.json").read_text())
    assert (stats["source_conversations"], stats["samples_per_prompt"], stats["rows_in"], stats["rows_out"]) == \
        (13, 3, 39, 36)
    assert stats["dropped"] == {"no assistant turn": 3}
    assert "36 of 39 conversations regenerated (13 x 3 samples)" in res.stderr
    assert json.loads((reference / "manifest.json").read_text())["params"]["samples_per_prompt"] == 3

    # a second run, killed at random points and resumed, draws the same samples, byte for byte
    out = tmp_path / "exp" / "data" / "regen"
    assert kill_at_random_points(params, tiny_llama_dir, chat, out, tmp_path / "stage.log", random.Random(17),
                                 attempts=4) >= 3
    res = run_stage(params, tiny_llama_dir, chat, out)
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "stats.json").read_text())["resumed_conversations"] > 0
    assert published(out) == published(reference)
    assert [(p.name, p.read_bytes()) for p in sorted(out.glob("shard-*.parquet"))] == \
        [(p.name, p.read_bytes()) for p in sorted(reference.glob("shard-*.parquet"))]

    # sample k is the same whatever N is; with N = 1 the rows keep their ids and the work dir its old params
    for n in (1, 2):
        fewer = tmp_path / f"n{n}" / "data" / "regen"
        res = run_stage(write_params(tmp_path / f"p{n}.yaml", **base, samples_per_prompt=n), tiny_llama_dir, chat,
                        fewer)
        assert res.returncode == 0, res.stderr
        assert published(fewer)[0] == [r for r in rows if sample_index(r["id"]) < n]
    assert "samples_per_prompt" not in json.loads((tmp_path / "n1/data/regen/manifest.json").read_text())["params"]

    # tokenize never puts samples of one conversation on both sides of the train/val split
    tok_params = yaml.safe_load(params.read_text())
    tok_params["data"]["val_fraction"] = 0.3
    (tmp_path / "tok.yaml").write_text(yaml.safe_dump(tok_params))
    tokens = tmp_path / "exp" / "data" / "tokens"
    res = subprocess.run([sys.executable, "-m", "eaglepipe.stages.tokenize", "--params", str(tmp_path / "tok.yaml"),
                          "--target", str(tiny_llama_dir), "--chat", str(out), "--out", str(tokens)],
                         cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    train = {source_id(s["id"]) for s in read_tokens(tokens, "train")}
    val = {source_id(s["id"]) for s in read_tokens(tokens, "val")}
    assert train and val and not train & val and len(train | val) == len(answered)
    assert len(read_tokens(tokens, "val")) == 3 * len(val)


def test_native_backend_sends_each_sample_its_seed(url_server, tiny_llama_dir, tmp_path):
    """The native backend's server draws the same samples as another server given the same seeds."""
    make_chat(tmp_path / "chat", 6)
    common = dict(mode="last", max_new_tokens=8, max_model_len=512, trim_history_to=256, concurrency=2,
                  temperature=0.8, top_p=0.9, samples_per_prompt=2)
    native = tmp_path / "native" / "data" / "regen"
    res = run_stage(write_params(tmp_path / "n.yaml", backend="native", **common), tiny_llama_dir, tmp_path / "chat",
                    native)
    assert res.returncode == 0, res.stderr
    url = tmp_path / "url" / "data" / "regen"
    res = run_stage(write_params(tmp_path / "u.yaml", backend="url", url=url_server, **common), tiny_llama_dir,
                    tmp_path / "chat", url)
    assert res.returncode == 0, res.stderr
    rows, _ = published(native)
    assert len(rows) == 12 and published(native) == published(url)
    assert all(answers(a) != answers(b) for a, b in zip(rows[::2], rows[1::2]))
