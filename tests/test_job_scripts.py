"""The GPU job scripts' options (benchmarks/flags.sh): values, switches and positional arguments, and a clear stop
on an unknown option, so that a lease's job fails at once instead of running with a default it was not given."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOBS = ["gpu_run.sh", "gpu_collect.sh", "peer_nemo.sh", "quality_job.sh", "lease_job.sh", "lease_poll.sh"]


def parse(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    script = ('set -u; ARMS=default PHASES="h2h lk" ALONE=; OPTIONS=(arms phases arms-file); SWITCHES=(alone); '
              'source benchmarks/flags.sh; parse_flags "$@"; '
              'printf "%s|" "$ARMS" "$PHASES" "$ALONE" "${ARMS_FILE-unset}" "${ARGS[@]}"')
    return subprocess.run(["bash", "-c", script, "job.sh", *args], cwd=REPO, capture_output=True, text=True,
                          env=env)


def test_options_switches_and_arguments_become_variables():
    done = parse("out", "--phases", "ablation profile", "--alone", "--arms-file", "a b.yaml", "more")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "default|ablation profile|1|a b.yaml|out|more|"


def test_everything_after_a_double_dash_is_an_argument():
    done = parse("--phases", "family", "--", "--arms", "x", "--alone")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "default|family||unset|--arms|x|--alone|"


def test_an_unknown_option_or_a_missing_value_stops_the_job():
    unknown = parse("--arm", "x")
    assert unknown.returncode == 2
    assert "unknown option --arm (options: --arms --phases --arms-file --alone)" in unknown.stderr
    missing = parse("--arms")
    assert missing.returncode == 2 and "--arms needs a value" in missing.stderr


def test_an_environment_variable_of_the_same_name_is_no_switch():
    done = parse(env={"PATH": "/usr/bin:/bin", "ARMS": "from_env", "ALONE": "1"})
    assert done.stdout.startswith("default|h2h lk||")


@pytest.mark.parametrize("job", JOBS)
def test_each_job_prints_its_usage_and_refuses_unknown_options(job):
    usage = subprocess.run(["bash", f"benchmarks/{job}", "--help"], cwd=REPO, capture_output=True, text=True)
    assert usage.returncode == 0 and "--" in usage.stdout and not usage.stdout.startswith("!")
    refused = subprocess.run(["bash", f"benchmarks/{job}", "--no-such-option", "1"], cwd=REPO, capture_output=True,
                             text=True)
    assert refused.returncode == 2 and "unknown option --no-such-option" in refused.stderr


def test_a_misspelt_phase_stops_the_quality_job_before_anything_runs(tmp_path):
    store = tmp_path / "store"
    done = subprocess.run(["bash", "benchmarks/quality_job.sh", "--store", str(store), "--phases", "family abaltion"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "unknown phase abaltion" in done.stderr
    assert not store.exists()


def test_the_poll_shows_each_arms_latest_training_row_and_packs_its_history(tmp_path):
    """A poll between two of the box's calls: each arm's last log lines and latest training history row (is it
    learning, how fast), and its history in the pack that comes back; no weights."""
    import json
    import tarfile

    store, out = tmp_path / "store", tmp_path / "out"
    train = store / "arms" / "dflash" / "results" / "smollm2_h100" / ".work" / "train" / "f00"
    train.mkdir(parents=True)
    out.mkdir()
    (store / "arms" / "dflash" / "ablation.log").write_text("localrule train:\n")
    rows = [{"step": 20, "acc_0": 0.0045, "loss_0": 9.55, "tokens_per_s": 5657.2},
            {"step": 240, "acc_0": 0.09324, "acc_1": 0.0878, "loss_0": 6.1313, "tokens_per_s": 20187.57}]
    (train / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (train / "step_240.pt").write_bytes(b"weights")
    done = subprocess.run(["bash", "benchmarks/lease_poll.sh", "--store", str(store), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "step 240 acc_0 0.093 acc_1 0.088 loss_0 6.131 tokens_per_s 20187.57" in done.stdout
    with tarfile.open(out / "store.tar.xz") as pack:
        names = pack.getnames()
    assert "arms/dflash/results/smollm2_h100/.work/train/f00/history.jsonl" in names
    assert not any(name.endswith(".pt") for name in names)
