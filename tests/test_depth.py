"""The depth sweep's collection and report: runs found by experiment name, a run's full experiment preferred to
its attack-only one, each run's attacker read from its params, and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_seeds import write_run

from fedmeta import depth
from fedmeta.errors import FedmetaError

from conftest import sh


def commit_as_experiment(repo: Path, name: str, seed: int, episodes: int, epochs: int, target: str) -> None:
    """A run's metric files committed and referenced as DVC keeps experiment `name`."""
    write_run(repo, seed, 0.6)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["profile"] = "long"
    params["profiles"]["long"].update(attack_episodes=episodes, attack_inner_epochs=epochs)
    params["attack"]["target_output"] = target
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    sh(repo, "git", "add", "-A")
    # a part's commit holds the baseline's files of the stages it did not run, as DVC's do
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--allow-empty", "-qm", name)
    sh(repo, "git", "update-ref", f"refs/exps/ab/cdef/{name}", sh(repo, "git", "rev-parse", "HEAD").strip())


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    sh(tmp_path, "git", "init", "-q")
    commit_as_experiment(tmp_path, "depth-50000x2", 0, 50000, 2, "fixed")
    commit_as_experiment(tmp_path, "depth-50000x2-attack", 0, 50000, 2, "fixed")
    commit_as_experiment(tmp_path, "depth-1000x50-random-attack", 0, 1000, 50, "random")
    commit_as_experiment(tmp_path, "seed-1", 1, 50, 2, "fixed")  # not a depth run
    return tmp_path


def test_runs_are_collected_by_name_and_the_full_run_wins(repo: Path) -> None:
    out = repo / "metrics" / "depth"
    assert depth.collect(repo, out) == ["1000x50-random", "50000x2"]
    assert sorted(p.name for p in out.iterdir()) == ["1000x50-random", "50000x2"]
    runs = {r.label: r for r in depth.load_all(out)}
    assert not (out / "1000x50-random" / "exp1_exclude").exists()  # an attack-only part's baseline files stay out
    assert runs["50000x2"].attacker == depth.Attacker(50000, 2, "fixed", 0, (1.0, 0.003))
    assert runs["1000x50-random"].attacker.target_output == "random"
    assert set(runs["50000x2"].exp2) == {"a", "b", "c"}


def test_report_states_each_run_and_draws_the_figures(repo: Path) -> None:
    out = repo / "metrics" / "depth"
    depth.collect(repo, out, ["50000x2"])
    written = depth.write(out)
    text = (out / "report.md").read_text()
    assert "| 50,000 × 2, fixed | c |" in text
    assert "≈ 40 / 40" in text  # the paper's (c) after 50 rounds, beside ours
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)


def test_an_unknown_run_is_refused_before_anything_is_written(repo: Path) -> None:
    out = repo / "metrics" / "depth"
    with pytest.raises(FedmetaError, match=r"--run 5x2: no DVC experiment depth-5x2\[-attack\|-exp1\]; found: 1000x50"):
        depth.collect(repo, out, ["50000x2", "5x2"])
    assert not out.exists()
