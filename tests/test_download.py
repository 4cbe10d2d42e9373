"""Download: truncation-tolerant JSON streaming, local file kinds, split slices, hub file choice, mixing."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eaglepipe.config import DataCfg, SourceCfg
from eaglepipe.data.download import download
from eaglepipe.data.hub_dataset import split_files
from eaglepipe.data.json_stream import StreamReport, iter_json_array
from eaglepipe.data.mix import allocate, choose_rows
from eaglepipe.data.sources import packaged_sharegpt_path, read_files
from eaglepipe.data.split_spec import parse_split
import eaglepipe.data.json_stream as json_stream

CONVS = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"question {i} " + "x" * (i * 37)},
                                           {"from": "gpt", "value": f"answer {i}"}]} for i in range(40)]


def _truncated_array(path, n_complete: int) -> str:
    text = json.dumps(CONVS[:n_complete + 1], indent=2)
    cut = text.rfind('"answer')  # inside the last record
    path.write_text(text[:cut + 5])
    return text


@pytest.mark.parametrize("chunk", [64, 1 << 20])
def test_truncated_array_keeps_complete_records(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(json_stream, "CHUNK_CHARS", chunk)  # small chunks exercise refills mid-record
    path = tmp_path / "cut.json"
    _truncated_array(path, 25)
    report = StreamReport()
    got = [value for value, _ in iter_json_array(path, report)]
    assert got == CONVS[:25]
    assert report.truncated and report.complete_records == 25
    assert "element 25" in report.truncation_reason


def test_complete_array_and_original_text(tmp_path, monkeypatch):
    monkeypatch.setattr(json_stream, "CHUNK_CHARS", 50)
    path = tmp_path / "ok.json"
    path.write_text(json.dumps([1, 22, {"a": [1, 2]}, "s", 12345]))
    report = StreamReport()
    got = list(iter_json_array(path, report))
    assert [v for v, _ in got] == [1, 22, {"a": [1, 2]}, "s", 12345]
    assert [json.loads(t) for _, t in got] == [v for v, _ in got]
    assert not report.truncated


def test_unclosed_array_is_reported(tmp_path):
    path = tmp_path / "open.json"
    path.write_text(json.dumps(CONVS[:3])[:-1] + "\n")
    report = StreamReport()
    assert len(list(iter_json_array(path, report))) == 3
    assert report.truncated and "not closed" in report.truncation_reason


MALFORMED = '{"id": "bad", "conversations": [}'
# a broken element holding whole turns: a reader must not resume on one of them as if it were an element
MALFORMED_WITH_TURNS = ('{"id": "bad", "conversations": [{"from": "human", "value": "a"}, '
                        '{"from": "gpt", "value": "b"}, {"from": "human", "value": "c"} }')


@pytest.mark.parametrize("chunk", [64, 1 << 20])
@pytest.mark.parametrize("indent", [None, 2])
@pytest.mark.parametrize("at,bad", [(0, MALFORMED), (2, MALFORMED), (2, MALFORMED_WITH_TURNS), (5, MALFORMED)])
def test_malformed_element_is_passed_on_and_reading_resumes(tmp_path, monkeypatch, chunk, indent, at, bad):
    monkeypatch.setattr(json_stream, "CHUNK_CHARS", chunk)
    texts = [json.dumps(c, indent=indent) for c in CONVS[:6]]
    texts[at] = bad
    path = tmp_path / "six.json"
    path.write_text("[\n" + ",\n".join(texts) + "\n]\n")
    report = StreamReport()
    got = list(iter_json_array(path, report))
    assert [v for v, _ in got] == [None if i == at else c for i, c in enumerate(CONVS[:6])]
    assert got[at][1] == bad
    assert (report.complete_records, report.malformed_elements, report.truncated) == (5, 1, False)


def test_truncated_file_keeps_its_lost_text(tmp_path):
    path = tmp_path / "cut.json"
    _truncated_array(path, 3)
    report = StreamReport()
    assert len(list(iter_json_array(path, report))) == 3
    assert report.truncated and report.malformed_elements == 0
    assert path.read_text()[report.truncated_at_char:] == report.truncated_text
    assert report.truncated_text.lstrip().startswith('{\n    "id": "c3"')


def test_utf8_bom_is_accepted(tmp_path):
    lines = tmp_path / "bom.jsonl"
    lines.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(c) + "\n" for c in CONVS[:3]).encode())
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(CONVS[:3]).encode())
    for path in (lines, array):
        recs = read_files("bom", [path])
        assert [json.loads(r) for r in recs.records] == CONVS[:3], path.name
        assert recs.notes == []


def test_not_an_array_is_an_error(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not a JSON array"):
        list(iter_json_array(path, StreamReport()))


def test_packaged_sharegpt_has_17671_complete_conversations():
    recs = read_files("sharegpt", [packaged_sharegpt_path()])
    assert len(recs.records) == 17671
    assert recs.files[0]["truncated_at_char"] > 0 and "truncated" in recs.notes[0]
    assert "conversations" in json.loads(recs.records[-1])


def test_local_kinds_and_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text(json.dumps(CONVS[0]) + "\n{broken\n\n" + json.dumps(CONVS[1]) + "\n")
    _truncated_array(tmp_path / "d" / "b.json", 2)
    pq.write_table(pa.Table.from_pylist([{"messages": [{"role": "user", "content": "hi"}], "n": 1}]),
                   tmp_path / "d" / "c.parquet")
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    data = DataCfg(sources=[SourceCfg(name="mine", kind="local", path=str(tmp_path / "d"))], max_samples=None)
    out = tmp_path / "raw"
    out.mkdir()
    manifest = download(data, out)
    table = pq.read_table(out / "part-00000.parquet")
    assert table.column_names == ["source", "row", "record"]
    records = table.column("record").to_pylist()
    # 2 good JSONL lines + the malformed one kept as text for normalize, 2 complete array records, 1 parquet row
    assert len(records) == 6 and "{broken" in records
    assert table.column("row").to_pylist() == list(range(6))
    assert set(table.column("source").to_pylist()) == {"mine"}
    info = manifest["sources"]["mine"]
    assert info["available"] == 6 and info["taken"] == 6
    assert any("malformed" in n for n in info["notes"]) and any("truncated" in n for n in info["notes"])


def test_missing_local_path_is_a_clear_error(tmp_path):
    data = DataCfg(sources=[SourceCfg(name="x", kind="local", path=str(tmp_path / "nope.jsonl"))])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        download(data, tmp_path)


def test_mixing_is_deterministic_and_keeps_source_names(tmp_path):
    for name, n in (("a", 30), ("b", 50)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"k": f"{name}{i}"}) + "\n" for i in range(n)))

    def run(seed: int, out_name: str) -> list:
        data = DataCfg(sources=[SourceCfg(name="a", kind="local", path=str(tmp_path / "a.jsonl"), weight=3.0),
                                SourceCfg(name="b", kind="local", path=str(tmp_path / "b.jsonl"), weight=1.0)],
                       max_samples=20, seed=seed)
        out = tmp_path / out_name
        out.mkdir()
        download(data, out)
        return pq.read_table(out / "part-00000.parquet").to_pylist()

    first, again, other = run(0, "r1"), run(0, "r2"), run(1, "r3")
    assert first == again and first != other
    assert sum(r["source"] == "a" for r in first) == 15 and sum(r["source"] == "b" for r in first) == 5
    for r in first:  # each row is the record at its index within its source
        assert json.loads(r["record"])["k"] == f"{r['source']}{r['row']}"


def test_allocate_samples_weights_and_shortfall():
    assert allocate([100, 100, 100], [None] * 3, [0.45, 0.35, 0.2], 100) == [45, 35, 20]
    assert allocate([10, 100, 100], [None] * 3, [0.45, 0.35, 0.2], 100) == [10, 57, 33]
    assert allocate([10, 100, 100], [5, None, None], [1, 1, 1], 45) == [5, 20, 20]
    assert allocate([10, 100], [50, None], [1, 1], None) == [10, 100]
    assert allocate([3, 4], [None, None], [1, 1], 100) == [3, 4]


def test_choose_rows_is_seeded_per_source():
    a = choose_rows(1000, 10, 0, "a")
    assert list(a) == sorted(a) and len(set(a)) == 10
    assert list(a) == list(choose_rows(1000, 10, 0, "a"))
    assert list(a) != list(choose_rows(1000, 10, 0, "b"))
    assert list(choose_rows(5, 10, 0, "a")) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("spec,total,expected", [
    ("train", 50, ("train", 0, 50)),
    ("train[:200000]", 1000, ("train", 0, 1000)),
    ("train[:20]", 1000, ("train", 0, 20)),
    ("train[10%:20%]", 1000, ("train", 100, 200)),
    ("train_sft[5:]", 8, ("train_sft", 5, 8)),
    ("test[-10:]", 100, ("test", 90, 100)),
    ("train[:-25%]", 100, ("train", 0, 75)),
])
def test_parse_split(spec, total, expected):
    s = parse_split(spec)
    assert (s.name, *s.bounds(total)) == expected


@pytest.mark.parametrize("spec", ["train[a:b]", "train[:10", "train[150%:]", "[:10]", "train[1:2:3]"])
def test_parse_split_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match="split"):
        parse_split(spec)


def test_split_files_picks_the_split():
    files = ["README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
             "data/train_sft-00000-of-00001.parquet", "data/test-00000-of-00001.parquet", ".gitattributes"]
    assert split_files(files, "train") == files[1:3]
    assert split_files(files, "train_sft") == ["data/train_sft-00000-of-00001.parquet"]
    assert split_files(["default/train/0000.parquet", "default/test/0000.parquet"], "train") == \
        ["default/train/0000.parquet"]
    single = ["ShareGPT_V3_unfiltered_cleaned_split.json", "sg_90k_part1.json"]
    assert split_files(single, "train") == sorted(single)
    assert split_files(single, "test") == []
    assert split_files(["a/train.jsonl", "b/train.jsonl"], "train", data_files="b/*") == ["b/train.jsonl"]
    assert split_files(single + ["ShareGPT_V4.3_unfiltered_cleaned_split.json"], "train",
                       data_files="ShareGPT_V4.3_*.json") == ["ShareGPT_V4.3_unfiltered_cleaned_split.json"]
