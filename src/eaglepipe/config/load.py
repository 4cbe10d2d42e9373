"""Strict loading of `params.yaml` into the dataclass schema.

Stages call `load_params(path)`. It needs only PyYAML, so stages also run where
Hydra/OmegaConf are absent (e.g. on a bare GPU box).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml

from .schema import Config, ConfigError


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where)
    if value is None:
        raise ConfigError(f"{where}: null is not allowed here (expected {getattr(tp, '__name__', tp)})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _to_dataclass(tp, value, where)
    if origin in (list, typing.List):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, typing.Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        _, vt = get_args(tp)
        return {str(k): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected a bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _to_dataclass(cls: Any, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or 'params'}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{where}.{f.name}" if where else f.name)
    return cls(**kwargs)


def params_from_dict(data: dict) -> Config:
    """Build and check a Config from a plain dict (as parsed from YAML)."""
    cfg = _to_dataclass(Config, data or {}, "")
    cfg.check()
    return cfg


def load_params(path: str | Path) -> Config:
    """Read `params.yaml`, reject unknown keys and wrong types, and run the semantic checks."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file {path} does not exist; run `python -m eaglepipe.compose` first")
    return params_from_dict(yaml.safe_load(path.read_text()) or {})


def to_dict(obj: Any) -> Any:
    """Plain-dict form of a (nested) config dataclass."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def fingerprint(obj: Any) -> str:
    """Stable short hash of a config section, used to refuse mixing outputs across configs."""
    blob = json.dumps(to_dict(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
