"""scripts/cost_estimate.py counts each stage's training steps from params.yaml as the stages run them."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from fedmeta import config

from conftest import REPO, tiny_raw

spec = importlib.util.spec_from_file_location("cost_estimate", REPO / "scripts/cost_estimate.py")
cost = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cost)


def test_paper_profiles_steps_match_the_papers_budgets() -> None:
    raw = tiny_raw()
    paper = cost.stage_work(config.parse(raw | {"profile": "paper"}))
    assert paper["attack@exclude"][0] == 50_000 * 250 + 2 * 1000 * 10  # 50 epochs of 5 × 10 shots in batches of 10
    assert paper["pretrain@include"][0] == 100 * 3 * 1000 * 10
    mini = cost.stage_work(config.parse(raw | {"profile": "paper-miniimagenet", "dataset": "miniimagenet"}))
    assert mini["attack@include"][0] == 150_000 * 8 + 2 * 100 * 10  # one epoch of 5 × 15 shots: 7.5 → 8 batches
    assert mini["pretrain@exclude"][0] == 1000 * 3 * 100 * 10
    # the attacker trains once per variant and federation (stages/exp4.py), not once for each of the 32 runs
    assert 4 * 50_000 * 250 < paper["exp4"][0] < 5 * 50_000 * 250
    long = cost.stage_work(config.parse(raw | {"profile": "long"}))
    # 50 rounds measured every 5: 10 points of meta-test and (b), (c), 40 episodes each
    assert long["continue@include"] == (50 * 3 * 100 * 10, 10 * 3 * 40)


def estimate(profile: str, bench: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "scripts/cost_estimate.py", profile, str(bench)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True)


def test_command_prints_every_stage(tmp_path: Path) -> None:
    bench = tmp_path / "bench.json"
    rates = {"meta_train": {"fedmeta_eps_per_s": 10.0}, "evaluation": {"fedmeta_eps_per_s": 1.0}}
    bench.write_text(json.dumps({"device": "cpu", **rates}))
    done = estimate("paper", bench)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("paper (omniglot) at 100.0 training steps/s")
    assert [line.split()[0] for line in lines[1:]][:3] == ["pretrain@exclude", "attack@exclude", "continue@exclude"]
    assert lines[2].split()[-2:] == ["34.8", "h"]  # 12.52 M steps at 100/s plus 160 evaluation episodes at 1/s
    bad = estimate("paper", tmp_path / "none.json")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "none.json" in bad.stderr


def test_a_depth_run_is_predicted_with_its_overrides_and_stages(tmp_path: Path) -> None:
    bench = tmp_path / "bench.json"
    rates = {"meta_train": {"fedmeta_eps_per_s": 10.0}, "evaluation": {"fedmeta_eps_per_s": 1.0}}
    bench.write_text(json.dumps({"device": "cpu", **rates}))
    command = [sys.executable, "scripts/cost_estimate.py", "long", str(bench), "--stages", "attack"]
    deep = command + ["--set", "profiles.long.attack_episodes=50000"]
    done = subprocess.run(deep, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["attack@exclude", "attack@include", "all"]
    assert lines[1].split()[1] == "0.50"  # 50,000 episodes × 10 steps, plus two benign users' 1,000 each
    bad = subprocess.run(command + ["--set", "profiles.long"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1 and "--set profiles.long: expected KEY=VALUE" in bad.stderr
