"""Configuration: dataclass schemas and the strict params.yaml loader."""
from .load import fingerprint, load_params, params_from_dict, to_dict
from .schema import (
    BenchCfg,
    Config,
    ConfigError,
    DataCfg,
    EngineOptions,
    ExportCfg,
    PromptsCfg,
    RegenCfg,
    SourceCfg,
    SweepPoint,
    TargetCfg,
    TrainCfg,
    VocabCfg,
)

__all__ = ["BenchCfg", "Config", "ConfigError", "DataCfg", "EngineOptions", "ExportCfg", "PromptsCfg", "RegenCfg",
           "SourceCfg", "SweepPoint", "TargetCfg", "TrainCfg", "VocabCfg", "fingerprint", "load_params",
           "params_from_dict", "to_dict"]
