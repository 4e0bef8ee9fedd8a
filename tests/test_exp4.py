"""Experiment 4 end to end: the larger federation's split, and a tiny-profile `dvc repro` of its stages."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_raw
from fedmeta import config, robust, splits
from fedmeta.data.omniglot import fetch_archives, load_omniglot
from test_pipeline import sh


def test_regroup_deals_the_classes_as_a_split_with_that_many_users(omniglot_dir: Path) -> None:
    raw = tiny_raw(omniglot_dir)
    images = load_omniglot(fetch_archives(str(omniglot_dir), raw["omniglot"]["archives"], Path("unused")), raw["omniglot"]["image_size"])
    four = splits.split(images, config.parse(raw))
    raw["federation"].update(users=8, per_round=5, min_updates=5)
    eight = splits.split(images, config.parse(raw))
    regrouped = robust.regroup(four, 8, 0)
    assert regrouped.user_classes == eight.user_classes and regrouped.attack_owner == eight.attack_owner
    assert regrouped.train_idx is four.train_idx and sorted(sum(regrouped.user_classes, [])) == sorted(sum(four.user_classes, []))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.pipeline
def test_experiment4_stages_reproduce_on_the_tiny_profile(tmp_path: Path, omniglot_dir: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True)
    for rel in files.stdout.split():
        if rel.startswith(("metrics/", "tests/")) or not (REPO / rel).is_file():
            continue
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, tmp_path / rel)
    raw = tiny_raw(omniglot_dir)
    # The tiny data has few classes: a federation of 8 stands in for the quick profile's 20.
    raw["experiment4"]["federations"]["m20"]["federation"].update(users=8, per_round=5, min_updates=5, trimmed_mean={"beta": 0.2}, multi_krum={"f": 1, "m": 3})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, "git", "add", "-A")
    sh(tmp_path, "git", "commit", "-qm", "tiny")
    sh(tmp_path, "dvc", "repro", "continue", "exp4", "exp4_adaptive", "exp4_benign", "exp4_secure")
    m = tmp_path / "metrics"
    names = {p.stem for p in (m / "exp4").glob("*.json")}
    assert len(names) == 24 + 4 + 12 + 4
    # The mean rule on the paper's federation is Experiment 1, round for round and bit for bit.
    for scenario, variant in (("a", "exclude"), ("b", "include"), ("c", "include")):
        assert _rows(m / f"exp4/naive-mean-{variant}-m4/{scenario}.csv") == _rows(m / f"exp1_{variant}/{scenario}.csv")
        rounds = [r["round"] for r in _rows(m / f"exp4/naive-median-{variant}-m20/{scenario}.csv")]
        assert rounds == ["1", "2", "3"]
    secure = json.loads((m / "exp4/naive-norm_clip-secure-include-m4.json").read_text())
    assert {"attack_round", "final", "user_finetune", "user_defense"} <= set(secure["c"])
    benign = json.loads((m / "exp4/benign-flame-exclude-m20.json").read_text())
    assert benign["round"] == 3 and 0 <= benign["meta_test"] <= 1
    sh(tmp_path, "dvc", "repro", "report")
    text = (m / "report.md").read_text()
    assert "## Experiment 4" in text and "| m20 | adaptive | norm_clip | a |" in text and "| norm_clip | c |" in text
    assert (tmp_path / "docs/figures/exp4_defenses.png").is_file()
    assert "Running stage" not in sh(tmp_path, "dvc", "repro", "report")
