"""Compose `conf/` (Hydra) into the committed `params.yaml` that Snakemake and DVC read.

    python -m eaglepipe.compose [overrides...]            # writes params.yaml
    python -m eaglepipe.compose --print experiment=foo    # prints, writes nothing

It uses the same calls as DVC's Hydra integration, with the dataclass schema
registered, so unknown keys and wrong types fail here as in `dvc exp run -S`; here the
message names the bad key and value. Local paths in the config must exist.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Iterator, Sequence

import yaml
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from .config import Config, ConfigError, params_from_dict

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_NAME = "eaglepipe_schema"


def _compose(overrides: Sequence[str], config_dir: Path | None) -> dict:
    """conf/ composed with `overrides`, resolved to a plain dict (Hydra's own checks apply)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir or REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


@contextlib.contextmanager
def _schema_off() -> Iterator[None]:
    """Compose without the registered schema for the duration (the ConfigStore is process-wide)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node={})
    try:
        yield
    finally:
        store.store(name=SCHEMA_NAME, node=Config)


def _explain(err: Exception, overrides: Sequence[str], config_dir: Path | None) -> str:
    """A message naming the bad key or value behind a failed composition.

    Hydra's own message often does not (an override of the wrong type reports only "Error merging
    override", a typo inside a list entry suggests appending with '+'). Composing again without the
    schema, with value overrides allowed to add keys ('++'), and checking the result with our loader
    names the exact field, e.g. `data.sources[0]: unknown key(s) ['pth']`.
    """
    cause = err.__cause__ or err.__context__
    hydra_message = f"{err}" + (f" ({str(cause).splitlines()[0]})" if cause else "")
    # a dotted key is a value override (config groups are named with '/')
    forced = [o if o.startswith(("+", "~")) or "." not in o.split("=", 1)[0] else "++" + o for o in overrides]
    try:
        with _schema_off():
            params_from_dict(_compose(forced, config_dir))
    except ConfigError as e:
        return str(e)
    except (HydraException, OmegaConfBaseException):  # broken beyond a bad value (e.g. an unknown group option)
        pass
    return hydra_message


def compose_dict(overrides: Sequence[str] = (), config_dir: Path | None = None, base_dir: Path | None = None) -> dict:
    """Compose conf/ with `overrides` and return the resolved plain dict, schema-checked.

    Local paths (a local target, local dataset sources, local benchmark prompts) must exist; relative
    ones are taken from `base_dir` (default: the repository root, where the stages run). Raises
    ConfigError naming the bad key or value.
    """
    from hydra.core.plugins import Plugins

    # Hydra finds the schema plugin by importing the `hydra_plugins` namespace. An installed eaglepipe brings it;
    # a checkout run uninstalled with PYTHONPATH=src (the GPU boxes, stage commands) has it at the repository root,
    # which is on sys.path only when the working directory is the root, so it is added here.
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    Plugins.instance()  # registers the schemas from hydra_plugins/eaglepipe_schemas
    try:
        data = _compose(overrides, config_dir)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_explain(e, overrides, config_dir)) from e
    cfg = params_from_dict(data)  # semantic checks (ranges, combinations)
    check_local_paths(cfg, base_dir or REPO_ROOT)
    return data


def check_local_paths(cfg: Config, base_dir: Path) -> None:
    """ConfigError when a local target, dataset or prompt path does not exist (hub ids and packaged
    sources are not looked up)."""
    def missing(path: str) -> Path | None:
        p = Path(path).expanduser()
        p = p if p.is_absolute() else base_dir / p
        return None if p.exists() else p

    checks = [("target.name_or_path", cfg.target.name_or_path, cfg.target.source == "local"),
              ("bench.prompts.path", cfg.bench.prompts.path, cfg.bench.prompts.source == "local")]
    checks += [(f"data.sources[{s.name}].path", s.path, s.kind == "local") for s in cfg.data.sources]
    for key, path, local in checks:
        if local and (gone := missing(path)) is not None:
            raise ConfigError(f"{key}: local path {gone} does not exist")


def dump(data: dict) -> str:
    """The exact text written to params.yaml."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=smollm2_h100 train.lr=2e-4")
    p.add_argument("--out", default=str(REPO_ROOT / "params.yaml"))
    p.add_argument("--print", action="store_true", help="print instead of writing")
    args = p.parse_args(argv)
    try:
        text = dump(compose_dict(args.overrides, base_dir=Path(args.out).resolve().parent))
    except ConfigError as e:
        print(f"compose: {e}", file=sys.stderr)
        raise SystemExit(2)
    if args.print:
        print(text, end="")
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
