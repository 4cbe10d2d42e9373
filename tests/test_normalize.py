"""Normalisation: ShareGPT / conversations / messages sources and every kind of bad row."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from eaglepipe.config import Config, to_dict
from eaglepipe.data.chat_io import read_conversations
from eaglepipe.stages import download, normalize

U, A, S = "user", "assistant", "system"

GOOD = {
    "sharegpt": {"id": "g1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                                               {"from": "human", "value": "Bye"},
                                               {"from": "chatgpt", "value": "Bye."}]},
    "sharegpt_bing_bard": {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "user", "value": "Q"},
                                             {"from": "bing", "value": "A1"}, {"from": "human", "value": "Q2"},
                                             {"from": "bard", "value": "A2"}]},
    "conversations_role_content": {"conversations": [{"role": "user", "content": "2+2?"},
                                                     {"role": "model", "content": "4"}]},
    "messages": {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "u"},
                              {"role": "assistant", "content": "a"}], "extra": 1},
    "content_parts": {"messages": [{"role": "user", "content": [{"type": "text", "text": "par"},
                                                                {"type": "text", "text": "ts"}]},
                                   {"role": "assistant", "content": "ok"}]},
    "trailing_user": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                   {"role": "user", "content": "unanswered"}]},
    "leading_assistant": {"conversations": [{"from": "gpt", "value": "...continued"},
                                            {"from": "human", "value": "more"}, {"from": "gpt", "value": "sure"}]},
    "consecutive": {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                 {"role": "assistant", "content": "c"}, {"role": "assistant", "content": "d"}]},
    # a row of a table whose rows mix both naming schemes: the other scheme's columns are null
    "null_filled": {"messages": None, "conversations": [{"from": "human", "value": "q", "role": None, "content": None},
                                                        {"from": None, "value": None, "role": "gpt", "content": "a"}]},
}
EXPECTED = {
    "sharegpt": [(U, "Hi"), (A, "Hello!"), (U, "Bye"), (A, "Bye.")],
    "sharegpt_bing_bard": [(S, "Be brief."), (U, "Q"), (A, "A1"), (U, "Q2"), (A, "A2")],
    "conversations_role_content": [(U, "2+2?"), (A, "4")],
    "messages": [(S, "sys"), (U, "u"), (A, "a")],
    "content_parts": [(U, "parts"), (A, "ok")],
    "trailing_user": [(U, "q"), (A, "a")],
    "leading_assistant": [(U, "more"), (A, "sure")],
    "consecutive": [(U, "a\n\nb"), (A, "c\n\nd")],
    "null_filled": [(U, "q"), (A, "a")],
}
BAD = [  # (JSONL line, expected reason)
    ('{"conversations": [{"from": "human", "value": "x"}', "malformed JSON"),
    (json.dumps({"text": "no chat here", "label": 1}), "missing messages column"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),
     "unknown role"),
    (json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]}),
     "empty content"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "   "}]}),
     "empty content"),
    (json.dumps({"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "y"}]}),
     "non-string content"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}),
     "non-string content"),
    (json.dumps({"conversations": [{"from": "human", "value": "only a question"}]}), "no assistant turn"),
    (json.dumps({"conversations": []}), "empty conversation"),
    (json.dumps({"messages": "hello"}), "messages not a list"),
    (json.dumps({"messages": ["hello", {"role": "assistant", "content": "y"}]}), "turn not an object"),
    (json.dumps({"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}), "missing role"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "late"},
                              {"role": "assistant", "content": "y"}]}), "misplaced system turn"),
    (json.dumps([1, 2, 3]), "not an object"),
]


def write_params(path: Path, **data_overrides) -> Path:
    """A full params.yaml with the given `data` fields replaced."""
    params = to_dict(Config())
    params["data"].update(data_overrides)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_download_normalize(tmp_path: Path, params: Path) -> Path:
    download.main(["--params", str(params), "--out", str(tmp_path / "raw")])
    normalize.main(["--params", str(params), "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "chat")])
    return tmp_path / "chat"


def test_good_and_bad_rows(tmp_path):
    lines, kinds = [], []
    for i, (name, rec) in enumerate(GOOD.items()):  # interleave good and bad rows
        lines.append(json.dumps(rec))
        kinds.append(("good", name))
        if i < len(BAD):
            lines.append(BAD[i][0])
            kinds.append(("bad", BAD[i][1]))
    for line, reason in BAD[len(GOOD):]:
        lines.append(line)
        kinds.append(("bad", reason))
    src = tmp_path / "mixed.jsonl"
    src.write_text("\n".join(lines) + "\n")
    params = write_params(tmp_path / "params.yaml", max_samples=None,
                          sources=[{"name": "mix", "kind": "local", "path": str(src)}])
    chat = run_download_normalize(tmp_path, params)

    rows = {r["id"]: r for r in read_conversations(chat)}
    expected_good = {f"mix:{i}": name for i, (kind, name) in enumerate(kinds) if kind == "good"}
    assert set(rows) == set(expected_good), "every good row kept, no bad row kept"
    for rid, name in expected_good.items():
        assert [(m["role"], m["content"]) for m in rows[rid]["messages"]] == EXPECTED[name], name
        assert rows[rid]["source"] == "mix"

    rejects = [json.loads(x) for x in (chat / "rejects.jsonl").read_text().splitlines()]
    expected_bad = {f"mix:{i}": reason for i, (kind, reason) in enumerate(kinds) if kind == "bad"}
    assert {r["id"]: r["reason"] for r in rejects} == expected_bad
    for r in rejects:
        assert r["source"] == "mix" and r["row"] == int(r["id"].split(":")[1]) and r["detail"]
    missing = next(r for r in rejects if r["reason"] == "missing messages column")
    assert missing["detail"] == "no column `messages` or `conversations`; columns are ['label', 'text']"

    stats = json.loads((chat / "stats.json").read_text())
    assert stats["rows_in"] == len(lines) and stats["rows_out"] == len(GOOD)
    assert stats["rows_rejected"] == len(BAD)
    assert sum(stats["dropped"].values()) == len(BAD)
    assert stats["dropped"]["empty content"] == 2
    assert stats["repairs"] == {"dropped_trailing_user_turns": 1, "dropped_leading_assistant_turns": 1,
                                "merged_consecutive_turns": 2}


def test_system_prompt_drop(tmp_path):
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps(GOOD["messages"]) + "\n" + json.dumps(GOOD["sharegpt_bing_bard"]) + "\n")
    params = write_params(tmp_path / "params.yaml", max_samples=None, system_prompt="drop",
                          sources=[{"name": "s", "kind": "local", "path": str(src)}])
    rows = list(read_conversations(run_download_normalize(tmp_path, params)))
    assert [[m["role"] for m in r["messages"]] for r in rows] == [[U, A], [U, A, U, A]]


def test_parquet_source_with_messages_column(tmp_path):
    table = pa.Table.from_pylist([{"prompt_id": "p0", "messages": GOOD["messages"]["messages"]},
                                  {"prompt_id": "p1", "messages": GOOD["content_parts"]["messages"][1:]}])
    pq.write_table(table, tmp_path / "train.parquet")
    params = write_params(tmp_path / "params.yaml", max_samples=None,
                          sources=[{"name": "pq", "kind": "local", "path": str(tmp_path / "train.parquet")}])
    chat = run_download_normalize(tmp_path, params)
    assert [r["id"] for r in read_conversations(chat)] == ["pq:0"]
    rejects = [json.loads(x) for x in (chat / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in rejects] == [("pq:1", "no assistant turn")]


def test_parquet_written_by_datasets_keeps_its_json_columns(tmp_path):
    import datasets

    # turns of two naming schemes and content of two types: datasets stores them as a Json column, which is text
    # in the parquet file itself
    rows = [GOOD["sharegpt"], {"conversations": GOOD["content_parts"]["messages"]}]
    features = datasets.Features({"id": datasets.Value("string"), "conversations": datasets.List(datasets.Json())})
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "mixed.parquet"))
    assert isinstance(pq.read_table(tmp_path / "mixed.parquet").to_pylist()[0]["conversations"][0], str)
    params = write_params(tmp_path / "params.yaml", max_samples=None,
                          sources=[{"name": "pq", "kind": "local", "path": str(tmp_path / "mixed.parquet")}])
    chat = {r["id"]: r["messages"] for r in read_conversations(run_download_normalize(tmp_path, params))}
    assert [(m["role"], m["content"]) for m in chat["pq:0"]] == EXPECTED["sharegpt"]
    assert [(m["role"], m["content"]) for m in chat["pq:1"]] == EXPECTED["content_parts"]


def test_all_rows_invalid_fails_naming_the_problem(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": "a"}) + "\n" for i in range(5)))
    params = write_params(tmp_path / "params.yaml", max_samples=None,
                          sources=[{"name": "bad", "kind": "local", "path": str(src)}])
    with pytest.raises(SystemExit) as exc:
        run_download_normalize(tmp_path, params)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "all 5 rows are invalid" in err
    assert "no column `messages` or `conversations`; columns are ['answer', 'prompt']" in err
    assert not (tmp_path / "chat").exists()


def _six_conversations(bad_at: int | None = None) -> list[str]:
    texts = [json.dumps({"id": f"c{i}", "conversations": [{"from": "human", "value": f"q{i}"},
                                                          {"from": "gpt", "value": f"a{i}"}]}, indent=2)
             for i in range(6)]
    if bad_at is not None:
        texts[bad_at] = '{"id": "bad", "conversations": [}'
    return texts


def test_malformed_element_of_a_json_array_loses_no_good_row(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    src = tmp_path / "six.json"
    src.write_text("[\n" + ",\n".join(_six_conversations(bad_at=2)) + "\n]\n")
    params = write_params(tmp_path / "params.yaml", max_samples=None,
                          sources=[{"name": "arr", "kind": "local", "path": str(src)}])
    chat = run_download_normalize(tmp_path, params)
    assert [r["id"] for r in read_conversations(chat)] == ["arr:0", "arr:1", "arr:3", "arr:4", "arr:5"]
    rejects = [json.loads(x) for x in (chat / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in rejects] == [("arr:2", "malformed JSON")]
    raw_stats = json.loads((tmp_path / "raw" / "stats.json").read_text())
    assert (raw_stats["rows_in"], raw_stats["rows_out"], raw_stats["malformed_passed_on"]) == (6, 6, 1)
    stats = json.loads((chat / "stats.json").read_text())
    assert (stats["rows_in"], stats["rows_out"], stats["dropped"]) == (6, 5, {"malformed JSON": 1})
    assert "1 malformed array elements kept for normalize to reject" in caplog.text
    assert "kept 5 of 6 rows" in caplog.text and "dropped 1 (1 x malformed JSON" in caplog.text


def test_truncated_json_array_shows_its_loss(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    src = tmp_path / "cut.json"
    text = "[\n" + ",\n".join(_six_conversations()) + "\n]\n"
    cut = text.rindex('"a5"') + 2  # the file ends inside the last record's last string
    src.write_text(text[:cut])
    params = write_params(tmp_path / "params.yaml", max_samples=None,
                          sources=[{"name": "arr", "kind": "local", "path": str(src)}])
    chat = run_download_normalize(tmp_path, params)
    assert len(list(read_conversations(chat))) == 5
    reason = "incomplete record at the end of a truncated file"
    raw_stats = json.loads((tmp_path / "raw" / "stats.json").read_text())
    assert (raw_stats["rows_in"], raw_stats["rows_out"], raw_stats["dropped"]) == (6, 5, {reason: 1})
    (aside,) = [json.loads(x) for x in (tmp_path / "raw" / "rejects.jsonl").read_text().splitlines()]
    assert aside["reason"] == reason and aside["source"] == "arr" and aside["text"] == text[aside["char"]:cut]
    assert '"id": "c5"' in aside["text"] and "incomplete" in aside["detail"]
    assert f"dropped 1 (1 x {reason}; written to rejects.jsonl)" in caplog.text


def test_jsonl_with_a_byte_order_mark_keeps_its_first_row(tmp_path):
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD["sharegpt"]) + "\n" + json.dumps(GOOD["messages"]) + "\n")
                    .encode())
    params = write_params(tmp_path / "params.yaml", max_samples=None,
                          sources=[{"name": "bom", "kind": "local", "path": str(src)}])
    chat = run_download_normalize(tmp_path, params)
    assert [r["id"] for r in read_conversations(chat)] == ["bom:0", "bom:1"]
    assert (chat / "rejects.jsonl").read_text() == ""
