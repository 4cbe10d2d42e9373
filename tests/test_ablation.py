"""The ablation sweep (`benchmarks/ablation.py`) on the tiny pipeline: each arm runs the pipeline's own stages in
its own copy of the checkout, an arm reruns only the stages its overrides change, and each arm's row lands in
RESULTS.md and results.jsonl with the base arm's figures as its baseline."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA_STAGES = {"download", "normalize", "regenerate", "tokenize", "vocab"}


def test_an_arm_reruns_only_what_its_overrides_change(tiny_llama_dir, tmp_path):
    arms = tmp_path / "arms.yaml"
    arms.write_text(yaml.safe_dump({
        "name": "ablation_test",
        "base": ["experiment=tiny", "target.source=local", f"target.name_or_path={tiny_llama_dir}",
                 "data.max_samples=12", "train.max_steps=2", "bench.prompts.num_prompts=1"],
        "arms": {"base": [], "ttt2": ["train.ttt_steps=2"]}}))
    work, results = tmp_path / "work", tmp_path / "RESULTS.md"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    done = subprocess.run([sys.executable, "benchmarks/ablation.py", str(arms), "--work", str(work), "--results",
                           str(results), "--hardware", "cpu"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1500)
    logs = "".join(f"\n--- {p}\n{p.read_text()[-2000:]}" for p in sorted(work.glob("*/ablation.log")))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + logs

    base, arm = [json.loads(line) for line in results.with_name("results.jsonl").read_text().splitlines()]
    assert base["name"] == arm["name"] == "ablation_test"
    assert base["config"]["overrides"] == [] and arm["config"]["overrides"] == ["train.ttt_steps=2"]
    assert arm["baselines"] == base["figures"]
    for record in (base, arm):
        assert record["figures"]["bench"] and record["figures"]["all_outputs_match"] is True
        assert record["figures"]["train_steps"] == 2
    assert yaml.safe_load((work / "ttt2" / "params.yaml").read_text())["train"]["ttt_steps"] == 2

    def rules_run(name: str) -> set[str]:
        return set(re.findall(r"^localrule (\w+):", (work / name / "ablation.log").read_text(), re.M))
    assert {"train", "export", "bench"} <= rules_run("ttt2") and not rules_run("ttt2") & DATA_STAGES
    assert "| ttt2 |" in done.stdout
    assert sum(line.startswith("| 20") for line in results.read_text().splitlines()) == 2

    # the arm again without the base arm, beside an arm of another arms file on the same setup that starts from
    # its data and trains the same: nothing reruns; each row's baseline is its own file's base arm's latest row
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"name": "other_test", "base": yaml.safe_load(arms.read_text())["base"],
                                     "arms": {"reference": ["train.ttt_steps=3"], "same": ["train.ttt_steps=2"]}}))
    alone = subprocess.run([sys.executable, "benchmarks/ablation.py", str(arms), str(other), "--work", str(work),
                            "--results", str(results), "--hardware", "cpu", "--only", "ttt2,same", "--alone"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stdout[-2000:] + alone.stderr[-2000:]
    again, same = [json.loads(line) for line in results.with_name("results.jsonl").read_text().splitlines()[-2:]]
    assert again["baselines"] == base["figures"] and again["figures"] == arm["figures"]
    assert again["command"].endswith(f"{arms} --only ttt2 --alone")
    assert f"base arm's latest recorded row ({base['benchmark']}, {base['date'][:16]}" in results.read_text()
    assert same["name"] == "other_test" and same["command"].endswith(f"{other} --only same --alone")
    assert same["baselines"]["result"].startswith("none:") and same["figures"]["bench"] == arm["figures"]["bench"]
    assert not set(re.findall(r"^localrule (\w+):", (work / "same" / "ablation.log").read_text(), re.M)) - {"all"}


def arms_files() -> list[Path]:
    return sorted(p for p in (REPO / "benchmarks").glob("*.yaml") if "arms" in yaml.safe_load(p.read_text()))


@pytest.mark.parametrize("path", arms_files(), ids=lambda p: p.name)
def test_every_arm_of_the_shipped_arms_files_composes(path, tmp_path):
    """Each arm's composition (the file's base, an `extends` file's base first, plus the arm's overrides) passes
    the schema and its checks, so that no arm fails on a GPU box for a typo; the head-to-head's rows come as a
    local source on the command line, here an empty file."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from ablation import load_arms
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    from eaglepipe.compose import compose_dict

    spec = load_arms(path)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("")
    extra = [f"data.sources=[{{name: rows, kind: local, path: {rows}}}]"] if "h2h" in path.name else []
    for name, overrides in spec["arms"].items():
        data = compose_dict([*spec["base"], *extra, *overrides])
        for override in overrides:
            key, value = override.split("=", 1)
            if not key.startswith(("+", "~")) and "." in key:
                section, field = key.split(".", 1)
                assert str(data[section][field]) == str(yaml.safe_load(value)), (name, override)


