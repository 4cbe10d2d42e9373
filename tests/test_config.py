"""Config schemas: composition, presets, and rejection of typos and wrong types (also through DVC's Hydra path)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from eaglepipe.compose import compose_dict
from eaglepipe.config import ConfigError, load_params, params_from_dict

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def test_committed_params_equal_composed_conf():
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    assert committed == compose_dict([]), "params.yaml is stale: run `python -m eaglepipe.compose` and commit it"


def test_committed_params_load_and_validate():
    cfg = load_params(REPO / "params.yaml")
    assert cfg.target.source == "packaged_smollm2"
    assert cfg.data.sources[0].kind == "packaged_sharegpt"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_composes(preset):
    data = compose_dict([f"experiment={preset}"])
    assert data["experiment"] == preset
    params_from_dict(data)


def test_production_presets_carry_the_seed_setups():
    llama = compose_dict(["experiment=llama31_8b_perfectblend"])
    assert llama["target"]["name_or_path"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert llama["data"]["sources"][0]["path"] == "frankleeeee/PerfectBlend-Regenerated-Llama-3.1-8B-Instruct"
    assert llama["data"]["max_samples"] == 200000 and llama["data"]["seq_length"] == 2048
    assert llama["vocab"]["draft_vocab_size"] == 32000
    assert compose_dict(["experiment=llama32_1b_mvp"])["data"]["max_samples"] == 1000
    assert compose_dict(["experiment=qwen3_4b"])["target"]["name_or_path"] == "Qwen/Qwen3-4B"


@pytest.mark.parametrize("override, message", [
    ("train.typo=1", "typo"),
    ("train.lr=abc", "lr"),
    ("data.seq_length=long", "seq_length"),
    ("train.ttt_steps=0", "ttt_steps"),
    ("train.seed=-1", "train.seed"),
    ("regen.mode=sometimes", "regen.mode"),
    ("bench.sweep=[{num_steps:3,topk:1,num_draft_tokens:9}]", "num_draft_tokens"),
])
def test_compose_rejects_bad_overrides(override, message):
    with pytest.raises(Exception) as err:
        compose_dict([override])
    assert message in str(err.value) or message in repr(err.value.__cause__)


@pytest.mark.parametrize("override, message", [
    ("train.lr=abc", "train.lr: expected a float, got 'abc'"),
    ("data.seq_length=long", "data.seq_length: expected an int, got 'long'"),
    ("data.sources=[{name:mine,kind:local,pth:a.jsonl}]", "data.sources[0]: unknown key(s) ['pth']"),
    ("data.sources.0.kinf=local", "data.sources[0]: unknown key(s) ['kinf']"),
    ("train.typo=1", "train: unknown key(s) ['typo']"),
])
def test_compose_errors_name_the_bad_key_and_value(override, message):
    with pytest.raises(ConfigError) as err:
        compose_dict([override])
    assert message in str(err.value)
    assert compose_dict(["train.lr=1"])["train"]["lr"] == 1.0  # the schema (which makes it a float) is back


def test_typo_in_a_source_entry_of_a_conf_file_names_the_key(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    (conf / "experiment" / "typo.yaml").write_text(
        "# @package _global_\nexperiment: typo\ndata:\n  sources:\n    - name: a\n      kind: local\n"
        "      paht: x.jsonl\n")
    with pytest.raises(ConfigError, match=r"data.sources\[0\]: unknown key\(s\) \['paht'\]"):
        compose_dict(["experiment=typo"], config_dir=conf)


def test_compose_checks_local_paths_but_not_hub_ids(tmp_path):
    (tmp_path / "chats.jsonl").write_text("{}\n")
    (tmp_path / "model").mkdir()
    ok = compose_dict(["target.source=local", "target.name_or_path=model",
                       "data.sources=[{name:mine,kind:local,path:chats.jsonl}]"], base_dir=tmp_path)
    assert ok["data"]["sources"][0]["path"] == "chats.jsonl"
    with pytest.raises(ConfigError, match=f"target.name_or_path: local path {tmp_path}/nope does not exist"):
        compose_dict(["target.source=local", "target.name_or_path=nope"], base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"data.sources\[mine\].path: local path /no/such.jsonl does not exist"):
        compose_dict(["data.sources=[{name:mine,kind:local,path:/no/such.jsonl}]"], base_dir=tmp_path)
    with pytest.raises(ConfigError, match="bench.prompts.path: local path"):
        compose_dict(["bench.prompts.source=local", "bench.prompts.path=q.jsonl"], base_dir=tmp_path)
    # hub ids and packaged sources are never looked up on disk
    compose_dict(["target.source=hub", "target.name_or_path=org/model",
                  "data.sources=[{name:h,kind:hub,path:org/data}]"], base_dir=tmp_path)


def test_compose_cli_refuses_a_missing_dataset_before_writing(tmp_path):
    out = tmp_path / "params.yaml"
    r = subprocess.run([str(REPO / ".venv/bin/python"), "-m", "eaglepipe.compose", "--out", str(out),
                        "data.sources=[{name:mine,kind:local,path:data/missing.jsonl}]"],
                       cwd=REPO, env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True)
    assert r.returncode == 2 and not out.exists()
    assert f"data.sources[mine].path: local path {tmp_path}/data/missing.jsonl does not exist" in r.stderr


def test_loader_rejects_unknown_keys_and_types(tmp_path):
    good = compose_dict([])
    bad = dict(good, train=dict(good["train"], lr="fast"))
    with pytest.raises(ConfigError, match="train.lr: expected a float"):
        params_from_dict(bad)
    bad = dict(good, train=dict(good["train"], learning_rate=1e-4))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['learning_rate'\]"):
        params_from_dict(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "missing.yaml")


def test_compose_cli_reports_errors_cleanly():
    r = subprocess.run([str(REPO / ".venv/bin/python"), "-m", "eaglepipe.compose", "--print", "train.typo=1"],
                       cwd=REPO, env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "compose: train: unknown key(s) ['typo']" in r.stderr


def test_dvc_hydra_composition_validates_with_the_schema(tmp_path):
    """DVC's own compose path (what `dvc exp run -S` calls) sees the registered schema."""
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(REPO / "conf"), None, "config", str(REPO), ["train.lr=2e-4"])
    assert yaml.safe_load(out.read_text())["train"]["lr"] == 2e-4
    for bad in (["train.typo=1"], ["train.lr=abc"]):
        with pytest.raises(Exception):
            compose_and_dump(tmp_path / "bad.yaml", str(REPO / "conf"), None, "config", str(REPO), bad)


def test_train_seed_defaults_to_the_experiment_seed_and_keys_the_training_work_dir(tmp_path):
    """`train.seed` reseeds training alone (the held-out split and regeneration keep `seed`); null takes `seed`,
    so a run that names the seed it already had keeps its resumable work dir, and another seed gets its own."""
    from eaglepipe.train.loop import Paths, work_dir

    def cfg(*overrides: str):
        return params_from_dict(compose_dict(list(overrides)))

    assert cfg().training_seed() == 0 and cfg("seed=3").training_seed() == 3
    assert cfg("seed=3", "train.seed=1").training_seed() == 1 and cfg("seed=3", "train.seed=1").seed == 3
    paths = Paths(*(tmp_path / name for name in ("target", "tokens", "vocab", "hidden", "out")))
    for folder in (paths.tokens, paths.vocab):
        folder.mkdir()
    assert work_dir(cfg(), paths) == work_dir(cfg("train.seed=0"), paths)
    assert work_dir(cfg(), paths) != work_dir(cfg("train.seed=1"), paths)
