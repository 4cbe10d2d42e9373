"""Chat template + assistant-only loss mask for ChatML (SmolLM2) and a Llama-3-style template; the tokenize CLI."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from transformers import AddedToken, AutoTokenizer

from eaglepipe.config import Config, to_dict
from eaglepipe.data.chat_io import write_conversations
from eaglepipe.data.loss_mask import ChatMasker, mark_supervised
from eaglepipe.data.tokenize import pick_workers, split_train_val, tokenize_chunk, tokenize_conversations
from eaglepipe.data.tokens_io import read_tokens
from eaglepipe.stages import tokenize as tokenize_stage

REPO = Path(__file__).resolve().parents[1]

# A Llama-3-style template written for this test: header tokens, trimmed contents, <|eot_id|> after every turn,
# a default system block when none is given.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = 'Cutting Knowledge Date: December 2023' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# ChatML that refuses tool turns (a TemplateError) and prepends a mark to any conversation whose third message is
# "shift", so that the prompt before its first reply is no prefix of its rendering (a TemplateMismatch)
PICKY_CHATML = (
    "{%- for m in messages %}{%- if m['role'] == 'tool' %}{{ raise_exception('no tool turns') }}{%- endif %}"
    "{%- endfor %}"
    "{%- if messages | length > 2 and messages[2]['content'] == 'shift' %}{{ '#' }}{%- endif %}"
    "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "And of Italy?\nAnswer in a sentence."},
     {"role": "assistant", "content": "The capital of Italy is Rome.\n\nIt has been since 1871."},
     {"role": "user", "content": "Say the word user."},
     {"role": "assistant", "content": "user"}],
    [{"role": "user", "content": "Write a haiku."},
     {"role": "assistant", "content": "Autumn moonlight—\na worm digs silently\ninto the chestnut."}],
    [{"role": "system", "content": "Reply with code."},
     {"role": "user", "content": "print hello in python"},
     {"role": "assistant", "content": "```python\nprint(\"hello\")\n```"},
     {"role": "user", "content": "thanks"},
     {"role": "assistant", "content": "You're welcome!"}],
]


@pytest.fixture(scope="module")
def chatml_tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def llama3_tokenizer_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer with Llama-3 special tokens and a Llama-3-style chat template."""
    out = tmp_path_factory.mktemp("llama3_tok")
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS], special_tokens=True)
    tok.bos_token = "<|begin_of_text|>"
    tok.eos_token = "<|eot_id|>"
    tok.chat_template = LLAMA3_TEMPLATE
    tok.save_pretrained(out)
    return out


