"""Experiment 4 end to end: the larger federation's split, and a tiny-profile `dvc repro` of its stages."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from fedmeta import config, robust, splits
from fedmeta.data.omniglot import fetch_archives, load_omniglot

from conftest import sh, tiny_raw


def test_regroup_deals_the_classes_as_a_split_with_that_many_users(omniglot_dir: Path) -> None:
    raw = tiny_raw(omniglot_dir)
    images = load_omniglot(
        fetch_archives(str(omniglot_dir), raw["omniglot"]["archives"], Path("unused")), raw["omniglot"]["image_size"]
    )
    four = splits.split(images, config.parse(raw))
    raw["federation"].update(users=8, per_round=5, min_updates=5)
    eight = splits.split(images, config.parse(raw))
    regrouped = robust.regroup(four, 8, 0)
    assert regrouped.user_classes == eight.user_classes and regrouped.attack_owner == eight.attack_owner
    assert regrouped.train_idx is four.train_idx and sorted(sum(regrouped.user_classes, [])) == sorted(
        sum(four.user_classes, [])
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.pipeline
def test_experiment4_stages_reproduce_on_the_tiny_profile(tiny_repo: Path) -> None:
    """The tiny pipeline's Experiment-4 stages (the baseline rule only: conftest.tiny_pipeline_raw), the report's
    section and figure; `mean` on the paper's federation is Experiment 1, round for round and bit for bit."""
    m = tiny_repo / "metrics"
    names = {p.stem for p in (m / "exp4").glob("*.json")}
    assert names == {
        "naive-mean-exclude-m4",
        "naive-mean-include-m4",
        "adaptive-norm_clip-exclude-m4",
        "adaptive-norm_clip-include-m4",
        "benign-mean-exclude-m4",
        *(f"naive-{a}-secure-{v}-m4" for a in ("mean", "norm_clip") for v in ("exclude", "include")),
    }
    for scenario, variant in (("a", "exclude"), ("b", "include"), ("c", "include")):
        assert _rows(m / f"exp4/naive-mean-{variant}-m4/{scenario}.csv") == _rows(m / f"exp1_{variant}/{scenario}.csv")
    secure = json.loads((m / "exp4/naive-norm_clip-secure-include-m4.json").read_text())
    assert {"attack_round", "final", "user_finetune", "user_defense"} <= set(secure["c"])
    benign = json.loads((m / "exp4/benign-mean-exclude-m4.json").read_text())
    assert benign["round"] == 3 and 0 <= benign["meta_test"] <= 1
    text = (m / "report.md").read_text()
    assert "## Experiment 4" in text and "| m4 | adaptive | norm_clip | a |" in text and "| norm_clip | c |" in text
    assert (tiny_repo / "docs/figures/exp4_defenses.png").is_file()


@pytest.mark.pipeline
def test_a_robust_rule_on_a_larger_federation_runs(tiny_repo: Path, tmp_path: Path) -> None:
    """The median on a federation of 8 users (the tiny data's stand-in for the quick profile's 20), from the
    tiny pipeline's pretrained model, for experiment4.rounds benign rounds after the attack."""
    for rel in ("data/prepared/dataset.pt", "checkpoints/pretrain_include.pt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tiny_repo / rel, tmp_path / rel)
    raw = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    raw["experiment4"]["federations"]["m8"] = {
        "federation": {
            "users": 8,
            "per_round": 5,
            "min_updates": 5,
            "trimmed_mean": {"beta": 0.2},
            "multi_krum": {"f": 1, "m": 3},
        }
    }
    raw["experiment4"]["rounds"] = 1  # fewer benign rounds than the profile's continuation_rounds (2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    sh(tmp_path, "fedmeta", "exp4", "median", "include", "m8")
    for scenario in ("b", "c"):
        assert [r["round"] for r in _rows(tmp_path / f"metrics/exp4/naive-median-include-m8/{scenario}.csv")] == [
            "1",
            "2",
        ]
