"""The summary across seeds: collecting runs from the workspace and DVC experiment refs, the claims per seed, the
Student-t interval, and the refusals."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedmeta import runtime, seed_runs, seeds
from fedmeta.errors import FedmetaError

from conftest import REPO, sh

STEPS = [0, 10, 20]


def point(acc: float, ci: float = 0.02) -> dict[str, float]:
    return {
        f"{k}{suffix}": (acc if k.startswith("attack") else 0.95) if not suffix else ci
        for k in ("attack_train", "attack_val", "main", "meta_test")
        for suffix in ("", "_ci95")
    }


def write_run(root: Path, seed: int, after_c: float, **params: object) -> None:
    """The paper's stages' metric files of one run. Scenario (c)'s backdoor accuracy after the attack is
    `after_c`; it persists in (a) and (b), and falls to nothing in (c)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text()) | {"seed": seed} | params
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    m = root / "metrics"
    after = {"a": 0.97, "b": 0.98, "c": after_c}
    final = {"a": 0.5, "b": 0.4, "c": 0.01}
    for v, scen in (("exclude", ["a"]), ("include", ["b", "c"])):
        runtime.write_json(m / f"attack_{v}.json", {s: {"before": point(0.1), "after": point(after[s])} for s in scen})
        positions = {s: {"attacked": {"random": point(0.2, ci=0.1), "output_4": point(after[s])}} for s in scen}
        runtime.write_json(m / f"positions_{v}.json", positions)
        for s in scen:
            rounds = [point(0.1), point(after[s]), point(final[s])]
            runtime.write_csv(m / f"exp1_{v}" / f"{s}.csv", [{"round": i, **p} for i, p in enumerate(rounds)])
            for user in (2, 3):
                exp2 = [{"step": t, **point(after[s] - t / 100, ci=0.01)} for t in STEPS]
                exp3 = [{"step": t, **point(0.15) | {"meta_test": 0.9}} for t in STEPS]
                runtime.write_csv(m / f"finetune_{v}" / f"{s}_user{user}.csv", exp2)
                runtime.write_csv(m / f"defend_{v}" / f"{s}_user{user}.csv", exp3)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository whose workspace holds seed 0 and whose DVC experiment refs hold seeds 1 and 2, as
    `dvc exp run --queue -S seed=N` leaves them; seed 2's attack in (c) does not rise above the pretrained's."""
    sh(tmp_path, "git", "init", "-q")
    refs = {}
    for seed, after_c in ((1, 0.6), (2, 0.11)):
        write_run(tmp_path, seed, after_c)
        sh(tmp_path, "git", "add", "-A")
        sh(tmp_path, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", f"seed {seed}")
        refs[seed] = sh(tmp_path, "git", "rev-parse", "HEAD").strip()
    for seed, rev in refs.items():
        sh(tmp_path, "git", "update-ref", f"refs/exps/ab/cdef/seed-{seed}", rev)
    sh(tmp_path, "git", "update-ref", "refs/exps/exec/EXEC_HEAD", refs[1])
    write_run(tmp_path, 0, 0.65)
    return tmp_path


def sources(repo: Path, *names: str) -> list[tuple[str, str | None]]:
    return [("the workspace", None)] + [(n, seed_runs.experiment_ref(repo, n)) for n in names]


def test_claims_are_stated_per_seed_and_marked_where_one_seed_fails(repo: Path) -> None:
    out = repo / "metrics" / "seeds"
    seed_runs.collect(repo, sources(repo, "seed-1", "seed-2"), out)
    assert sorted(p.name for p in out.iterdir()) == ["seed_0", "seed_1", "seed_2"]
    assert (out / "seed_2" / "finetune_include" / "c_user3.csv").is_file()
    written = seeds.write(out)
    assert all(p.is_file() for p in written)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1, 2]
    by = {(c["scenario"], c["claim"].split(":")[0]): c for c in summary["claims"]}
    attack_c = by[("c", "the attack succeeds in one shot")]
    assert attack_c["per_seed"] == {"0": 0.65, "1": 0.6, "2": 0.11}
    assert attack_c["holds"] == {"0": True, "1": True, "2": False}  # 0.11 - 0.02 is not above 0.1 + 0.02
    assert by[("a", "the attack succeeds in one shot")]["holds"] == {"0": True, "1": True, "2": True}
    assert by[("a", "it persists through benign fine-tuning")]["mean"] == pytest.approx(0.97 - 0.2)
    assert by[("a", "the defense costs meta-test accuracy")]["mean"] == pytest.approx(0.05)
    assert all(c["holds"] == {"0": True, "1": True, "2": True} for k, c in by.items() if "defense" in k[1])
    text = (out / "report.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("| c | the attack succeeds"))
    assert "65.0, 60.0, 11.0" in line and "2 / 3 **not every seed**" in line
    assert "seeds 0, 1, 2" in text


def test_the_interval_over_seeds_is_students_t() -> None:
    mean, half, lo, hi = seeds.across([1.0, 2.0, 3.0])
    assert (mean, lo, hi) == (2.0, 1.0, 3.0)
    assert half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t(0.975, 2) · sd 1 / √3
    assert math.isnan(seeds.across([0.5])[1])


def test_collecting_again_replaces_those_seeds_and_keeps_the_others(repo: Path) -> None:
    out = repo / "metrics" / "seeds"
    seed_runs.collect(repo, sources(repo, "seed-1"), out)
    seed_runs.collect(repo, [("seed-2", seed_runs.experiment_ref(repo, "seed-2"))], out)
    assert sorted(p.name for p in out.iterdir()) == ["seed_0", "seed_1", "seed_2"]
    write_run(repo, 0, 0.3)
    seed_runs.collect(repo, sources(repo), out)
    assert json.loads((out / "seed_0" / "attack_include.json").read_text())["c"]["after"]["attack_train"] == 0.3
    assert sorted(p.name for p in out.iterdir()) == ["seed_0", "seed_1", "seed_2"]


def test_redraws_from_the_collected_folders_alone(repo: Path) -> None:
    """Once collected, the summary needs neither the experiments nor the workspace's run: a fresh clone redraws it."""
    out = repo / "summary"
    seed_runs.collect(repo, sources(repo, "seed-1"), out)
    seeds.write(out)
    first = (out / "report.md").read_text()
    for ref in sh(repo, "git", "for-each-ref", "--format=%(refname)", "refs/exps").split():
        sh(repo, "git", "update-ref", "-d", ref)
    shutil.rmtree(repo / "metrics")
    seeds.write(out)
    assert (out / "report.md").read_text() == first and "seeds 0, 1" in first


