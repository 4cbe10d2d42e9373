"""Compose `conf/` (Hydra) into the committed `params.yaml` that Snakemake and DVC read.

    python -m eaglepipe.compose [overrides...]            # writes params.yaml
    python -m eaglepipe.compose --print experiment=foo    # prints, writes nothing

It uses the same calls as DVC's Hydra integration, with the dataclass schema
registered, so unknown keys and wrong types fail here exactly as in `dvc exp run -S`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


def compose_dict(overrides: Sequence[str] = (), config_dir: Path | None = None) -> dict:
    """Compose conf/ with `overrides` and return the resolved plain dict, schema-checked."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.plugins import Plugins
    from omegaconf import OmegaConf

    from .config import params_from_dict

    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    Plugins.instance()  # registers the schemas from hydra_plugins/eaglepipe_schemas
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir or REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    OmegaConf.resolve(cfg)
    data = OmegaConf.to_container(cfg, resolve=True)
    params_from_dict(data)  # semantic checks (ranges, combinations)
    return data


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
        text = dump(compose_dict(args.overrides))
    except Exception as e:  # Hydra/OmegaConf/ConfigError all carry a readable message
        print(f"compose: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2)
    if args.print:
        print(text, end="")
    else:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
