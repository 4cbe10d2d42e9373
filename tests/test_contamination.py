"""The benchmark-contamination filter: rows quoting MT-bench (or bench.prompts) are dropped in normalize, with the
question they quote; near-misses are kept."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from eaglepipe.config import Config, PromptsCfg, to_dict
from eaglepipe.data.contamination import BenchmarkIndex, benchmark_prompts, mtbench_prompts
from eaglepipe.data.normalize import NormalizeStats, normalize_rows
from eaglepipe.data.packaged_evals import read_openai_evals
from eaglepipe.data.sources import packaged_sharegpt_path, read_files
from eaglepipe.stages import download, normalize

Q105_SENTENCE = ("The parking lot guard can tell at a glance if the cars are parked correctly by looking at the "
                 "color of the cars.")


@pytest.fixture(scope="module")
def mtbench() -> BenchmarkIndex:
    return BenchmarkIndex(mtbench_prompts())


def _chat(*user_turns: str, assistant: str = "Sure.") -> list[dict[str, str]]:
    out = []
    for turn in user_turns:
        out += [{"role": "user", "content": turn}, {"role": "assistant", "content": assistant}]
    return out


def test_mtbench_has_80_questions_of_two_turns():
    prompts = mtbench_prompts()
    assert len(prompts) == 160 and {p.question_id for p in prompts} == set(range(81, 161))


@pytest.mark.parametrize("text", [
    f"Please help with this riddle. {Q105_SENTENCE} Who is the secretary?",
    Q105_SENTENCE.upper().replace(" ", "   ").replace(",", ""),  # case, spacing and punctuation do not hide it
    "the cars are yellow green purple red and blue and the executives names are alice",
])
def test_a_row_quoting_mtbench_question_105_is_found(mtbench, text):
    overlap = mtbench.find(_chat("Hello there, how are you?", text))
    assert overlap is not None
    assert (overlap.prompt.benchmark, overlap.prompt.question_id, overlap.prompt.turn) == ("mtbench", 105, 0)
    assert overlap.user_turn == 2 and len(overlap.shared.split()) == 8


@pytest.mark.parametrize("text,qid,turn", [
    ("ok. Prove the Pythagorean theorem!", 99, 1),      # the whole of a 4-word turn, inside a longer one
    ("can you parallelize it", 121, 1),
    ("Ich verstehe nur Bahnhof", 95, 1),
])
def test_a_row_holding_a_whole_short_turn_is_found(mtbench, text, qid, turn):
    overlap = mtbench.find(_chat(text))
    assert overlap is not None and (overlap.prompt.question_id, overlap.prompt.turn) == (qid, turn)


@pytest.mark.parametrize("messages", [
    # 7 words of a run, not 8
    _chat("the parking lot guard can tell at dawn whether it works"),
    # the 8 words, but not in one run
    _chat("The parking lot guard, who can always tell at a glance, is here."),
    # part of a short turn, or a longer word in place of one of its words
    _chat("Can you parallelize this loop?", "Prove the Pythagorean theorems."),
    # the benchmark quoted by the assistant or the system prompt, not by the user
    [{"role": "system", "content": Q105_SENTENCE}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": Q105_SENTENCE}],
    # a run split across two user turns
    _chat("The parking lot guard can tell at", "a glance if the cars are parked"),
])
def test_near_misses_are_kept(mtbench, messages):
    assert mtbench.find(messages) is None


def test_normalize_drops_overlaps_with_the_question_id(mtbench):
    rows = [("s", 0, json.dumps({"messages": _chat("What is 2+2?")})),
            ("s", 1, json.dumps({"messages": _chat(Q105_SENTENCE)})),
            ("t", 0, json.dumps({"messages": _chat("Can you parallelize it?")}))]
    stats, rejects = NormalizeStats(), []
    kept = list(normalize_rows(rows, False, stats, rejects, mtbench))
    assert [r["id"] for r in kept] == ["s:0"]
    assert dict(stats.rejected) == {"benchmark overlap": 2}
    assert stats.by_source["s"] == {"rows_in": 2, "rows_out": 1, "dropped": {"benchmark overlap": 1}}
    assert [(r["id"], r["benchmark"], r["question_id"], r["question_turn"]) for r in rejects] == [
        ("s:1", "mtbench", 105, 0), ("t:0", "mtbench", 121, 1)]
    assert "mtbench question 105 turn 0" in rejects[0]["detail"]


def test_evals_logic_riddles_quote_question_105(mtbench):
    evals = read_openai_evals("evals", 100, 0)
    rows = [("evals", i, r) for i, r in enumerate(evals.records)]
    stats, rejects = NormalizeStats(), []
    kept = sum(1 for _ in normalize_rows(rows, False, stats, rejects, mtbench))
    hits = [r for r in rejects if r["reason"] == "benchmark overlap"]
    files = [json.loads(evals.records[r["row"]])["file"] for r in hits]
    assert [r["question_id"] for r in hits] == [108, 105, 105, 105]
    assert files == ["logic/samples.jsonl"] + ["logic-riddles/samples.jsonl"] * 3
    assert kept == 37179


def test_packaged_sharegpt_holds_one_mtbench_prompt(mtbench):
    records = read_files("sharegpt", [packaged_sharegpt_path()])
    rows = [("sharegpt", i, r) for i, r in enumerate(records.records)]
    stats, rejects = NormalizeStats(), []
    kept = sum(1 for _ in normalize_rows(rows, False, stats, rejects, mtbench))
    hits = [r for r in rejects if r["reason"] == "benchmark overlap"]
    # a copy of the "act as a math teacher" prompt that MT-bench question 97 also uses
    assert [(r["row"], r["question_id"]) for r in hits] == [(12294, 97)]
    assert kept == 17321 and stats.rows_out + stats.rejected["benchmark overlap"] == 17322


def _run_stages(tmp_path: Path, rows: list[dict], **overrides) -> Path:
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = to_dict(Config())
    params["data"].update(sources=[{"name": "mine", "kind": "local", "path": str(tmp_path / "chats.jsonl")}],
                          max_samples=None)
    for section, values in overrides.items():
        params[section].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    download.main(["--params", str(path), "--out", str(tmp_path / "raw")])
    normalize.main(["--params", str(path), "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "chat")])
    return tmp_path / "chat"


def test_normalize_stage_writes_overlaps_aside(tmp_path):
    rows = [{"messages": _chat("Tell me a joke about cats.")}, {"messages": _chat(Q105_SENTENCE)}]
    chat = _run_stages(tmp_path, rows)
    stats = json.loads((chat / "stats.json").read_text())
    assert (stats["rows_out"], stats["dropped"], stats["benchmark_prompt_turns"]) == (1, {"benchmark overlap": 1}, 160)
    reject = json.loads((chat / "rejects.jsonl").read_text())
    assert (reject["id"], reject["reason"], reject["question_id"]) == ("mine:1", "benchmark overlap", 105)


def test_the_filter_can_be_switched_off(tmp_path):
    chat = _run_stages(tmp_path, [{"messages": _chat(Q105_SENTENCE)}], data={"exclude_benchmark": False})
    stats = json.loads((chat / "stats.json").read_text())
    assert (stats["rows_out"], stats["dropped"], stats["benchmark_prompt_turns"]) == (1, {}, 0)


def test_a_local_bench_prompt_set_is_excluded_too(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"turns": ["Describe the migration of the arctic tern across both poles."]}) + "\n"
                       + json.dumps({"turns": ["Name three prime numbers.", "Now name three even ones."]}) + "\n")
    cfg = PromptsCfg(source="local", path=str(prompts), num_prompts=1, multi_turn=False)
    found = benchmark_prompts(cfg)
    # every turn of every prompt, whatever num_prompts and multi_turn say, after MT-bench's 160
    assert [(p.question_id, p.turn) for p in found[160:]] == [(0, 0), (1, 0), (1, 1)]
    rows = [{"messages": _chat("So: describe the migration of the Arctic tern across both poles, please.")},
            {"messages": _chat("now name three even ones")}, {"messages": _chat("Name three odd numbers.")}]
    chat = _run_stages(tmp_path, rows, bench={"prompts": {**to_dict(cfg)}})
    rejects = [json.loads(line) for line in (chat / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["question_id"], r["question_turn"]) for r in rejects] == [("mine:0", 0, 0), ("mine:1", 1, 1)]
    assert all(r["benchmark"].startswith("bench.prompts (local ") for r in rejects)