def supervised_runs(tok, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """The decoded text of each contiguous run of supervised tokens."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append(tok.decode(ids[start:i].tolist(), skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False))
            start = None
    return runs


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_chatml_mask_is_exactly_assistant_content_plus_im_end(chatml_tokenizer, conv):
    masker = ChatMasker(chatml_tokenizer)
    assert masker.end_of_turn == "<|im_end|>"
    messages = CONVERSATIONS[conv]
    s = masker.encode(messages, 4096)
    assert not s.truncated and s.misaligned_tokens == 0
    expected = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert supervised_runs(chatml_tokenizer, s.input_ids, s.loss_mask) == expected
    # the unmasked rest is everything else the template rendered (headers, system, user turns)
    assert chatml_tokenizer.decode(s.input_ids.tolist(), skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False) == masker.render(messages, False)


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_llama3_mask_is_exactly_assistant_content_plus_eot(llama3_tokenizer_dir, conv):
    tok = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    masker = ChatMasker(tok)
    assert masker.end_of_turn == "<|eot_id|>"
    messages = [dict(m) for m in CONVERSATIONS[conv]]
    messages[-1]["content"] = "  " + messages[-1]["content"] + "\n"  # the template trims contents
    s = masker.encode(messages, 4096)
    assert s.misaligned_tokens == 0
    expected = [m["content"].strip() + "<|eot_id|>" for m in messages if m["role"] == "assistant"]
    assert supervised_runs(tok, s.input_ids, s.loss_mask) == expected
    text = tok.decode(s.input_ids.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    header_ids = tok.convert_tokens_to_ids(["<|start_header_id|>", "<|end_header_id|>", "<|begin_of_text|>"])
    assert not s.loss_mask[np.isin(s.input_ids, header_ids)].any(), "headers are never supervised"


def test_truncation_and_empty_samples(chatml_tokenizer):
    masker = ChatMasker(chatml_tokenizer)
    messages = CONVERSATIONS[0]
    full = masker.encode(messages, 4096)
    cut = int(np.flatnonzero(full.loss_mask)[-1]) - 2  # inside the last assistant reply
    s = masker.encode(messages, cut)
    assert s.truncated and len(s.input_ids) == cut
    assert np.array_equal(s.input_ids, full.input_ids[:cut]) and np.array_equal(s.loss_mask, full.loss_mask[:cut])

    long_prompt = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    res = tokenize_conversations(masker, [{"id": "x:0", "messages": long_prompt},
                                          {"id": "x:1", "messages": CONVERSATIONS[1]}], seq_length=64)
    assert [s["id"] for s in res.samples] == ["x:1"]
    assert res.dropped == {"no_supervised_tokens": 1} and res.conversations_in == 2


def test_mark_supervised(chatml_tokenizer):
    masker = ChatMasker(chatml_tokenizer)
    s = masker.encode(CONVERSATIONS[1], 4096)
    marked = mark_supervised(chatml_tokenizer, s.input_ids, s.loss_mask)
    assert ("<|im_start|>assistant\n[[Autumn moonlight—\na worm digs silently\n"
            "into the chestnut.<|im_end|>]]\n") in marked
    assert marked.count("[[") == 1


def test_template_without_end_of_turn_special_token(tiny_llama_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}ASSISTANT: {% endif %}")
    masker = ChatMasker(tok)
    assert masker.end_of_turn is None
    s = masker.encode(CONVERSATIONS[2], 4096)
    # "ASSISTANT: " ends in a space that BPE merges into the reply's first token: that token is kept and counted
    assert supervised_runs(tok, s.input_ids, s.loss_mask) == [" " + m["content"] for m in CONVERSATIONS[2]
                                                              if m["role"] == "assistant"]
    assert s.misaligned_tokens == 2


def test_tokenizer_without_template_is_rejected(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        ChatMasker(tok)


def test_split_train_val_is_seeded_and_sized():
    a = split_train_val(100, 0.1, seed=3)
    assert a.sum() == 10 and np.array_equal(a, split_train_val(100, 0.1, seed=3))
    assert not np.array_equal(a, split_train_val(100, 0.1, seed=4))
    assert split_train_val(10, 0.01, 0).sum() == 1  # at least one validation sample
    assert split_train_val(1, 0.5, 0).sum() == 0  # never the only sample
    assert split_train_val(10, 0.0, 0).sum() == 0


def test_tokenize_cli(tiny_llama_dir, llama3_tokenizer_dir, tmp_path, capsys):
    """The stage on a plain HF dir (ChatML) and on a Llama-3-style target dir."""
    chat = tmp_path / "chat"
    rows = [{"id": f"t:{i}", "source": "t", "messages": CONVERSATIONS[i % 3]} for i in range(12)]
    write_conversations(chat / "chat.parquet", rows)
    params = to_dict(Config())
    params["data"].update(seq_length=512, val_fraction=0.25)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    llama3_target = tmp_path / "llama3_target"
    shutil.copytree(tiny_llama_dir, llama3_target, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    for f in llama3_tokenizer_dir.iterdir():
        shutil.copy(f, llama3_target / f.name)

    for target, eot in ((tiny_llama_dir, "<|im_end|>"), (llama3_target, "<|eot_id|>")):
        out = tmp_path / f"tokens_{target.name}"
        tokenize_stage.main(["--params", str(tmp_path / "params.yaml"), "--target", str(target),
                             "--chat", str(chat), "--out", str(out)])
        train, val = read_tokens(out, "train"), read_tokens(out, "val")
        assert len(train) == 9 and len(val) == 3
        assert sorted(s["id"] for s in train + val) == sorted(r["id"] for r in rows)
        stats = json.loads((out / "stats.json").read_text())
        assert stats["end_of_turn_token"] == eot and stats["samples"] == 12
        assert stats["all"]["supervised_tokens"] == sum(int(s["loss_mask"].sum()) for s in train + val)
        assert 0 < stats["all"]["supervised_fraction"] < 1
        assert stats["vocab_size"] == json.loads((target / "config.json").read_text())["vocab_size"]
        assert f"{eot}]]" in (out / "sample.txt").read_text()
        assert f"{eot}]]" in capsys.readouterr().err


def test_worker_processes_give_the_same_result(tiny_llama_dir):
    masker = ChatMasker(AutoTokenizer.from_pretrained(tiny_llama_dir))
    convs = [{"id": f"w:{i}", "messages": CONVERSATIONS[i % 3]} for i in range(9)]
    convs.insert(4, {"id": "w:long", "messages": [{"role": "user", "content": "word " * 400},
                                                   {"role": "assistant", "content": "ok"}]})
    one = tokenize_conversations(masker, convs, 64, chunk_size=2)
    two = tokenize_conversations(masker, convs, 64, workers=2, tokenizer_dir=str(tiny_llama_dir), chunk_size=2)
    assert [s["id"] for s in two.samples] == [s["id"] for s in one.samples] == [c["id"] for c in convs
                                                                                 if c["id"] != "w:long"]
    for a, b in zip(one.samples, two.samples):
        assert np.array_equal(a["input_ids"], b["input_ids"]) and np.array_equal(a["loss_mask"], b["loss_mask"])
    assert one.dropped == two.dropped == {"no_supervised_tokens": 1}
    assert one.truncated == two.truncated > 0 and one.conversations_in == two.conversations_in == 10
    assert pick_workers(100, cpus=16) == 1 and pick_workers(10**6, cpus=16) == 8 and pick_workers(6000, 16) == 1
    assert pick_workers(45000, cpus=16) == 2
    assert pick_workers(10**6, cpus=2) == 1


def test_a_chunk_tokenized_as_one_batch_equals_each_conversation_encoded_alone(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = PICKY_CHATML
    masker = ChatMasker(tok)
    tool = [{"role": "user", "content": "run it"}, {"role": "tool", "content": "{}"},
            {"role": "assistant", "content": "done"}]
    shift = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "user", "content": "shift"}, {"role": "assistant", "content": "c"}]
    long_prompt = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    messages = [CONVERSATIONS[0], tool, CONVERSATIONS[1], shift, long_prompt, CONVERSATIONS[2], tool]
    res = tokenize_chunk(masker, [{"id": f"c:{i}", "messages": m} for i, m in enumerate(messages)], 64)
    assert [s["id"] for s in res.samples] == ["c:0", "c:2", "c:5"]
    for s in res.samples:
        alone = masker.encode(messages[int(s["id"][2:])], 64)
        assert np.array_equal(s["input_ids"], alone.input_ids) and np.array_equal(s["loss_mask"], alone.loss_mask)
    assert res.dropped == {"template_error": 2, "template_not_prefix": 1, "no_supervised_tokens": 1}
    assert res.first_errors["template_error"].startswith("c:1: ") and "no tool turns" in res.first_errors[
        "template_error"]
    assert res.first_errors["template_not_prefix"].startswith("c:3: ")
    assert res.conversations_in == 7 and res.truncated == 1


def test_tokenize_throughput_benchmark_checks_every_way_against_one_at_a_time(tiny_llama_dir, tmp_path):
    chat = tmp_path / "chat"
    chat.mkdir()
    write_conversations(chat / "chat.parquet", [{"id": f"b:{i}", "source": "b", "messages": CONVERSATIONS[i % 3]}
                                                for i in range(12)])
    results = tmp_path / "RESULTS.md"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tokenize_throughput.py"), "--target",
                           str(tiny_llama_dir), "--chat", str(chat), "--seq-length", "64", "--repeats", "1",
                           "--workers", "2", "--results", str(results)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(results.with_name("results.jsonl").read_text())
    figures = record["figures"]
    assert record["name"] == "tokenize_throughput" and figures["same_samples"] is True
    assert figures["conversations"] == figures["samples"] == 12 and figures["workers"] == 2
    assert figures["one_at_a_time_s"] > 0 and figures["batched_s"] > 0 and figures["batched_workers_s"] > 0
    assert "tokenize_throughput" in results.read_text()
