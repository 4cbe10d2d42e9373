"""End to end: fetch_target → download → normalize → tokenize → vocab on a tiny slice of the packaged default."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from eaglepipe.compose import compose_dict
from eaglepipe.data import dropped
from eaglepipe.data.chat_io import read_conversations
from eaglepipe.data.tokens_io import read_tokens
from eaglepipe.data.vocab import load_vocab
from eaglepipe.stages import fetch_target, normalize, tokenize, vocab

REPO = Path(__file__).resolve().parents[1]


def test_data_stages_end_to_end(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(compose_dict(["experiment=tiny", "data.max_samples=16",
                                                   "vocab.draft_vocab_size=1024"]), sort_keys=False))
    p = ["--params", str(params)]
    r = tmp_path / "results"

    fetch_target.main(p + ["--out", str(r / "target")])
    info = json.loads((r / "target" / "target.json").read_text())
    assert (info["num_layers"], info["hidden_size"], info["vocab_size"]) == (30, 576, 49152)
    assert info["aux_layers"] == [2, 15, 27] and info["model_path"] == "model"
    assert (r / "target" / "model" / "model.safetensors").exists()

    # the download CLI as Snakemake and DVC call it
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    subprocess.run([sys.executable, "-m", "eaglepipe.stages.download", *p, "--out", str(r / "data/raw")],
                   check=True, env=env, cwd=tmp_path)
    manifest = json.loads((r / "data/raw/manifest.json").read_text())
    assert manifest["total"] == 16 and manifest["sources"]["sharegpt"]["available"] == 17671
    assert "truncated" in manifest["sources"]["sharegpt"]["notes"][0]

    normalize.main(p + ["--raw", str(r / "data/raw"), "--out", str(r / "data/chat")])
    chat = list(read_conversations(r / "data/chat"))
    stats = json.loads((r / "data/chat/stats.json").read_text())
    assert len(chat) == stats["rows_out"] and stats["rows_out"] + stats["rows_rejected"] == 16
    assert all(c["id"].startswith("sharegpt:") and c["messages"][-1]["role"] == "assistant" for c in chat)

    capsys.readouterr()
    tokenize.main(p + ["--target", str(r / "target"), "--chat", str(r / "data/chat"), "--out", str(r / "data/tokens")])
    assert "<|im_end|>]]" in capsys.readouterr().err
    train = read_tokens(r / "data/tokens", "train")
    val = read_tokens(r / "data/tokens", "val")
    assert train and val and all(len(s["input_ids"]) <= 256 for s in train + val)
    tstats = json.loads((r / "data/tokens/stats.json").read_text())
    assert tstats["samples"] == len(train) + len(val)
    assert tstats["samples"] + sum(tstats["dropped"].values()) == len(chat)

    # every stage's stats.json says what it dropped, and one table shows them all
    raw = json.loads((r / "data/raw/stats.json").read_text())
    assert raw["dropped"] == {"incomplete record at the end of a truncated file": 1}
    assert raw["rows_in"] == 17672 and raw["rows_out"] == 16 and raw["not_sampled"] == 17671 - 16
    capsys.readouterr()
    dropped.main([str(r)])
    table = capsys.readouterr().out
    assert ("| download | 17672 | 16 | 1 | 1 incomplete record at the end of a truncated file | "
            "17655 left out by sampling (data.max_samples) |") in table
    assert f"| normalize | 16 | {len(chat)} | {16 - len(chat)} |" in table
    assert f"| tokenize | {len(chat)} | {tstats['samples']} |" in table
    assert f"{tstats['samples']} of the 16 rows taken by download reached tokenize's output" in table

    vocab.main(p + ["--tokens", str(r / "data/tokens"), "--out", str(r / "vocab")])
    d2t, t2d = load_vocab(r / "vocab")
    assert d2t.shape == (1024,) and t2d.shape == (49152,)
    assert bool(t2d[torch.arange(1024) + d2t].all())
    vinfo = json.loads((r / "vocab/vocab.json").read_text())
    assert vinfo["supervised_tokens"] == tstats["train"]["supervised_tokens"]
    assert 0 < vinfo["coverage"] <= 1 and (r / "vocab/coverage.png").stat().st_size > 0
    sizes = [row["size"] for row in vinfo["coverage_by_size"]]
    assert 1024 in sizes and sizes == sorted(sizes)

    # a draft vocab larger than the target's is refused with a clear message, leaving the old output intact
    big = tmp_path / "big.yaml"
    big.write_text(yaml.safe_dump(compose_dict(["experiment=tiny", "vocab.draft_vocab_size=60000"])))
    with pytest.raises(SystemExit) as exc:
        vocab.main(["--params", str(big), "--tokens", str(r / "data/tokens"), "--out", str(r / "vocab")])
    assert exc.value.code == 2
    assert "draft_vocab_size=60000 exceeds the target vocab size 49152" in capsys.readouterr().err
    assert load_vocab(r / "vocab")[0].shape == (1024,)