def test_arms_share_the_data_of_the_earliest_arm_that_regenerates_the_same():
    """The lever arms that change the conversations or their answers make their own data; the others (training,
    vocab and bench overrides) reuse the base arm's regenerated conversations, and without the base arm, the
    earliest named arm's that regenerates the same."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from ablation import data_leaders, load_arms
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    spec = load_arms(REPO / "benchmarks" / "levers_smollm2.yaml")

    def overrides(spec: dict, names: list[str]) -> dict[str, list[str]]:
        return {n: [*spec["base"], *spec["arms"][n]] for n in names}
    leaders = data_leaders(overrides(spec, list(spec["arms"])))
    assert {n for n, leader in leaders.items() if leader == "base"} == {"base", "vocab32k", "steps2000",
                                                                       "eagle31_lk_alpha"}
    assert all(leaders[n] == n for n in ("sampled", "sampled_x2", "more_prompts", "sharegpt_6k", "mix_6k"))
    assert data_leaders(overrides(spec, ["sampled_x2", "steps2000", "vocab32k"])) == {
        "sampled_x2": "sampled_x2", "steps2000": "steps2000", "vocab32k": "steps2000"}
    # another file's arms on the same setup (the family comparison's) reuse the same data; their bench does not
    # change it
    family = load_arms(REPO / "benchmarks" / "family_compare.yaml")
    both = overrides(spec, ["base", "sampled_x2"]) | overrides(family, ["dflash", "peagle"])
    assert data_leaders(both) == {"base": "base", "sampled_x2": "sampled_x2", "dflash": "base", "peagle": "base"}


def test_named_arms_run_in_the_order_given_with_the_base_first():
    """`--only` sets the benchmarking order (what matters most lands first), each file's base arm leading, and an
    unknown arm, or a name two arms files share, is refused before anything runs."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from ablation import arm_order
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    spec = {"arms": {"base": [], "a": ["x=1"], "b": ["x=2"], "c": ["x=3"]}}
    assert arm_order([spec], None) == ["base", "a", "b", "c"]
    assert arm_order([spec], "c,a,base") == ["base", "c", "a"]
    assert arm_order([spec], "b,c,b") == ["b", "c"]
    with pytest.raises(SystemExit, match="unknown arms"):
        arm_order([spec], "base,d")
    assert arm_order([spec], "c,a", alone=True) == ["c", "a"]
    with pytest.raises(SystemExit, match="--alone needs --only"):
        arm_order([spec], None, alone=True)
    other = {"arms": {"ref": [], "e": ["y=1"]}}
    assert arm_order([spec, other], None) == ["base", "a", "b", "c", "ref", "e"]
    assert arm_order([spec, other], "e,a,ref,base") == ["ref", "base", "e", "a"]
    assert arm_order([spec, other], "e,base,a", alone=True) == ["e", "base", "a"]
    with pytest.raises(SystemExit, match=r"\['a'\] are in more than one arms file"):
        arm_order([spec, {"arms": {"ref": [], "a": []}}], None)


def test_data_stages_run_one_arm_at_a_time_and_each_arm_trains_after_its_leaders_data():
    """Two regenerations at once exhaust the GPU (each server's KV cache is sized for all of it): the arms that
    make their own data build it one after another, every arm trains once its leader's data is ready (beside the
    next leader's data stages), and the arms of a leader whose data failed fail with its error, unbuilt."""
    import threading

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from ablation import build_arms
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    names = ["base", "sampled", "steps2000", "broken", "vocab32k", "after_broken"]
    leaders = {"base": "base", "sampled": "sampled", "steps2000": "base", "broken": "broken",
               "vocab32k": "base", "after_broken": "broken"}
    lock, events, running_data = threading.Lock(), [], []
    error = RuntimeError("regenerate failed")
    base_trains, trained_beside = threading.Event(), []

    def build(name: str, upto: str) -> Exception | None:
        with lock:
            events.append(("start", name, upto))
            if upto == "vocab":
                running_data.append(name)
                overlapping = len(running_data) > 1
        if (name, upto) == ("base", "export"):
            base_trains.set()
        if (name, upto) == ("sampled", "vocab"):  # the base arm's group trains while this arm makes its data
            trained_beside.append(base_trains.wait(timeout=60))
        threading.Event().wait(0.05)  # long enough for any other build submitted meanwhile to start
        with lock:
            events.append(("end", name, upto))
            if upto == "vocab":
                running_data.remove(name)
        assert not (upto == "vocab" and overlapping), f"{name}'s data built beside another arm's"
        return error if (name, upto) == ("broken", "vocab") else None

    failures = build_arms(names, leaders, build, jobs=3)
    assert list(failures) == names
    assert failures == {**dict.fromkeys(names), "broken": error, "after_broken": error}
    built = [(n, u) for kind, n, u in events if kind == "start"]
    assert [n for n, u in built if u == "vocab"] == ["base", "sampled", "broken"]
    assert sorted(n for n, u in built if u == "export") == ["base", "sampled", "steps2000", "vocab32k"]
    for name in ("base", "steps2000", "vocab32k", "sampled"):
        assert events.index(("end", leaders[name], "vocab")) < events.index(("start", name, "export"))
    assert trained_beside == [True]
