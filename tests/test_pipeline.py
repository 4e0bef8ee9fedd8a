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
        "metrics/heads_exclude.json",
        "metrics/heads_include.json",
    ):
        assert (repo / rel).is_file(), rel
    with (repo / "metrics/exp1_exclude/a.csv").open() as f:
        rounds = [row["round"] for row in csv.DictReader(f)]
    assert rounds == ["0", "1", "2", "3"]  # before the attack, the attack round, two benign rounds
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["fedmeta"])
    stages = {
        "prepare",
        "pretrain",
        "attack",
        "positions",
        "continue",
        "finetune",
        "defend",
        "ablation",
        "heads",
        "report",
    }
    assert stages <= set(runs["tags.stage"])
    assert (runs["tags.profile"] == "tiny").all()
    # one key per quantity; the scenario is a tag of the nested run that holds the curve
    scenario_a = runs[runs["tags.scenario"] == "a"]
    assert scenario_a["metrics.attack_train"].notna().any()


def test_positions_cover_every_output_of_the_attacked_model_and_the_pretrained_base_rate(repo: Path) -> None:
    """Output N − 1 comes from the attack stage's metrics (tests/test_evaluation.py shows it is the same
    measurement); the others are measured, for the pretrained model only the random one."""
    for variant in ("exclude", "include"):
        attack = json.loads((repo / f"metrics/attack_{variant}.json").read_text())
        positions = json.loads((repo / f"metrics/positions_{variant}.json").read_text())
        assert set(positions) == set(attack)
        for point in positions.values():
            assert set(point) == {"pretrained", "attacked"}
            assert set(point["attacked"]) == {*(f"output_{k}" for k in range(5)), "random"}
            assert set(point["pretrained"]) == {"output_4", "random"}
            for model in point.values():
                assert all(
                    set(p)
                    == {"main", "attack_train", "attack_val"}
                    | {f"{k}_ci95" for k in ("main", "attack_train", "attack_val")}
                    for p in model.values()
                )
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


def test_continuation_measured_every_k_rounds_trains_the_same_rounds(repo: Path, tmp_path: Path) -> None:
    """With `continuation_eval_every: 2` of 2 rounds only the last is measured, and measuring fewer rounds does not
    move the training: its point equals the every-round run's."""
    for rel in ("data/prepared/dataset.pt", "checkpoints/attacked_exclude.pt", "metrics/attack_exclude.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes((repo / rel).read_bytes())
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["profiles"]["tiny"]["continuation_eval_every"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    sh(tmp_path, "fedmeta", "continue", "exclude")
    with (repo / "metrics/exp1_exclude/a.csv").open() as f:
        every = list(csv.DictReader(f))
    with (tmp_path / "metrics/exp1_exclude/a.csv").open() as f:
        sparse = list(csv.DictReader(f))
    assert [r["round"] for r in every] == ["0", "1", "2", "3"] and [r["round"] for r in sparse] == ["0", "1", "3"]
    assert sparse[-1] == every[-1]


def test_second_repro_does_nothing(repo: Path) -> None:
    out = sh(repo, "dvc", "repro", "-P")
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
