"""Download: truncation-tolerant JSON streaming, local file kinds, hub datasets through `datasets` (split slices,
data_files, offline cache), mixing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import eaglepipe.data.json_stream as json_stream
from eaglepipe.config import Config, ConfigError, DataCfg, SourceCfg, to_dict
from eaglepipe.data.download import download
from eaglepipe.data.json_stream import StreamReport, iter_json_array
from eaglepipe.data.mix import allocate, choose_rows
from eaglepipe.data.sources import packaged_sharegpt_path, read_files

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


@pytest.mark.parametrize("split", ["train", "train[:200000]", "train[10%:20%]", "train_sft[5:]", "test[-10:]",
                                   "train[:-25%]"])
def test_hub_split_is_checked_by_datasets_at_config_time(split):
    SourceCfg(name="h", kind="hub", path="org/data", split=split).check()


@pytest.mark.parametrize("split", ["train[a:b]", "train[:10", "train[150%:]", "[:10]", "train[1:2:3]", "train+test"])
def test_bad_hub_split_is_a_config_error(split):
    with pytest.raises(ConfigError, match=r"data.sources\[h\].split"):
        SourceCfg(name="h", kind="hub", path="org/data", split=split).check()


REPO_ROOT = Path(__file__).resolve().parents[1]


def _dataset_repo(root: Path) -> Path:
    """A dataset repo laid out as on the hub: two train shards (20 rows), a train_sft and a test split."""
    data = root / "data"
    data.mkdir(parents=True)
    for shard in range(2):
        pq.write_table(pa.Table.from_pylist([{"k": f"train{i}"} for i in range(shard * 10, shard * 10 + 10)]),
                       data / f"train-{shard:05d}-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist([{"k": f"train_sft{i}"} for i in range(4)]),
                   data / "train_sft-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist([{"k": f"test{i}"} for i in range(3)]), data / "test-00000-of-00001.parquet")
    return root


def _run_download(tmp_path: Path, name: str, sources: list[dict], cache: Path) -> subprocess.CompletedProcess:
    """The download CLI as the pipeline runs it, offline, with its own datasets cache."""
    params = to_dict(Config())
    params["data"].update(sources=sources, max_samples=None)
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "eaglepipe.stages.download",
                           "--params", str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name)],
                          env=env, cwd=tmp_path, capture_output=True, text=True)


def _rows_by_source(out: Path) -> dict[str, list[tuple[int, str]]]:
    rows: dict[str, list[tuple[int, str]]] = {}
    for r in pq.read_table(out / "part-00000.parquet").to_pylist():
        rows.setdefault(r["source"], []).append((r["row"], json.loads(r["record"])["k"]))
    return rows


def test_hub_dataset_splits_slices_and_data_files(tmp_path):
    repo = _dataset_repo(tmp_path / "repo")
    versions = tmp_path / "sharegpt"  # several ShareGPT versions side by side; data_files picks one
    versions.mkdir()
    for v, n in (("V3", 2), ("V4.3", 3)):
        (versions / f"ShareGPT_{v}_unfiltered_cleaned_split.json").write_text(
            json.dumps([{"k": f"{v}-{i}"} for i in range(n)]))
    hub = {"kind": "hub", "path": str(repo)}
    r = _run_download(tmp_path, "raw", [
        {**hub, "name": "head", "split": "train[:3]"},            # streamed
        {**hub, "name": "window", "split": "train[8:12]"},        # streamed across the shard boundary
        {**hub, "name": "pct", "split": "train[10%:20%]"},        # prepared in the cache, then sliced
        {**hub, "name": "sft", "split": "train_sft"},
        {"kind": "hub", "path": str(versions), "name": "v43", "data_files": "ShareGPT_V4.3_*.json"}],
        tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    rows = _rows_by_source(tmp_path / "raw")
    assert rows["head"] == [(i, f"train{i}") for i in range(3)]
    assert rows["window"] == [(i, f"train{i}") for i in range(8, 12)]
    assert rows["pct"] == [(2, "train2"), (3, "train3")]
    assert rows["sft"] == [(i, f"train_sft{i}") for i in range(4)]
    assert rows["v43"] == [(i, f"V4.3-{i}") for i in range(3)]
    sources = json.loads((tmp_path / "raw" / "manifest.json").read_text())["sources"]
    assert [Path(f["path"]).name for f in sources["window"]["files"]] == \
        ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert (sources["pct"]["split"], sources["pct"]["first_row"]) == ("train[10%:20%]", 2)
    assert [Path(f["path"]).name for f in sources["v43"]["files"]] == ["ShareGPT_V4.3_unfiltered_cleaned_split.json"]


def test_hub_dataset_loads_offline_from_the_datasets_cache(tmp_path):
    import datasets

    # the cache an earlier online load of the hub dataset `user/repo` leaves behind: prepared from a copy of its files,
    # under the folder datasets gives a hub id (namespace___name)
    cache = tmp_path / "cache"
    datasets.load_dataset_builder(str(_dataset_repo(tmp_path / "repo")), cache_dir=str(cache)).download_and_prepare()
    (cache / "repo").rename(cache / "user___repo")
    hub = {"kind": "hub", "path": "user/repo"}
    r = _run_download(tmp_path, "raw", [{**hub, "name": "tail", "split": "train[-3:]"},
                                        {**hub, "name": "head", "split": "train[:2]"},
                                        {**hub, "name": "test", "split": "test"}], cache)
    assert r.returncode == 0, r.stderr
    rows = _rows_by_source(tmp_path / "raw")
    assert rows["tail"] == [(i, f"train{i}") for i in range(17, 20)]
    assert rows["head"] == [(0, "train0"), (1, "train1")]
    assert rows["test"] == [(i, f"test{i}") for i in range(3)]

    r = _run_download(tmp_path, "missing", [{**hub, "name": "x", "path": "user/other"}], cache)
    assert r.returncode == 2 and not (tmp_path / "missing").exists()
    assert "datasets could not load 'user/other'" in r.stderr
    assert "HF_HUB_OFFLINE is set, so only datasets already in the datasets cache load" in r.stderr


@pytest.mark.parametrize("split", ["valid", "valid[:3]"])
def test_hub_dataset_unknown_split_is_a_clear_error(tmp_path, split):
    repo = _dataset_repo(tmp_path / "repo")
    r = _run_download(tmp_path, "raw", [{"kind": "hub", "path": str(repo), "name": "x", "split": split}],
                      tmp_path / "cache")
    assert r.returncode == 2 and "error: datasets could not load" in r.stderr
    assert "valid" in r.stderr and "train_sft" in r.stderr  # names the splits there are
    assert "kind: local" not in r.stderr


@pytest.mark.parametrize("split", ["train", "train[:5]"])
def test_hub_dataset_with_a_malformed_json_file_says_how_to_keep_its_rows(tmp_path, split):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train.jsonl").write_text(json.dumps(CONVS[0]) + "\n{broken\n" + json.dumps(CONVS[1]) + "\n")
    r = _run_download(tmp_path, "raw", [{"kind": "hub", "path": str(repo), "name": "x", "split": split}],
                      tmp_path / "cache")
    assert r.returncode == 2 and not (tmp_path / "raw").exists()
    assert "datasets could not load" in r.stderr and "JSON parse error" in r.stderr
    assert "kind: local, which passes malformed records on to normalize" in r.stderr