def test_refusals_name_the_run_and_what_is_wrong(repo: Path) -> None:
    out = repo / "out"
    with pytest.raises(FedmetaError, match=r"^--exp nope: no DVC experiment has that name"):
        seed_runs.experiment_ref(repo, "nope")
    seeds_1 = seed_runs.experiment_ref(repo, "seed-1")
    with pytest.raises(FedmetaError, match=r"^again: seed 1 is already collected from seed-1; each seed once"):
        seed_runs.collect(repo, [("seed-1", seeds_1), ("again", seeds_1)], out)
    write_run(repo, 0, 0.65, profile="long")
    with pytest.raises(FedmetaError, match=r"^seed-1: parameter profile differs from the workspace's"):
        seed_runs.collect(repo, sources(repo, "seed-1"), out)
    assert not out.exists()  # nothing half-written
    seed_runs.collect(repo, [("seed-1", seeds_1)], out)
    with pytest.raises(FedmetaError, match=r"/out/seed_1: parameter profile differs from the workspace's"):
        seed_runs.collect(repo, sources(repo), out)  # the folder already there is checked too
    assert sorted(p.name for p in out.iterdir()) == ["seed_1"]
    with pytest.raises(FedmetaError, match=r"empty: no seed_<n>/ folders"):
        seeds.write(repo / "empty")


def test_the_command_collects_and_prints_what_it_wrote(repo: Path) -> None:
    cli = [sys.executable, "-m", "fedmeta"]
    done = subprocess.run(
        [*cli, "seeds", "metrics/seeds", "--exp", "seed-1", "--exp", "seed-2"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "metrics/seeds/report.md" in done.stdout and "metrics/seeds/exp3_omniglot.png" in done.stdout
    bad = subprocess.run([*cli, "seeds", "metrics/seeds", "--exp", "nope"], cwd=repo, capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
        "error: --exp nope: no DVC experiment has that name (see `dvc exp list --all-commits`)"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "usage: bash scripts/seeds.sh PROFILE SEED [SEED ...]"),
        (["quick", "one"], "seeds: SEED must be a non-negative integer, got 'one'"),
        (["nosuch", "1"], "seeds: PROFILE 'nosuch' is not under profiles: in params.yaml"),
    ],
)
def test_the_seeds_script_refuses_bad_arguments_before_queueing_anything(args: list[str], message: str) -> None:
    done = subprocess.run(["bash", "scripts/seeds.sh", *args], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == message
