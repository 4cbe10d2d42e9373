"""`EngineOptions`, the one switch of the engine's fast paths: resolved per device, spelled as the same flags by the
server, the regenerate stage's server command and the benchmarks, set from the regen and bench configs, and read
from no environment variable."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from eaglepipe.config import ConfigError, EngineOptions, load_params, params_from_dict
from eaglepipe.engine import resolve_options
from eaglepipe.utils.engine_flags import engine_flags

REPO = Path(__file__).resolve().parents[1]
FIELDS = ["token_path", "cuda_graphs", "prefill_graphs", "graph_rounds"]


def test_null_means_where_the_path_runs_and_true_or_false_stand():
    assert asdict(EngineOptions().resolved(cuda=False, triton=True)) == dict.fromkeys(FIELDS, False)
    assert asdict(EngineOptions().resolved(cuda=True, triton=True)) == dict.fromkeys(FIELDS, True)
    assert EngineOptions().resolved(cuda=True, triton=False).token_path is False  # no Triton, no token path
    forced = EngineOptions(token_path=True, cuda_graphs=False, prefill_graphs=True)
    assert asdict(forced.resolved(cuda=False, triton=False)) == {"token_path": True, "cuda_graphs": False,
                                                                 "prefill_graphs": True, "graph_rounds": False}
    assert asdict(resolve_options(None, torch.device("cpu"))) == dict.fromkeys(FIELDS, False)


def test_flags_spell_the_options_and_the_server_reads_them_back():
    from eaglepipe.server.serve import parse_args
    from eaglepipe.utils.engine_flags import options_from_args

    options = EngineOptions(token_path=False, graph_rounds=True)
    flags = engine_flags(options)
    assert flags == ["--token-path", "off", "--graph-rounds", "on"]
    assert options_from_args(parse_args(["--model", "m", *flags])) == options
    assert options_from_args(parse_args(["--model", "m"])) == EngineOptions()
    assert engine_flags(EngineOptions()) == []


def test_the_served_engine_takes_the_flags(tiny_llama_dir):
    from eaglepipe.server.app import BRIDGE
    from eaglepipe.server.serve import build_app, parse_args

    args = parse_args(["--model", str(tiny_llama_dir), "--device", "cpu", "--max-batch-size", "1",
                       "--max-model-len", "64", "--prefill-graphs", "on"])
    engine = build_app(args)[BRIDGE].engine
    try:
        assert engine.options == EngineOptions(token_path=False, cuda_graphs=False, prefill_graphs=True,
                                               graph_rounds=False)
        assert engine.runner.prefill_graphs is not None and engine.runner.token_path is None
    finally:
        engine.close()


def params(tmp_path: Path, **sections) -> Path:
    """The repo's params.yaml with some keys of its sections replaced."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_the_regen_config_reaches_the_native_server_command(tmp_path):
    from eaglepipe.regen.backends import launch_command

    cfg = load_params(params(tmp_path, regen={"engine_options": {"token_path": False, "prefill_graphs": True}}))
    cmd = launch_command(cfg.regen, tmp_path / "model", "cpu", 1234)
    assert cmd[cmd.index("--token-path") + 1] == "off" and cmd[cmd.index("--prefill-graphs") + 1] == "on"
    assert "--cuda-graphs" not in cmd and "--graph-rounds" not in cmd


def test_the_configs_default_to_every_path_where_it_runs_and_refuse_other_values(tmp_path):
    cfg = load_params(REPO / "params.yaml")
    assert cfg.regen.engine_options == cfg.bench.engine_options == EngineOptions()
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["bench"]["engine_options"]["token_path"] = "fast"
    with pytest.raises(ConfigError, match="bench.engine_options.token_path: expected a bool"):
        params_from_dict(data)


def test_no_environment_variable_switches_the_engine():
    """Fast paths come from EngineOptions only: no EAGLEPIPE_* variable is read anywhere in the package."""
    package = REPO / "src" / "eaglepipe"
    hits = [str(p.relative_to(REPO)) for p in package.rglob("*.py") if "EAGLEPIPE_" in p.read_text()]
    assert hits == []
