"""Experiment 4 end to end: the larger federation's split, and a tiny-profile `dvc repro` of its stages."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from errors_common import cli_in_process

from fedmeta import config, splits
from fedmeta.data.omniglot import fetch_archives, load_omniglot
from fedmeta.regroup import regroup

from conftest import sh, tiny_raw


def test_regroup_deals_the_classes_as_a_split_with_that_many_users(omniglot_dir: Path) -> None:
    raw = tiny_raw(omniglot_dir)
    images = load_omniglot(
        fetch_archives(str(omniglot_dir), raw["omniglot"]["archives"], Path("unused")), raw["omniglot"]["image_size"]
    )
    four = splits.split(images, config.parse(raw))
    raw["federation"].update(users=8, per_round=5, min_updates=5)
    eight = splits.split(images, config.parse(raw))
    regrouped = regroup(four, 8, 0)
    assert regrouped.user_classes == eight.user_classes and regrouped.attack_owner == eight.attack_owner
    assert regrouped.train_idx is four.train_idx and sorted(sum(regrouped.user_classes, [])) == sorted(
        sum(four.user_classes, [])
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.pipeline
def test_experiment4_stages_reproduce_on_the_tiny_profile(tiny_repo: Path) -> None:
    """The tiny pipeline's Experiment-4 stages (the baseline rule only: conftest.tiny_pipeline_raw), its report and
    figure; `mean` on the paper's federation is Experiment 1, round for round and bit for bit, though
    its round 1 is the stage's shared round-1 work and Experiment 1's is the attack stage's own round."""
    m = tiny_repo / "metrics"
    summary, curves = m / "exp4/summary", m / "exp4/curves"
    names = {p.relative_to(summary).with_suffix("").as_posix() for p in summary.glob("*/*.json")}
    assert names == {
        "exclude-m4/naive-mean",
        "include-m4/naive-mean",
        "exclude-m4/adaptive-norm_clip",
        "include-m4/adaptive-norm_clip",
        "exclude-m4/benign-mean",
        *(f"{v}-m4/naive-{a}-secure" for a in ("mean", "norm_clip") for v in ("exclude", "include")),
    }
    for scenario, variant in (("a", "exclude"), ("b", "include"), ("c", "include")):
        assert _rows(curves / f"{variant}-m4/naive-mean/{scenario}.csv") == _rows(m / f"exp1_{variant}/{scenario}.csv")
    secure = json.loads((summary / "include-m4/naive-norm_clip-secure.json").read_text())
    assert {"attack_round", "final", "user_finetune", "user_defense"} <= set(secure["c"])
    benign = json.loads((summary / "exclude-m4/benign-mean.json").read_text())
    assert benign["round"] == 3 and 0 <= benign["meta_test"] <= 1
    assert not list((tiny_repo / "state").glob("exp4_*"))  # the resumable state goes once the stage is done
    text = (m / "exp4/report.md").read_text()
    assert "# Experiment 4" in text and "| m4 | adaptive | norm_clip | a |" in text and "| norm_clip | c |" in text
    assert (tiny_repo / "docs/figures/exp4_defenses.png").is_file()
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tiny_repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["fedmeta"], filter_string="tags.stage = 'exp4'")
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert sorted(parents["tags.variant"]) == ["exclude", "include"]  # one run per stage, one child per rule's run
    children = runs[runs["tags.mlflow.parentRunId"].isin(parents["run_id"])]  # below them: each run's curves
    assert len(children) == len(names) and set(children["tags.mlflow.parentRunId"]) == set(parents["run_id"])
    adaptive = children[children["tags.attacker"] == "adaptive"]
    assert set(adaptive["params.attack.norm_bound"]) == {adaptive["params.federation.norm_clip.clip_norm"].iloc[0]}


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
    raw["experiment4"]["aggregators"] = ["mean", "median"]
    raw["experiment4"]["rounds"] = 1  # fewer benign rounds than the profile's continuation_rounds (2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    sh(tmp_path, "fedmeta", "exp4", "include", "m8")
    written = {p.relative_to(tmp_path / "metrics/exp4").as_posix() for p in (tmp_path / "metrics/exp4").rglob("*.*")}
    runs = ("naive-mean", "naive-median", "adaptive-norm_clip")  # include: no benign runs; m8: no secure ones
    assert written == {f"summary/include-m8/{r}.json" for r in runs} | {
        f"curves/include-m8/{r}/{s}.csv" for r in runs for s in ("b", "c")
    }
    for scenario in ("b", "c"):
        rows = _rows(tmp_path / f"metrics/exp4/curves/include-m8/naive-median/{scenario}.csv")
        assert [r["round"] for r in rows] == ["1", "2"]


class Killed(Exception):
    pass


@pytest.mark.pipeline
def test_an_interrupted_stage_resumes_after_its_last_finished_run(
    tiny_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed in its third run, the stage keeps the two finished runs and their round-1 work in its state; run
    again, it computes only the rest, and writes an uninterrupted run's files byte for byte. The uninterrupted run
    is made in this process too, so that both share whatever kernels earlier tests bound in it."""
    from stages import exp4

    whole, tmp_path = tmp_path / "whole", tmp_path / "killed"
    for root in (whole, tmp_path):
        for rel in ("params.yaml", "data/prepared/dataset.pt", "checkpoints/pretrain_exclude.pt"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(tiny_repo / rel, root / rel)
    assert cli_in_process(whole, "exp4", "exclude", "m4").returncode == 0
    names = [r.name for r in exp4.runs("exclude", "m4", ["mean"])]
    calls: list[str] = []
    real = exp4._run

    def dying(exp, base, theta, variant, federation, run, *rest):  # type: ignore[no-untyped-def]
        calls.append(run.name)
        if calls == names[:3]:  # the first attempt's third run
            raise Killed
        return real(exp, base, theta, variant, federation, run, *rest)

    monkeypatch.setattr(exp4, "_run", dying)
    with pytest.raises(Killed):
        cli_in_process(tmp_path, "exp4", "exclude", "m4")
    state = torch.load(tmp_path / "state/exp4_exclude-m4.pt", weights_only=True)
    assert list(state["outputs"]) == names[:2] and set(state["work"]) == {"attacked"}
    assert not (tmp_path / "metrics").exists()
    calls.clear()
    resumed = cli_in_process(tmp_path, "exp4", "exclude", "m4")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming an interrupted run (2 done)" in resumed.stderr and calls == names[2:]
    for folder in ("summary", "curves"):
        ours, theirs = (root / "metrics/exp4" / folder / "exclude-m4" for root in (tmp_path, whole))
        files = sorted(p.relative_to(theirs) for p in theirs.rglob("*.*"))
        assert files and files == sorted(p.relative_to(ours) for p in ours.rglob("*.*"))
        assert all((ours / f).read_bytes() == (theirs / f).read_bytes() for f in files)
    assert not (tmp_path / "state/exp4_exclude-m4.pt").exists()
