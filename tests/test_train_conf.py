"""One source for the training defaults: TrainCfg (config/schema.py) holds them, a conf/train/<algorithm>.yaml file
picks the algorithm and what belongs to it alone, and an experiment (conf/config.yaml for the embedded default,
conf/experiment/*.yaml) sets its own run's size. A group file that restated a default, or set a run's schedule,
would be a second source that drifts from the first."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from eaglepipe.config.schema import TrainCfg

REPO = Path(__file__).resolve().parents[1]
# how long and how hard a run trains, and how often it logs and saves: the experiment's choice, not the algorithm's
SCHEDULE = {"epochs", "max_steps", "micro_batch_size", "grad_accum", "lr", "weight_decay", "warmup_ratio",
            "min_lr_ratio", "max_grad_norm", "log_every", "eval_every", "save_every", "keep_checkpoints", "mode",
            "pack", "resume", "init_from", "parallel", "nproc_per_node", "compile"}
GROUP_FILES = sorted((REPO / "conf" / "train").glob("*.yaml"))


def test_the_schedule_keys_are_train_config_keys():
    assert SCHEDULE <= {f.name for f in fields(TrainCfg)}


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: p.stem)
def test_a_train_group_file_names_its_algorithm_and_restates_no_default(path: Path):
    data = yaml.safe_load(path.read_text())
    defaults = TrainCfg()
    assert "algorithm" in data
    assert not set(data) & SCHEDULE, f"{path.name} sets the run's schedule {sorted(set(data) & SCHEDULE)}"
    restated = [k for k, v in data.items() if k != "algorithm" and v == getattr(defaults, k)]
    assert not restated, f"{path.name} restates TrainCfg's defaults for {restated}"
