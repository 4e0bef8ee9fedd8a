"""End to end: `dvc repro` of the whole pipeline on the tiny profile, in a temporary copy of the repo."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from conftest import sh

pytestmark = pytest.mark.pipeline
METRIC_FILES = (
    "metrics/attack_exclude.json",
    "metrics/exp1_include/b.csv",
    "metrics/finetune_exclude/a_user2.csv",
    "metrics/report.md",
)


@pytest.fixture()
def repo(tiny_repo: Path) -> Path:
    return tiny_repo


def test_repro_produces_every_output_and_logs_to_mlflow(repo: Path) -> None:
    for rel in (
        *METRIC_FILES,
        "checkpoints/attacked_include.pt",
        "docs/figures/exp1_omniglot.png",
        "docs/figures/exp3_omniglot.png",
        "metrics/figures/backdoor_omniglot.png",
        "metrics/ablation.csv",
        "metrics/positions_exclude.json",
        "metrics/positions_include.json",
    ):
        assert (repo / rel).is_file(), rel
    with (repo / "metrics/exp1_exclude/a.csv").open() as f:
        rounds = [row["round"] for row in csv.DictReader(f)]
    assert rounds == ["0", "1", "2", "3"]  # before the attack, the attack round, two benign rounds
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["fedmeta"])
    stages = {"prepare", "pretrain", "attack", "positions", "continue", "finetune", "defend", "ablation", "report"}
    assert stages <= set(runs["tags.stage"])
    assert (runs["tags.profile"] == "tiny").all()
    assert runs["metrics.a.attack_train"].notna().any()


def test_positions_at_the_attackers_output_repeat_the_attack_stages_numbers(repo: Path) -> None:
    """With evaluation.target_output = last the attack stage measures at output N − 1 on the same seeds:
    the positions stage's output N − 1 must give its numbers exactly, before and after the attack."""
    for variant in ("exclude", "include"):
        attack = json.loads((repo / f"metrics/attack_{variant}.json").read_text())
        positions = json.loads((repo / f"metrics/positions_{variant}.json").read_text())
        assert set(positions) == set(attack)
        for scenario, point in positions.items():
            assert set(point["attacked"]) == {*(f"output_{k}" for k in range(5)), "random"}
            for model, when in (("pretrained", "before"), ("attacked", "after")):
                for key in ("main", "attack_train", "attack_val", "attack_train_ci95"):
                    assert point[model]["output_4"][key] == attack[scenario][when][key]
    assert "## Where the target sits in the user's episodes" in (repo / "metrics/report.md").read_text()


def test_ablation_has_every_variant_and_reuses_experiments_2_and_3_exactly(repo: Path) -> None:
    with (repo / "metrics/ablation.csv").open() as f:
        rows = {(r["removed"], r["scenario"]): r for r in csv.DictReader(f)}
    assert set(rows) == {
        (v, s) for v in ("none", "attention", "reinit", "finetune", "defense", "attack") for s in "abc"
    }
    assert rows[("finetune", "a")]["steps"] == "0"
    for removed, stage in (("none", "defend"), ("defense", "finetune")):
        for scenario, variant in (("a", "exclude"), ("b", "include"), ("c", "include")):
            final = json.loads((repo / f"metrics/{stage}_{variant}.json").read_text())[f"{scenario}_user2"]
            assert float(rows[(removed, scenario)]["attack_train"]) == final["attack_train"]
            assert float(rows[(removed, scenario)]["meta_test"]) == final["meta_test"]


def test_meta_test_command_repeats_the_pipelines_episodes_and_draws_more(repo: Path) -> None:
    """`fedmeta meta-test` starts from Experiments 2-3's meta-test episodes: with the budget's count it gives
    Experiment 2's meta-test curve exactly; asked for more, it adds episodes."""
    with (repo / "metrics/finetune_include/b_user2.csv").open() as f:
        exp2 = [(int(r["step"]), float(r["meta_test"])) for r in csv.DictReader(f)]
    count = yaml.safe_load((repo / "params.yaml").read_text())["profiles"]["tiny"]["eval_episodes"]
    for n in (count, 3 * count):
        sh(
            repo,
            "fedmeta",
            "meta-test",
            "checkpoints/attacked_include.pt",
            "--episodes",
            str(n),
            "--out",
            f"mt{n}.json",
        )
    same, more = (json.loads((repo / f"mt{n}.json").read_text()) for n in (count, 3 * count))
    assert [(r["step"], r["meta_test"]) for r in same["curve"]] == exp2
    assert more["episodes"] == 3 * count and [r["step"] for r in more["curve"]] == [s for s, _ in exp2]


def test_second_repro_does_nothing(repo: Path) -> None:
    out = sh(repo, "dvc", "repro")
    assert "Running stage" not in out


def test_forced_rerun_gives_byte_identical_metrics(repo: Path) -> None:
    before = {rel: (repo / rel).read_bytes() for rel in METRIC_FILES}
    sh(repo, "dvc", "repro", "-f", "-s", "attack@exclude", "continue@include", "finetune@exclude", "report")
    after = {rel: (repo / rel).read_bytes() for rel in METRIC_FILES}
    assert before == after


def test_exp_run_with_a_larger_boost_changes_the_attack_metrics(repo: Path) -> None:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline results")
    base = json.loads((repo / "metrics/attack_exclude.json").read_text())
    sh(repo, "dvc", "exp", "run", "-S", "attack.boost=5", "attack@exclude")  # the stage the boost acts on first
    boosted = json.loads((repo / "metrics/attack_exclude.json").read_text())
    assert boosted["a"]["before"] == base["a"]["before"]
    assert boosted["a"]["after"] != base["a"]["after"]
    shown = sh(repo, "dvc", "exp", "show", "--no-pager", "--csv")
    assert "attack.boost" in shown and ",5," in shown.replace(",5.0,", ",5,")
